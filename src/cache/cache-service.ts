import { createHash, randomBytes, randomUUID } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { CacheError, backendUnavailable, invalidRequest, leaseInvalidated, valueTooLarge } from '../errors.js'
import type { Store } from '../stores/store.js'
import {
  DEFAULT_LIMITS,
  checkKey,
  checkSelector,
  checkTags,
  checkTtl,
  checkUserId,
  etagOf,
  serializeValue,
  type Limits,
} from './limits.js'
import { eachLimited } from './each-limited.js'
import { Ring } from './ring.js'
import { WriteOrderedMap } from './write-ordered-map.js'
import {
  SELECTOR_KINDS,
  selectorLabels,
  type EvictionReason,
  type InvalidationMode,
  type InvalidationNote,
  type InvalidationRecord,
  type InvalidationResult,
  type InvalidationSource,
  type LeaseStamp,
  type Selector,
  type SelectorInput,
  type StoredEntry,
} from './types.js'

export const DEFAULT_FILL_LEASE_MS = 2000
export const DEFAULT_INVALIDATION_LOG_SIZE = 1000
/** Most keys with an outstanding fill lease tracked at once (herd control only; safe to forget). */
const MAX_FILL_LEASES = 100_000
/** Waiters are told to come back after at most this long, even if the fill lease has longer to run. */
const MAX_RETRY_AFTER_MS = 100
/** Keys of a batch-get looked up, or of a batch-set written, at once. */
const BATCH_LOOKUPS = 32

/** The subset of a pino logger the core uses. */
export interface CoreLogger {
  info(obj: object, msg?: string): void
  warn(obj: object, msg?: string): void
  error(obj: object, msg?: string): void
}

export interface CacheServiceOptions {
  store: Store
  limits?: Partial<Limits>
  /** The clock; tests pass a fake one. */
  now?: () => number
  logger?: CoreLogger
  /** How long a fill lease keeps other missers waiting (herd control). */
  fillLeaseMs?: number
  /** How many recent invalidations `GET /v1/debug/invalidations` can show. */
  invalidationLogSize?: number
  /** Leases are checked on writes; off only to prove the race test can fail. */
  leasesEnabled?: boolean
}

/** A lease handed out with a miss. */
export interface IssuedLease {
  lease: string
  fill: boolean
  retryAfterMs?: number
}

export type ReadResult = { entry: StoredEntry; lease?: undefined } | { entry?: undefined; lease: IssuedLease }

/** The body of a write, as PUT and batch-set accept it. */
export interface WriteInput {
  value: unknown
  ttlMs?: number | null
  userId?: string | null
  tags?: string[] | null
  lease?: string | { lease?: string; token?: string } | null
  origin?: string
}

/** One item of `writeMany`: written, or refused with its own error. */
export type WriteOutcome = { key: string; entry: StoredEntry; error?: undefined } | { key: string; error: CacheError }

export interface InvalidateOptions {
  mode?: InvalidationMode
  source: InvalidationSource
  actor?: string
  reason?: string
  /**
   * Another try of an invalidation whose failure was already counted and logged (the
   * PostgreSQL listener replaying what it owes): a failure now is neither counted nor logged.
   */
  repeat?: boolean
}

/** Monotonic totals: the Prometheus counters read these; the resettable summary subtracts a baseline. */
export interface Totals {
  hits: number
  misses: number
  sets: number
  evictions: Record<EvictionReason, number>
  leasesIssued: number
  leaseRejections: number
  invalidations: number
  invalidationsBySelector: Record<string, number>
  invalidationsBySource: Record<string, number>
  invalidationFailures: Record<string, number>
}

function emptyTotals(): Totals {
  return {
    hits: 0,
    misses: 0,
    sets: 0,
    evictions: { evict: 0, expire: 0 },
    leasesIssued: 0,
    leaseRejections: 0,
    invalidations: 0,
    invalidationsBySelector: {},
    invalidationsBySource: {},
    invalidationFailures: {},
  }
}

/**
 * What the core and the modules around it report. The metrics plugin, the audit log, the
 * SSE stream and the structured logs all subscribe here, so no route or module counts
 * anything itself.
 */
export interface CacheServiceEvents {
  invalidation: [InvalidationRecord]
  invalidation_failed: [{ source: InvalidationSource; selector: Selector; error: Error }]
  /** The stats summary was zeroed (the audit log listens). */
  stats_reset: [{ actor: string | undefined }]
  /** One call to an origin (src/origins): result is `success`, `error` or `timeout`. */
  origin_request: [{ origin: string; result: 'success' | 'error' | 'timeout'; durationMs: number }]
  /** One refresh-ahead, forced refresh or warm load: result is `success` or `error`. */
  refresh: [{ result: 'success' | 'error' }]
  /** The Redis pub/sub bus connected or lost (cluster mode). */
  bus_state: [{ connected: boolean }]
  /**
   * Copies kept outside this instance may be out of date, and no invalidation here says
   * which: another instance cleared the cache, or the bus was down (cluster mode). The
   * stream tells its clients to drop or revalidate what they kept.
   */
  resync: [{ reason: string }]
  /** The PostgreSQL listener started or stopped listening. */
  pg_listener_state: [{ connected: boolean }]
}

/**
 * The cache core: validation, leases and herd control, invalidation, the invalidation log
 * and the stats. It knows nothing of HTTP. Every invalidation, whatever its source, goes
 * through `invalidate`, which is where the log, the counters and the event for metrics,
 * logs and the SSE stream are all fed.
 */
export class CacheService extends EventEmitter<CacheServiceEvents> {
  readonly store: Store
  readonly limits: Limits
  readonly now: () => number
  readonly totals: Totals = emptyTotals()
  /** Called on every hit (refresh-ahead listens); unset when no origin is configured, so a hit pays one check. */
  onHit: ((entry: StoredEntry, now: number) => void) | undefined = undefined
  readonly #logger: CoreLogger | undefined
  readonly #fillLeaseMs: number
  readonly #leasesEnabled: boolean
  readonly #log: Ring<InvalidationRecord>
  /** Outstanding fill leases: until when, and which token holds it. */
  /** Fill claims in memory (a store without `claimFill`), oldest first. */
  readonly #fills = new WriteOrderedMap<string, { until: number; holder: string }>()
  #baseline: Totals = emptyTotals()
  #last: InvalidationRecord | undefined

  constructor(options: CacheServiceOptions) {
    super()
    this.store = options.store
    this.limits = { ...DEFAULT_LIMITS, ...options.limits }
    this.now = options.now ?? Date.now
    this.#logger = options.logger
    this.#fillLeaseMs = options.fillLeaseMs ?? DEFAULT_FILL_LEASE_MS
    this.#leasesEnabled = options.leasesEnabled ?? true
    this.#log = new Ring(options.invalidationLogSize ?? DEFAULT_INVALIDATION_LOG_SIZE)
    this.store.onEviction((_entry, reason) => {
      this.totals.evictions[reason]++
    })
  }

  /**
   * Reads an entry; a miss (or a stale entry without `allowStale`) comes back with a lease.
   * A hit the store answers from memory comes back as is, not as a promise: the GET route
   * then replies without a trip through the microtask queue. Bad keys throw synchronously.
   */
  read(key: string, allowStale = false): ReadResult | Promise<ReadResult> {
    checkKey(key, this.limits)
    return this.#lookup(key, allowStale, this.now())
  }

  /** Reads many keys; misses each get a lease. */
  async readMany(keys: string[], allowStale = false): Promise<{ entries: Map<string, StoredEntry>; leases: Map<string, IssuedLease> }> {
    if (keys.length > this.limits.maxBatch) throw invalidRequest(`keys has more than ${this.limits.maxBatch} items`)
    keys.forEach((key, i) => checkKey(key, this.limits, `keys[${i}]`))
    const now = this.now()
    const unique = [...new Set(keys)]
    // Up to BATCH_LOOKUPS at once: in cluster mode a miss is a Redis round trip or two, and
    // concurrent commands share the connection's pipeline instead of queueing one by one.
    const results = new Map<string, ReadResult>()
    await eachLimited(unique, BATCH_LOOKUPS, async (key) => results.set(key, await this.#lookup(key, allowStale, now)))
    const entries = new Map<string, StoredEntry>()
    const leases = new Map<string, IssuedLease>()
    for (const key of unique) {
      const result = results.get(key)!
      if (result.entry !== undefined) entries.set(key, result.entry)
      else leases.set(key, result.lease)
    }
    return { entries, leases }
  }

  /** One read of a validated key: a hit (counted, refresh-ahead told), or a miss with its lease. */
  #lookup(key: string, allowStale: boolean, now: number): ReadResult | Promise<ReadResult> {
    const local = this.store.getLocal?.(key, now, allowStale)
    if (local !== undefined) return this.#found(key, local ?? undefined, allowStale, now) // null: a certain miss
    return this.store.get(key, now, allowStale).then((entry) => this.#found(key, entry, allowStale, now))
  }

  #found(key: string, entry: StoredEntry | undefined, allowStale: boolean, now: number): ReadResult | Promise<ReadResult> {
    if (readable(entry, allowStale)) {
      this.totals.hits++
      if (this.onHit !== undefined) this.onHit(entry, now)
      return { entry }
    }
    this.totals.misses++
    return this.issueLease(key, now).then((lease) => ({ lease }))
  }

  /** Reads an entry for inspection: no hit counted, stale and all. */
  async inspect(key: string): Promise<StoredEntry | undefined> {
    checkKey(key, this.limits)
    return this.store.peek(key, this.now())
  }

  /** Validates and writes one entry. Throws `lease_invalidated` when its lease was voided. */
  async write(key: string, input: WriteInput): Promise<StoredEntry> {
    const entry = this.buildEntry(key, input)
    const lease = this.#parseLease(input.lease, key)
    const outcome = await this.store.set(entry, this.#leasesEnabled ? lease : undefined)
    if (outcome === 'lease_invalidated') {
      this.totals.leaseRejections++
      // The filler's value was refused: let the next miss fill at once rather than keep
      // the waiters polling until the fill lease runs out.
      if (lease?.holder !== undefined) await this.#releaseFill(key, lease.holder)
      throw leaseInvalidated(key)
    }
    this.totals.sets++
    this.#fills.delete(key)
    return entry
  }

  /**
   * Writes a batch (`POST /v1/entries/batch-set`): each item validated and written on its own, so
   * a refused item gets its own error and does not sink the others. Up to BATCH_LOOKUPS keys are
   * written at once (in cluster mode each write is a Redis round trip, and concurrent ones share
   * the pipeline); the items of one key are written one after another in the order given, so the
   * last one stands, as if the batch were written item by item. Outcomes come in the items' order.
   * A backend failure (a 5xx) rejects the whole batch, as it would a single write, and no write
   * starts after it (those already sent to the store may still land, as before a timeout).
   */
  async writeMany(items: readonly unknown[]): Promise<WriteOutcome[]> {
    if (items.length > this.limits.maxBatch) throw invalidRequest(`entries has more than ${this.limits.maxBatch} items`)
    const outcomes: WriteOutcome[] = new Array(items.length)
    const byKey = new Map<string, number[]>()
    items.forEach((item, i) => {
      const key = item !== null && typeof item === 'object' ? (item as { key?: unknown }).key : undefined
      // As the PUT body's schema does: a misspelt field is refused, not dropped.
      const unknown = typeof key === 'string' ? Object.keys(item as object).find((field) => !BATCH_ITEM_FIELDS.has(field)) : undefined
      if (typeof key !== 'string') outcomes[i] = { key: '', error: invalidRequest(`entries[${i}].key must be a string`) }
      else if (unknown !== undefined) outcomes[i] = { key, error: invalidRequest(`entries[${i}].${unknown} is not allowed`) }
      else if (byKey.has(key)) byKey.get(key)!.push(i)
      else byKey.set(key, [i])
    })
    let failed = false
    await eachLimited([...byKey], BATCH_LOOKUPS, async ([key, indexes]) => {
      for (const i of indexes) {
        // After a failure (the batch is a 5xx) no further write starts, for any key.
        if (failed) return
        try {
          outcomes[i] = { key, entry: await this.write(key, items[i] as WriteInput) }
        } catch (error) {
          if (!(error instanceof CacheError) || error.statusCode >= 500) {
            failed = true
            throw error
          }
          outcomes[i] = { key, error }
        }
      }
    })
    return outcomes
  }

  /** Builds (and validates) the entry a write would store. */
  buildEntry(key: string, input: WriteInput): StoredEntry {
    checkKey(key, this.limits)
    if (input === null || typeof input !== 'object') throw invalidRequest('body must be an object')
    const value = serializeValue(input.value, this.limits)
    const ttlMs = checkTtl(input.ttlMs, this.limits)
    const userId = input.userId === undefined || input.userId === null ? undefined : checkUserId(input.userId, this.limits)
    const tags = input.tags === undefined || input.tags === null ? undefined : checkTags(input.tags, this.limits)
    const now = this.now()
    let size = byteLength(key) + byteLength(value)
    if (userId !== undefined) size += byteLength(userId)
    if (tags) for (const tag of tags) size += byteLength(tag)
    if (size > this.store.maxBytes) {
      // The store would drop it at once (and the old entry with it): refuse rather than acknowledge.
      throw valueTooLarge(`the entry takes ${size} bytes, more than the whole cache holds (CACHE_MAX_BYTES ${this.store.maxBytes})`)
    }
    return {
      key,
      value,
      etag: etagOf(value),
      userId,
      tags: tags && tags.length > 0 ? tags : undefined,
      createdAt: now,
      expiresAt: now + ttlMs,
      hits: 0,
      lastAccessAt: now,
      stale: false,
      origin: input.origin,
      size,
    }
  }

  /**
   * The one invalidation function. Every source (API, events, PostgreSQL, bus, admin) calls
   * it; it validates, applies through the store, logs, counts and emits `invalidation`.
   */
  async invalidate(rawSelector: SelectorInput, options: InvalidateOptions): Promise<InvalidationResult> {
    const selector = checkSelector(rawSelector, this.limits)
    const mode = options.mode ?? 'delete'
    const result = await this.#apply(selector, options, async () => ({
      invalidated: await this.store.invalidate(selector, mode, this.now(), options), // its reason and actor
      mode,
    }))
    // As memcache does on a delete: a fill in flight for an invalidated key will be refused,
    // so the next miss becomes the filler. (Users, tags and prefixes name no keys here; their
    // fills are released when the filler's write is refused.)
    for (const key of selector.keys ?? []) this.#fills.delete(key)
    return result
  }

  /**
   * Marks every entry stale and voids every lease: for a source that may have missed
   * invalidations (the PostgreSQL listener after a reconnect). Recorded like any other
   * invalidation, with the selector `{all: true}`. A store without `markAllStale` is cleared.
   */
  async markAllStale(options: Omit<InvalidateOptions, 'mode'>): Promise<InvalidationResult> {
    return this.#apply({ all: true }, options, async () => {
      if (this.store.markAllStale) return { invalidated: await this.store.markAllStale(options), mode: 'stale' as const }
      this.#logger?.warn({ store: this.store.kind, source: options.source }, 'store cannot mark all stale; clearing it')
      const invalidated = await this.store.clear(options)
      this.#fills.clear()
      return { invalidated, mode: 'delete' as const }
    })
  }

  /** Runs one invalidation against the store, then records it; a store failure is counted and is a 503. */
  async #apply(
    selector: Selector,
    options: Omit<InvalidateOptions, 'mode'>,
    run: () => Promise<{ invalidated: number; mode: InvalidationMode }>,
  ): Promise<InvalidationResult> {
    const started = performance.now()
    let outcome: { invalidated: number; mode: InvalidationMode }
    try {
      outcome = await run()
    } catch (error) {
      if (options.repeat === true) throw error instanceof CacheError ? error : backendUnavailable('the store')
      this.#countFailure(options.source)
      this.emit('invalidation_failed', { source: options.source, selector, error: error as Error })
      // A known failure (Redis down: the store logged its cause once) needs no stack; during an
      // outage every invalidation fails, and a stack each flooded the log.
      if (error instanceof CacheError) this.#logger?.error({ error: error.code, reason: error.message, source: options.source }, 'invalidation failed')
      else this.#logger?.error({ err: error, source: options.source }, 'invalidation failed')
      throw error instanceof CacheError ? error : backendUnavailable('the store')
    }
    const record: InvalidationRecord = {
      id: randomUUID(),
      selector,
      mode: outcome.mode,
      source: options.source,
      invalidated: outcome.invalidated,
      durationMs: round(performance.now() - started),
      at: new Date(this.now()).toISOString(),
      actor: options.actor,
      reason: options.reason,
    }
    this.#record(record)
    return { id: record.id, invalidated: record.invalidated, mode: record.mode, durationMs: record.durationMs }
  }

  /** Counts an invalidation that never reached the store (e.g. an unparseable notification). */
  countFailure(source: InvalidationSource): void {
    this.#countFailure(source)
  }

  /**
   * Records an invalidation another instance made (cluster mode): Redis and this instance's
   * L1 already have it applied, so only the log, the counters and the `invalidation` event
   * (metrics, stream) are fed, with source `bus`. `invalidated` counts the L1 copies dropped;
   * `note` is the reason and actor the other instance was given, when its message said.
   * The id is this instance's own (a stream client's Last-Event-ID names one instance's order).
   */
  recordBusInvalidation(selector: Selector, mode: InvalidationMode, invalidated: number, note?: InvalidationNote): void {
    for (const key of selector.keys ?? []) this.#fills.delete(key)
    const at = new Date(this.now()).toISOString()
    this.#record({ id: randomUUID(), selector, mode, source: 'bus', invalidated, durationMs: 0, at, actor: note?.actor, reason: note?.reason })
  }

  /**
   * Drops everything and voids every lease: the emergency clear (`admin`), or the PostgreSQL
   * listener's `clear` policy. An invalidation of everything (DESIGN 4 names "a clear" among
   * them), recorded like any other with the selector `{all: true}` (the stream then resets).
   */
  async clear(actor?: string, reason?: string, source: InvalidationSource = 'admin', repeat = false): Promise<number> {
    const result = await this.#apply({ all: true }, { source, actor, reason, repeat }, async () => {
      const invalidated = await this.store.clear({ reason, actor })
      this.#fills.clear()
      return { invalidated, mode: 'delete' as const }
    })
    return result.invalidated
  }

  recentInvalidations(limit: number): InvalidationRecord[] {
    return this.#log.recent(limit)
  }

  /** The stats summary of `GET /v1/stats`: totals since the last reset. */
  async stats() {
    const { entries, bytes } = await this.store.size()
    const t = this.totals
    const b = this.#baseline
    const hits = t.hits - b.hits
    const misses = t.misses - b.misses
    return {
      entries,
      bytes,
      hits,
      misses,
      hitRatio: hits + misses === 0 ? 0 : hits / (hits + misses),
      sets: t.sets - b.sets,
      evictions: t.evictions.evict + t.evictions.expire - b.evictions.evict - b.evictions.expire,
      invalidations: {
        bySelector: diff(t.invalidationsBySelector, b.invalidationsBySelector),
        bySource: diff(t.invalidationsBySource, b.invalidationsBySource),
        failed: sum(t.invalidationFailures) - sum(b.invalidationFailures),
        last: this.#last ?? null,
      },
      leases: { issued: t.leasesIssued - b.leasesIssued, rejected: t.leaseRejections - b.leaseRejections },
    }
  }

  /** Zeroes the summary; the monotonic totals behind the Prometheus counters keep counting. */
  resetStats(actor?: string): void {
    this.#baseline = structuredClone(this.totals)
    this.#last = undefined
    this.emit('stats_reset', { actor })
  }

  async close(): Promise<void> {
    await this.store.close()
  }

  /** Issues a lease for a missed key; the first miss in a while gets the fill lease. */
  async issueLease(key: string, now = this.now()): Promise<IssuedLease> {
    // Every lease names its own holder, so only the filler's refused write can end its claim
    // (a waiter's lease carries the same stamp, never the same holder).
    const holder = newHolder()
    // The store's claim is shared with the other instances (cluster mode), stamped and
    // claimed in one step; without one, the claims are kept here.
    const { stamp, left } =
      this.store.claimFill !== undefined
        ? await this.store.claimFill(key, holder, this.#fillLeaseMs, now)
        : { stamp: await this.store.leaseStamp(), left: this.#claimFill(key, holder, now) }
    this.totals.leasesIssued++
    const lease = encodeLease(stamp, key, holder)
    return left > 0 ? { lease, fill: false, retryAfterMs: Math.max(1, Math.min(left, MAX_RETRY_AFTER_MS)) } : { lease, fill: true }
  }

  /** `Store.claimFill`'s claim, in memory: 0 when `holder` now holds the fill, else the ms the other claim has left. */
  #claimFill(key: string, holder: string, now: number): number {
    const fill = this.#fills.get(key)
    if (fill !== undefined && fill.until > now) return fill.until - now
    if (fill === undefined && this.#fills.size >= MAX_FILL_LEASES) this.#pruneFills(now)
    this.#fills.set(key, { until: now + this.#fillLeaseMs, holder })
    return 0
  }

  /**
   * Ends the fill claim of the lease's holder on `key` (its fill failed: an origin that could
   * not answer), so the next miss fills at once instead of waiting for the claim to run out.
   */
  async releaseFill(key: string, lease: string): Promise<void> {
    const holder = decodeLease(lease)?.holder
    if (holder !== undefined) await this.#releaseFill(key, holder)
  }

  /**
   * A caller that will not fill after all (its load failed) hands its lease back
   * (`POST /v1/entries/:key/release`): if it was the fill lease, the next miss fills at once.
   * Any other lease of the key changes nothing; a token that is not a lease of this key is a 400,
   * and a store that cannot be reached a 503 (the claim then runs out by itself).
   */
  async giveUpFill(key: string, lease: string): Promise<void> {
    checkKey(key, this.limits)
    const stamp = decodeLease(lease)
    if (stamp === undefined) throw invalidRequest('lease must be the token a miss returned')
    if (stamp.keyHash !== keyHash(key)) throw invalidRequest('lease was issued for another key')
    if (stamp.holder !== undefined) await this.#releaseFill(key, stamp.holder, true)
  }

  /** Ends `holder`'s fill claim; a store failure is thrown only when `report`: else at worst the claim runs out. */
  async #releaseFill(key: string, holder: string, report = false): Promise<void> {
    if (this.store.releaseFill === undefined) {
      if (this.#fills.get(key)?.holder === holder) this.#fills.delete(key)
      return
    }
    const released = this.store.releaseFill(key, holder)
    await (report ? released : released.catch(() => undefined))
  }

  #parseLease(raw: WriteInput['lease'], key: string): (LeaseStamp & { holder?: string }) | undefined {
    if (raw === undefined || raw === null) return undefined
    const token = typeof raw === 'string' ? raw : (raw.lease ?? raw.token)
    if (typeof token !== 'string') throw invalidRequest('lease must be the token a miss returned')
    const stamp = decodeLease(token)
    if (stamp === undefined) throw invalidRequest('lease is not a token cachewarden issued')
    if (stamp.keyHash !== keyHash(key)) {
      this.totals.leaseRejections++
      throw new CacheError('lease_invalidated', 'the lease was issued for another key')
    }
    return { epoch: stamp.epoch, seq: stamp.seq, holder: stamp.holder }
  }

  #record(record: InvalidationRecord): void {
    const t = this.totals
    t.invalidations++
    for (const label of selectorLabels(record.selector)) t.invalidationsBySelector[label] = (t.invalidationsBySelector[label] ?? 0) + 1
    t.invalidationsBySource[record.source] = (t.invalidationsBySource[record.source] ?? 0) + 1
    this.#log.push(record)
    this.#last = record
    this.#logger?.info(
      {
        invalidation: record.id,
        source: record.source,
        mode: record.mode,
        selectors: record.selector.all
          ? { all: true }
          : Object.fromEntries(SELECTOR_KINDS.filter((k) => record.selector[k]).map((k) => [k, record.selector[k]!.length])),
        invalidated: record.invalidated,
        durationMs: record.durationMs,
      },
      'invalidation',
    )
    this.emit('invalidation', record)
  }

  #countFailure(source: InvalidationSource): void {
    this.totals.invalidationFailures[source] = (this.totals.invalidationFailures[source] ?? 0) + 1
  }

  #pruneFills(now: number): void {
    // Every claim runs for the same time, so the oldest set runs out first.
    this.#fills.shiftWhile((fill) => fill.until <= now)
    // Still full of live fills: forget the oldest; the worst case is one more concurrent fill.
    while (this.#fills.size >= MAX_FILL_LEASES) this.#fills.shift()
  }
}

/**
 * `epoch.seq.keyhash.holder`: the stamp dates the lease, the key hash binds it to its key, and
 * the random holder tells its fill claim from the waiters' (same stamp, same key).
 */
export function encodeLease(stamp: LeaseStamp, key: string, holder = newHolder()): string {
  return `${stamp.epoch}.${stamp.seq.toString(36)}.${keyHash(key)}.${holder}`
}

export function decodeLease(token: string): (LeaseStamp & { keyHash: string; holder?: string }) | undefined {
  if (token.length > 128) return undefined
  const parts = token.split('.')
  // Three parts: a token from before holders were added (it can still write, not end a claim).
  if (parts.length !== 3 && parts.length !== 4) return undefined
  if (!/^[A-Za-z0-9_-]{1,32}$/.test(parts[0]!) || !/^[0-9a-z]{1,12}$/.test(parts[1]!)) return undefined
  if (!/^[A-Za-z0-9_-]{11}$/.test(parts[2]!) || (parts.length === 4 && !/^[A-Za-z0-9_-]{1,32}$/.test(parts[3]!))) return undefined
  return { epoch: parts[0]!, seq: parseInt(parts[1]!, 36), keyHash: parts[2]!, holder: parts[3] }
}

/** Whether a read answers with this entry: it is there, and fresh unless stale ones are allowed. */
export function readable(entry: StoredEntry | undefined, allowStale: boolean): entry is StoredEntry {
  return entry !== undefined && (allowStale || !entry.stale)
}

/** 72 random bits: a waiter cannot guess the filler's holder from its own lease. */
const newHolder = () => randomBytes(9).toString('base64url')

function keyHash(key: string): string {
  return createHash('sha1').update(key).digest('base64url').slice(0, 11)
}

const byteLength = (s: string) => (s.length < 128 && /^[\x20-\x7e]*$/.test(s) ? s.length : Buffer.byteLength(s))

/** The fields of a batch-set item: the PUT body's plus `key`. */
export const BATCH_ITEM_FIELDS: ReadonlySet<string> = new Set(['key', 'value', 'ttlMs', 'userId', 'tags', 'lease'])

const round = (n: number, digits = 3) => Math.round(n * 10 ** digits) / 10 ** digits

const sum = (r: Record<string, number>) => Object.values(r).reduce((a, b) => a + b, 0)

function diff(now: Record<string, number>, base: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {}
  for (const [k, v] of Object.entries(now)) if (v - (base[k] ?? 0) > 0) out[k] = v - (base[k] ?? 0)
  return out
}
