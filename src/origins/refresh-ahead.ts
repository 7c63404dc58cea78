/** Most keys waiting for a background refresh; past it new ones are dropped until the queue drains (the next hit asks again). */
export const MAX_PENDING_REFRESHES = 10_000

export interface RefreshAheadOptions {
  /** At most this many refreshes run at once (REFRESH_CONCURRENCY). */
  concurrency: number
  /** Refreshes one key; must not throw (failures are the caller's to count). */
  run: (key: string) => Promise<void>
}

/**
 * The background refresh queue: one entry per key, however often it is hit; the busiest
 * key (most hits when last asked) goes first; at most `concurrency` run at once; a key
 * already queued or running is never queued twice.
 */
export class RefreshAhead {
  readonly #concurrency: number
  readonly #run: (key: string) => Promise<void>
  /** key -> hits, the priority. */
  readonly #pending = new Map<string, number>()
  readonly #running = new Set<string>()
  #idle: Array<() => void> = []
  #closed = false

  constructor(options: RefreshAheadOptions) {
    this.#concurrency = options.concurrency
    this.#run = options.run
  }

  get pending(): number {
    return this.#pending.size
  }

  /** Queues a refresh of `key`, or raises its priority; nothing when it is running or the queue is full. */
  schedule(key: string, hits: number): void {
    if (this.#closed || this.#running.has(key)) return
    const queued = this.#pending.get(key)
    if (queued !== undefined) {
      if (hits > queued) this.#pending.set(key, hits)
      return
    }
    if (this.#pending.size >= MAX_PENDING_REFRESHES) return
    this.#pending.set(key, hits)
    this.#pump()
  }

  has(key: string): boolean {
    return this.#pending.has(key) || this.#running.has(key)
  }

  /** Resolves once nothing is queued or running (tests, benchmarks, shutdown). */
  drain(): Promise<void> {
    if (this.#pending.size === 0 && this.#running.size === 0) return Promise.resolve()
    return new Promise((resolve) => this.#idle.push(resolve))
  }

  /** Drops what is queued; running refreshes finish on their own. */
  close(): void {
    this.#closed = true
    this.#pending.clear()
    if (this.#running.size === 0) this.#wakeIdle()
  }

  #pump(): void {
    while (this.#running.size < this.#concurrency && this.#pending.size > 0) {
      // A linear scan for the busiest: the queue is bounded and each pick starts an HTTP call.
      let best: string | undefined
      let bestHits = -1
      for (const [key, hits] of this.#pending) {
        if (hits > bestHits) {
          best = key
          bestHits = hits
        }
      }
      const key = best!
      this.#pending.delete(key)
      this.#running.add(key)
      void this.#run(key)
        .catch(() => {})
        .finally(() => {
          this.#running.delete(key)
          this.#pump()
          if (this.#pending.size === 0 && this.#running.size === 0) this.#wakeIdle()
        })
    }
  }

  #wakeIdle(): void {
    const idle = this.#idle
    this.#idle = []
    for (const resolve of idle) resolve()
  }
}
