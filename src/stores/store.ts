import type {
  EvictionListener,
  InvalidationMode,
  InvalidationNote,
  LeaseStamp,
  Selector,
  SetOutcome,
  StoredEntry,
} from '../cache/types.js'

/**
 * The contract every store keeps (test/stores/store-contract.ts checks it).
 *
 * A store owns the entries, the exact `userId -> keys` and `tag -> keys` indexes and the
 * lease sequences, so that a store backed by Redis can update all three atomically in
 * one script. The CacheService above it owns validation, herd control, stats and the log.
 */
export interface Store {
  readonly kind: string

  /** The most bytes of entries the store keeps (`CACHE_MAX_BYTES`): a larger entry is never kept. */
  readonly maxBytes: number

  /**
   * Reads an entry, counting a hit on it when the read is answered from it: fresh, or stale
   * and `allowStale` (a stale entry read without it is a miss). Expired entries are never returned.
   */
  get(key: string, now: number, allowStale?: boolean): Promise<StoredEntry | undefined>

  /**
   * What `get` would return, when the store can answer from memory without I/O: the hot path
   * of a hit, with no promise. `null` is a miss the store is sure of (nothing anywhere);
   * `undefined` means "ask `get`" (say, an entry only a shared tier may hold). Optional: a
   * store without a local tier leaves it out, and so does the TieredStore, whose L1 reads
   * first wait for the bus messages already on its socket.
   */
  getLocal?(key: string, now: number, allowStale?: boolean): StoredEntry | null | undefined

  /**
   * Reads an entry without touching its hit count or recency. Throws `backend_unavailable`
   * when the store cannot tell whether the key has an entry (Redis down, no local copy).
   */
  peek(key: string, now: number): Promise<StoredEntry | undefined>

  /**
   * Writes an entry, replacing any entry under its key (and its index memberships).
   * With a lease, refuses when an invalidation covering the entry's key, user, tags or a
   * prefix of its key, or a clear, was accepted after the lease's sequence.
   */
  set(entry: StoredEntry, lease?: LeaseStamp): Promise<SetOutcome>

  /**
   * Applies an invalidation: bumps the sequence, records it for every scope in the
   * selector (so older leases on them are refused), then deletes or marks stale every
   * matching entry. Returns how many entries it touched. `note` (why, and who asked) is for
   * the other instances' invalidation logs, where a store has other instances to tell.
   */
  invalidate(selector: Selector, mode: InvalidationMode, now: number, note?: InvalidationNote): Promise<number>

  /** Drops every entry and voids every outstanding lease. Returns how many entries went. `note`: as for `invalidate`. */
  clear(note?: InvalidationNote): Promise<number>

  /**
   * Marks every entry stale and voids every outstanding lease, like `clear` but keeping the
   * entries for `allowStale` readers. Returns how many entries were newly marked. Optional:
   * CacheService.markAllStale falls back to `clear` on a store without it.
   */
  markAllStale?(note?: InvalidationNote): Promise<number>

  /** The stamp a lease issued now carries. */
  leaseStamp(): Promise<LeaseStamp>

  /**
   * Herd control shared by every instance on the store (DESIGN.md section 4: one fill lease
   * per key at a time): takes the stamp a lease issued now carries and, in the same step,
   * claims the fill of `key` for `ttlMs` for `holder` unless another claim is outstanding.
   * `left` is 0 when claimed, else the ms the other claim has left, or 1 when the key holds a
   * fresh entry at `now` although the read missed (a fill landed since, or the instance's copy
   * was behind: the store drops that copy, so reading again finds it). A write of the key and an
   * invalidation naming it end the claim. Never rejects: when the store cannot be asked, the
   * stamp is one that can never write, and the miss fills. Optional: without it, the
   * CacheService keeps the claims in memory, which is exact for a store only it uses.
   */
  claimFill?(key: string, holder: string, ttlMs: number, now: number): Promise<{ stamp: LeaseStamp; left: number }>

  /** Ends `holder`'s fill claim on `key` (its write was refused); nothing if another holds it. */
  releaseFill?(key: string, holder: string): Promise<void>

  /**
   * Records every instance on the store shares (a domain event's id and its reply, an
   * emergency clear's token): stores `value` under `name` for `ttlMs` unless a record is there, and resolves
   * to that record's value, or undefined when this call stored it. Optional: without it,
   * event ids (and clear tokens) are remembered per process. `putRecord`, `swapRecord` and
   * `getRecord` come together.
   */
  putRecord?(name: string, value: string, ttlMs: number): Promise<string | undefined>

  /**
   * Replaces the record `name` with `value` for `ttlMs` (or drops it, when `value` is
   * undefined) only if it still holds `expected`; resolves whether it did. A claim's owner
   * renews, fulfils or abandons its claim with it, never touching a claim another took over.
   */
  swapRecord?(name: string, expected: string, value: string | undefined, ttlMs: number): Promise<boolean>

  /** The record `name` holds, or undefined. Comes with `putRecord` and `swapRecord`. */
  getRecord?(name: string): Promise<string | undefined>

  /** A user's entries (for inspection), from the index: O(that user's entries). */
  userEntries(userId: string, now: number): Promise<StoredEntry[]>

  /** Keys of a user (for tests and consistency checks). */
  userKeys(userId: string): Promise<string[]>

  /** Keys of a tag. */
  tagKeys(tag: string): Promise<string[]>

  /** Up to `limit` keys, for sampling. */
  sampleKeys(limit: number): Promise<string[]>

  /** Current counts. */
  size(): Promise<{ entries: number; bytes: number }>

  /** Called when the store drops an entry by itself (LRU eviction, TTL expiry). */
  onEviction(listener: EvictionListener): void

  /** Stops timers and connections. */
  close(): Promise<void>
}

/** The records every instance on a shared store sees (cluster mode): `Store.putRecord` and friends. */
export type SharedRecords = Required<Pick<Store, 'putRecord' | 'swapRecord' | 'getRecord'>>

/** The store's shared records, when it has them. */
export function sharedRecords(store: Store): SharedRecords | undefined {
  const { putRecord, swapRecord, getRecord } = store
  if (putRecord === undefined || swapRecord === undefined || getRecord === undefined) return undefined
  return { putRecord: putRecord.bind(store), swapRecord: swapRecord.bind(store), getRecord: getRecord.bind(store) }
}
