import { CacheError, invalidRequest } from '../errors.js'
import type { Origins } from '../origins/origins.js'
import type { CacheService } from './cache-service.js'
import { eachLimited } from './each-limited.js'
import { bareEtag, checkKey, checkUserId, etagOf, serializeValue } from './limits.js'
import type { StoredEntry } from './types.js'

/** The etag of a value no write could store; equal to no entry's etag (those are 22 characters). */
const UNCACHEABLE = ''

const abandoned = (signal: AbortSignal | undefined) => signal?.aborted === true

/** A key selected but not looked at yet. */
const UNCHECKED: Status = { kind: 'missing' }

/** Most keys one check looks at, after userIds and the sample are expanded. */
export const MAX_CHECKED_KEYS = 10_000
/** Origin fetches (and refresh repairs) a check runs at once. */
export const CHECK_CONCURRENCY = 5

export type Repair = 'none' | 'invalidate' | 'refresh'

/** The body of `POST /v1/consistency` (DESIGN.md section 3). */
export interface ConsistencyRequest {
  keys?: string[]
  userIds?: string[]
  sample?: number
  against: 'provided' | 'origin'
  entries?: Array<{ key: string; value?: unknown; etag?: string }>
  repair?: Repair
}

export interface ConsistencyReport {
  checked: number
  consistent: number
  stale: string[]
  missing: string[]
  errors: Array<{ key: string; error: string }>
  repaired: number
  durationMs: number
}

/**
 * A comparison between copies inside the cache itself, run on every cached key a check
 * looks at. Cluster mode registers one (L1 against Redis) with
 * `app.consistency.copyChecks.push(...)`; keys it reports as differing are reported stale
 * and repaired like the others.
 */
export interface CopyCheck {
  name: string
  compare(keys: string[]): Promise<{ differing: string[]; errors: Array<{ key: string; error: string }> }>
}

type Status =
  | { kind: 'consistent' }
  | { kind: 'missing' }
  | { kind: 'stale'; gone: boolean }
  | { kind: 'error'; error: string }

/**
 * Compares cached entries with the source of truth: values or etags the caller provides,
 * or what the origins hold now. Etags are compared as the core computes them: the hash of
 * `JSON.stringify(value)`, so a provided value must serialize as the cached one did (same
 * key order) to count as consistent.
 */
export class ConsistencyChecker {
  readonly copyChecks: CopyCheck[] = []
  readonly #cache: CacheService
  readonly #origins: Origins

  constructor(cache: CacheService, origins: Origins) {
    this.#cache = cache
    this.#origins = origins
  }

  /**
   * Runs one check and its repairs; throws invalid_request for a malformed request. Once
   * `signal` aborts (the caller went away) no further key is fetched or repaired: the report
   * then covers what was looked at and what was repaired by then.
   */
  async check(request: ConsistencyRequest, actor?: string, signal?: AbortSignal): Promise<ConsistencyReport> {
    const started = performance.now()
    const repair = request.repair ?? 'none'
    const statuses = new Map<string, Status>()
    if (request.against === 'provided') {
      for (const [key, etag] of this.#provided(request)) {
        const entry = await this.#inspect(key)
        statuses.set(
          key,
          entry === undefined ? { kind: 'missing' }
          : 'kind' in entry ? entry
          : entry.etag === etag ? { kind: 'consistent' }
          : { kind: 'stale', gone: false },
        )
      }
    } else {
      const { keys, named } = await this.#selected(request)
      // Placed first, in the order asked: a Map keeps a key's place when its value is replaced.
      for (const key of keys) statuses.set(key, UNCHECKED)
      await eachLimited(keys, CHECK_CONCURRENCY, async (key) => statuses.set(key, await this.#againstOrigin(key)), signal)
      // Only an abandoned check leaves keys it never looked at: they are in no list. A key the
      // cache chose (a user's, the sample) that is gone by the time it is looked at (expired,
      // evicted, invalidated meanwhile) is no finding: only a named key can be missing.
      for (const [key, s] of statuses) if (s === UNCHECKED || (s.kind === 'missing' && !named.has(key))) statuses.delete(key)
    }

    const cached = [...statuses].filter(([, s]) => s.kind === 'consistent' || s.kind === 'stale').map(([k]) => k)
    // Each key lands in one list: a copy that differs makes a consistent key stale, and one
    // the copy check could not compare makes it an error (it is not known to be consistent).
    for (const copyCheck of this.copyChecks) {
      const { differing, errors } = await copyCheck.compare(cached)
      for (const key of differing) if (statuses.get(key)?.kind === 'consistent') statuses.set(key, { kind: 'stale', gone: false })
      for (const e of errors) {
        if (statuses.get(e.key)?.kind === 'consistent') statuses.set(e.key, { kind: 'error', error: `${copyCheck.name}: ${e.error}` })
      }
    }

    const report = this.#report(statuses, started)
    if (abandoned(signal)) return report
    if (repair === 'invalidate') {
      report.repaired = await this.#invalidate(report.stale, actor)
    } else if (repair === 'refresh') {
      report.repaired = await this.#refresh(report.stale, statuses, report.errors, actor, signal)
    }
    report.durationMs = Math.round((performance.now() - started) * 1000) / 1000
    return report
  }

  /** The report of the statuses, unrepaired. */
  #report(statuses: Map<string, Status>, started: number): ConsistencyReport {
    const report: ConsistencyReport = { checked: statuses.size, consistent: 0, stale: [], missing: [], errors: [], repaired: 0, durationMs: 0 }
    for (const [key, s] of statuses) {
      if (s.kind === 'consistent') report.consistent++
      else if (s.kind === 'stale') report.stale.push(key)
      else if (s.kind === 'missing') report.missing.push(key)
      else report.errors.push({ key, error: s.error })
    }
    report.durationMs = Math.round((performance.now() - started) * 1000) / 1000
    return report
  }

  /** Provided mode: key -> the etag the caller's truth has. */
  #provided(request: ConsistencyRequest): Map<string, string> {
    if (request.keys !== undefined || request.userIds !== undefined || request.sample !== undefined) {
      throw invalidRequest('against "provided" checks exactly the entries sent: keys, userIds and sample are for against "origin"')
    }
    const entries = request.entries
    if (entries === undefined || entries.length === 0) throw invalidRequest('entries is required (and not empty) with against "provided"')
    if (entries.length > this.#cache.limits.maxBatch) throw invalidRequest(`entries has more than ${this.#cache.limits.maxBatch} items`)
    const out = new Map<string, string>()
    entries.forEach((item, i) => {
      const key = checkKey(item.key, this.#cache.limits, `entries[${i}].key`)
      if (out.has(key)) throw invalidRequest(`entries[${i}].key repeats an earlier key`)
      // `value: null` is a JSON value like any other, so presence is what counts.
      const hasValue = Object.hasOwn(item, 'value')
      // Both could disagree, and one would be ignored without a word: which is the truth?
      if (hasValue && item.etag !== undefined) throw invalidRequest(`entries[${i}] has both a value and an etag: send one`)
      if (hasValue) out.set(key, this.#etagOf(item.value))
      else if (typeof item.etag === 'string' && item.etag !== '') out.set(key, bareEtag(item.etag))
      else throw invalidRequest(`entries[${i}] needs a value or an etag`)
    })
    return out
  }

  /** Origin mode: keys ∪ every key of userIds ∪ a sample of the cache; `named`: the keys the caller named. */
  async #selected(request: ConsistencyRequest): Promise<{ keys: string[]; named: Set<string> }> {
    if (request.entries !== undefined) throw invalidRequest('entries is for against "provided"; against "origin" fetches the truth itself')
    if (this.#origins.list.length === 0) throw invalidRequest('against "origin" needs origins in CONFIG_FILE; none are configured')
    const limits = this.#cache.limits
    // An empty list names nothing, as in an invalidation: `{keys: []}` alone is refused.
    if (!request.keys?.length && !request.userIds?.length && request.sample === undefined) {
      throw invalidRequest('name what to check: a non-empty keys or userIds, or sample')
    }
    const keys = new Set<string>()
    for (const [i, key] of (request.keys ?? []).entries()) keys.add(checkKey(key, limits, `keys[${i}]`))
    const named = new Set(keys)
    for (const [i, userId] of (request.userIds ?? []).entries()) {
      for (const key of await this.#cache.store.userKeys(checkUserId(userId, limits, `userIds[${i}]`))) keys.add(key)
      if (keys.size > MAX_CHECKED_KEYS) break
    }
    if (request.sample !== undefined) for (const key of await this.#cache.store.sampleKeys(request.sample)) keys.add(key)
    if (keys.size > MAX_CHECKED_KEYS) throw invalidRequest(`the selection has more than ${MAX_CHECKED_KEYS} keys; check fewer at a time`)
    return { keys: [...keys], named }
  }

  /** The entry, or an error status when the store cannot say (Redis down, no L1 copy). */
  async #inspect(key: string): Promise<StoredEntry | Status | undefined> {
    try {
      return await this.#cache.inspect(key)
    } catch (error) {
      if (error instanceof CacheError) return { kind: 'error', error: `${error.code}: ${error.message}` }
      throw error
    }
  }

  async #againstOrigin(key: string): Promise<Status> {
    const before = await this.#inspect(key)
    if (before === undefined) return { kind: 'missing' }
    if ('kind' in before) return before
    let truth
    try {
      const match = this.#origins.matchEntry(before)
      if (match === undefined) return { kind: 'error', error: 'no origin serves this key' }
      truth = await this.#origins.fetch(match)
    } catch (error) {
      return { kind: 'error', error: (error as Error).message }
    }
    // Compare with the entry as it is now: it may have been refreshed while the origin answered.
    const entry = await this.#inspect(key)
    if (entry === undefined) return { kind: 'missing' }
    if ('kind' in entry) return entry
    if (!truth.found) return { kind: 'stale', gone: true }
    const etag = this.#etagOf(truth.value)
    // A value the cache could never hold cannot be reloaded either: repair deletes the entry.
    if (etag === UNCACHEABLE) return { kind: 'stale', gone: true }
    return etag === entry.etag ? { kind: 'consistent' } : { kind: 'stale', gone: false }
  }

  /**
   * The etag a write of this value would store. A value over the value limits (too large, or
   * nested too deep, which JSON.stringify alone could overflow the stack on) gets
   * UNCACHEABLE, which no entry's etag equals: whatever the cache holds differs from it.
   */
  #etagOf(value: unknown): string {
    try {
      return etagOf(serializeValue(value, this.#cache.limits))
    } catch (error) {
      if (error instanceof CacheError) return UNCACHEABLE
      throw error
    }
  }

  /**
   * Invalidates the stale keys; returns how many it repaired: all of them once the
   * invalidation succeeded. Not `invalidated`, which counts only the entries the store held:
   * a copy only an L1 kept (cluster mode) is repaired by dropping it, and counts too.
   */
  async #invalidate(keys: string[], actor: string | undefined): Promise<number> {
    const batch = this.#cache.limits.maxBatch
    for (let i = 0; i < keys.length; i += batch) {
      await this.#cache.invalidate(
        { keys: keys.slice(i, i + batch) },
        { source: 'consistency', mode: 'delete', actor, reason: 'consistency check found them stale' },
      )
    }
    return keys.length
  }

  /**
   * Reloads each stale key from its origin; keys no origin serves, or whose origin has no data,
   * are invalidated instead. Once `signal` aborts no further key is reloaded or invalidated.
   */
  async #refresh(
    keys: string[],
    statuses: Map<string, Status>,
    errors: ConsistencyReport['errors'],
    actor: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<number> {
    let repaired = 0
    const toInvalidate: string[] = []
    await eachLimited(keys, CHECK_CONCURRENCY, async (key) => {
      let match
      try {
        match = this.#origins.match(key)
      } catch {
        match = undefined // a load of it could never be cached: as good as no origin
      }
      const s = statuses.get(key)
      if (match === undefined || (s?.kind === 'stale' && s.gone)) {
        toInvalidate.push(key)
        return
      }
      try {
        const outcome = await this.#origins.refreshMatch(match)
        if (!outcome.found) toInvalidate.push(key)
        else if (outcome.cached) repaired++
        else errors.push({ key, error: 'refresh was voided by concurrent invalidations; not repaired' })
      } catch (error) {
        errors.push({ key, error: `refresh failed: ${(error as Error).message}` })
      }
    }, signal)
    return abandoned(signal) ? repaired : repaired + (await this.#invalidate(toInvalidate, actor))
  }
}

