import fc, { type Parameters } from 'fast-check'
import type { FastifyInstance, InjectOptions } from 'fastify'
import t from 'tap'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import type { Selector } from '../../src/cache/types.js'
import { DEFAULT_SECURITY } from '../../src/config.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { TieredStore } from '../../src/stores/tiered-store.js'
import { FakeClock, build, call, keyPath } from '../helpers/build.js'
import { runs } from '../helpers/property.js'
import { requireRedisServer, startRedis } from '../helpers/redis-server.js'

// The HTTP API against a model of it, over random sequences of: writes (PUT, and batch-set with
// a bad item now and then and keys sent twice; with no lease, one of the key's, or another
// key's), reads (plain, allowStale, conditional with the entry's etag quoted or bare, or
// another; HEAD), batch reads, leases given back, emergency clears, invalidations in every form
// the contract has (POST /v1/invalidations, DELETE of a key, the user and tag shorthands, both
// modes), user inspection, stats, and the clock moving on. Every answer is checked against the
// model:
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
// - HEAD and the inspection of an entry (the entry's hits too, in memory mode) count nothing
//   and take no lease; a user's entries; the hits, misses, sets and leases issued and refused of
//   the stats.
// In memory mode with one app, and in cluster mode with two apps on one Redis (a step runs on
// either; reading on the other app at once after a change holds on one host, see
// test/stores/tiered-store.property.test.ts).

const KEYS = ['a', 'ab', 'b:1', 'b/2', 'c d', 'é']
const USERS = ['u1', 'u2']
const TAGS = ['t1', 't2', 't3']
/** The emergency clear is rate-limited per key: not here, where a sequence may clear many times. */
const CONFIG = { security: { ...DEFAULT_SECURITY, clearRateLimitMax: 0 } }

const key = fc.constantFrom(...KEYS)
const mode = fc.constantFrom('delete' as const, 'stale' as const)
// Fastify refuses a body with a `__proto__` or `constructor` key (prototype poisoning): not values to draw.
const value = fc.jsonValue({ maxDepth: 2 }).filter((v) => !/"(__proto__|constructor)"/.test(JSON.stringify(v)))
const selector: fc.Arbitrary<Selector> = fc.oneof(
  fc.record({ keys: fc.uniqueArray(key, { minLength: 1, maxLength: 2 }) }),
  fc.record({ userIds: fc.uniqueArray(fc.constantFrom(...USERS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ tags: fc.uniqueArray(fc.constantFrom(...TAGS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ prefixes: fc.uniqueArray(fc.constantFrom('a', 'b', 'b:', 'c', 'é'), { minLength: 1, maxLength: 2 }) }),
  fc.constant<Selector>({ userIds: ['u1'], tags: ['t3'], prefixes: ['b/'] }),
)
const on = fc.nat()
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
  { arbitrary: fc.record({ op: fc.constant('get' as const), on, key, allowStale: fc.boolean(), conditional: fc.constantFrom(undefined, 'quoted', 'bare', 'other') }), weight: 5 },
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
)
type Op = typeof op extends fc.Arbitrary<infer T> ? T : never

interface ModelEntry {
  value: unknown
  userId: string | undefined
  tags: string[] | undefined
  expiresAt: number
  stale: boolean
  etag: string
  /** Reads answered from it; checked in memory mode (in cluster mode an instance adds only its own L1 hits). */
  hits: number
}

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
  readonly counters: Array<{ hits: number; misses: number; sets: number; issued: number; rejected: number }>
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
  ) {
    this.counters = Array.from({ length: apps }, () => ({ hits: 0, misses: 0, sets: 0, issued: 0, rejected: 0 }))
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
  invalidate(step: number, selector: Selector, mode: 'delete' | 'stale'): number {
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
    return count
  }

  /** Applies a clear: every entry goes (past its expiry too), every lease is void, every claim ends. How many went. */
  clear(step: number): number {
    const count = this.entries.size
    this.entries.clear()
    this.fills.clear()
    this.voidings.push({ step, touched: new Set(KEYS), userIds: new Set(), tags: new Set() })
    return count
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
async function step(apps: FastifyInstance[], model: Model, o: Op, i: number, at: string): Promise<void> {
  const fail = (what: string): never => {
    throw new Error(`${what}, at ${at}`)
  }
  const app = 'on' in o ? apps[o.on % apps.length]! : apps[0]!
  const counters = 'on' in o ? model.counters[o.on % apps.length]! : undefined
  const now = model.now()
  const checkEntry = (body: Record<string, unknown>, key: string, e: ModelEntry, what: string) => {
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
    model.entries.set(w.key, { value: w.value, userId: w.user, tags: w.tags, expiresAt, stale: false, etag: answer.etag!, hits: 0 })
    model.endFill(w.key)
    counters!.sets++
  }
  switch (o.op) {
    case 'put': {
      const lease = model.pickLease(o.key, o.lease)
      const payload = { value: o.value, userId: o.user, tags: o.tags, ttlMs: o.ttl, lease: lease?.token }
      const res = await call(app, { method: 'PUT', url: `/v1/entries/${keyPath(o.key)}`, payload })
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
      const e = model.read(o.key, o.allowStale)
      const etag = model.entries.get(o.key)?.etag ?? 'none'
      const sent = { quoted: `"${etag}"`, bare: etag, other: '"another-etag"' } as const
      const headers = o.conditional === undefined ? {} : { 'if-none-match': sent[o.conditional] }
      const res = await call(app, { method: 'GET', url: `/v1/entries/${keyPath(o.key)}${o.allowStale ? '?allowStale=true' : ''}`, headers })
      if (e === undefined) {
        if (res.statusCode !== 404 || res.json().error !== 'not_found' || typeof res.json().lease !== 'string') fail(`a miss answered ${res.statusCode} ${res.body}`)
        const herd = model.miss(o.key, i, res.json())
        if (herd !== undefined) fail(herd)
        counters!.misses++
        counters!.issued++
        return
      }
      counters!.hits++
      e.hits++
      // 304 when the etag sent is the entry's, never for a stale-marked entry.
      if (o.conditional !== undefined && o.conditional !== 'other' && !e.stale) {
        if (res.statusCode !== 304 || res.headers.etag !== `"${e.etag}"`) fail(`a conditional read of an unchanged entry answered ${res.statusCode}`)
        return
      }
      if (res.statusCode !== 200 || res.headers.etag !== `"${e.etag}"`) fail(`a read answered ${res.statusCode} ${res.body}`)
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
      counters!.hits += found.length
      for (const k of found) answers.get(k)!.hits++
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
      const count = model.invalidate(i, selector, m)
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
      const cleared = model.clear(i)
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
      const got = JSON.stringify(body.entries.map((e: { key: string; stale: boolean; etag: string; hits: number }) => [e.key, e.stale, e.etag, hits(e.hits)]).sort())
      const want = JSON.stringify([...model.entries].filter(([, e]) => model.live(e) && e.userId === o.user).map(([k, e]) => [k, e.stale, e.etag, hits(e.hits)]).sort())
      if (body.count !== body.entries.length || got !== want) fail(`${o.user}'s inspection listed ${got} (count ${body.count}), the model ${want}`)
      return
    }
    case 'head': {
      // Whether the key is cached now: no lease, no hit or miss, no fill claim.
      const e = model.peek(o.key)
      const res = await call(app, { method: 'HEAD', url: `/v1/entries/${keyPath(o.key)}${o.allowStale ? '?allowStale=true' : ''}` })
      const cached = e !== undefined && (o.allowStale || !e.stale)
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
      return
    }
  }
}

/** An invalidation step as its selector, its mode, and the request that makes it. */
function invalidation(o: Extract<Op, { op: 'invalidate' | 'deleteKey' | 'deleteUser' | 'deleteTag' }>): [Selector, 'delete' | 'stale', InjectOptions] {
  switch (o.op) {
    case 'invalidate':
      return [o.selector, o.mode, { method: 'POST', url: '/v1/invalidations', payload: { ...o.selector, mode: o.mode } }]
    case 'deleteKey':
      return [{ keys: [o.key] }, 'delete', { method: 'DELETE', url: `/v1/entries/${keyPath(o.key)}` }]
    case 'deleteUser':
      return [{ userIds: [o.user] }, o.mode, { method: 'DELETE', url: `/v1/users/${o.user}/entries?mode=${o.mode}` }]
    case 'deleteTag':
      return [{ tags: [o.tag] }, o.mode, { method: 'DELETE', url: `/v1/tags/${o.tag}/entries?mode=${o.mode}` }]
  }
}

/** Runs the property with `open` making the apps for one sequence on the given clock, into `apps` (closed whatever happens). */
async function holds(open: (clock: FakeClock, run: number, apps: FastifyInstance[]) => Promise<void>, options: Parameters<unknown>, fillLeaseMs: number, cluster: boolean): Promise<number> {
  let steps = 0
  let run = 0
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 40 }), async (ops) => {
      const clock = new FakeClock()
      const apps: FastifyInstance[] = []
      try {
        await open(clock, run++, apps)
        const model = new Model(apps.length, clock.now, fillLeaseMs, cluster)
        for (const [i, o] of ops.entries()) {
          if (o.op === 'advance') clock.advance(o.ms)
          await step(apps, model, o, i, `step ${i} ${JSON.stringify(o)} of ${JSON.stringify(ops)}`)
          steps++
        }
      } finally {
        await Promise.all(apps.map((app) => app.close()))
      }
    }),
    options,
  )
  return steps
}

t.test('memory mode: every answer of the API agrees with the model, after any sequence', async (t) => {
  const options = runs(80)
  // No sweep: an expired entry stays until a read or an invalidation meets it, as the model has it.
  const fillLeaseMs = 2000
  const open = async (clock: FakeClock, _run: number, apps: FastifyInstance[]) =>
    void apps.push(await build({ teardown() {} }, { ...CONFIG, fillLeaseMs }, { now: clock.now, store: new MemoryStore({ now: clock.now, sweepIntervalMs: 0 }) }))
  const steps = await holds(open, options, fillLeaseMs, false)
  t.pass(`the model held for ${options.numRuns} random sequences (${steps} steps)`)
})

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  t.test('cluster mode, two apps on one Redis: every answer agrees with the model, whichever app takes each step', async (t) => {
    // A fill claim lives in Redis and runs out by Redis' clock, which the test's clock does not
    // move: claims of 10 minutes run out by neither within a sequence. Timeouts long enough for
    // a loaded machine, and no bus PING (a late one would take the bus down).
    const fillLeaseMs = 600_000
    const open = async (clock: FakeClock, run: number, apps: FastifyInstance[]) => {
      for (let n = 0; n < 2; n++) {
        const store = new TieredStore({ redisUrl: redis.url, namespace: `m${run}`, now: clock.now, sweepIntervalMs: 0, commandTimeoutMs: 10_000, busPingMs: 0 })
        if (!(await store.connect(10_000))) {
          await store.close()
          throw new Error('a TieredStore did not connect')
        }
        apps.push(await build({ teardown() {} }, { ...CONFIG, fillLeaseMs }, { now: clock.now, store }))
      }
    }
    const options = runs(40)
    const steps = await holds(open, options, fillLeaseMs, true)
    t.pass(`the model held for ${options.numRuns} random sequences (${steps} steps) over two apps`)
  })
}
