import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

interface Teardown {
  teardown(fn: () => unknown): void
}

/**
 * A real origin over node:http for the tests: serves `values` by path as JSON (404 when
 * absent), counts calls, tracks how many are in flight, and can be slowed, held, failed
 * or changed while a test runs.
 */
export class OriginServer {
  readonly values = new Map<string, unknown>()
  /** Paths in the order requests arrived. */
  readonly log: string[] = []
  /** performance.now() of each request's arrival. */
  readonly arrivals: number[] = []
  readonly headers: IncomingMessage['headers'][] = []
  calls = 0
  inFlight = 0
  maxInFlight = 0
  /** Delay before answering, in ms. */
  delayMs = 0
  /** The next `failNext` requests answer `failStatus`. */
  failNext = 0
  /** Every request answers this status (until unset). */
  failAll: number | undefined
  failStatus = 500
  /** With `hold()`, only requests for this path wait (undefined: all). */
  holdPath: string | undefined
  /** Never answer (timeouts). */
  hang = false
  #gate: Promise<void> | undefined
  #release: (() => void) | undefined
  #waiters: Array<{ n: number; resolve: () => void }> = []
  readonly #server: Server
  #port = 0

  constructor() {
    this.#server = createServer((req, res) => void this.#handle(req, res))
  }

  static async start(t: Teardown): Promise<OriginServer> {
    const origin = new OriginServer()
    await new Promise<void>((resolve) => origin.#server.listen(0, '127.0.0.1', resolve))
    origin.#port = (origin.#server.address() as AddressInfo).port
    t.teardown(() => origin.close())
    return origin
  }

  get base(): string {
    return `http://127.0.0.1:${this.#port}`
  }

  /** Holds every answer until `release()`. */
  hold(): void {
    this.#gate = new Promise((resolve) => (this.#release = resolve))
  }

  release(): void {
    this.#release?.()
    this.#gate = undefined
  }

  /** Resolves once `n` calls have arrived in all. */
  waitForCalls(n: number): Promise<void> {
    if (this.calls >= n) return Promise.resolve()
    return new Promise((resolve) => this.#waiters.push({ n, resolve }))
  }

  close(): Promise<void> {
    this.release()
    this.#server.closeAllConnections()
    return new Promise((resolve) => this.#server.close(() => resolve()))
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    this.calls++
    this.log.push(req.url ?? '')
    this.arrivals.push(performance.now())
    this.headers.push(req.headers)
    this.inFlight++
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight)
    this.#waiters = this.#waiters.filter((w) => (this.calls >= w.n ? (w.resolve(), false) : true))
    try {
      if (this.hang) return
      // The answer is read on arrival, as an origin reads its database before a slow reply.
      const path = req.url ?? ''
      let status = 200
      let body: string
      if (this.failAll !== undefined || this.failNext > 0) {
        if (this.failNext > 0) this.failNext--
        status = this.failAll ?? this.failStatus
        body = '{"error":"boom"}'
      } else if (!this.values.has(path)) {
        status = 404
        body = '{"error":"not_found"}'
      } else {
        body = JSON.stringify(this.values.get(path))
      }
      if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs))
      if (this.#gate && (this.holdPath === undefined || this.holdPath === path)) await this.#gate
      res.writeHead(status, { 'content-type': 'application/json' }).end(body)
    } finally {
      if (!this.hang) this.inFlight--
    }
  }
}

/**
 * With the origin held (`hold()`) and `base` its call count before a load starts: runs
 * `invalidate` while the load's call and then its retry's are held, so both are voided.
 */
export async function voidBothLoads(origin: OriginServer, base: number, invalidate: () => Promise<{ statusCode: number }>): Promise<void> {
  for (const n of [base + 1, base + 2]) {
    await origin.waitForCalls(n)
    const { statusCode } = await invalidate()
    if (statusCode !== 200) throw new Error(`the invalidation failed: ${statusCode}`)
    origin.release()
    if (n === base + 1) origin.hold()
  }
}

/** A CONFIG_FILE origin serving `dashboard:{userId}` from this server. */
export function dashboardOrigin(origin: OriginServer, extra: Record<string, unknown> = {}) {
  return {
    name: 'dashboards',
    keyPattern: 'dashboard:{userId}',
    url: `${origin.base}/users/{userId}/dashboard`,
    ttlMs: 10_000,
    tags: ['analytics:{userId}'],
    timeoutMs: 2000,
    retries: 0,
    backoffMs: 10,
    ...extra,
  }
}
