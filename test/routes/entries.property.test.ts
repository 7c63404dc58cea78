import fc, { type Parameters } from 'fast-check'
import type { FastifyInstance, InjectOptions } from 'fastify'
import t, { type Test } from 'tap'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import type { Selector } from '../../src/cache/types.js'
import { DEFAULT_SECURITY, type Config } from '../../src/config.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { TieredStore } from '../../src/stores/tiered-store.js'
import { FakeClock, build, call, keyPath } from '../helpers/build.js'
import { OriginServer } from '../helpers/origin-server.js'
import { runs, turns } from '../helpers/property.js'
import { requireRedisServer, startRedis } from '../helpers/redis-server.js'

// The HTTP API against a model of it, over random sequences of: writes (PUT, and batch-set with
// a bad item now and then and keys sent twice; with no lease, one of the key's, or another
// key's), reads (plain, allowStale, conditional with the entry's etag quoted or bare, or
// another; HEAD), batch reads, leases given back, emergency clears, invalidations in every form
// the contract has (POST /v1/invalidations, DELETE of a key, the user and tag shorthands, both
// modes), domain events, user inspection, stats and their reset, the invalidation log, and the
// clock moving on. Every answer is checked against the model:
// - a read's status, value, user, tags, stale flag, etag and expiry; 304 only for the entry's
//   etag and never for a stale entry; what a batch read finds and misses;
// - an etag is the same for the same value and differs for different ones;
// - the count an invalidation reports;
// - a leased write is refused exactly when the README's Leases rule says: an invalidation since
//   the lease touched the key by key, by a prefix of it, by the user or a tag of the write or
//   of the entry the key held (one past its expiry included until a read or an invalidation
//   drops it: no sweep runs here), or the lease is another key's;
// - herd control: a miss's `fill` and `retryAfterMs` against the key's claim, which a write, an
//   invalidation by key, the filler's refused write or its lease given back ends, or which runs
//   out;
// - an emergency clear (its token redeemed on either app) drops every entry, voids every lease
//   and ends every claim;
// - a write racing an invalidation that covers its key (both in flight at once, a few event-loop
//   turns apart either way, on either app) comes out as one of the two orders: what is left
//   (the write refused, or its entry standing fresh: the invalidation went first) tells which,
//   and both answers and the entry must then be the model's for that order; writes under a
//   valid lease must have come out both ways in each test;
// - a domain event runs each rule its type matches (`{{data.…}}` filled in), in rule order; a
//   redelivery of an id (on either app, with the first payload or another) gets the first
//   reply again and applies nothing;
// - HEAD and the inspection of an entry (the entry's hits too, in memory mode) count nothing
//   and take no lease; a user's entries; the stats since the app's last reset: hits, misses,
//   sets, leases issued and refused, invalidations by source (and in memory mode the last);
//   the invalidation log: every invalidation the app made (API, events, repairs, clears),
//   newest first, with its selector, mode, source and count.
// With a real origin serving two of the keys (`o:{userId}`), whose data steps change or remove:
// - a `?load=true` miss the origin has data for is filled from it (under the miss's lease, so a
//   miss and a set are counted) and answered; one it has no data for stays a plain miss;
// - a hit on an origin key's entry that is stale or past 80% of its TTL reloads it in the
//   background (the step waits for the refresh queue to drain, then the model reloads it);
//   `age` steps move the clock into an entry's last fifth, and each test must have reached it;
// - a slow fill racing an invalidation: while a `?load=true` miss's origin call is held, the
//   origin's data changes and an invalidation covering the key lands (on either app); the
//   load's write of the old data is refused (counted), and it loads again: the new data is
//   cached and answered, or, if the origin has none now, the miss with its (void) lease;
// - a forced refresh reloads (404 when no origin serves the key, or it has no data: then the
//   key is invalidated); a warm loads its keys and its users' keys, and counts what failed;
// - a consistency check, against the origin (named keys, users' keys, a sample of them all)
//   or against truths sent (values or etags), reports each key consistent, stale, missing or
//   an error (a key no origin serves), and repairs by invalidating, or by reloading those the
//   origin has data for.
// In memory mode with one app, and in cluster mode with two apps on one Redis (a step runs on
// either; reading on the other app at once after a change holds on one host, see
// test/stores/tiered-store.property.test.ts).

const USERS = ['u1', 'u2']
const TAGS = ['t1', 't2', 't3']
/** The key the origin serves for a user (`o:{userId}`), and the tag of what it loads. */
const originKey = (user: string) => `o:${user}`
const ORIGIN_TAG = 't3'
/** Keys the origin serves: read-through, refresh-ahead, forced refresh, warming, consistency. */
const ORIGIN_KEYS = USERS.map(originKey)
const KEYS = ['a', 'ab', 'b:1', 'b/2', 'c d', 'é', ...ORIGIN_KEYS]
const ORIGIN_TTL_MS = 4000
/**
 * How far `age` steps may move a sequence's clock in all (`advance` steps move it at most
 * 40 × 3 s): well inside the 10-minute windows of event ids and, in cluster mode, of the fill
 * claims, which run by Redis' clock.
 */
const AGE_BUDGET_MS = 5 * 60_000
/** The origin's entry for `o:{userId}`: the value is the test's, the rest the origin config's. */
const originOf = (key: string) => (ORIGIN_KEYS.includes(key) ? { userId: key.slice(2), tags: [ORIGIN_TAG], path: `/o/${encodeURIComponent(key.slice(2))}` } : undefined)
/** A hit past this share of its entry's TTL, or on a stale entry, refreshes an origin key in the background. */
const REFRESH_AHEAD = 0.8
const originConfig = (origin: OriginServer) => ({
  origins: [
    { name: 'o', keyPattern: 'o:{userId}', url: `${origin.base}/o/{userId}`, ttlMs: ORIGIN_TTL_MS, tags: [ORIGIN_TAG], refreshAhead: REFRESH_AHEAD, timeoutMs: 10_000, retries: 0 },
  ],
})
/** CONFIG_FILE `rules`: domain events and the invalidations they make, filled from the event's data. */
const RULES = [
  { event: 'user.changed', invalidate: { userIds: ['{{data.user}}'], tags: ['{{data.tag}}'] }, mode: 'stale' as const },
  { event: 'user.changed', invalidate: { keys: ['{{data.key}}'] }, mode: 'delete' as const },
  { event: 'catalog.changed', invalidate: { prefixes: ['{{ data.prefix }}'] }, mode: 'delete' as const },
]
/** A rule's selector for an event's data. */
const ruleSelector = (rule: (typeof RULES)[number], data: Record<string, string>): Selector => {
  const fill = (list: string[] | undefined) => list?.map((template) => template.replace(/\{\{\s*data\.(\w+)\s*\}\}/g, (_, field: string) => data[field]!))
  const { keys, userIds, tags, prefixes } = rule.invalidate as Partial<Record<keyof Selector, string[]>>
  return { keys: fill(keys), userIds: fill(userIds), tags: fill(tags), prefixes: fill(prefixes) }
}
/** The emergency clear is rate-limited per key: not here, where a sequence may clear many times. */
const CONFIG = { security: { ...DEFAULT_SECURITY, clearRateLimitMax: 0 } }

// The origin's keys drawn more often: their steps (loads, refreshes, checks) need an entry there.
const key = fc.oneof({ arbitrary: fc.constantFrom(...KEYS), weight: 3 }, { arbitrary: fc.constantFrom(...ORIGIN_KEYS), weight: 1 })
const mode = fc.constantFrom('delete' as const, 'stale' as const)
// Fastify refuses a body with a `__proto__` or `constructor` key (prototype poisoning): not values to draw.
const value = fc.jsonValue({ maxDepth: 2 }).filter((v) => !/"(__proto__|constructor)"/.test(JSON.stringify(v)))
const selector: fc.Arbitrary<Selector> = fc.oneof(
  fc.record({ keys: fc.uniqueArray(key, { minLength: 1, maxLength: 2 }) }),
  fc.record({ userIds: fc.uniqueArray(fc.constantFrom(...USERS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ tags: fc.uniqueArray(fc.constantFrom(...TAGS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ prefixes: fc.uniqueArray(fc.constantFrom('a', 'b', 'b:', 'c', 'é', 'o:'), { minLength: 1, maxLength: 2 }) }),
  fc.constant<Selector>({ userIds: ['u1'], tags: ['t3'], prefixes: ['b/'] }),
)
const on = fc.nat()
const repair = fc.constantFrom('none' as const, 'invalidate' as const, 'refresh' as const)
const write = {
  key,
  value,
  user: fc.option(fc.constantFrom(...USERS), { nil: undefined }),
  tags: fc.option(fc.uniqueArray(fc.constantFrom(...TAGS), { minLength: 1, maxLength: 2 }), { nil: undefined }),
  ttl: fc.option(fc.integer({ min: 1, max: 20_000 }), { nil: undefined }),
  // Which lease the write carries: none, one of its key's (the nth, cycling), or another key's.
  lease: fc.oneof(
    { arbitrary: fc.constant(undefined), weight: 3 },
    { arbitrary: fc.record({ nth: fc.nat(), foreign: fc.constant(false) }), weight: 3 },
    { arbitrary: fc.record({ nth: fc.nat(), foreign: fc.constant(true) }), weight: 1 },
  ),
}

const op = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('put' as const), on, ...write }), weight: 6 },
  {
    arbitrary: fc.record({
      op: fc.constant('batchSet' as const),
      on,
      items: fc.array(fc.record({ ...write, bad: fc.oneof({ arbitrary: fc.constant(false), weight: 5 }, { arbitrary: fc.constant(true), weight: 1 }) }), { minLength: 1, maxLength: 3 }),
    }),
    weight: 2,
  },
  {
    arbitrary: fc.record({ op: fc.constant('get' as const), on, key, allowStale: fc.boolean(), conditional: fc.constantFrom(undefined, 'quoted', 'bare', 'other'), load: fc.boolean() }),
    weight: 5,
  },
  { arbitrary: fc.record({ op: fc.constant('batchGet' as const), on, keys: fc.uniqueArray(key, { minLength: 1, maxLength: 4 }), allowStale: fc.boolean() }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('invalidate' as const), on, selector, mode }), weight: 3 },
  fc.record({ op: fc.constant('deleteKey' as const), on, key }),
  fc.record({ op: fc.constant('deleteUser' as const), on, user: fc.constantFrom(...USERS), mode }),
  fc.record({ op: fc.constant('deleteTag' as const), on, tag: fc.constantFrom(...TAGS), mode }),
  { arbitrary: fc.record({ op: fc.constant('advance' as const), ms: fc.integer({ min: 1, max: 3000 }) }), weight: 2 },
  fc.record({ op: fc.constant('inspectUser' as const), on, user: fc.constantFrom(...USERS) }),
  fc.record({ op: fc.constant('release' as const), on, key, lease: fc.nat() }),
  fc.record({ op: fc.constant('clear' as const), on, redeemOn: on }),
  fc.record({ op: fc.constant('head' as const), on, key, allowStale: fc.boolean() }),
  fc.record({ op: fc.constant('inspectEntry' as const), on, key }),
  fc.record({ op: fc.constant('stats' as const), on }),
  fc.record({ op: fc.constant('log' as const), on }),
  fc.record({ op: fc.constant('resetStats' as const), on }),
  // A write racing an invalidation that covers its key (by key, a prefix of it, its user or a
  // tag: by key when the write has no user or no tag), on either app, `gap` event-loop turns
  // apart (the write first when negative). The write carries no lease, one of the key's (the
  // nth, void or not), or a valid one: the key's newest valid lease, after a miss of the key
  // to get one if the key is not cached.
  {
    arbitrary: fc.record({
      op: fc.constant('race' as const),
      on,
      invalidateOn: on,
      key: write.key,
      value: write.value,
      user: write.user,
      tags: write.tags,
      ttl: write.ttl,
      lease: fc.oneof(fc.constantFrom('none' as const, 'any' as const), fc.constant('valid' as const)),
      nth: fc.nat(),
      cover: fc.constantFrom('key' as const, 'prefix' as const, 'user' as const, 'tag' as const),
      mode,
      gap: fc.integer({ min: -3, max: 3 }),
    }),
    weight: 3,
  },
  // The clock moves into the last fifth of the life of the key's entry (`share` of the way
  // through it), and the key is read: an origin key's hit then refreshes it in the background.
  { arbitrary: fc.record({ op: fc.constant('age' as const), on, key: fc.constantFrom(...ORIGIN_KEYS), share: fc.integer({ min: 0, max: 99 }), allowStale: fc.boolean() }), weight: 2 },
  // A `?load=true` miss of an origin key whose origin call is held while the origin's data
  // changes (to `value`, or goes) and an invalidation covering the key lands, on either app.
  {
    arbitrary: fc.record({
      op: fc.constant('fillRace' as const),
      on,
      invalidateOn: on,
      key: fc.constantFrom(...ORIGIN_KEYS),
      value: fc.option(value, { nil: undefined, freq: 4 }),
      cover: fc.constantFrom('key' as const, 'prefix' as const, 'user' as const, 'tag' as const),
      mode,
    }),
    weight: 2,
  },
  // A domain event (one with no rule too); an id seen before is a redelivery: of that event, or
  // (`changed`, when that event matched rules) with this op's data and type (if a rule matches it).
  {
    arbitrary: fc.record({
      op: fc.constant('event' as const),
      on,
      id: fc.option(fc.constantFrom('e1', 'e2'), { nil: undefined }),
      changed: fc.boolean(),
      type: fc.constantFrom('user.changed', 'catalog.changed', 'other.thing'),
      data: fc.record({ user: fc.constantFrom(...USERS), tag: fc.constantFrom(...TAGS), key, prefix: fc.constantFrom('a', 'b:', 'o:', 'é') }),
    }),
    weight: 2,
  },
  // The origin's data changes (or goes: the origin then answers 404).
  { arbitrary: fc.record({ op: fc.constant('originSet' as const), key: fc.constantFrom(...ORIGIN_KEYS), value: fc.option(value, { nil: undefined, freq: 3 }) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('refresh' as const), on, key }), weight: 2 },
  fc.record({ op: fc.constant('warm' as const), on, keys: fc.uniqueArray(key, { maxLength: 3 }), userIds: fc.uniqueArray(fc.constantFrom(...USERS), { maxLength: 2 }) }),
  // (A sample of 100 is every cached key here.)
  fc
    .record({
      op: fc.constant('checkOrigin' as const),
      on,
      keys: fc.uniqueArray(key, { maxLength: 3 }),
      userIds: fc.uniqueArray(fc.constantFrom(...USERS), { maxLength: 2 }),
      sample: fc.option(fc.constant(100), { nil: undefined, freq: 2 }),
      repair,
    })
    .filter((o) => o.keys.length + o.userIds.length > 0 || o.sample !== undefined),
  fc.record({
    op: fc.constant('checkProvided' as const),
    on,
    // The truth sent for each key: the cached value, the origin's, another value, the cached entry's etag (its value while the model does not know the etag), or another etag.
    entries: fc.uniqueArray(fc.record({ key, truth: fc.constantFrom('cached' as const, 'origin' as const, 'other' as const, 'etag' as const, 'otherEtag' as const), other: value }), {
      selector: (e) => e.key,
      minLength: 1,
      maxLength: 3,
    }),
    repair,
  }),
)
type Op = typeof op extends fc.Arbitrary<infer T> ? T : never

interface ModelEntry {
  value: unknown
  userId: string | undefined
  tags: string[] | undefined
  createdAt: number
  expiresAt: number
  stale: boolean
  /** Undefined for a value loaded from the origin that no answer has shown yet: the first that does tells it. */
  etag: string | undefined
  /** Reads answered from it; checked in memory mode (in cluster mode an instance adds only its own L1 hits). */
  hits: number
}

/** What the stats count, per app. */
interface Counters {
  hits: number
  misses: number
  sets: number
  issued: number
  rejected: number
}

/** The fields of an invalidation record (`GET /v1/debug/invalidations`, the stats' `last`) the model compares. */
interface LogRecord {
  selector: Selector
  mode: string
  source: string
  invalidated: number
}

/** An invalidation record as the model compares it: selector (each list sorted), mode, source and count. */
function logged(selector: Selector, mode: string, source: string, invalidated: number): string {
  const lists = (['keys', 'userIds', 'tags', 'prefixes'] as const).map((kind) => (selector[kind] === undefined ? null : [...selector[kind]].sort()))
  return JSON.stringify([lists, selector.all === true, mode, source, invalidated])
}

/** What a consistency check finds for a key ('gone': cached, but the origin has no data for it; reported stale, as 'stale' is). */
type Finding = 'consistent' | 'stale' | 'gone' | 'missing' | 'error'

/** An invalidation as a lease sees it: the keys it touched, and the users and tags it named. */
interface Voiding {
  step: number
  touched: Set<string>
  userIds: Set<string>
  tags: Set<string>
}

/** The API as the contract and README describe it, for `apps` instances of one cache. */
class Model {
  readonly entries = new Map<string, ModelEntry>()
  readonly leases: Array<{ token: string; key: string; step: number }> = []
  readonly voidings: Voiding[] = []
  readonly counters: Counters[]
  /** Each app's invalidation log, newest first: each record as `logged` writes it, and its source (in cluster mode without the other apps' records, source `bus`). */
  readonly logs: Array<Array<{ record: string; source: string }>>
  /** How many of each app's log records predate its last stats reset. */
  readonly resetAt: number[]
  /** Events by id: the event first delivered with it, and the reply it got. */
  readonly events = new Map<string, { type: string; data: Record<string, string>; reply: string }>()
  /** Keys a hit of the step has given a background refresh (with the counters of the app that runs it, and whether the entry was stale): see `refreshed`. */
  readonly refreshes = new Map<string, { counters: Counters; stale: boolean }>()
  /** What the origin holds, by key (absent: it answers 404). */
  readonly origin = new Map<string, unknown>()
  /** Etags by serialized value, and values by etag: one to one. */
  readonly #etags = new Map<string, string>()
  readonly #values = new Map<string, string>()

  /** The fill claims (herd control), by key: the fill lease's token and when its claim runs out (on the test's clock). */
  readonly fills = new Map<string, { token: string; until: number }>()

  constructor(
    apps: number,
    readonly now: () => number,
    readonly fillLeaseMs: number,
    /** Cluster mode: an inspection or HEAD that meets an expired entry drops it (in Redis), and entry hits are per instance. */
    readonly cluster: boolean,
    /** Shared by the sequences of a test. */
    readonly tally: Tally,
  ) {
    this.counters = Array.from({ length: apps }, () => ({ hits: 0, misses: 0, sets: 0, issued: 0, rejected: 0 }))
    this.logs = Array.from({ length: apps }, () => [])
    this.resetAt = Array.from({ length: apps }, () => 0)
  }

  /** A miss's lease: checks `fill` and `retryAfterMs` against the claim the key has, and takes the claim if it is free. */
  miss(key: string, step: number, lease: { lease: string; fill: boolean; retryAfterMs?: number }): string | undefined {
    this.leases.push({ token: lease.lease, key, step })
    const claim = this.fills.get(key)
    const now = this.now()
    if (claim === undefined || claim.until <= now) {
      this.fills.set(key, { token: lease.lease, until: now + this.fillLeaseMs })
      return lease.fill === true && lease.retryAfterMs === undefined ? undefined : `a miss with no fill claim on its key got ${JSON.stringify(lease)}`
    }
    const retryAfterMs = Math.max(1, Math.min(claim.until - now, 100))
    return lease.fill === false && lease.retryAfterMs === retryAfterMs ? undefined : `a miss while a claim has ${claim.until - now} ms left got ${JSON.stringify(lease)}`
  }

  /** Ends the key's fill claim: any write of the key, an invalidation naming it, or the filler's token (`token`) refused or given back. */
  endFill(key: string, token?: string): void {
    if (token === undefined || this.fills.get(key)?.token === token) this.fills.delete(key)
  }

  live(e: ModelEntry | undefined): e is ModelEntry {
    return e !== undefined && e.expiresAt > this.now()
  }

  readable(key: string, allowStale: boolean): ModelEntry | undefined {
    const e = this.entries.get(key)
    return this.live(e) && (allowStale || !e.stale) ? e : undefined
  }

  /** The lease a write carries: the nth of its key's (cycling), or of the other keys' when `foreign`; none if there is none. */
  pickLease(key: string, choice: { nth: number; foreign: boolean } | undefined): { token: string; key: string; step: number } | undefined {
    if (choice === undefined) return undefined
    const pool = this.leases.filter((lease) => (lease.key === key) !== choice.foreign)
    return pool.length === 0 ? undefined : pool[choice.nth % pool.length]
  }

  /** An inspection or HEAD: the entry there is, stale or not, counting nothing (in cluster mode it drops an expired one). */
  peek(key: string): ModelEntry | undefined {
    if (this.cluster) this.#dropExpired(key)
    return this.readable(key, true)
  }

  /** A read: the entry it answers with, if any; a read that meets an expired entry drops it (no sweep runs here). */
  read(key: string, allowStale: boolean): ModelEntry | undefined {
    this.#dropExpired(key)
    return this.readable(key, allowStale)
  }

  #dropExpired(key: string): void {
    if (this.entries.has(key) && !this.live(this.entries.get(key))) this.entries.delete(key)
  }

  /** Whether a write with the lease must be refused: an invalidation since the lease touched its key, its user or a tag. */
  refuses(lease: { key: string; step: number }, key: string, userId: string | undefined, tags: string[] | undefined): boolean {
    if (lease.key !== key) return true // a lease bound to another key
    const by = (v: Voiding) => v.touched.has(key) || (userId !== undefined && v.userIds.has(userId)) || (tags ?? []).some((tag) => v.tags.has(tag))
    return this.voidings.some((v) => v.step > lease.step && by(v))
  }

  /**
   * Applies an invalidation; the count the API must report. It touches (for leases) the keys it
   * names, those under its prefixes, and those whose entry has a user or tag it names, an entry
   * past its expiry included until a read or an invalidation drops it (no sweep runs here).
   */
  invalidate(step: number, selector: Selector, mode: 'delete' | 'stale', by: { app: number; source: 'api' | 'events' | 'consistency' }): number {
    const voiding: Voiding = { step, touched: new Set(selector.keys), userIds: new Set(selector.userIds), tags: new Set(selector.tags) }
    const byPrefix = new Set(KEYS.filter((key) => (selector.prefixes ?? []).some((prefix) => key.startsWith(prefix))))
    for (const key of byPrefix) voiding.touched.add(key)
    for (const key of selector.keys ?? []) this.endFill(key)
    let count = 0
    for (const [key, e] of [...this.entries]) {
      // In cluster mode a prefix's batches name the keys they found, so they end those claims too.
      if (this.cluster && byPrefix.has(key)) this.endFill(key)
      if ((e.userId !== undefined && voiding.userIds.has(e.userId)) || (e.tags ?? []).some((tag) => voiding.tags.has(tag))) voiding.touched.add(key)
      if (!voiding.touched.has(key)) continue
      if (!this.live(e)) this.entries.delete(key) // dropped, not counted
      else if (mode === 'delete') {
        this.entries.delete(key)
        count++
      } else if (!e.stale) {
        e.stale = true
        count++
      }
    }
    this.voidings.push(voiding)
    this.logs[by.app]!.unshift({ record: logged(selector, mode, by.source, count), source: by.source })
    return count
  }

  /** Applies a clear: every entry goes (past its expiry too), every lease is void, every claim ends. How many went. */
  clear(step: number, app: number): number {
    const count = this.entries.size
    this.logs[app]!.unshift({ record: logged({ all: true }, 'delete', 'admin', count), source: 'admin' })
    this.entries.clear()
    this.fills.clear()
    this.voidings.push({ step, touched: new Set(KEYS), userIds: new Set(), tags: new Set() })
    return count
  }

  /**
   * An origin key loaded now, for read-through, refresh-ahead, a forced refresh, a warm or a
   * repair: a write (under a lease no invalidation voided: steps run one at a time) of what the
   * origin holds, for the origin's TTL, user and tag. The etag is known if the value was seen before.
   */
  load(key: string, counters: Counters): ModelEntry {
    const { userId, tags } = originOf(key)!
    const value = this.origin.get(key)
    const now = this.now()
    const e = { value, userId, tags, createdAt: now, expiresAt: now + ORIGIN_TTL_MS, stale: false, etag: this.#etags.get(JSON.stringify(value)), hits: 0 }
    this.entries.set(key, e)
    this.endFill(key)
    counters.sets++
    return e
  }

  /** Once the step's background refreshes are done: each reloaded its key, if the origin has data for it. */
  refreshed(): void {
    for (const [key, { counters, stale }] of this.refreshes) {
      if (!this.origin.has(key)) continue
      this.tally.refreshes[stale ? 'stale' : 'aged']++
      this.load(key, counters)
    }
    this.refreshes.clear()
  }

  /** How far to move the clock for the key's entry to be `share`% into the last fifth of its life (0 if it has none). */
  untilAged(key: string, share: number): number {
    const e = this.entries.get(key)
    if (!this.live(e)) return 0
    const from = e.createdAt + Math.ceil(REFRESH_AHEAD * (e.expiresAt - e.createdAt))
    return Math.max(0, from + Math.floor(((e.expiresAt - from) * share) / 100) - this.now())
  }

  /** Whether a hit on the key's entry refreshes it from the origin in the background: stale, or past REFRESH_AHEAD of its TTL. */
  due(key: string, e: ModelEntry): boolean {
    return originOf(key) !== undefined && (e.stale || this.now() - e.createdAt >= REFRESH_AHEAD * (e.expiresAt - e.createdAt))
  }

  /** Takes the etag an answer shows for an entry whose etag the model does not know yet (checking it pairs one to one). */
  learn(e: ModelEntry, etag: unknown): string | undefined {
    if (e.etag !== undefined || typeof etag !== 'string') return undefined
    const mismatch = this.etag(JSON.stringify(e.value), etag)
    if (mismatch === undefined) e.etag = etag
    return mismatch
  }

  /** Checks that etags and serialized values pair one to one. */
  etag(serialized: string, etag: string): string | undefined {
    const known = this.#etags.get(serialized)
    if (known !== undefined && known !== etag) return `${serialized} had etag ${known}, now ${etag}`
    const other = this.#values.get(etag)
    if (other !== undefined && other !== serialized) return `${serialized} and ${other} share etag ${etag}`
    this.#etags.set(serialized, etag)
    this.#values.set(etag, serialized)
    return undefined
  }
}

/** Runs one step on the apps and the model; throws on any disagreement. */
async function step(apps: FastifyInstance[], model: Model, origin: OriginServer, o: Op, i: number, at: string): Promise<void> {
  const fail = (what: string): never => {
    throw new Error(`${what}, at ${at}`)
  }
  const here = 'on' in o ? o.on % apps.length : 0
  const app = apps[here]!
  const counters = 'on' in o ? model.counters[here]! : undefined
  const now = model.now()
  const learn = (e: ModelEntry, etag: unknown) => {
    const mismatch = model.learn(e, etag)
    if (mismatch !== undefined) fail(mismatch)
  }
  const checkEntry = (body: Record<string, unknown>, key: string, e: ModelEntry, what: string) => {
    learn(e, body.etag)
    const got = JSON.stringify([body.key, body.value, body.userId, body.tags, body.stale, body.etag, body.expiresAt, body.ttlRemainingMs])
    const want = JSON.stringify([key, e.value, e.userId ?? null, e.tags ?? [], e.stale, e.etag, new Date(e.expiresAt).toISOString(), e.expiresAt - now])
    if (got !== want) fail(`${what} read ${got}, the model ${want}`)
  }
  /** Checks a write's answer (a PUT's, or a batch-set item's) against the lease rule, and applies it to the model. */
  const written = (
    w: { key: string; value: unknown; user?: string | undefined; tags?: string[] | undefined; ttl?: number | undefined },
    lease: { token: string; key: string; step: number } | undefined,
    answer: { status: number; key?: string; etag?: string; expiresAt?: string; error?: string },
    what: string,
  ) => {
    const refused = lease !== undefined && model.refuses(lease, w.key, w.user, w.tags)
    if (answer.status === 409) {
      if (!refused) fail(`${what} was refused (${JSON.stringify(answer)}) that no invalidation since its lease touched`)
      if (answer.error !== 'lease_invalidated') fail(`${what} was refused with ${JSON.stringify(answer)}`)
      model.endFill(w.key, lease!.token)
      counters!.rejected++
      return
    }
    if (answer.status !== 200) fail(`${what} answered ${JSON.stringify(answer)}`)
    if (refused) fail(`${what} was taken although its lease is void`)
    const expiresAt = now + (w.ttl ?? DEFAULT_LIMITS.defaultTtlMs)
    if (answer.key !== w.key || answer.expiresAt !== new Date(expiresAt).toISOString()) fail(`${what} answered ${JSON.stringify(answer)}`)
    const mismatch = model.etag(JSON.stringify(w.value), answer.etag!)
    if (mismatch !== undefined) fail(mismatch)
    model.entries.set(w.key, { value: w.value, userId: w.user, tags: w.tags, createdAt: now, expiresAt, stale: false, etag: answer.etag!, hits: 0 })
    model.endFill(w.key)
    counters!.sets++
  }
  /** A hit: counted, and a background refresh if the entry is due one (applied once it is done). */
  const hit = (key: string, e: ModelEntry) => {
    counters!.hits++
    e.hits++
    if (model.due(key, e)) model.refreshes.set(key, { counters: counters!, stale: e.stale })
  }
  /** Checks a consistency report against the model's findings per key, then applies the repair asked for. */
  const reported = (res: Awaited<ReturnType<typeof call>>, findings: Map<string, Finding>, repair: 'none' | 'invalidate' | 'refresh') => {
    if (res.statusCode !== 200) fail(`a consistency check answered ${res.statusCode} ${res.body}`)
    const body = res.json()
    const keysOf = (...kinds: Finding[]) => [...findings].filter(([, f]) => kinds.includes(f)).map(([k]) => k).sort()
    const stale = keysOf('stale', 'gone')
    // A refresh reloads the stale keys whose origin has data, and deletes the others (no origin, or no data).
    const reload = repair === 'refresh' ? stale.filter((k) => model.origin.has(k)) : []
    const drop = repair === 'none' ? [] : stale.filter((k) => !reload.includes(k))
    const got = JSON.stringify([body.checked, body.consistent, [...body.stale].sort(), [...body.missing].sort(), body.errors.map((e: { key: string }) => e.key).sort(), body.repaired])
    const want = JSON.stringify([findings.size, keysOf('consistent').length, stale, keysOf('missing'), keysOf('error'), reload.length + drop.length])
    if (got !== want) fail(`a consistency check reported ${got}, the model ${want}`)
    for (const k of reload) model.load(k, counters!)
    if (drop.length > 0) model.invalidate(i, { keys: drop }, 'delete', { app: here, source: 'consistency' })
  }
  switch (o.op) {
    case 'put': {
      const lease = model.pickLease(o.key, o.lease)
      const res = await call(app, putRequest(o, lease))
      written(o, lease, { ...res.json(), status: res.statusCode }, 'a write')
      return
    }
    case 'batchSet': {
      // A bad item (ttlMs 0) fails alone.
      const leases = o.items.map((item) => model.pickLease(item.key, item.lease))
      const entries = o.items.map((item, n) => ({ key: item.key, value: item.value, userId: item.user, tags: item.tags, ttlMs: item.bad ? 0 : item.ttl, lease: leases[n]?.token }))
      const res = await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries } })
      if (res.statusCode !== 200) fail(`batch-set answered ${res.statusCode} ${res.body}`)
      const { results } = res.json()
      if (results.length !== o.items.length) fail(`batch-set answered ${results.length} results for ${o.items.length} items`)
      for (const [n, item] of o.items.entries()) {
        if (results[n].key !== item.key) fail(`batch-set result ${n} is for ${results[n].key}, not ${item.key}`)
        if (!item.bad) written(item, leases[n], results[n], `batch-set item ${n}`)
        else if (results[n].status !== 400 || results[n].error !== 'invalid_request') fail(`a bad batch-set item answered ${JSON.stringify(results[n])}`)
      }
      return
    }
    case 'get': {
      const etag = model.entries.get(o.key)?.etag ?? 'none'
      let e = model.read(o.key, o.allowStale)
      const sent = { quoted: `"${etag}"`, bare: etag, other: '"another-etag"' } as const
      const headers = o.conditional === undefined ? {} : { 'if-none-match': sent[o.conditional] }
      const query = new URLSearchParams({ ...(o.allowStale ? { allowStale: 'true' } : {}), ...(o.load ? { load: 'true' } : {}) })
      const res = await call(app, { method: 'GET', url: `/v1/entries/${keyPath(o.key)}?${query}`, headers })
      if (e === undefined) {
        counters!.misses++
        counters!.issued++
        // With ?load=true a miss the origin has data for is filled from it under the miss's lease, and answered.
        if (!o.load || !model.origin.has(o.key)) {
          if (res.statusCode !== 404 || res.json().error !== 'not_found' || typeof res.json().lease !== 'string') fail(`a miss answered ${res.statusCode} ${res.body}`)
          const herd = model.miss(o.key, i, res.json())
          if (herd !== undefined) fail(herd)
          return
        }
        e = model.load(o.key, counters!)
      } else hit(o.key, e)
      // 304 when the etag sent is the entry's, never for a stale-marked entry.
      if (o.conditional !== undefined && o.conditional !== 'other' && etag === e.etag && !e.stale) {
        if (res.statusCode !== 304 || res.headers.etag !== `"${e.etag}"`) fail(`a conditional read of an unchanged entry answered ${res.statusCode}`)
        return
      }
      if (res.statusCode !== 200) fail(`a read answered ${res.statusCode} ${res.body}`)
      learn(e, String(res.headers.etag).slice(1, -1))
      if (res.headers.etag !== `"${e.etag}"`) fail(`a read answered etag ${res.headers.etag}, the model's "${e.etag}"`)
      checkEntry(res.json(), o.key, e, 'GET')
      return
    }
    case 'batchGet': {
      const res = await call(app, { method: 'POST', url: `/v1/entries/batch-get${o.allowStale ? '?allowStale=true' : ''}`, payload: { keys: o.keys } })
      if (res.statusCode !== 200) fail(`batch-get answered ${res.statusCode} ${res.body}`)
      const body = res.json()
      const answers = new Map(o.keys.map((k) => [k, model.read(k, o.allowStale)]))
      const found = o.keys.filter((k) => answers.get(k) !== undefined)
      const missing = o.keys.filter((k) => answers.get(k) === undefined)
      if (JSON.stringify(Object.keys(body.entries).sort()) !== JSON.stringify(found.sort())) fail(`batch-get found ${Object.keys(body.entries)}, the model ${found}`)
      if (JSON.stringify([...body.missing].sort()) !== JSON.stringify(missing.sort())) fail(`batch-get missed ${body.missing}, the model ${missing}`)
      for (const k of found) checkEntry(body.entries[k], k, answers.get(k)!, 'batch-get')
      for (const k of missing) {
        const herd = model.miss(k, i, body.leases[k])
        if (herd !== undefined) fail(`batch-get: ${herd}`)
      }
      for (const k of found) hit(k, answers.get(k)!)
      counters!.misses += missing.length
      counters!.issued += missing.length
      return
    }
    case 'invalidate':
    case 'deleteKey':
    case 'deleteUser':
    case 'deleteTag': {
      const [selector, m, request] = invalidation(o)
      const res = await call(app, request)
      const count = model.invalidate(i, selector, m, { app: here, source: 'api' })
      if (res.statusCode !== 200) fail(`an invalidation answered ${res.statusCode} ${res.body}`)
      const body = res.json()
      if (body.invalidated !== count || body.mode !== m || typeof body.id !== 'string') fail(`an invalidation answered ${res.body}, the model counts ${count}`)
      return
    }
    case 'advance':
      return
    case 'clear': {
      // The emergency clear: a token from one app, redeemed on the same or (cluster mode) the other.
      const token = await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'model' } })
      if (token.statusCode !== 200) fail(`clear-token answered ${token.statusCode} ${token.body}`)
      const res = await call(apps[o.redeemOn % apps.length]!, { method: 'POST', url: '/v1/admin/clear', payload: { token: token.json().token } })
      const cleared = model.clear(i, o.redeemOn % apps.length)
      if (res.statusCode !== 200 || res.json().cleared !== cleared) fail(`a clear answered ${res.statusCode} ${res.body}, the model clears ${cleared}`)
      return
    }
    case 'release': {
      // Gives back one of the key's leases (the fill lease or a waiter's): only the fill lease ends the claim.
      const mine = model.leases.filter((l) => l.key === o.key)
      if (mine.length === 0) return
      const token = mine[o.lease % mine.length]!.token
      const res = await call(app, { method: 'POST', url: `/v1/entries/${keyPath(o.key)}/release`, payload: { lease: token } })
      if (res.statusCode !== 204) fail(`a release answered ${res.statusCode} ${res.body}`)
      model.endFill(o.key, token)
      return
    }
    case 'inspectUser': {
      const res = await call(app, { method: 'GET', url: `/v1/debug/users/${o.user}` })
      if (res.statusCode !== 200) fail(`a user's inspection answered ${res.statusCode} ${res.body}`)
      const body = res.json()
      const hits = (n: number) => (model.cluster ? null : n)
      for (const listed of body.entries) {
        const e = model.entries.get(listed.key)
        if (e !== undefined) learn(e, listed.etag)
      }
      type Listed = { key: string; tags: string[]; ttlRemainingMs: number; stale: boolean; etag: string; hits: number }
      const got = JSON.stringify(body.entries.map((e: Listed) => [e.key, e.tags, e.ttlRemainingMs, e.stale, e.etag, hits(e.hits)]).sort())
      const want = JSON.stringify(
        [...model.entries].filter(([, e]) => model.live(e) && e.userId === o.user).map(([k, e]) => [k, e.tags ?? [], e.expiresAt - now, e.stale, e.etag, hits(e.hits)]).sort(),
      )
      if (body.count !== body.entries.length || got !== want) fail(`${o.user}'s inspection listed ${got} (count ${body.count}), the model ${want}`)
      return
    }
    case 'head': {
      // Whether the key is cached now: no lease, no hit or miss, no fill claim.
      const e = model.peek(o.key)
      const res = await call(app, { method: 'HEAD', url: `/v1/entries/${keyPath(o.key)}${o.allowStale ? '?allowStale=true' : ''}` })
      const cached = e !== undefined && (o.allowStale || !e.stale)
      if (cached && typeof res.headers.etag === 'string') learn(e, res.headers.etag.slice(1, -1))
      if (res.statusCode !== (cached ? 200 : 404) || res.body !== '' || (cached && res.headers.etag !== `"${e.etag}"`)) fail(`HEAD answered ${res.statusCode} ${JSON.stringify(res.headers)}`)
      return
    }
    case 'inspectEntry': {
      const e = model.peek(o.key)
      const res = await call(app, { method: 'GET', url: `/v1/debug/entries/${keyPath(o.key)}` })
      if (e === undefined) {
        if (res.statusCode !== 404 || res.json().error !== 'not_found' || 'lease' in res.json()) fail(`an inspection of a missing key answered ${res.statusCode} ${res.body}`)
        return
      }
      const body = res.json()
      learn(e, body.etag)
      const got = JSON.stringify([res.statusCode, body.key, body.value, body.userId, body.tags, body.stale, body.etag, body.expiresAt, model.cluster ? null : body.hits])
      const want = JSON.stringify([200, o.key, e.value, e.userId ?? null, e.tags ?? [], e.stale, e.etag, new Date(e.expiresAt).toISOString(), model.cluster ? null : e.hits])
      if (got !== want) fail(`an inspection answered ${got}, the model ${want}`)
      return
    }
    case 'stats': {
      const res = await call(app, { method: 'GET', url: '/v1/stats' })
      const { hits, misses, sets, leases } = res.json()
      const got = JSON.stringify({ hits, misses, sets, issued: leases.issued, rejected: leases.rejected })
      if (got !== JSON.stringify(counters)) fail(`stats counted ${got}, the model ${JSON.stringify(counters)}`)
      // The invalidations by source since the reset, this app's own (in cluster mode, `bus` counts the others' as they arrive),
      // and (memory mode) the last of them.
      const { bySource, last } = res.json().invalidations as { bySource: Record<string, number>; last: LogRecord | null }
      const since = model.logs[here]!.slice(0, model.logs[here]!.length - model.resetAt[here]!)
      const sources: Record<string, number> = {}
      for (const { source } of since) sources[source] = (sources[source] ?? 0) + 1
      const counted = Object.entries(bySource).filter(([source, n]) => source !== 'bus' && n > 0)
      if (JSON.stringify(counted.sort()) !== JSON.stringify(Object.entries(sources).sort())) {
        fail(`stats counted invalidations by source ${JSON.stringify(bySource)}, the model ${JSON.stringify(sources)}`)
      }
      if (!model.cluster) {
        const newest = last === null ? null : logged(last.selector, last.mode, last.source, last.invalidated)
        if (newest !== (since[0]?.record ?? null)) fail(`stats' last invalidation is ${newest}, the model's ${since[0]?.record ?? null}`)
      }
      return
    }
    case 'resetStats': {
      const res = await call(app, { method: 'POST', url: '/v1/stats/reset' })
      if (res.statusCode !== 200 || res.json().reset !== true) fail(`a stats reset answered ${res.statusCode} ${res.body}`)
      Object.assign(counters!, { hits: 0, misses: 0, sets: 0, issued: 0, rejected: 0 })
      model.resetAt[here] = model.logs[here]!.length
      return
    }
    case 'race': {
      if (o.lease === 'valid' && model.readable(o.key, false) === undefined) {
        await step(apps, model, origin, { op: 'get', on: o.on, key: o.key, allowStale: false, conditional: undefined, load: false }, i, `${at} (its miss)`)
      }
      const lease =
        o.lease === 'none' ? undefined
        : o.lease === 'any' ? model.pickLease(o.key, { nth: o.nth, foreign: false })
        : model.leases.filter((l) => l.key === o.key && !model.refuses(l, o.key, o.user, o.tags)).at(-1)
      const kind = lease === undefined ? 'unleased' : model.refuses(lease, o.key, o.user, o.tags) ? 'void' : 'valid'
      const selector = covering(o.cover, o.key, o.user, o.tags)
      const [res, inv] = await Promise.all([
        turns(o.gap).then(() => call(app, putRequest(o, lease))),
        turns(-o.gap).then(() => call(apps[o.invalidateOn % apps.length]!, postInvalidation(selector, o.mode))),
      ])
      if (inv.statusCode !== 200) fail(`an invalidation racing a write answered ${inv.statusCode} ${inv.body}`)
      // Which went first, from what is left: a write refused, or one whose entry stands fresh, came after the invalidation.
      const after = await call(app, { method: 'GET', url: `/v1/debug/entries/${keyPath(o.key)}` })
      const answer = { ...res.json(), status: res.statusCode }
      const stands = after.statusCode === 200 && after.json().etag === answer.etag && after.json().stale === false
      const invalidationFirst = res.statusCode === 409 || stands
      model.tally.races[kind][invalidationFirst ? 1 : 0]++
      // The invalidation is half a step later than the step's miss, if it made one: it voids that lease.
      let count: number
      if (invalidationFirst) {
        count = model.invalidate(i + 0.5, selector, o.mode, { app: o.invalidateOn % apps.length, source: 'api' })
        written(o, lease, answer, 'a write racing an invalidation (after it)')
      } else {
        written(o, lease, answer, 'a write racing an invalidation (before it)')
        count = model.invalidate(i + 0.5, selector, o.mode, { app: o.invalidateOn % apps.length, source: 'api' })
      }
      if (inv.json().mode !== o.mode) fail(`an invalidation racing a write answered ${inv.body}`)
      if (inv.json().invalidated !== count) fail(`an invalidation racing a write counted ${inv.body}, the model ${count} (${invalidationFirst ? 'after' : 'before'} the write)`)
      // What is left must be what the model has after the two in that order.
      return step(apps, model, origin, { op: 'inspectEntry', on: o.on, key: o.key }, i, `${at} (its inspection)`)
    }
    case 'age':
      // The clock has moved (see `holds`): now the read, its refresh, and what it left.
      await step(apps, model, origin, { op: 'get', on: o.on, key: o.key, allowStale: o.allowStale, conditional: undefined, load: false }, i, `${at} (its read)`)
      await refreshesDone(apps, model)
      return step(apps, model, origin, { op: 'inspectEntry', on: o.on, key: o.key }, i, `${at} (its inspection)`)
    case 'fillRace': {
      // Only a miss loads: a readable entry is deleted first (before the miss: its lease is not voided by it).
      if (model.readable(o.key, false) !== undefined) await step(apps, model, origin, { op: 'deleteKey', on: o.on, key: o.key }, i, `${at} (its delete)`)
      model.read(o.key, false)
      const { path, userId, tags } = originOf(o.key)!
      const selector = covering(o.cover, o.key, userId, tags)
      const loaded = model.origin.has(o.key)
      origin.holdPath = path
      origin.hold()
      const calls = origin.calls
      const reading = call(app, { method: 'GET', url: `/v1/entries/${keyPath(o.key)}?load=true` })
      let inv: Awaited<ReturnType<typeof call>>
      let called = false
      try {
        // (A read answered without calling the origin fails here rather than hang.)
        await Promise.race([
          origin.waitForCalls(calls + 1).then(() => void (called = true)),
          reading.then((r) => void (called || fail(`a ?load=true miss answered ${r.statusCode} ${r.body} without calling the origin`))),
        ])
        setOriginData(origin, model, o.key, o.value)
        inv = await call(apps[o.invalidateOn % apps.length]!, postInvalidation(selector, o.mode))
      } finally {
        origin.release()
        origin.holdPath = undefined
      }
      const res = await reading
      if (inv.statusCode !== 200 || inv.json().mode !== o.mode) fail(`an invalidation during a load answered ${inv.statusCode} ${inv.body}`)
      // In the model's order: the miss (at step i; its lease and fill claim are seen only when
      // the miss is answered), the invalidation (half a step later, so it voids that lease), and
      // then, if the origin had data at the first call, the load's refused write of it and its
      // second load: what the origin has now is cached and answered, or, if it has nothing, the
      // miss is. If the origin had no data at the first call, nothing is written or loaded again:
      // the miss is answered.
      counters!.misses++
      counters!.issued++
      const missed = !loaded || o.value === undefined
      if (missed) {
        if (res.statusCode !== 404 || res.json().error !== 'not_found' || typeof res.json().lease !== 'string') fail(`a load voided by an invalidation answered ${res.statusCode} ${res.body}`)
        const herd = model.miss(o.key, i, res.json())
        if (herd !== undefined) fail(herd)
      }
      const count = model.invalidate(i + 0.5, selector, o.mode, { app: o.invalidateOn % apps.length, source: 'api' })
      if (inv.json().invalidated !== count) fail(`an invalidation during a load counted ${inv.body}, the model ${count}`)
      if (loaded) counters!.rejected++
      model.tally.fills[!loaded ? 'nothing' : missed ? 'voided' : 'reloaded']++
      if (missed) {
        // The refused write ended the miss's fill claim, if it had one.
        if (loaded) model.endFill(o.key, res.json().lease)
        return
      }
      const e = model.load(o.key, counters!)
      if (res.statusCode !== 200) fail(`a load voided by an invalidation answered ${res.statusCode} ${res.body}, not the origin's new data`)
      checkEntry(res.json(), o.key, e, 'a load voided by an invalidation')
      return
    }
    case 'event': {
      // A redelivery (an id seen before) is replied to as the first delivery was, and nothing is
      // applied again, whatever data it carries. In cluster mode that holds across apps when
      // both deliveries match a rule (README, Events): an event no rule matches is answered by
      // the app alone, without Redis. So an id whose first delivery matched no rule is
      // redelivered as it was, and a changed redelivery keeps a type some rule matches.
      const first = o.id === undefined ? undefined : model.events.get(o.id)
      const firstRules = first === undefined ? [] : RULES.filter((rule) => rule.event === first.type)
      const event =
        first === undefined ? { type: o.type, data: o.data }
        : o.changed && firstRules.length > 0 ? { type: RULES.some((rule) => rule.event === o.type) ? o.type : first.type, data: o.data }
        : first
      const res = await call(app, { method: 'POST', url: '/v1/events', payload: { id: o.id, type: event.type, data: event.data } })
      if (res.statusCode !== 200) fail(`an event answered ${res.statusCode} ${res.body}`)
      const rules = first === undefined ? RULES.filter((rule) => rule.event === event.type) : firstRules
      // (The redelivery of an event no rule matched gets the same empty reply, replayed or not.)
      if (first !== undefined && rules.length > 0) {
        if (res.headers['idempotent-replayed'] !== 'true' || res.body !== first.reply) fail(`a redelivered event answered ${JSON.stringify(res.headers)} ${res.body}, first ${first.reply}`)
        return
      }
      if (first === undefined && res.headers['idempotent-replayed'] !== undefined) fail(`a new event was answered as a replay: ${res.body}`)
      const counts = rules.map((rule) => [model.invalidate(i, ruleSelector(rule, event.data), rule.mode, { app: here, source: 'events' }), rule.mode])
      const body = res.json()
      const got = JSON.stringify([body.matched, body.invalidations.map((inv: { invalidated: number; mode: string }) => [inv.invalidated, inv.mode])])
      if (got !== JSON.stringify([rules.length, counts])) fail(`an event answered ${got}, the model ${JSON.stringify([rules.length, counts])}`)
      if (o.id !== undefined && first === undefined) model.events.set(o.id, { ...event, reply: res.body })
      return
    }
    case 'log': {
      // Every invalidation the app made, newest first: the API's, the events', the repairs', the clears.
      const res = await call(app, { method: 'GET', url: '/v1/debug/invalidations?limit=1000' })
      if (res.statusCode !== 200) fail(`the invalidation log answered ${res.statusCode} ${res.body}`)
      const records: LogRecord[] = res.json()
      const got = JSON.stringify(records.filter((r) => r.source !== 'bus').map((r) => logged(r.selector, r.mode, r.source, r.invalidated)))
      const want = JSON.stringify(model.logs[here]!.map(({ record }) => record))
      if (got !== want) fail(`the invalidation log has ${got}, the model ${want}`)
      return
    }
    case 'originSet':
      return setOriginData(origin, model, o.key, o.value)
    case 'refresh': {
      // A forced refresh: 404 when no origin serves the key, and when it has no data (then the key is invalidated).
      const res = await call(app, { method: 'POST', url: `/v1/entries/${keyPath(o.key)}/refresh` })
      if (!model.origin.has(o.key)) {
        if (res.statusCode !== 404 || res.json().error !== 'not_found') fail(`a refresh answered ${res.statusCode} ${res.body}, not 404`)
        if (originOf(o.key) === undefined) return
        model.invalidate(i, { keys: [o.key] }, 'delete', { app: here, source: 'api' })
        return step(apps, model, origin, { op: 'inspectEntry', on: o.on, key: o.key }, i, `${at} (its inspection)`)
      }
      const e = model.load(o.key, counters!)
      const body = res.json()
      learn(e, body.etag)
      if (res.statusCode !== 200 || body.key !== o.key || body.etag !== e.etag || body.expiresAt !== new Date(e.expiresAt).toISOString()) {
        fail(`a refresh answered ${res.statusCode} ${res.body}`)
      }
      return
    }
    case 'warm': {
      // Each key, and each user's key of the origin, is loaded (cached or not) if the origin has data for it; else it failed.
      const res = await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: o.keys, userIds: o.userIds } })
      if (res.statusCode !== 200) fail(`a warm answered ${res.statusCode} ${res.body}`)
      const keys = [...new Set([...o.keys, ...o.userIds.map(originKey)])]
      const loaded = keys.filter((k) => model.origin.has(k))
      const body = res.json()
      const got = JSON.stringify([body.requested, body.loaded, body.failed, body.errors.map((e: { key: string }) => e.key).sort()])
      const want = JSON.stringify([keys.length, loaded.length, keys.length - loaded.length, keys.filter((k) => !loaded.includes(k)).sort()])
      if (got !== want) fail(`a warm summed up ${got}, the model ${want}`)
      for (const k of loaded) model.load(k, counters!)
      return
    }
    case 'checkOrigin': {
      // The named keys, the users' keys and the sampled ones (every cached key), each compared with what the origin holds now.
      const res = await call(app, { method: 'POST', url: '/v1/consistency', payload: { against: 'origin', keys: o.keys, userIds: o.userIds, sample: o.sample, repair: o.repair } })
      const named = new Set(o.keys)
      const users = [...model.entries].filter(([, e]) => e.userId !== undefined && o.userIds.includes(e.userId)).map(([k]) => k)
      const sampled = o.sample === undefined ? [] : [...model.entries].filter(([, e]) => model.live(e)).map(([k]) => k)
      const findings = new Map<string, Finding>()
      for (const k of new Set([...o.keys, ...users, ...sampled])) {
        const e = model.peek(k)
        // A key the cache chose (a user's) that is not there is no finding.
        if (e === undefined) {
          if (named.has(k)) findings.set(k, 'missing')
        } else if (originOf(k) === undefined) findings.set(k, 'error')
        else if (!model.origin.has(k)) findings.set(k, 'gone')
        else findings.set(k, JSON.stringify(model.origin.get(k)) === JSON.stringify(e.value) ? 'consistent' : 'stale')
      }
      reported(res, findings, o.repair)
      return
    }
    case 'checkProvided': {
      const truths = o.entries.map(({ key: k, truth, other }) => {
        const e = model.entries.get(k)
        switch (truth) {
          case 'cached':
            return { key: k, value: e !== undefined ? e.value : other }
          case 'origin':
            return { key: k, value: model.origin.has(k) ? model.origin.get(k) : other }
          case 'other':
            return { key: k, value: other }
          case 'etag':
            // (An etag the model does not know yet: the cached value instead.)
            return e?.etag !== undefined ? { key: k, etag: `"${e.etag}"` } : { key: k, value: e !== undefined ? e.value : other }
          case 'otherEtag':
            return { key: k, etag: 'another-etag' }
        }
      })
      const res = await call(app, { method: 'POST', url: '/v1/consistency', payload: { against: 'provided', entries: truths, repair: o.repair } })
      const findings = new Map<string, Finding>()
      for (const truth of truths) {
        const e = model.peek(truth.key)
        const same = e !== undefined && ('etag' in truth ? truth.etag === `"${e.etag}"` : JSON.stringify(truth.value) === JSON.stringify(e.value))
        findings.set(truth.key, e === undefined ? 'missing' : same ? 'consistent' : 'stale')
      }
      reported(res, findings, o.repair)
      return
    }
  }
}

/** What the sequences of one test reached, for the test to require it was reached. */
interface Tally {
  /** Races by the write's lease (none, void before the race, valid): [write first, invalidation first]. */
  races: Record<'unleased' | 'void' | 'valid', [number, number]>
  /** Background refreshes (that reloaded) of a stale entry, and of one past REFRESH_AHEAD of its TTL. */
  refreshes: { stale: number; aged: number }
  /** Fills raced by an invalidation: the origin had nothing at first; its data was voided, and then it had none; or reloaded. */
  fills: { nothing: number; voided: number; reloaded: number }
}

/** Waits until no app has a background refresh queued or running, then applies them to the model. */
async function refreshesDone(apps: FastifyInstance[], model: Model): Promise<void> {
  await Promise.all(apps.map((app) => app.origins.refresher.drain()))
  model.refreshed()
}

/** The origin's data for an origin key, in the origin server and in the model (undefined: none, it answers 404). */
function setOriginData(origin: OriginServer, model: Model, key: string, value: unknown): void {
  const { path } = originOf(key)!
  if (value === undefined) {
    origin.values.delete(path)
    model.origin.delete(key)
  } else {
    origin.values.set(path, value)
    model.origin.set(key, value)
  }
}

/**
 * An invalidation that covers a write of `key` (its user and tags given): by the key, its
 * first character as a prefix, its user or its first tag (by key when it has no user or tag).
 */
function covering(cover: 'key' | 'prefix' | 'user' | 'tag', key: string, userId: string | undefined, tags: string[] | undefined): Selector {
  if (cover === 'user' && userId !== undefined) return { userIds: [userId] }
  if (cover === 'tag' && tags !== undefined) return { tags: [tags[0]!] }
  if (cover === 'prefix') return { prefixes: [key.slice(0, 1)] }
  return { keys: [key] }
}

/** A PUT of a write, with the lease's token if it carries one. */
function putRequest(w: { key: string; value: unknown; user?: string | undefined; tags?: string[] | undefined; ttl?: number | undefined }, lease: { token: string } | undefined): InjectOptions {
  return { method: 'PUT', url: `/v1/entries/${keyPath(w.key)}`, payload: { value: w.value, userId: w.user, tags: w.tags, ttlMs: w.ttl, lease: lease?.token } }
}

const postInvalidation = (selector: Selector, mode: 'delete' | 'stale'): InjectOptions => ({ method: 'POST', url: '/v1/invalidations', payload: { ...selector, mode } })

/** An invalidation step as its selector, its mode, and the request that makes it. */
function invalidation(o: Extract<Op, { op: 'invalidate' | 'deleteKey' | 'deleteUser' | 'deleteTag' }>): [Selector, 'delete' | 'stale', InjectOptions] {
  switch (o.op) {
    case 'invalidate':
      return [o.selector, o.mode, postInvalidation(o.selector, o.mode)]
    case 'deleteKey':
      return [{ keys: [o.key] }, 'delete', { method: 'DELETE', url: `/v1/entries/${keyPath(o.key)}` }]
    case 'deleteUser':
      return [{ userIds: [o.user] }, o.mode, { method: 'DELETE', url: `/v1/users/${o.user}/entries?mode=${o.mode}` }]
    case 'deleteTag':
      return [{ tags: [o.tag] }, o.mode, { method: 'DELETE', url: `/v1/tags/${o.tag}/entries?mode=${o.mode}` }]
  }
}

type Open = (clock: FakeClock, run: number, apps: FastifyInstance[], config: Partial<Config>) => Promise<void>

/**
 * Runs the property with `open` making the apps for one sequence on the given clock and with
 * the given config, into `apps` (closed whatever happens), all with `origin` as their origin.
 */
async function holds(open: Open, origin: OriginServer, options: Parameters<unknown>, fillLeaseMs: number, cluster: boolean): Promise<{ steps: number; tally: Tally }> {
  let steps = 0
  let run = 0
  const tally: Tally = { races: { unleased: [0, 0], void: [0, 0], valid: [0, 0] }, refreshes: { stale: 0, aged: 0 }, fills: { nothing: 0, voided: 0, reloaded: 0 } }
  const config = { ...CONFIG, fillLeaseMs, configFile: { ...originConfig(origin), rules: RULES } }
  await fc.assert(
    // The origin starts with data for each of its keys; `originSet` steps change or remove it.
    fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 40 }), fc.array(value, { minLength: ORIGIN_KEYS.length, maxLength: ORIGIN_KEYS.length }), async (ops, data) => {
      const clock = new FakeClock()
      const apps: FastifyInstance[] = []
      try {
        await open(clock, run++, apps, config)
        const model = new Model(apps.length, clock.now, fillLeaseMs, cluster, tally)
        origin.values.clear()
        for (const [n, key] of ORIGIN_KEYS.entries()) setOriginData(origin, model, key, data[n])
        let aged = 0
        for (const [i, o] of ops.entries()) {
          if (o.op === 'advance') clock.advance(o.ms)
          // (Past the budget the step is a plain read.)
          const age = o.op === 'age' ? model.untilAged(o.key, o.share) : 0
          if (aged + age <= AGE_BUDGET_MS) {
            clock.advance(age)
            aged += age
          }
          await step(apps, model, origin, o, i, `step ${i} ${JSON.stringify(o)} of ${JSON.stringify(ops)}`)
          // Refresh-ahead runs in the background: the step is over once its refreshes are.
          await refreshesDone(apps, model)
          steps++
        }
      } finally {
        await Promise.all(apps.map((app) => app.close()))
      }
    }),
    options,
  )
  return { steps, tally }
}

/**
 * Requires that the sequences reached what they are for: valid-leased writes racing
 * invalidations both ways, refreshes of aged entries, slow fills voided and reloaded.
 */
function reached(t: Test, tally: Tally, numRuns: number): void {
  // A replay (FC_SEED and FC_PATH) or a short run (FC_RUNS) need not reach them all.
  if (process.env.FC_SEED || numRuns < 40) return
  t.ok(tally.races.valid[0] > 0 && tally.races.valid[1] > 0, `writes under valid leases raced invalidations both ways: ${JSON.stringify(tally.races)}`)
  t.ok(tally.refreshes.aged > 0, `hits refreshed entries past ${REFRESH_AHEAD * 100}% of their TTL: ${JSON.stringify(tally.refreshes)}`)
  t.ok(tally.fills.reloaded > 0, `slow fills were voided by invalidations and loaded again: ${JSON.stringify(tally.fills)}`)
}

t.test('memory mode: every answer of the API agrees with the model, after any sequence', async (t) => {
  const options = runs(80)
  // No sweep: an expired entry stays until a read or an invalidation meets it, as the model has it.
  const fillLeaseMs = 2000
  const open: Open = async (clock, _run, apps, config) =>
    void apps.push(await build({ teardown() {} }, config, { now: clock.now, store: new MemoryStore({ now: clock.now, sweepIntervalMs: 0 }) }))
  const { steps, tally } = await holds(open, await OriginServer.start(t), options, fillLeaseMs, false)
  t.pass(`the model held for ${options.numRuns} random sequences (${steps} steps)`)
  reached(t, tally, options.numRuns)
})

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  t.test('cluster mode, two apps on one Redis: every answer agrees with the model, whichever app takes each step', async (t) => {
    // A fill claim lives in Redis and runs out by Redis' clock, which the test's clock does not
    // move: claims of 10 minutes run out by neither within a sequence. Timeouts long enough for
    // a loaded machine, and no bus PING (a late one would take the bus down).
    const fillLeaseMs = 600_000
    const open: Open = async (clock, run, apps, config) => {
      for (let n = 0; n < 2; n++) {
        const store = new TieredStore({ redisUrl: redis.url, namespace: `m${run}`, now: clock.now, sweepIntervalMs: 0, commandTimeoutMs: 10_000, busPingMs: 0 })
        if (!(await store.connect(10_000))) {
          await store.close()
          throw new Error('a TieredStore did not connect')
        }
        apps.push(await build({ teardown() {} }, config, { now: clock.now, store }))
      }
    }
    const options = runs(40)
    const { steps, tally } = await holds(open, await OriginServer.start(t), options, fillLeaseMs, true)
    t.pass(`the model held for ${options.numRuns} random sequences (${steps} steps) over two apps`)
    reached(t, tally, options.numRuns)
  })
}
