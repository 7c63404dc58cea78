import { Agent, request } from 'undici'
import type { OriginSpec } from './config.js'

/** Longest single backoff, however many retries an origin allows. */
export const MAX_BACKOFF_MS = 10_000
/**
 * Requests in flight per origin host (and keep-alive connections kept to it): loads are
 * single-flight and refreshes bounded, so few are needed. More wait for a slot before
 * their attempt starts, so a queue here never eats into an attempt's timeout.
 */
export const CONNECTIONS_PER_ORIGIN = 32
const KEEP_ALIVE_MS = 30_000

/** What an origin said: the value, or that it has none (404/410). */
export type FetchOutcome = { found: true; value: unknown } | { found: false }

export type OriginResult = 'success' | 'error' | 'timeout'

/** An origin that could not answer after every attempt. */
export class OriginError extends Error {
  constructor(readonly origin: string, message: string, readonly result: 'error' | 'timeout') {
    super(message)
    this.name = 'OriginError'
  }
}

export interface OriginClientOptions {
  /** Called once per attempt, an HTTP call or a wait for a connection that timed out (the `origin_request` telemetry event). */
  onAttempt?: (event: { origin: string; result: OriginResult; durationMs: number }) => void
  /** Largest body accepted from an origin. */
  maxBodyBytes: number
  /** Jitter source; tests may pin it. */
  random?: () => number
}

/** A failed attempt, and whether another attempt may help. */
class AttemptError extends Error {
  constructor(message: string, readonly retryable: boolean, readonly timeout = false) {
    super(message)
  }
}

/**
 * Fetches values from origins over one keep-alive undici Agent: a timeout per attempt,
 * retries with exponential backoff and jitter on network errors, timeouts, 5xx, 408 and 429.
 */
export class OriginClient {
  readonly #agent = new Agent({ keepAliveTimeout: KEEP_ALIVE_MS, connections: CONNECTIONS_PER_ORIGIN })
  readonly #options: OriginClientOptions
  readonly #random: () => number
  readonly #inflight = new Set<AbortController>()
  readonly #sleeps = new Set<() => void>()
  /** Per origin host (URL origin): attempts in flight, and those waiting for one to end. */
  readonly #slots = new Map<string, { busy: number; waiting: Array<(granted: boolean | 'late') => void> }>()
  #closed = false

  constructor(options: OriginClientOptions) {
    this.#options = options
    this.#random = options.random ?? Math.random
  }

  /** GETs `url` from the origin, retrying as the origin allows; throws OriginError when every attempt failed. */
  async fetch(origin: OriginSpec, url: string): Promise<FetchOutcome> {
    for (let attempt = 0; ; attempt++) {
      let started = performance.now()
      let host: string | undefined
      try {
        host = await this.#acquire(origin, url)
        started = performance.now()
        const outcome = await this.#attempt(origin, url)
        this.#report(origin.name, 'success', started)
        return outcome
      } catch (error) {
        if (error instanceof OriginError) throw error // closed while waiting for a slot
        const e = error instanceof AttemptError ? error : new AttemptError((error as Error).message, true)
        this.#report(origin.name, e.timeout ? 'timeout' : 'error', started)
        if (!e.retryable || attempt >= origin.retries || this.#closed) {
          const tries = attempt + 1
          const message = `${e.message} (after ${tries} attempt${tries === 1 ? '' : 's'})`
          throw new OriginError(origin.name, message, e.timeout ? 'timeout' : 'error')
        }
      } finally {
        if (host !== undefined) this.#releaseSlot(host)
      }
      await this.#sleep(this.backoff(origin.backoffMs, attempt))
    }
  }

  /**
   * The wait before retry `attempt + 1`: base * 2^attempt, capped, with "equal jitter"
   * (half fixed, half random), so retries spread out yet each wait at least doubles the floor.
   */
  backoff(baseMs: number, attempt: number): number {
    const ceiling = Math.min(MAX_BACKOFF_MS, baseMs * 2 ** attempt)
    return ceiling / 2 + this.#random() * (ceiling / 2)
  }

  /** Aborts in-flight calls and pending retries, then closes the connections. */
  async close(): Promise<void> {
    this.#closed = true
    for (const controller of this.#inflight) controller.abort()
    for (const wake of this.#sleeps) wake()
    for (const slots of this.#slots.values()) for (const wake of slots.waiting.splice(0)) wake(false)
    await this.#agent.close().catch(() => {})
  }

  /**
   * Waits for one of the host's CONNECTIONS_PER_ORIGIN slots, first come first served, for at
   * most the origin's timeoutMs (then the attempt fails as a timeout, and may be retried);
   * returns the host to release. undici would queue the request itself, but with the
   * attempt's timer already running.
   */
  async #acquire(origin: OriginSpec, url: string): Promise<string> {
    if (this.#closed) throw new OriginError(origin.name, 'shutting down', 'error')
    const host = hostOf(url)
    let slots = this.#slots.get(host)
    if (slots === undefined) this.#slots.set(host, (slots = { busy: 0, waiting: [] }))
    if (slots.busy < CONNECTIONS_PER_ORIGIN) {
      slots.busy++
      return host
    }
    // A release hands its slot straight to the first waiter (true); close wakes them with false.
    const queue = slots.waiting
    let timer: NodeJS.Timeout | undefined
    const granted = await new Promise<boolean | 'late'>((resolve) => {
      queue.push(resolve)
      timer = setTimeout(() => {
        const at = queue.indexOf(resolve)
        if (at === -1) return // granted or closed meanwhile
        queue.splice(at, 1)
        resolve('late')
      }, origin.timeoutMs)
      timer.unref()
    })
    clearTimeout(timer)
    if (granted === 'late') {
      throw new AttemptError(`origin "${origin.name}" had no free connection within ${origin.timeoutMs} ms (${CONNECTIONS_PER_ORIGIN} in use)`, true, true)
    }
    if (!granted) throw new OriginError(origin.name, 'shutting down', 'error')
    return host
  }

  #releaseSlot(host: string): void {
    const slots = this.#slots.get(host)!
    const next = slots.waiting.shift()
    if (next !== undefined) return next(true)
    if (--slots.busy === 0) this.#slots.delete(host)
  }

  async #attempt(origin: OriginSpec, url: string): Promise<FetchOutcome> {
    const controller = new AbortController()
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      controller.abort()
    }, origin.timeoutMs)
    timer.unref()
    this.#inflight.add(controller)
    try {
      const res = await request(url, {
        method: 'GET',
        headers: { accept: 'application/json', ...origin.headers },
        dispatcher: this.#agent,
        signal: controller.signal,
      })
      if (res.statusCode === 404 || res.statusCode === 410) {
        await res.body.dump()
        return { found: false }
      }
      if (res.statusCode < 200 || res.statusCode >= 300) {
        await res.body.dump()
        const retryable = res.statusCode >= 500 || res.statusCode === 408 || res.statusCode === 429
        throw new AttemptError(`origin "${origin.name}" answered ${res.statusCode}`, retryable)
      }
      const text = await readCapped(res.body, this.#options.maxBodyBytes)
      if (text === undefined) {
        throw new AttemptError(`origin "${origin.name}" sent more than ${this.#options.maxBodyBytes} bytes`, false)
      }
      try {
        return { found: true, value: JSON.parse(text) }
      } catch {
        throw new AttemptError(`origin "${origin.name}" sent a body that is not JSON`, false)
      }
    } catch (error) {
      if (error instanceof AttemptError) throw error
      if (timedOut) throw new AttemptError(`origin "${origin.name}" timed out after ${origin.timeoutMs} ms`, true, true)
      if (this.#closed) throw new AttemptError(`the call to origin "${origin.name}" was cut short: this instance is shutting down`, false)
      // Never echo the URL: its query may carry credentials.
      const code = (error as { code?: string }).code
      throw new AttemptError(`origin "${origin.name}" is unreachable${code ? ` (${code})` : ''}`, !this.#closed)
    } finally {
      clearTimeout(timer)
      this.#inflight.delete(controller)
    }
  }

  #report(origin: string, result: OriginResult, started: number): void {
    this.#options.onAttempt?.({ origin, result, durationMs: Math.round((performance.now() - started) * 1000) / 1000 })
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer)
        this.#sleeps.delete(wake)
        resolve()
      }
      const timer = setTimeout(wake, ms)
      timer.unref()
      this.#sleeps.add(wake)
    })
  }
}

/** The URL's origin (scheme, host, port); a URL that does not parse (undici refuses it too) is its own host. */
function hostOf(url: string): string {
  try {
    return new URL(url).origin
  } catch {
    return url
  }
}

/** Reads a body as UTF-8, or undefined (and the rest discarded) once it passes `max` bytes. */
async function readCapped(body: AsyncIterable<Buffer> & { destroy(): unknown }, max: number): Promise<string | undefined> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of body) {
    size += chunk.length
    if (size > max) {
      body.destroy()
      return undefined
    }
    chunks.push(chunk)
  }
  return Buffer.concat(chunks).toString('utf8')
}
