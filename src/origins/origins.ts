import { randomUUID } from 'node:crypto'
import { encodeLease, readable, type CacheService, type CoreLogger, type ReadResult, type WriteInput } from '../cache/cache-service.js'
import type { StoredEntry } from '../cache/types.js'
import { defaultBodyLimit } from '../config.js'
import { LogThrottle } from '../logger.js'
import { CacheError, invalidRequest, notFound, truncate } from '../errors.js'
import { checkTags, checkUserId } from '../cache/limits.js'
import type { OriginSpec } from './config.js'
import { MAX_BACKOFF_MS, OriginClient, OriginError, type FetchOutcome } from './loader.js'
import { sharedRecords, type SharedRecords } from '../stores/store.js'
import { render } from './pattern.js'
import { RefreshAhead } from './refresh-ahead.js'

/** After a failed background refresh, hits on that key wait this long before asking again. */
const REFRESH_FAILURE_COOLDOWN_MS = 1000
const MAX_COOLDOWNS = 10_000
/** During an outage every hot key fails; one warning per origin per this long, with the count, is enough. */
const FAILURE_LOG_INTERVAL_MS = 5000
/** A `?load=true` miss waiting for another instance's load of the key looks for its entry this often, */
const LOAD_WAIT_POLL_MS = 25
/** and for at most this long before it loads itself. */
const LOAD_WAIT_MAX_MS = 30_000

/**
 * How long a load claim lives: every attempt (its wait for a connection and its own timeout,
 * each up to timeoutMs) and backoff the origin allows, twice (a load whose write an
 * invalidation voids fetches once more), plus a second; at most LOAD_WAIT_MAX_MS, so a holder
 * that died frees the key by then.
 */
const claimName = (match: OriginMatch) => `load:${match.key}`

/** A load claim in the shared records: ours (to release), or another instance's (its holder id). */
type LoadClaim = { release: () => Promise<void>; holder?: undefined } | { holder: string; release?: undefined }

function loadClaimMs({ timeoutMs, retries, backoffMs }: OriginSpec): number {
  let budget = 2 * timeoutMs * (retries + 1)
  for (let attempt = 0; attempt < retries; attempt++) budget += Math.min(MAX_BACKOFF_MS, backoffMs * 2 ** attempt)
  return Math.min(LOAD_WAIT_MAX_MS, 2 * budget + 1000)
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** A key an origin serves, with everything needed to load it. */
export interface OriginMatch {
  origin: OriginSpec
  key: string
  url: string
  userId: string | undefined
  tags: string[] | undefined
}

/** A load's result: the entry (cached unless a second invalidation voided it too), or the origin has no data. */
export type LoadOutcome = { found: true; entry: StoredEntry; cached: boolean } | { found: false }

export interface OriginsOptions {
  cache: CacheService
  origins: OriginSpec[]
  /** Background refreshes at once (REFRESH_CONCURRENCY). */
  refreshConcurrency: number
  logger?: CoreLogger
}

/**
 * Read-through loading, refresh-ahead and forced refresh against the configured origins.
 *
 * Every load of a key, whatever asked for it (a `?load=true` miss, refresh-ahead, a forced
 * refresh, warming, a consistency repair), goes through `load`, which keeps one origin call
 * per key in flight and writes under a lease, so an invalidation accepted while the origin
 * answered is never overwritten by what it answered.
 */
export class Origins {
  readonly list: readonly OriginSpec[]
  readonly cache: CacheService
  readonly client: OriginClient
  readonly refresher: RefreshAhead
  readonly #byName = new Map<string, OriginSpec>()
  readonly #inflight = new Map<string, Promise<LoadOutcome>>()
  /** `?load=true` misses in progress, by key: the entry their load left, if any. */
  readonly #misses = new Map<string, Promise<StoredEntry | undefined>>()
  readonly #cooldown = new Map<string, number>()
  /** origin -> when its last refresh failure was logged, and failures since. */
  readonly #failureLog = new LogThrottle(FAILURE_LOG_INTERVAL_MS)
  readonly #logger: CoreLogger | undefined
  /** The store's shared records (cluster mode): a `?load=true` load is claimed there. */
  readonly #records: SharedRecords | undefined
  #closed = false
  /** Aborted once shutdown begins: warms load no further key (src/plugins/origins.ts). */
  readonly stopping = new AbortController()
  /** The lowest refreshAhead of all origins: below it a hit is not even looked at. */
  readonly #minRatio: number

  constructor(options: OriginsOptions) {
    this.list = options.origins
    this.cache = options.cache
    this.#logger = options.logger
    this.#records = sharedRecords(this.cache.store)
    for (const origin of this.list) this.#byName.set(origin.name, origin)
    this.#minRatio = Math.min(1, ...this.list.map((o) => o.refreshAhead))
    this.client = new OriginClient({
      // As much as a client may send: a pretty-printed or escaped body of a value within the
      // limit fits; the write refuses a value past it, naming the limit.
      maxBodyBytes: defaultBodyLimit(this.cache.limits.maxValueBytes),
      onAttempt: (event) => this.cache.emit('origin_request', event),
    })
    this.refresher = new RefreshAhead({ concurrency: options.refreshConcurrency, run: (key) => this.#refreshAhead(key) })
  }

  /** The first origin whose pattern matches `key`, with the URL, user and tags for it. */
  match(key: string): OriginMatch | undefined {
    const found = this.#first(key)
    return found === undefined ? undefined : this.#resolve(found.origin, key, found.params)
  }

  /** The match for the entry's own origin, if it still exists and matches, else the first match. */
  matchEntry(entry: StoredEntry): OriginMatch | undefined {
    const found = this.#originOf(entry)
    return found === undefined ? undefined : this.#resolve(found.origin, entry.key, found.params)
  }

  /** matchEntry without building the URL, user and tags (the hit hook only needs the origin). */
  #originOf(entry: StoredEntry): { origin: OriginSpec; params: Record<string, string> } | undefined {
    const own = entry.origin === undefined ? undefined : this.#byName.get(entry.origin)
    const ownParams = own?.pattern.match(entry.key)
    return own !== undefined && ownParams !== undefined ? { origin: own, params: ownParams } : this.#first(entry.key)
  }

  /** The first origin whose keyPattern matches the key, with the pattern's parameters. */
  #first(key: string): { origin: OriginSpec; params: Record<string, string> } | undefined {
    for (const origin of this.list) {
      const params = origin.pattern.match(key)
      if (params !== undefined) return { origin, params }
    }
    return undefined
  }

  /** Past `ratio` of its TTL, or stale: due for a refresh. */
  #due(entry: StoredEntry, ratio: number, now: number): boolean {
    return entry.stale || now - entry.createdAt >= ratio * (entry.expiresAt - entry.createdAt)
  }

  /**
   * `GET /v1/entries/:key?load=true`: a hit as usual; a miss on a key an origin serves is
   * loaded (once, however many callers wait) and returned. No matching origin, or an
   * origin without data (404): the plain miss with its lease. Origin down: the stale entry
   * if one is kept (a soft invalidation's), else 503.
   */
  readThrough(key: string, allowStale: boolean): ReadResult | Promise<ReadResult> {
    const result = this.cache.read(key, allowStale)
    // A hit answered from memory stays synchronous, as for a plain read.
    if (result instanceof Promise) return result.then((r) => this.#loadMiss(key, r))
    return result.entry !== undefined ? result : this.#loadMiss(key, result)
  }

  async #loadMiss(key: string, result: ReadResult): Promise<ReadResult> {
    if (result.entry !== undefined || this.list.length === 0) return result
    let match: OriginMatch | undefined
    try {
      match = this.match(key)
    } catch (error) {
      if (result.lease.fill) await this.cache.releaseFill(key, result.lease.lease)
      throw error
    }
    if (match === undefined) return result
    // Concurrent misses of the key here share one load (each keeps its own lease for its reply).
    let shared = this.#misses.get(key)
    if (shared === undefined) {
      shared = this.#loadOnce(match, result.lease.lease).finally(() => this.#misses.delete(key))
      this.#misses.set(key, shared)
    }
    let entry: StoredEntry | undefined
    try {
      entry = await shared
    } catch (error) {
      // Let the next miss, here or on another instance, fill at once rather than wait out the claim.
      if (result.lease.fill) await this.cache.releaseFill(key, result.lease.lease)
      // A stale value stays served while the origin fails (marked `stale: true`), or while
      // Redis cannot take the loaded entry (cluster mode, Redis down); a bug is not hidden.
      if (error instanceof OriginError || (error instanceof CacheError && error.code === 'backend_unavailable')) {
        const kept = await this.cache.inspect(key).catch(() => undefined)
        if (kept?.stale === true) return { entry: kept }
      }
      throw unavailable(error)
    }
    return entry !== undefined ? { entry } : result
  }

  /** The load behind `?load=true` misses: joined, waited for on another instance, or made here. */
  async #loadOnce(match: OriginMatch, lease: string): Promise<StoredEntry | undefined> {
    const claim = this.#inflight.has(match.key) ? undefined : await this.#claimLoad(match)
    if (claim?.done === true) return claim.entry
    try {
      const outcome = await this.load(match, lease)
      return outcome.found ? outcome.entry : undefined
    } finally {
      // After the write, so a waiter that sees the claim end finds the entry.
      await claim?.release()
    }
  }

  /**
   * Single flight across instances (cluster mode): claims the key's load in the store's shared
   * records, or, while another instance holds that claim, waits for the entry its load writes,
   * looking every LOAD_WAIT_POLL_MS (no hit or miss counted). When the claim ends without an
   * entry (the origin failed or had no data, or the holder died), this instance claims the
   * load itself. Undefined without shared records, when they cannot be reached, when waiting
   * outlasts LOAD_WAIT_MAX_MS, or on shutdown: then the load is single flight per instance only.
   */
  async #claimLoad(
    match: OriginMatch,
  ): Promise<{ done: true; entry: StoredEntry } | { done: false; release: () => Promise<void> } | undefined> {
    const fresh = async () => {
      const entry = await this.cache.inspect(match.key)
      return readable(entry, false) ? entry : undefined // a load writes a fresh entry
    }
    const giveUpAt = performance.now() + LOAD_WAIT_MAX_MS
    try {
      for (;;) {
        const claim = await this.#claim(match)
        if (claim === undefined) return undefined
        if (claim.release !== undefined) return { done: false, release: claim.release }
        // Another instance is loading: wait for its write, or for its claim to end.
        do {
          await sleep(LOAD_WAIT_POLL_MS)
          const entry = await fresh()
          if (entry !== undefined) return { done: true, entry }
          if (this.#closed || performance.now() > giveUpAt) return undefined
        } while ((await this.#records!.getRecord(claimName(match))) === claim.holder)
        // The claim ended: its entry may have landed between the two looks above.
        const entry = await fresh()
        if (entry !== undefined) return { done: true, entry }
      }
    } catch (error) {
      if (error instanceof CacheError && error.statusCode >= 500) return undefined
      throw error
    }
  }

  /**
   * Claims the key's load in the store's shared records (cluster mode), for as long as the
   * origin may take: the claim's release, or the other instance's holder id when it is taken.
   * Undefined without shared records. Throws `backend_unavailable` when they cannot be reached.
   */
  async #claim(match: OriginMatch): Promise<LoadClaim | undefined> {
    const records = this.#records
    if (records === undefined) return undefined
    const name = claimName(match)
    const holder = randomUUID()
    const other = await records.putRecord(name, holder, loadClaimMs(match.origin))
    if (other !== undefined) return { holder: other }
    // At worst (Redis unreachable) the claim runs out by itself.
    return { release: () => records.swapRecord(name, holder, undefined, 0).then(() => undefined, () => undefined) }
  }

  /**
   * `POST /v1/entries/:key/refresh`: reloads now; 404 if no origin serves the key, 503 if it
   * fails (the old entry stays). 404 too if the origin has no data for the key any more: then
   * the cached entry is invalidated (source `api`, by `actor`), as the origin says it is gone.
   * 409 if invalidations voided both loads (the value may predate them, so it is not cached).
   */
  async refresh(key: string, actor?: string): Promise<StoredEntry> {
    const match = this.match(key)
    if (match === undefined) throw notFound(`no origin serves "${truncate(key)}"`)
    let outcome: LoadOutcome
    try {
      outcome = await this.refreshMatch(match)
    } catch (error) {
      throw unavailable(error)
    }
    if (!outcome.found) {
      const reason = `forced refresh: origin "${match.origin.name}" has no data for it`
      const { invalidated } = await this.cache.invalidate({ keys: [key] }, { source: 'api', actor, reason })
      throw notFound(`origin "${match.origin.name}" has no data for "${truncate(key)}"${invalidated > 0 ? '; the cached entry was removed' : ''}`)
    }
    if (!outcome.cached) {
      throw new CacheError(
        'lease_invalidated',
        `invalidations of "${truncate(key)}" landed during both loads from origin "${match.origin.name}": nothing was cached; refresh again`,
      )
    }
    return outcome.entry
  }

  /** A counted refresh (forced, warm, repair): loads and emits `refresh`; a failure keeps the old entry. */
  async refreshMatch(match: OriginMatch): Promise<LoadOutcome> {
    try {
      const outcome = await this.load(match)
      // An origin without data is an answer, not an outage: the refresh worked, nothing to cache.
      this.cache.emit('refresh', { result: 'success' })
      return outcome
    } catch (error) {
      this.cache.emit('refresh', { result: 'error' })
      throw error
    }
  }

  /**
   * Loads a key from its origin and writes it under a lease (the caller's, or one taken
   * now). One call per key in flight: concurrent loads of the key share it. If an
   * invalidation voids the lease while the origin answers, the value may predate it, so it
   * is reloaded once under a new lease; if that is voided too, the value is returned to the
   * waiting callers but not cached.
   */
  load(match: OriginMatch, lease?: string): Promise<LoadOutcome> {
    const running = this.#inflight.get(match.key)
    if (running !== undefined) return running
    const load = this.#load(match, lease).finally(() => this.#inflight.delete(match.key))
    this.#inflight.set(match.key, load)
    return load
  }

  /** Fetches what the origin holds for a match now, without caching it (consistency checks). */
  fetch(match: OriginMatch): Promise<FetchOutcome> {
    return this.client.fetch(match.origin, match.url)
  }

  /** The CacheService hit hook: schedules a background refresh past the origin's refreshAhead, or of a stale entry. */
  readonly onHit = (entry: StoredEntry, now: number): void => {
    if (!this.#due(entry, this.#minRatio, now)) return
    if (this.#inflight.has(entry.key)) return
    if (this.refresher.has(entry.key)) {
      // Already queued (its priority rises with these hits) or running (nothing to do).
      this.refresher.schedule(entry.key, entry.hits)
      return
    }
    const until = this.#cooldown.get(entry.key)
    if (until !== undefined) {
      if (until > now) return
      this.#cooldown.delete(entry.key)
    }
    const own = this.#originOf(entry)
    if (own === undefined || !this.#due(entry, own.origin.refreshAhead, now)) return
    this.refresher.schedule(entry.key, entry.hits)
  }

  /** Stops refreshes and origin calls. */
  async close(): Promise<void> {
    this.#closed = true
    this.refresher.close()
    await this.client.close()
  }

  async #load(match: OriginMatch, lease: string | undefined): Promise<LoadOutcome> {
    const { key, origin } = match
    let token = lease ?? encodeLease(await this.cache.store.leaseStamp(), key)
    for (let round = 1; ; round++) {
      const fetched = await this.client.fetch(origin, match.url)
      if (!fetched.found) return fetched
      const input: WriteInput = {
        value: fetched.value,
        ttlMs: origin.ttlMs,
        userId: match.userId,
        tags: match.tags,
        lease: token,
        origin: origin.name,
      }
      try {
        return { found: true, entry: await this.cache.write(key, input), cached: true }
      } catch (error) {
        // Not the origin's doing: a bug, or the store unavailable (cluster mode, Redis down).
        if (!(error instanceof CacheError) || error.statusCode >= 500) throw error
        if (error.code !== 'lease_invalidated') {
          // The origin sent something the cache refuses (too large, a bad tag): its fault, not the caller's.
          throw new OriginError(origin.name, `origin "${origin.name}" sent an entry the cache refuses: ${error.message}`, 'error')
        }
        if (round === 2) {
          this.#logger?.warn({ origin: origin.name, key: truncate(key) }, 'origin load voided twice by invalidations; returned uncached')
          return { found: true, entry: this.cache.buildEntry(key, { ...input, lease: undefined }), cached: false }
        }
        token = encodeLease(await this.cache.store.leaseStamp(), key)
      }
    }
  }

  async #refreshAhead(key: string): Promise<void> {
    // Re-read: the entry may have been invalidated, refreshed or dropped while queued.
    const entry = await this.cache.inspect(key)
    if (entry === undefined) return
    let match: OriginMatch | undefined
    try {
      match = this.matchEntry(entry)
    } catch (error) {
      // A key whose user or tags no entry can carry (written by a client): no load of it could
      // ever be cached. Left alone for the rest of the entry's life, so its hits do not queue it again.
      this.#coolDown(key, entry.expiresAt)
      this.#logFailure(this.#originOf(entry)?.origin.name ?? 'unknown', key, error as Error)
      return
    }
    if (match === undefined || !this.#due(entry, match.origin.refreshAhead, this.cache.now())) return
    // In cluster mode every instance that serves the hot key would refresh it: the first to
    // claim the load does, the others leave it (the entry it writes reaches them all).
    let claim: LoadClaim | undefined
    try {
      claim = await this.#claim(match)
    } catch {
      claim = undefined // Redis unreachable: refresh here, as without shared records
    }
    if (claim?.holder !== undefined) return
    try {
      await this.refreshMatch(match)
    } catch (error) {
      this.#coolDown(key)
      this.#logFailure(match.origin.name, key, error as Error)
    } finally {
      await claim?.release()
    }
  }

  /** No refresh-ahead of the key until `until` (by default a while after a failure). */
  #coolDown(key: string, until = this.cache.now() + REFRESH_FAILURE_COOLDOWN_MS): void {
    if (this.#cooldown.size >= MAX_COOLDOWNS) this.#cooldown.delete(this.#cooldown.keys().next().value!)
    this.#cooldown.set(key, until)
  }

  #logFailure(origin: string, key: string, error: Error): void {
    const held = this.#failureLog.pass(origin)
    if (held === undefined) return
    this.#logger?.warn({ origin, key: truncate(key), err: error.message, failuresNotLogged: held }, 'refresh-ahead failed; the cached entry stays')
  }

  /**
   * The URL, user and tags of the key's load. Throws `invalid_request` when the user or a tag
   * the key gives is one no entry can carry (a part too long for a user id, say): the load
   * could never be cached, so the origin is not called for it.
   */
  #resolve(origin: OriginSpec, key: string, params: Record<string, string>): OriginMatch {
    const userId = origin.userId === undefined ? undefined : render(origin.userId, params)
    const tags = origin.tags.length === 0 ? undefined : origin.tags.map((t) => render(t, params))
    try {
      if (userId !== undefined) checkUserId(userId, this.cache.limits)
      if (tags !== undefined) checkTags(tags, this.cache.limits)
    } catch (error) {
      throw invalidRequest(`origin "${origin.name}" cannot cache "${truncate(key)}": ${(error as Error).message}`)
    }
    return { origin, key, url: render(origin.url, params, encodeURIComponent), userId, tags }
  }
}

/** An origin failure as the contract's 503; anything else (a bug) passes through to become a 500. */
export function unavailable(error: unknown): unknown {
  return error instanceof OriginError ? new CacheError('backend_unavailable', error.message) : error
}
