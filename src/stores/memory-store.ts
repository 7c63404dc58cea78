import { LRUCache } from 'lru-cache'
import { LeaseBook } from '../cache/lease-book.js'
import type {
  EvictionListener,
  EvictionReason,
  InvalidationMode,
  LeaseStamp,
  Selector,
  SetOutcome,
  StoredEntry,
} from '../cache/types.js'
import { prefixMatcher, prefixRuns, SortedKeys } from './sorted-keys.js'
import type { Store } from './store.js'

export const DEFAULT_MAX_ENTRIES = 1_000_000
export const DEFAULT_MAX_BYTES = 512 * 1024 * 1024
/** Expiry is swept in buckets of this width, so a sweep never looks at live entries. */
const EXPIRY_BUCKET_MS = 1000
/**
 * Long loops (a large user's or tag's invalidation, prefix scans, expiry sweeps,
 * mark-all-stale) yield to the event loop after this long, so a request waits at most about
 * this plus a GC pause (DESIGN: under 10 ms).
 */
const SLICE_MS = 2

export interface MemoryStoreOptions {
  /** Most entries kept before LRU eviction (CACHE_MAX_ENTRIES). */
  maxEntries?: number
  /** Most accounted bytes kept before LRU eviction (CACHE_MAX_BYTES). */
  maxBytes?: number
  /** The clock; tests pass a fake one. */
  now?: () => number
  /** How often expired entries are swept, in ms; 0 turns the timer off (tests sweep by hand). */
  sweepIntervalMs?: number
  /** Bounds of the lease bookkeeping. */
  maxLeaseScopes?: number
  maxLeasePrefixes?: number
  /**
   * Keep lease bookkeeping (default true). Off for a tier under a store that keeps the leases
   * itself (the TieredStore's L1): its invalidations then stamp nothing, and it issues no leases.
   */
  leases?: boolean
  /** How long a long loop runs before it yields (default 2 ms); tests pass 0 to make every run yield. */
  sliceMs?: number
  /**
   * Keep the keys in order as well (default false), so a prefix invalidation costs the keys
   * it matches instead of a pass over every key; about 20 more heap bytes an entry (BENCHMARKS.md). On for the
   * TieredStore's L1, where every instance runs every prefix invalidation of the cluster.
   */
  prefixIndex?: boolean
}

/**
 * The embedded store: an lru-cache of entries plus exact, eager indexes.
 *
 * Every way an entry leaves (overwrite, delete, TTL expiry, LRU eviction) goes through
 * lru-cache's `dispose`, which is the one place index memberships are removed, so the
 * indexes cannot drift from the entries. Expiry is eager: entries sit in per-second
 * buckets and a timer sweeps the due ones, freeing memory and index slots on time.
 */
export class MemoryStore implements Store {
  readonly kind = 'memory'
  readonly maxBytes: number
  readonly #lru: LRUCache<string, StoredEntry>
  readonly #users = new Map<string, Members>()
  readonly #tags = new Map<string, Members>()
  readonly #buckets = new Map<number, Set<string>>()
  // Bucket ids, a min-heap, so a sweep finds the due buckets without scanning them all.
  readonly #bucketHeap: number[] = []
  readonly #sorted: SortedKeys | undefined
  readonly #leases: LeaseBook | undefined
  readonly #listeners: EvictionListener[] = []
  readonly #now: () => number
  readonly #sliceMs: number
  readonly #timer: NodeJS.Timeout | undefined
  readonly #maxEntries: number
  #dropReason: EvictionReason | undefined
  /** The entry an overwrite is replacing while it keeps that entry's memberships. */
  #carried: StoredEntry | undefined
  #sweeping = false

  constructor(options: MemoryStoreOptions = {}) {
    this.#now = options.now ?? Date.now
    this.#sliceMs = options.sliceMs ?? SLICE_MS
    this.#maxEntries = options.maxEntries ?? DEFAULT_MAX_ENTRIES
    this.maxBytes = options.maxBytes ?? DEFAULT_MAX_BYTES
    this.#leases = options.leases === false ? undefined : new LeaseBook(options.maxLeaseScopes, options.maxLeasePrefixes)
    this.#sorted = options.prefixIndex === true ? new SortedKeys() : undefined
    this.#lru = new LRUCache<string, StoredEntry>({
      // No `max`: with one, lru-cache preallocates and, whenever its last entry goes,
      // refills arrays of `max` slots (17 ms at 1M). The count bound is enforced in set().
      maxSize: this.maxBytes,
      sizeCalculation: (entry) => entry.size,
      dispose: (entry, _key, reason) => {
        // An overwrite keeping the same user and tags carries the memberships over (setSync).
        if (entry !== this.#carried) this.#unindex(entry)
        const dropped = reason === 'evict' ? 'evict' : this.#dropReason
        if (dropped) for (const listener of this.#listeners) listener(entry, dropped)
      },
    })
    const interval = options.sweepIntervalMs ?? 1000
    if (interval > 0) {
      this.#timer = setInterval(() => void this.sweep(), interval)
      this.#timer.unref()
    }
  }

  async get(key: string, now: number, allowStale = false): Promise<StoredEntry | undefined> {
    return this.getLocal(key, now, allowStale) ?? undefined
  }

  /** Every read is local here: `get` without the promise, and a miss is certain (null). */
  getLocal(key: string, now: number, allowStale = false): StoredEntry | null {
    const entry = this.#lru.get(key)
    if (entry === undefined) return null
    if (entry.expiresAt <= now) {
      this.#drop(key, 'expire')
      return null
    }
    if (allowStale || !entry.stale) entry.hits++
    entry.lastAccessAt = now
    return entry
  }

  async peek(key: string, now: number): Promise<StoredEntry | undefined> {
    return this.peekLocal(key, now)
  }

  /** `peek` without the promise: no hit counted, recency untouched. */
  peekLocal(key: string, now: number): StoredEntry | undefined {
    const entry = this.#lru.peek(key)
    return entry !== undefined && entry.expiresAt > now ? entry : undefined
  }

  async set(entry: StoredEntry, lease?: LeaseStamp): Promise<SetOutcome> {
    return this.setSync(entry, lease)
  }

  setSync(entry: StoredEntry, lease?: LeaseStamp): SetOutcome {
    if (lease && this.#leases && !this.#leases.allows(lease, entry.key, entry.userId, entry.tags)) return 'lease_invalidated'
    // set() disposes the old entry (removing its memberships) before we index the new one,
    // except when the new one has the same user and tags: then the memberships stay and only
    // the expiry bucket moves (the common overwrite, and two fewer set operations per name).
    const old = this.#lru.peek(entry.key)
    const carried = old !== undefined && old.userId === entry.userId && sameTags(old.tags, entry.tags) ? old : undefined
    this.#carried = carried
    try {
      this.#lru.set(entry.key, entry)
    } finally {
      this.#carried = undefined
    }
    if (this.#lru.peek(entry.key) !== entry) {
      // Larger than the whole cache: not kept, and the old entry is gone too.
      if (carried !== undefined) this.#unindex(carried)
      return 'ok'
    }
    if (carried === undefined) this.#index(entry)
    else this.#carry(carried, entry)
    // pop() evicts the least recently used, through dispose with reason 'evict'.
    while (this.#lru.size > this.#maxEntries) this.#lru.pop()
    return 'ok'
  }

  async invalidate(selector: Selector, mode: InvalidationMode, now: number): Promise<number> {
    // Stamp first: from here on, leases issued before this invalidation are refused, even
    // while a long run over a user's, a tag's or a prefix's entries is still going.
    const leases = this.#leases
    const seq = leases?.record(selector) ?? 0
    // The keys a user or tag reaches are taken at once. A tag (or a user) can reach a large
    // part of the cache, so the run over them yields to the event loop between slices, as a
    // prefix scan does, rather than hold every other request up. Each key's lease scope is
    // stamped as the run reaches it, so a lease on it is refused even if the write names
    // another user or no tags; while the run goes, every lease older than it is refused.
    // Only what is still in the user's or tag's set when the run gets to it is invalidated: a
    // key rewritten for someone else meanwhile, or written again after a clear emptied the
    // set, is a newer write and is kept, as is a key that joins the user or tag meanwhile.
    const reached: Array<{ members: Members; keys: string[]; stamp: boolean }> = []
    const take = (members: Members | undefined) => {
      if (members !== undefined) reached.push({ members, keys: [...members.values()], stamp: leases?.stampsKeys(members.size, seq) ?? false })
    }
    for (const userId of selector.userIds ?? []) take(this.#users.get(userId))
    for (const tag of selector.tags ?? []) take(this.#tags.get(tag))
    let count = 0
    for (const key of selector.keys ?? []) if (this.#apply(key, mode, now)) count++
    const slice = new Slice(this.#sliceMs)
    // Until the run is done, every older lease is refused: a key not reached yet may be one of it.
    if (reached.length > 0) leases?.beginRun(seq)
    try {
      for (const { members, keys, stamp } of reached) {
        for (const key of keys) {
          if (stamp) leases!.touch(key, seq)
          if (members.has(key) && this.#apply(key, mode, now)) count++
          if (slice.due()) await slice.yield()
        }
      }
    } finally {
      if (reached.length > 0) leases?.endRun(seq)
    }
    if (selector.prefixes?.length) count += await this.#invalidatePrefixes(selector.prefixes, mode, now)
    return count
  }

  async clear(): Promise<number> {
    this.#leases?.recordClear()
    const count = this.#lru.size
    // At once, rather than key by key as clear() disposes of the entries.
    this.#sorted?.clear()
    this.#lru.clear()
    return count
  }

  async markAllStale(): Promise<number> {
    this.#leases?.recordClear()
    let count = 0
    const now = this.#now()
    const slice = new Slice(this.#sliceMs)
    // lru-cache's values() iterator survives the yields; entries set meanwhile are fresh writes.
    for (const entry of this.#lru.values()) {
      if (!entry.stale && entry.expiresAt > now) {
        entry.stale = true
        count++
      }
      if (slice.due()) await slice.yield()
    }
    return count
  }

  async leaseStamp(): Promise<LeaseStamp> {
    if (this.#leases === undefined) throw new Error('this store keeps no leases (its leases live in the store above it)')
    return this.#leases.stamp()
  }

  /**
   * Deletes these keys without stamping lease scopes: for a tier above a store that keeps
   * the leases itself (the TieredStore's L1), where a delete is only cache upkeep.
   */
  deleteKeys(keys: readonly string[]): number {
    let count = 0
    const now = this.#now()
    for (const key of keys) if (this.#apply(key, 'delete', now)) count++
    return count
  }

  async userEntries(userId: string, now: number): Promise<StoredEntry[]> {
    const out: StoredEntry[] = []
    for (const key of this.#users.get(userId) ?? []) {
      const entry = this.#lru.peek(key)
      if (entry !== undefined && entry.expiresAt > now) out.push(entry)
    }
    return out
  }

  async userKeys(userId: string): Promise<string[]> {
    return [...(this.#users.get(userId)?.values() ?? [])]
  }

  async tagKeys(tag: string): Promise<string[]> {
    return [...(this.#tags.get(tag)?.values() ?? [])]
  }

  async sampleKeys(limit: number): Promise<string[]> {
    const out: string[] = []
    const now = this.#now()
    // Most recently used first; an entry past its expiry that the sweep has not reached yet
    // is not cached any more (a consistency sample would report it missing).
    for (const [key, entry] of this.#lru.entries()) {
      if (out.length >= limit) break
      if (entry.expiresAt > now) out.push(key)
    }
    return out
  }

  async size(): Promise<{ entries: number; bytes: number }> {
    return { entries: this.#lru.size, bytes: this.#lru.calculatedSize }
  }

  onEviction(listener: EvictionListener): void {
    this.#listeners.push(listener)
  }

  async close(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer)
  }

  /** Every entry held (expired or not) and the live indexes, for the property test. */
  snapshot(): {
    entries: StoredEntry[]
    users: Map<string, Set<string>>
    tags: Map<string, Set<string>>
    buckets: Map<number, Set<string>>
    bytes: number
    /** The ordered keys, with `prefixIndex`. */
    sorted: string[] | undefined
  } {
    const sorted = this.#sorted === undefined ? undefined : [...this.#sorted]
    return { entries: [...this.#lru.values()], users: this.#users, tags: this.#tags, buckets: this.#buckets, bytes: this.#lru.calculatedSize, sorted }
  }

  /** Drops every entry whose TTL has run out; yields to the event loop on large sweeps. */
  async sweep(): Promise<number> {
    if (this.#sweeping) return 0
    this.#sweeping = true
    let dropped = 0
    try {
      // Bucket b holds expiries in [b, b+1) seconds: every bucket before the current one is
      // wholly expired; the current one is checked entry by entry.
      const due = Math.floor(this.#now() / EXPIRY_BUCKET_MS)
      const slice = new Slice(this.#sliceMs)
      while (this.#bucketHeap.length > 0 && this.#bucketHeap[0]! <= due) {
        const bucketId = this.#bucketHeap[0]!
        const bucket = this.#buckets.get(bucketId)
        if (bucket) {
          for (const key of bucket) {
            const entry = this.#lru.peek(key)
            if (entry === undefined) bucket.delete(key)
            else if (entry.expiresAt <= this.#now()) {
              this.#drop(key, 'expire')
              dropped++
            }
            if (slice.due()) await slice.yield()
          }
          if (bucket.size > 0) break // the current second: the rest expire later
          this.#buckets.delete(bucketId)
        }
        heapPop(this.#bucketHeap)
      }
    } finally {
      this.#sweeping = false
    }
    return dropped
  }

  async #invalidatePrefixes(prefixes: string[], mode: InvalidationMode, now: number): Promise<number> {
    if (this.#sorted !== undefined) return this.#invalidateIndexedPrefixes(this.#sorted, prefixes, mode, now)
    // Every entry is in exactly one expiry bucket, and Map/Set iterators survive mutation,
    // so walking the buckets in slices is a full scan that never blocks the loop for long.
    let count = 0
    const slice = new Slice(this.#sliceMs)
    const matches = prefixMatcher(prefixes)
    for (const bucket of this.#buckets.values()) {
      for (const key of bucket) {
        if (matches(key) && this.#apply(key, mode, now)) count++
        if (slice.due()) await slice.yield()
      }
    }
    return count
  }

  /** The keys a prefix matches are one run of the ordered keys: read in batches, applied in slices. */
  async #invalidateIndexedPrefixes(sorted: SortedKeys, prefixes: string[], mode: InvalidationMode, now: number): Promise<number> {
    let count = 0
    const slice = new Slice(this.#sliceMs)
    for (const prefix of prefixes) {
      // A key under two of the prefixes is counted once: the second finds it gone, or already stale.
      for (const run of prefixRuns(sorted, prefix, 256)) {
        for (const key of run) {
          if (this.#apply(key, mode, now)) count++
          if (slice.due()) await slice.yield()
        }
      }
    }
    return count
  }

  /**
   * Deletes or marks stale one entry; true when it changed something. An entry found expired
   * (the sweep has not reached it yet) is dropped as the sweep would drop it, and not counted.
   */
  #apply(key: string, mode: InvalidationMode, now: number): boolean {
    const entry = this.#lru.peek(key)
    if (entry === undefined) return false
    if (entry.expiresAt <= now) {
      this.#drop(key, 'expire')
      return false
    }
    if (mode === 'delete') return this.#lru.delete(key)
    if (entry.stale) return false
    entry.stale = true
    return true
  }

  #drop(key: string, reason: EvictionReason): void {
    this.#dropReason = reason
    try {
      this.#lru.delete(key)
    } finally {
      this.#dropReason = undefined
    }
  }

  #index(entry: StoredEntry): void {
    // Entries share the index's copy of their user id and tags: one string per name, not per entry.
    if (entry.userId !== undefined) entry.userId = addTo(this.#users, entry.userId, entry.key)
    const tags = entry.tags
    if (tags) for (let i = 0; i < tags.length; i++) tags[i] = addTo(this.#tags, tags[i]!, entry.key)
    this.#sorted?.add(entry.key)
    this.#addToBucket(entry)
  }

  /** Moves an overwritten entry's memberships to the entry replacing it (same user and tags). */
  #carry(old: StoredEntry, entry: StoredEntry): void {
    entry.userId = old.userId
    entry.tags = old.tags
    const oldBucket = Math.floor(old.expiresAt / EXPIRY_BUCKET_MS)
    if (oldBucket === Math.floor(entry.expiresAt / EXPIRY_BUCKET_MS)) return
    this.#buckets.get(oldBucket)?.delete(entry.key)
    this.#addToBucket(entry)
  }

  #addToBucket(entry: StoredEntry): void {
    const bucketId = Math.floor(entry.expiresAt / EXPIRY_BUCKET_MS)
    let bucket = this.#buckets.get(bucketId)
    if (bucket === undefined) {
      bucket = new Set()
      this.#buckets.set(bucketId, bucket)
      heapPush(this.#bucketHeap, bucketId)
    }
    bucket.add(entry.key)
  }

  #unindex(entry: StoredEntry): void {
    if (entry.userId !== undefined) removeFrom(this.#users, entry.userId, entry.key)
    if (entry.tags) for (const tag of entry.tags) removeFrom(this.#tags, tag, entry.key)
    this.#sorted?.delete(entry.key)
    // The bucket itself is dropped by the sweep, which owns the heap.
    this.#buckets.get(Math.floor(entry.expiresAt / EXPIRY_BUCKET_MS))?.delete(entry.key)
  }
}

function sameTags(a: readonly string[] | undefined, b: readonly string[] | undefined): boolean {
  if (a === undefined || b === undefined) return a === b
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false
  return true
}

/**
 * The keys of one user or tag, and the one copy of its name that entries share. Copy them
 * with `[...keys.values()]`: spreading the subclass itself misses V8's fast path for sets
 * (100 000 keys: 15–25 ms against 2.5).
 */
class Members extends Set<string> {
  constructor(readonly name: string) {
    super()
  }
}

/** Adds a key to a name's members and returns the canonical copy of the name. */
function addTo(index: Map<string, Members>, name: string, key: string): string {
  let keys = index.get(name)
  if (keys === undefined) {
    keys = new Members(name)
    index.set(name, keys)
  }
  keys.add(key)
  return keys.name
}

function removeFrom(index: Map<string, Members>, name: string, key: string): void {
  const keys = index.get(name)
  if (keys === undefined) return
  keys.delete(key)
  if (keys.size === 0) index.delete(name)
}

const yieldToLoop = () => new Promise<void>((resolve) => setImmediate(resolve))

/** Cuts a long loop into slices of `ms` (SLICE_MS); the clock is read every 64 steps, not every step. */
class Slice {
  #steps = 0
  #start = performance.now()

  constructor(readonly ms: number) {}

  due(): boolean {
    return (++this.#steps & 63) === 0 && performance.now() - this.#start >= this.ms
  }

  async yield(): Promise<void> {
    await yieldToLoop()
    this.#start = performance.now()
  }
}

function heapPush(heap: number[], value: number): void {
  heap.push(value)
  let i = heap.length - 1
  while (i > 0) {
    const parent = (i - 1) >> 1
    if (heap[parent]! <= heap[i]!) break
    ;[heap[parent], heap[i]] = [heap[i]!, heap[parent]!]
    i = parent
  }
}

function heapPop(heap: number[]): void {
  const last = heap.pop()!
  if (heap.length === 0) return
  heap[0] = last
  let i = 0
  for (;;) {
    const l = 2 * i + 1
    const r = l + 1
    let m = i
    if (l < heap.length && heap[l]! < heap[m]!) m = l
    if (r < heap.length && heap[r]! < heap[m]!) m = r
    if (m === i) return
    ;[heap[m], heap[i]] = [heap[i]!, heap[m]!]
    i = m
  }
}
