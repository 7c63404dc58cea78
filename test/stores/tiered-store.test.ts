import { Redis } from 'ioredis'
import t, { type Test } from 'tap'
import type { Selector } from '../../src/cache/types.js'
import { TieredStore } from '../../src/stores/tiered-store.js'
import { FakeClock } from '../helpers/build.js'
import { requireRedisServer, startRedis, waitUntil } from '../helpers/redis-server.js'
import { entry, storeContract, type ContractClock } from './store-contract.js'

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  let n = 0
  type Options = Partial<ConstructorParameters<typeof TieredStore>[0]>

  /** A TieredStore on the test's redis-server, in a namespace of its own. */
  const open = async (clock: ContractClock, options: Options = {}) => {
    const store = new TieredStore({ redisUrl: redis.url, namespace: `t${n++}`, now: clock.now, sweepIntervalMs: 0, ...options })
    if (!(await store.connect(10_000))) throw new Error('the TieredStore did not connect')
    return store
  }

  /** Two TieredStores sharing one namespace, as two instances share one Redis; closed at the test's end. */
  const openPair = async (t: Test, clock: ContractClock, aOptions: Options = {}, bOptions: Options = {}) => {
    const namespace = `shared${n++}`
    const a = await open(clock, { ...aOptions, namespace })
    const b = await open(clock, { ...bOptions, namespace })
    t.teardown(() => Promise.all([a.close(), b.close()]))
    return [a, b, namespace] as const
  }

  // A read fills L1 unless a bus message about the key lands while it is in flight (the
  // write's own message, typically): read until the copy is there.
  const filled = (store: TieredStore, key: string, clock: ContractClock) =>
    waitUntil(async () => {
      await store.get(key, clock.now())
      return (await store.l1Peek(key, clock.now())) !== undefined
    })

  /** Writes `count` entries, `make(i)` the i-th, 250 at a time. */
  const fill = async (store: TieredStore, count: number, make: (i: number) => Parameters<TieredStore['set']>[0]) => {
    for (let i = 0; i < count; i += 250) {
      await Promise.all(Array.from({ length: Math.min(250, count - i) }, (_, j) => store.set(make(i + j))))
    }
  }

  storeContract(t, 'TieredStore', (clock) => open(clock))

  t.test('an L1 copy never outlives l1MaxTtlMs, while Redis keeps the entry', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock, { l1MaxTtlMs: 1000 })
    t.teardown(() => store.close())
    await store.set(entry(clock, 'a', { expiresAt: clock.now() + 60_000 }))
    t.ok(await filled(store, 'a', clock), 'a read filled L1')
    clock.advance(1000)
    t.equal(await store.l1Peek('a', clock.now()), undefined, 'the L1 copy is gone after l1MaxTtlMs')
    const again = await store.get('a', clock.now())
    t.equal(again?.expiresAt, clock.now() - 1000 + 60_000, 'the entry keeps its real expiry')
  })

  t.test('a user\'s entries count the reads of Redis plus the L1 hits of the instance listing them', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock)
    const c = await open(clock, { namespace })
    t.teardown(() => c.close())
    await a.set(entry(clock, 'k', { userId: 'u' }))
    t.ok(await filled(a, 'k', clock))
    t.ok(await filled(b, 'k', clock))
    const hits = async (store: TieredStore) => (await store.userEntries('u', clock.now()))[0]?.hits
    const [a0, b0, redis0] = [await hits(a), await hits(b), await hits(c)]
    for (let i = 0; i < 3; i++) await a.get('k', clock.now())
    for (let i = 0; i < 2; i++) await b.get('k', clock.now())
    t.equal(await hits(c), redis0, 'L1 hits never reach Redis (c holds no copy)')
    t.equal(await hits(a), a0! + 3, 'a lists its own three L1 hits')
    t.equal(await hits(b), b0! + 2, 'b its own two')
    t.equal((await a.peek('k', clock.now()))?.hits, await hits(a), 'inspecting the entry on a counts as listing it there')
    await c.get('k', clock.now()) // a read Redis answers (and c takes a copy)
    t.equal((await a.peek('k', clock.now()))?.hits, a0! + 3 + 1, 'a read Redis answered since a took its copy counts too')
  })

  t.test('a write on one store drops the copy another store holds in L1', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    await a.set(entry(clock, 'k', { value: '"v1"' }))
    t.ok(await filled(b, 'k', clock))
    t.equal((await b.l1Peek('k', clock.now()))?.value, '"v1"')
    await a.set(entry(clock, 'k', { value: '"v2"' }))
    t.ok(await waitUntil(async () => (await b.l1Peek('k', clock.now())) === undefined), 'the bus dropped the L1 copy')
    t.equal((await b.get('k', clock.now()))?.value, '"v2"')
  })

  t.test('a user invalidation on one store reaches the other store\'s L1 through its index', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    for (let i = 0; i < 3; i++) await a.set(entry(clock, `u1:${i}`, { userId: 'u1' }))
    await a.set(entry(clock, 'other', { userId: 'u2' }))
    for (const key of ['u1:0', 'u1:1', 'u1:2', 'other']) t.ok(await filled(b, key, clock), `${key} is in b's L1`)
    t.equal(await a.invalidate({ userIds: ['u1'] }, 'delete', clock.now()), 3)
    t.ok(await waitUntil(async () => (await b.l1Size()).entries === 1))
    t.ok(await b.l1Peek('other', clock.now()), 'another user\'s copy stays')
  })

  t.test('once a write or invalidation on one store resolves, a read on the other never serves its L1 copy of what it replaced', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    let old = 0
    for (let i = 0; i < 300; i++) {
      const key = `seq:${i}`
      await a.set(entry(clock, key, { value: '"v1"', userId: `u${i}` }))
      t.ok(await filled(b, key, clock))
      await a.set(entry(clock, key, { value: '"v2"', userId: `u${i}` }))
      if ((await b.get(key, clock.now()))?.value !== '"v2"') old++
      t.ok(await filled(b, key, clock))
      await a.invalidate(i % 2 === 0 ? { userIds: [`u${i}`] } : { keys: [key] }, 'delete', clock.now())
      if ((await b.get(key, clock.now())) !== undefined) old++
    }
    t.equal(old, 0, 'no read of 600 served the replaced or invalidated value')
  })

  t.test('stale mode travels on the bus and marks the L1 copies stale', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    await a.set(entry(clock, 'k', { tags: ['t'] }))
    t.ok(await filled(b, 'k', clock))
    t.equal((await b.l1Peek('k', clock.now()))?.stale, false)
    await a.invalidate({ tags: ['t'] }, 'stale', clock.now())
    t.ok(await waitUntil(async () => (await b.l1Peek('k', clock.now()))?.stale === true))
    t.equal((await b.get('k', clock.now()))?.stale, true)
  })

  t.test('a clear on one store empties every L1 and voids leases everywhere', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    await a.set(entry(clock, 'k', { userId: 'u' }))
    t.ok(await filled(b, 'k', clock))
    const lease = await b.leaseStamp()
    t.equal(await a.clear(), 1)
    t.ok(await waitUntil(async () => (await b.l1Size()).entries === 0))
    t.equal(await b.get('k', clock.now()), undefined)
    t.equal(await b.set(entry(clock, 'k'), lease), 'lease_invalidated')
    t.same(await b.userKeys('u'), [])
  })

  t.test('past maxEntries, the entries closest to expiry are evicted with their memberships', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock, { maxEntries: 3 })
    t.teardown(() => store.close())
    const evicted: string[] = []
    store.onEviction((e, reason) => evicted.push(`${e.key}:${reason}`))
    for (const [key, ttl] of [['a', 5000], ['b', 1000], ['c', 9000], ['d', 7000]] as const) {
      await store.set(entry(clock, key, { userId: 'u', expiresAt: clock.now() + ttl }))
    }
    t.same(evicted, ['b:evict'])
    t.same((await store.userKeys('u')).sort(), ['a', 'c', 'd'])
    t.same((await store.size()).entries, 3)
  })

  t.test('the sweep drops expired entries by the store\'s clock and reports them', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock)
    t.teardown(() => store.close())
    const expired: string[] = []
    store.onEviction((e, reason) => expired.push(`${e.key}:${reason}`))
    await store.set(entry(clock, 'short', { tags: ['t'], expiresAt: clock.now() + 1500 }))
    await store.set(entry(clock, 'long', { tags: ['t'], expiresAt: clock.now() + 60_000 }))
    t.equal(await store.sweep(), 0)
    clock.advance(3000)
    t.equal(await store.sweep(), 1)
    t.same(expired, ['short:expire'])
    t.same(await store.tagKeys('t'), ['long'])
    t.same(await store.size(), { entries: 1, bytes: 'long'.length + JSON.stringify({ key: 'long' }).length })
  })

  t.test('forgotten lease stamps raise the floor, so old leases are refused', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock, { maxLeaseScopes: 2 })
    t.teardown(() => store.close())
    const lease = await store.leaseStamp()
    for (const key of ['x', 'y', 'z']) await store.invalidate({ keys: [key] }, 'delete', clock.now())
    t.equal(await store.set(entry(clock, 'unrelated'), lease), 'lease_invalidated', 'errs towards refusing')
    t.equal(await store.set(entry(clock, 'unrelated'), await store.leaseStamp()), 'ok')
  })

  t.test('a tag reaching more keys than the lease bound refuses every older lease', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock, { maxLeaseScopes: 2 })
    t.teardown(() => store.close())
    for (const key of ['a', 'b', 'c']) await store.set(entry(clock, key, { tags: ['t'] }))
    const lease = await store.leaseStamp()
    await store.invalidate({ tags: ['t'] }, 'stale', clock.now())
    t.equal(await store.set(entry(clock, 'unrelated'), lease), 'lease_invalidated', 'errs towards refusing')
    t.equal(await store.set(entry(clock, 'unrelated'), await store.leaseStamp()), 'ok', 'a newer lease writes')
  })

  t.test('a prefix invalidation scans in batches and matches glob characters literally', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock)
    t.teardown(() => store.close())
    await fill(store, 2500, (i) => entry(clock, `p*:${i}`))
    await store.set(entry(clock, 'pX:1'))
    await store.set(entry(clock, 'p:1'))
    t.equal(await store.invalidate({ prefixes: ['p*:'] }, 'delete', clock.now()), 2500)
    t.equal((await store.size()).entries, 2)
  })

  t.test('a fill claim is shared by every store on the Redis, until a write, an invalidation, a release or a clear ends it', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    const claim = async (store: TieredStore, holder: string, ttlMs = 2000) => (await store.claimFill('k', holder, ttlMs, clock.now())).left
    t.equal(await claim(a, 'holder-a'), 0, 'the first claim holds the fill')
    const left = await claim(b, 'holder-b')
    t.ok(left > 0 && left <= 2000, `another store's claim waits (${left} ms left)`)
    await b.releaseFill('k', 'holder-b')
    t.ok((await claim(b, 'holder-b')) > 0, 'releasing a claim one does not hold changes nothing')
    await a.releaseFill('k', 'holder-a')
    t.equal(await claim(b, 'holder-b'), 0, 'the holder released it')

    // A stale-marked entry still wants a fill, so the claim that follows shows the write ended the claim.
    await a.set(entry(clock, 'k', { stale: true }))
    t.equal(await claim(a, 'holder-c'), 0, 'a write of the key ended the claim')
    await a.set(entry(clock, 'k', { stale: true }))
    t.equal(await claim(a, 'holder-c2'), 0, 'a claim for the invalidation to end')
    await b.invalidate({ keys: ['k'] }, 'delete', clock.now())
    t.equal(await claim(b, 'holder-d'), 0, 'so did an invalidation naming it')
    await a.clear()
    t.equal(await claim(a, 'holder-e', 50.5), 0, 'and a clear (and a fractional ttl is rounded, not refused)')
    t.ok(await waitUntil(async () => (await claim(b, 'holder-f')) === 0), 'a claim runs out by itself')
    await a.set(entry(clock, 'k'))
    t.equal(await claim(b, 'holder-g'), 1, 'a fresh entry in the key: nothing to fill, 1 ms (read again)')
    clock.advance(60_000) // the fake clock only: a claim holder-g took would still run in Redis
    t.equal(await claim(b, 'holder-h'), 0, 'an expired entry is filled again, and the answer above took no claim')
  })

  t.test('a fill claim carries the stamp a lease issued at the same moment carries', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock)
    t.teardown(() => store.close())
    const before = await store.claimFill('k', 'h1', 2000, clock.now())
    t.same(before.stamp, await store.leaseStamp(), 'the same epoch and sequence as leaseStamp')
    await store.invalidate({ tags: ['t'] }, 'delete', clock.now())
    const after = await store.claimFill('k', 'h2', 2000, clock.now())
    t.equal(after.stamp.epoch, before.stamp.epoch)
    t.ok(after.stamp.seq > before.stamp.seq, 'an invalidation in between moves the sequence on')
    t.ok(after.left > 0, 'and leaves the claim to its holder (only a write or a key invalidation ends it)')
  })

  t.test('an idempotency record is claimed once, and only its owner renews, fulfils or drops it', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    t.equal(await a.putRecord('r', 'pending:a', 100), undefined, 'claimed')
    t.equal(await b.putRecord('r', 'pending:b', 100), 'pending:a', 'a second claim sees the first')
    t.equal(await b.swapRecord('r', 'pending:b', undefined, 0), false, 'another owner cannot drop it')
    t.equal(await b.swapRecord('r', 'pending:b', 'reply-b', 1000), false, 'nor fulfil it')
    t.equal(await a.swapRecord('r', 'pending:a', 'pending:a', 1000), true, 'its owner renews it')
    await sleep(200)
    t.equal(await b.putRecord('r', 'pending:b', 100), 'pending:a', 'the renewal outlived the first claim time')
    t.equal(await a.swapRecord('r', 'pending:a', 'reply-a', 60_000), true, 'its owner fulfils it')
    t.equal(await b.putRecord('r', 'pending:b', 100), 'reply-a')
    t.equal(await a.swapRecord('r', 'pending:a', undefined, 0), false, 'a fulfilled record is no longer a claim to drop')
    t.equal(await a.putRecord('q', 'pending:a', 100), undefined)
    t.equal(await a.swapRecord('q', 'pending:a', undefined, 0), true, 'its owner drops it')
    t.equal(await b.putRecord('q', 'pending:b', 100), undefined, 'and the id is free again')
  })

  t.test('malformed bus messages are ignored and the bus keeps working', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock)
    const publisher = new Redis(redis.url)
    t.teardown(() => publisher.quit())
    await a.set(entry(clock, 'k', { value: '"v1"' }))
    t.ok(await filled(b, 'k', clock))
    const reported: unknown[] = []
    const notes: unknown[] = []
    b.onRemoteInvalidation((remote) => void (remote.write || remote.flush || (reported.push(remote.selector), notes.push(remote.note))))
    for (const junk of [
      'null', '1', '"text"', '[]', 'true', 'x', '{}', '{"s":null}', '{"s":"all"}', '{"s":{"keys":"k"}}', '{"s":{"userIds":[1]}}',
      '{"s":{"keys":5}}', '{"qs":{"tags":{}}}', '{"s":{"prefixes":[null]},"i":1}', '{"s":{}}', '{"s":{"all":true}}', '{"s":{"keys":[]}}',
      // Not junk, but only its lists are taken: nothing else reaches the log and the stream.
      '{"f":"z","s":{"keys":["j"],"all":true,"note":"<script>"}}',
      // A reason and an actor that are not strings, or are too long, are dropped or cut.
      '{"f":"z","s":{"keys":["j2"]},"r":5,"a":{"name":"x"}}',
      `{"f":"z","s":{"keys":["j3"]},"r":"${'r'.repeat(2000)}","a":"${'😀'.repeat(1500)}"}`,
    ]) {
      await publisher.publish(`{${namespace}}:bus`, junk)
    }
    await a.set(entry(clock, 'k', { value: '"v2"' }))
    t.ok(await waitUntil(async () => (await b.l1Peek('k', clock.now())) === undefined), 'a real message after the junk still dropped the copy')
    t.equal((await b.get('k', clock.now()))?.value, '"v2"')
    t.same(reported, [{ keys: ['j'] }, { keys: ['j2'] }, { keys: ['j3'] }], 'invalidations reported, of their keys alone')
    t.same(notes, [undefined, undefined, { reason: 'r'.repeat(1024), actor: '😀'.repeat(1024) }], 'cut by code points, never within a pair')
  })

  t.test('a bus listener that throws neither stops the listeners after it nor the process', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    const heard: string[] = []
    b.onRemoteInvalidation(() => {
      throw new Error('a listener bug')
    })
    b.onRemoteInvalidation((remote) => void (remote.write || heard.push(JSON.stringify(remote.selector))))
    await a.invalidate({ keys: ['x'] }, 'delete', clock.now())
    await a.invalidate({ userIds: ['u'] }, 'delete', clock.now())
    t.ok(await waitUntil(() => heard.length === 2))
    t.same(heard, ['{"keys":["x"]}', '{"userIds":["u"]}'])
  })

  t.test('another store\'s invalidations are reported in the order they were sent, whatever each takes to apply to L1', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock)
    // Copies in b's L1 for the runs to find: users', tags', keys under prefixes.
    for (let n = 0; n < 100; n++) await a.set(entry(clock, `p:${n}`, { value: '1', userId: `u${n % 3}`, tags: [`t${n % 4}`] }))
    for (let n = 0; n < 100; n++) await b.get(`p:${n}`, clock.now())
    const heard: string[] = []
    b.onRemoteInvalidation((remote) => void (remote.write || heard.push(JSON.stringify(remote.selector))))
    const selectors = Array.from({ length: 60 }, (_, n): Selector => [{ keys: [`p:${n}`] }, { userIds: [`u${n % 3}`] }, { tags: [`t${n % 4}`] }, { prefixes: [`p:${n % 10}`] }][n % 4]!)
    // Sent at once (as a busy sender's messages come), so that b reads them together.
    const publisher = new Redis(redis.url)
    t.teardown(() => publisher.quit())
    const batch = publisher.pipeline()
    for (const selector of selectors) batch.publish(`{${namespace}}:bus`, JSON.stringify({ f: 'other', s: selector, m: 'stale' }))
    await batch.exec()
    t.ok(await waitUntil(() => heard.length === selectors.length))
    t.same(heard, selectors.map((selector) => JSON.stringify(selector)))
  })

  t.test('an L1 fill racing an invalidation from another store never keeps the old value', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    // Other entries in a's L1, as in a live L1.
    for (let i = 0; i < 50; i++) await b.set(entry(clock, `other:${i}`))
    for (let i = 0; i < 50; i++) await a.get(`other:${i}`, clock.now())
    let applied = 0
    a.onRemoteInvalidation(() => applied++)
    let stale = 0
    const rounds = 60
    for (let round = 0; round < rounds; round++) {
      const key = `race:${round}`
      const seen = applied
      await b.set(entry(clock, key, { value: '"old"' }))
      t.ok(await waitUntil(() => applied > seen), 'the set\'s own bus message reached a')
      const target = applied + 1
      // a reads Redis (and would fill L1) while b invalidates; a random head start varies the order.
      const lead = Math.random() * 2
      await Promise.all([
        new Promise((r) => setTimeout(r, lead)).then(() => a.get(key, clock.now())),
        b.invalidate({ keys: [key] }, 'delete', clock.now()),
      ])
      t.ok(await waitUntil(() => applied >= target), 'the invalidation reached a')
      if ((await a.l1Peek(key, clock.now())) !== undefined) stale++
    }
    t.equal(stale, 0, `no L1 kept the old value after the invalidation (${rounds} rounds)`)
  })

  t.test('marking everything stale keeps the entries, voids leases and empties every L1', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    await fill(a, 1500, (i) => entry(clock, `s:${i}`, { userId: 'u' }))
    t.ok(await filled(b, 's:0', clock))
    const lease = await b.leaseStamp()
    t.equal(await a.markAllStale(), 1500)
    t.equal(await a.markAllStale(), 0, 'each entry is counted once')
    t.ok(await waitUntil(async () => (await b.l1Size()).entries === 0), 'b flushed its L1')
    t.equal((await b.get('s:0', clock.now()))?.stale, true)
    t.equal((await b.get('s:1499', clock.now()))?.stale, true)
    t.equal((await a.size()).entries, 1500, 'nothing was deleted')
    t.equal(await b.set(entry(clock, 's:0'), lease), 'lease_invalidated')
  })

  t.test('a user or tag too large for one script is invalidated in batches: older leases refused, the bus told once done', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock)
    // 2500 tagged entries (the script takes at most 1000 members), 1500 of them of one user.
    await fill(a, 2500, (i) => entry(clock, `w:${i}`, { userId: i < 1500 ? 'big' : `u${i}`, tags: ['wide'] }))
    await a.set(entry(clock, 'other', { userId: 'u1' }))
    t.ok(await filled(b, 'w:2400', clock), 'another instance holds an L1 copy')
    const lease = await a.leaseStamp()
    const admin = new Redis(redis.url)
    t.teardown(() => admin.quit())
    const scriptCalls = async () => {
      const stats = await admin.info('commandstats')
      return [...stats.matchAll(/cmdstat_eval(?:sha)?:calls=(\d+)/g)].reduce((sum, m) => sum + Number(m[1]), 0)
    }
    const before = await scriptCalls()
    t.equal(await a.invalidate({ tags: ['wide'] }, 'stale', clock.now()), 2500, 'stale: every member, once')
    t.ok((await scriptCalls()) - before >= 4, 'one script to start, then batches (no script over 1000 members)')
    t.equal((await a.peek('w:2499', clock.now()))?.stale, true)
    t.ok(await waitUntil(async () => (await b.l1Peek('w:2400', clock.now()))?.stale !== false), 'the other instance heard of it')
    t.equal(await a.invalidate({ userIds: ['big'] }, 'delete', clock.now()), 1500, 'delete: every member of the user')
    t.equal(await a.invalidate({ tags: ['wide'] }, 'delete', clock.now()), 1000, 'and the rest of the tag')
    t.same(await a.size(), { entries: 1, bytes: (await a.peek('other', clock.now()))!.size }, 'only the untouched entry is left, its bytes counted')
    t.same(await a.tagKeys('wide'), [], 'the index is empty')
    t.equal(await a.set(entry(clock, 'w:2499', { userId: 'someone-else' }), lease), 'lease_invalidated', 'a lease from before, on a key a batch reached, is refused whatever its write names')
    t.equal(
      await a.set(entry(clock, 'other', { userId: 'u1' }), lease),
      'lease_invalidated',
      'every older lease is refused, on any key: while batches run, a key not reached yet may be one of the user\'s',
    )
    t.equal(await a.set(entry(clock, 'other', { userId: 'u1' }), await a.leaseStamp()), 'ok', 'a lease from after writes')

    // More members than the lease book holds: the floor rises, refusing every older lease.
    const small = await open(clock, { maxLeaseScopes: 1000 })
    t.teardown(() => small.close())
    await fill(small, 1500, (i) => entry(clock, `w:${i}`, { tags: ['wide'] }))
    await small.set(entry(clock, 'other'))
    const older = await small.leaseStamp()
    t.equal(await small.invalidate({ tags: ['wide'] }, 'delete', clock.now()), 1500)
    t.equal(await small.set(entry(clock, 'other'), older), 'lease_invalidated')
  })

  t.test('a large user or tag is read in batches: every live member once, no script over the whole set', async (t) => {
    const clock = new FakeClock()
    const store = await open(clock, { indexBatch: 50 })
    t.teardown(() => store.close())
    // 300 members (past the size where Redis keeps a set compact and SSCAN ignores COUNT), 100 short-lived.
    await Promise.all(
      Array.from({ length: 300 }, (_, i) =>
        store.set(entry(clock, `m:${i}`, { userId: 'many', tags: ['lots'], expiresAt: clock.now() + (i < 100 ? 1_000 : 60_000) })),
      ),
    )
    clock.advance(2_000)
    const admin = new Redis(redis.url)
    t.teardown(() => admin.quit())
    const scriptCalls = async () => {
      const stats = await admin.info('commandstats')
      return [...stats.matchAll(/cmdstat_eval(?:sha)?:calls=(\d+)/g)].reduce((sum, m) => sum + Number(m[1]), 0)
    }
    const live = Array.from({ length: 200 }, (_, i) => `m:${i + 100}`).sort()
    let before = await scriptCalls()
    const entries = await store.userEntries('many', clock.now())
    t.same(entries.map((e) => e.key).sort(), live, 'every live entry, once, none expired')
    t.ok((await scriptCalls()) - before >= 4, 'one script per batch of about 50')
    t.equal(entries.find((e) => e.key === 'm:150')?.userId, 'many', 'whole entries')
    before = await scriptCalls()
    t.equal((await store.userKeys('many')).length, 300, 'userKeys: every member whose entry Redis still holds (expired but not yet swept included)')
    t.same((await store.tagKeys('lots')).sort(), (await store.userKeys('many')).sort(), 'tagKeys: the same walk')
    t.ok((await scriptCalls()) - before >= 8, 'in batches too')
  })

  t.test('a batched invalidation racing a clear leaves what is written after the clear alone', async (t) => {
    const clock = new FakeClock()
    const [store, writer] = await openPair(t, clock, { indexBatch: 10 })
    let lost = 0
    let raced = 0
    const rounds = 12
    for (let round = 0; round < rounds; round++) {
      await Promise.all(Array.from({ length: 300 }, (_, i) => store.set(entry(clock, `c:${i}`, { userId: 'alice' }))))
      // alice's 300 (more than the 10 one script takes) go in batches; meanwhile, a little
      // later each round, another instance clears the cache and writes the same keys for bob.
      const invalidating = store.invalidate({ userIds: ['alice'] }, 'delete', clock.now())
      await sleep(round)
      await writer.clear()
      await Promise.all(Array.from({ length: 300 }, (_, i) => writer.set(entry(clock, `c:${i}`, { userId: 'bob' }))))
      const invalidated = await invalidating
      if (invalidated > 0 && invalidated < 300) raced++
      lost += 300 - (await writer.userKeys('bob')).length
    }
    t.equal(lost, 0, 'every entry written after the clear is still there')
    t.ok(raced > 0, `the clear fell inside a batched walk (${raced} of ${rounds} rounds)`)
  })

  // A walk in batches (a large user, or a prefix scan) that fails midway: here, a member whose
  // entry key holds a string (WRONGTYPE in the batch's script), as a stray writer could leave.
  for (const by of ['user', 'prefix'] as const) {
    t.test(`a ${by} invalidation failing midway through its batches leaves no other instance's L1 serving what it dropped`, async (t) => {
      const clock = new FakeClock()
      const [a, b, namespace] = await openPair(t, clock, { indexBatch: 10 })
      const admin = new Redis(redis.url)
      t.teardown(() => admin.quit())
      const reports: string[] = []
      b.onRemoteInvalidation((remote) => reports.push(remote.write ? 'write' : JSON.stringify(remote.selector)))
      const selector = by === 'user' ? { userIds: ['alice'] } : { prefixes: ['p/'] }
      let dropped = 0
      let rounds = 0
      // The bad key's place in the walk is Redis's hash order: should it come first (nothing
      // dropped) or last (everything dropped), the round proves nothing, so it goes again.
      for (; rounds < 8 && (dropped === 0 || dropped === 200); rounds++) {
        const keys = Array.from({ length: 200 }, (_, i) => `p/${rounds}:${i}`)
        await Promise.all(keys.map((key) => a.set(entry(clock, key, { userId: 'alice' }))))
        for (const key of keys) t.ok(await filled(b, key, clock), `${key} is in b's L1`)
        const gen = (await admin.get(`{${namespace}}:g`)) ?? '0'
        const bad = `p/${rounds}:bad`
        await admin.set(`{${namespace}}:${gen}:e:${bad}`, 'not a hash')
        await admin.sadd(`{${namespace}}:${gen}:u:alice`, bad)
        reports.length = 0
        await t.rejects(a.invalidate(selector, 'delete', clock.now()), { code: 'backend_unavailable' }, 'the invalidation fails')
        // The sentinel's write message follows whatever the failed invalidation published.
        await a.set(entry(clock, `sentinel${rounds}`))
        t.ok(await waitUntil(() => reports.includes('write')), 'b has had every message a sent')
        t.same(reports, ['write'], 'a failed invalidation is not reported on other instances')
        const gone = []
        for (const key of keys) if ((await admin.exists(`{${namespace}}:${gen}:e:${key}`)) === 0) gone.push(key)
        dropped = gone.length
        const served = []
        for (const key of gone) if ((await b.l1Peek(key, clock.now())) !== undefined) served.push(key)
        t.same(served, [], `b's L1 holds none of the ${gone.length} entries the walk dropped before it failed`)
        await admin.del(`{${namespace}}:${gen}:e:${bad}`)
        await admin.srem(`{${namespace}}:${gen}:u:alice`, bad)
        await a.invalidate({ userIds: ['alice'] }, 'delete', clock.now())
      }
      t.ok(dropped > 0 && dropped < 200, `the walk failed midway (${dropped} of 200 dropped, round ${rounds})`)
    })
  }

  t.test('a batched invalidation is reported once on other instances, when its walk is done', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock, { indexBatch: 10 })
    const reports: Array<{ selector: string; invalidated: number }> = []
    b.onRemoteInvalidation((remote) => void (remote.write || reports.push({ selector: JSON.stringify(remote.selector), invalidated: remote.invalidated })))
    await Promise.all(Array.from({ length: 100 }, (_, i) => a.set(entry(clock, `o/${i}`, { userId: 'carol' }))))
    for (let i = 0; i < 100; i++) t.ok(await filled(b, `o/${i}`, clock))
    t.equal(await a.invalidate({ userIds: ['carol'] }, 'delete', clock.now()), 100)
    t.equal(await a.invalidate({ prefixes: ['o/'] }, 'delete', clock.now()), 0)
    t.ok(await waitUntil(() => reports.length === 2))
    await sleep(50)
    t.same(reports, [
      { selector: '{"userIds":["carol"]}', invalidated: 100 },
      { selector: '{"prefixes":["o/"]}', invalidated: 0 },
    ], 'one report each; the quiet message before the walk dropped the copies, the last one reports')
    t.equal((await b.l1Size()).entries, 0)
  })

  t.test('quiet messages pair with their message proper by sender and walk: a failed walk\'s drops are never reported, the previous build\'s form still pairs', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock)
    const publisher = new Redis(redis.url)
    t.teardown(() => publisher.quit())
    const reports: Array<{ selector: unknown; invalidated: number }> = []
    b.onRemoteInvalidation((remote) => void (remote.write || reports.push({ selector: remote.selector, invalidated: remote.invalidated })))
    const send = (message: object) => publisher.publish(`{${namespace}}:bus`, JSON.stringify(message))
    const hold = async (user: string, count: number) => {
      for (let i = 0; i < count; i++) {
        await a.set(entry(clock, `${user}/${i}`, { userId: user }))
        t.ok(await filled(b, `${user}/${i}`, clock))
      }
    }
    // Walk 7 drops w's 2 copies, then fails; walk 8 of the same selector drops nothing.
    await hold('w', 2)
    await send({ f: 'z', qs: { userIds: ['w'] }, m: 'delete', i: 7 })
    await send({ f: 'z', qs: { userIds: ['w'] }, m: 'delete', i: 7, x: 1 })
    await send({ f: 'z', qs: { userIds: ['w'] }, m: 'delete', i: 8 })
    await send({ f: 'z', s: { userIds: ['w'] }, m: 'delete', i: 8 })
    // The previous build: `q: 1` with the selector under `s`, no walk number.
    await hold('v', 3)
    await send({ f: 'old', s: { userIds: ['v'] }, m: 'delete', q: 1 })
    await send({ f: 'old', s: { userIds: ['v'] }, m: 'delete' })
    t.ok(await waitUntil(() => reports.length === 2))
    await sleep(20)
    t.same(reports, [
      { selector: { userIds: ['w'] }, invalidated: 0 },
      { selector: { userIds: ['v'] }, invalidated: 3 },
    ], 'walk 8 reports none of the failed walk\'s drops; the old form reports its quiet drops once')
  })

  t.test('a batched invalidation\'s quiet message is nothing to an older build: its selector is not under `s`, and the message proper names the same walk', async (t) => {
    const clock = new FakeClock()
    const namespace = `quiet${n++}`
    const a = await open(clock, { namespace, indexBatch: 10 })
    const listener = new Redis(redis.url)
    t.teardown(() => Promise.all([a.close(), listener.quit()]))
    const messages: Array<Record<string, unknown>> = []
    listener.on('message', (_channel: string, raw: string) => messages.push(JSON.parse(raw) as Record<string, unknown>))
    await listener.subscribe(`{${namespace}}:bus`)
    await Promise.all(Array.from({ length: 50 }, (_, i) => a.set(entry(clock, `q/${i}`, { userId: 'erin' }))))
    for (const selector of [{ userIds: ['erin'] }, { prefixes: ['q/'] }]) {
      messages.length = 0
      await a.invalidate(selector, 'delete', clock.now())
      t.ok(await waitUntil(() => messages.length === 2), 'two messages: the quiet one, then the message proper')
      const [quiet, proper] = messages
      t.same(quiet, { f: a.id, qs: selector, m: 'delete', i: proper!.i }, 'the quiet one carries its selector as `qs`, which older builds do not read')
      t.same(proper, { f: a.id, s: selector, m: 'delete', i: quiet!.i })
    }
  })

  t.test('while a large invalidation is still being applied to an L1, that instance serves none of the copies it has yet to reach, and all the others', async (t) => {
    const clock = new FakeClock()
    // Runs over L1 yield every 64 keys: a user's 1000 copies take 16 turns of b's event loop.
    const [a, b] = await openPair(t, clock, { indexBatch: 2000 }, { l1SliceMs: 0 })
    let applied = 0
    b.onRemoteInvalidation((remote) => void (remote.write || applied++))
    const keys = Array.from({ length: 1000 }, (_, i) => `sl/${i}`)
    const others = Array.from({ length: 50 }, (_, i) => `ot/${i}`)
    await Promise.all(others.map((key) => a.set(entry(clock, key, { userId: 'zed', tags: ['t'] }))))
    for (const key of others) t.ok(await filled(b, key, clock), `${key} is in b's L1`)
    // Redis counts the reads it answers; an L1 hit does not reach it (a's L1 holds no copy).
    const redisHits = async (of = others) => (await Promise.all(of.map((key) => a.peek(key, clock.now())))).reduce((sum, e) => sum + (e?.hits ?? 0), 0)
    let served = 0
    let heard = 0
    let differing = 0
    // Whether a stale round's reads came while b's run went (on a busy machine the run may
    // end first: that round goes again, up to 20 times).
    let overlapped = false
    let staleRounds = 0
    const modes: Array<'delete' | 'stale'> = ['delete', 'stale', 'delete']
    for (let m = 0; m < modes.length; m++) {
      const mode = modes[m]!
      await Promise.all(keys.map((key) => a.set(entry(clock, key, { userId: 'dora', tags: ['t2'] }))))
      t.ok((await Promise.all(keys.map((key) => filled(b, key, clock)))).every(Boolean), 'dora\'s 1000 are in b\'s L1')
      const hitsBefore = await redisHits()
      const coveredBefore = await redisHits(keys)
      t.equal(await a.invalidate({ userIds: ['dora'] }, mode, clock.now()), 1000)
      // Read at once, as a client told of the invalidation would, while b's run goes; and check
      // b's copies. With allowStale, so that Redis counts a hit for each stale entry it answers.
      const [read, other, compared] = await Promise.all([
        Promise.all(keys.map((key) => b.get(key, clock.now(), true))),
        Promise.all(others.map((key) => b.get(key, clock.now()))),
        b.compareL1(keys),
      ])
      served += read.filter((e) => e !== undefined && !e.stale).length
      differing += compared.differing.length
      t.equal(other.filter((e) => e !== undefined).length, 50, 'another user\'s entries are read')
      t.equal(await redisHits(), hitsBefore, 'from b\'s L1: the run gates only the copies it covers')
      // Stale mode keeps the entries in Redis, which counts the covered reads it answered.
      if (mode === 'stale') {
        staleRounds++
        if ((await redisHits(keys)) > coveredBefore) overlapped = true
        else if (!overlapped && staleRounds < 20) modes.splice(m + 1, 0, 'stale')
      }
      t.ok(await waitUntil(() => applied === heard + 1), 'b applied the invalidation')
      heard++
      if (mode === 'stale') {
        await a.invalidate({ userIds: ['dora'] }, 'delete', clock.now())
        t.ok(await waitUntil(() => applied === heard + 1))
        heard++
      }
    }
    t.ok(overlapped, `b's run was still going while it read, in one of ${staleRounds} stale rounds`)
    t.equal(served, 0, `no read of ${modes.length * 1000} served a copy from before the invalidation`)
    t.equal(differing, 0, 'the consistency check does not report copies the run is dropping')
  })

  t.test('while a walk in batches goes, every L1 has dropped what it covers and takes none of it in; once it is done, they do again', async (t) => {
    const clock = new FakeClock()
    const [a, b] = await openPair(t, clock, { indexBatch: 5 })
    let heard = 0
    b.onRemoteInvalidation((remote) => void (remote.write || heard++))
    await fill(a, 3000, (i) => entry(clock, `own/${i}`, { tags: ['big'] }))
    await a.set(entry(clock, 'free', { tags: ['small'] }))
    for (const store of [a, b]) {
      t.ok(await filled(store, 'own/2999', clock), 'a copy of an entry the walk covers')
      t.ok(await filled(store, 'free', clock), 'and of one it does not')
    }
    let done = false
    const walking = a.invalidate({ tags: ['big'] }, 'delete', clock.now()).finally(() => (done = true))
    t.ok(await waitUntil(async () => (await b.l1Peek('own/2999', clock.now())) === undefined), 'the quiet message reached b')
    t.equal(await a.l1Peek('own/2999', clock.now()), undefined, 'a dropped its own copy as b did')
    // Reads meanwhile go to Redis, where the walk may not have reached the key yet: not into L1.
    for (const store of [a, b]) {
      for (const key of ['own/2999', 'own/0', 'own/1500']) {
        await store.get(key, clock.now())
        await store.get(key, clock.now())
        t.equal(await store.l1Peek(key, clock.now()), undefined, `${key} stays out of ${store === a ? 'a' : 'b'}'s L1`)
      }
      t.ok(await store.l1Peek('free', clock.now()), 'the entry the walk does not cover stays in L1')
    }
    t.notOk(done, 'the walk (600 batches) was still going all along')
    t.equal(await walking, 3000)
    t.ok(await waitUntil(() => heard === 1), 'b heard the message proper')
    await a.set(entry(clock, 'own/7', { tags: ['big'] }))
    t.ok(await filled(a, 'own/7', clock), 'a fills L1 again')
    t.ok(await filled(b, 'own/7', clock), 'b fills L1 again')
  })

  t.test('a walk\'s gate outlasts a bus reconnect: the walk may still be going', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock)
    const admin = new Redis(redis.url)
    t.teardown(() => admin.quit())
    let heard = 0
    b.onRemoteInvalidation((remote) => void (remote.write || heard++))
    await a.set(entry(clock, 'gk', { userId: 'g' }))
    t.ok(await filled(b, 'gk', clock))
    // Another instance starts walking user g (its quiet message), then b's subscriber drops.
    await admin.publish(`{${namespace}}:bus`, JSON.stringify({ f: 'walker', qs: { userIds: ['g'] }, m: 'delete', i: 1 }))
    t.ok(await waitUntil(async () => (await b.l1Peek('gk', clock.now())) === undefined), 'the quiet message dropped the copy')
    await admin.client('KILL', 'TYPE', 'pubsub')
    t.ok(await waitUntil(() => !b.ready()), 'b\'s bus dropped')
    t.ok(await waitUntil(() => b.ready()), 'and came back')
    for (let i = 0; i < 3; i++) await b.get('gk', clock.now())
    t.equal(await b.l1Peek('gk', clock.now()), undefined, 'an entry the walk covers is read from Redis, not put in L1')
    await admin.publish(`{${namespace}}:bus`, JSON.stringify({ f: 'walker', s: { userIds: ['g'] }, m: 'delete', i: 1 }))
    t.ok(await waitUntil(() => heard === 1), 'the message proper came')
    t.ok(await filled(b, 'gk', clock), 'then L1 takes it in again')
  })

  t.test('a walk\'s gate stays up while its heartbeats come, and lifts l1MaxTtlMs after the last', async (t) => {
    const clock = new FakeClock()
    const [a, b, namespace] = await openPair(t, clock, {}, { l1MaxTtlMs: 150 })
    const admin = new Redis(redis.url)
    t.teardown(() => admin.quit())
    await a.set(entry(clock, 'hk', { userId: 'h' }))
    t.ok(await filled(b, 'hk', clock))
    const quiet = JSON.stringify({ f: 'walker', qs: { userIds: ['h'] }, m: 'delete', i: 1 })
    await admin.publish(`{${namespace}}:bus`, quiet)
    t.ok(await waitUntil(async () => (await b.l1Peek('hk', clock.now())) === undefined), 'the quiet message dropped the copy')
    // Four gate timers' worth of heartbeats, one every 50 ms.
    for (let i = 0; i < 12; i++) {
      await sleep(50)
      await admin.publish(`{${namespace}}:bus`, quiet)
      await b.get('hk', clock.now())
      t.equal(await b.l1Peek('hk', clock.now()), undefined, `still gated after ${(i + 1) * 50} ms`)
    }
    // The sender stopped (it died): the gate lifts by its timer.
    t.ok(await filled(b, 'hk', clock), 'L1 takes the entry in again once the heartbeats stop')
    // A heartbeat after that (a gate lifted too early) drops the copy and gates again.
    await admin.publish(`{${namespace}}:bus`, quiet)
    t.ok(await waitUntil(async () => (await b.l1Peek('hk', clock.now())) === undefined), 'a late heartbeat drops the copy')
    await b.get('hk', clock.now())
    t.equal(await b.l1Peek('hk', clock.now()), undefined, 'and gates the entry again')
  })

  t.test('a walk longer than l1MaxTtlMs keeps every other L1 gated to its end, by its heartbeats', async (t) => {
    const clock = new FakeClock()
    // With a fake clock, l1MaxTtlMs times only the gates (and the heartbeat, a third of it).
    const [a, b, namespace] = await openPair(t, clock, { indexBatch: 2, l1MaxTtlMs: 30 }, { l1MaxTtlMs: 30 })
    const listener = new Redis(redis.url)
    t.teardown(() => listener.quit())
    const heartbeats: unknown[] = []
    listener.on('message', (_channel: string, raw: string) => {
      const message = JSON.parse(raw) as { qs?: unknown; i?: number }
      if (message.qs !== undefined) heartbeats.push(message.i)
    })
    await listener.subscribe(`{${namespace}}:bus`)
    const keys = Array.from({ length: 4000 }, (_, i) => `long/${i}`)
    await fill(a, keys.length, (i) => entry(clock, keys[i]!, { tags: ['long'] }))
    let done = false
    const walking = a.invalidate({ tags: ['long'] }, 'delete', clock.now()).finally(() => (done = true))
    // b keeps reading entries the walk has yet to reach; none may go into its L1.
    let filledCopies = 0
    let rounds = 0
    while (!done) {
      rounds++
      const sample = keys.slice((rounds * 37) % 3900, ((rounds * 37) % 3900) + 20)
      for (const key of sample) await b.get(key, clock.now())
      for (const key of sample) if ((await b.l1Peek(key, clock.now())) !== undefined) filledCopies++
    }
    t.equal(await walking, keys.length)
    t.ok(heartbeats.length >= 4, `the walk outlasted l1MaxTtlMs: its quiet message went ${heartbeats.length} times`)
    t.equal(filledCopies, 0, `no copy of an entry the walk covers went into b's L1 (${rounds} rounds of reads)`)
    t.equal(new Set(heartbeats).size, 1, 'every heartbeat names the one walk')
    const after = heartbeats.length
    await sleep(50)
    t.equal(heartbeats.length, after, 'no heartbeat after the message proper')
  })

  t.test('a batched read racing rewrites to another user and a clear returns only what is still the user\'s', async (t) => {
    const clock = new FakeClock()
    const [store, writer] = await openPair(t, clock, { indexBatch: 10 })
    let foreign = 0
    let rounds = 0
    let raced = 0
    // Each round: 300 entries of 'alice' tagged 'team', then a walk over them while another
    // client moves them, one at a time, to 'bob' and 'other' (every second round clearing the
    // cache halfway), for as long as the walk runs.
    for (; rounds < 6 && foreign === 0; rounds++) {
      await Promise.all(Array.from({ length: 300 }, (_, i) => store.set(entry(clock, `r:${i}`, { userId: 'alice', tags: ['team'] }))))
      let walking = true
      const moving = (async () => {
        for (let i = 0; walking && i < 300; i++) {
          if (rounds % 2 === 1 && i === 20) await writer.clear()
          await writer.set(entry(clock, `r:${i}`, { userId: 'bob', tags: ['other'] }))
        }
      })()
      const entries = await store.userEntries('alice', clock.now()).finally(() => (walking = false))
      await moving
      foreign += entries.filter((e) => e.userId !== 'alice' || !e.tags?.includes('team')).length
      if (entries.length < 300) raced++
    }
    t.ok(raced > 0, `the writer moved entries while a walk ran (${raced} of ${rounds} walks)`)
    t.equal(foreign, 0, `no entry of another user among ${rounds} racing walks`)
    // Not a race: once all are moved, nothing is alice's or the team's any more.
    for (let i = 0; i < 300; i++) await writer.set(entry(clock, `r:${i}`, { userId: 'bob', tags: ['other'] }))
    t.same(await store.userKeys('alice'), [])
    t.same(await store.tagKeys('team'), [])
  })
}
