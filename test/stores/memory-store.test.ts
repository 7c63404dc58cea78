import t from 'tap'
import { CacheService } from '../../src/cache/cache-service.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { FakeClock } from '../helpers/build.js'
import { entry, storeContract } from './store-contract.js'

storeContract(t, 'MemoryStore', async (clock) => new MemoryStore({ now: clock.now, sweepIntervalMs: 0 }))

t.test('without lease bookkeeping (a TieredStore L1) every invalidation still applies, and no lease is issued', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0, leases: false })
  t.teardown(() => store.close())
  for (const key of ['u:1', 'u:2', 't:1', 'p:1', 'p:2', 'k']) {
    await store.set(entry(clock, key, { userId: key === 'u:1' || key === 'u:2' ? 'u' : undefined, tags: key === 't:1' ? ['t'] : undefined }))
  }
  t.equal(await store.invalidate({ userIds: ['u'] }, 'delete', clock.now()), 2)
  t.equal(await store.invalidate({ tags: ['t'] }, 'stale', clock.now()), 1)
  t.equal(await store.invalidate({ prefixes: ['p:'], keys: ['k'] }, 'delete', clock.now()), 3)
  t.same(await store.userKeys('u'), [])
  t.equal((await store.peek('t:1', clock.now()))?.stale, true)
  t.equal(await store.markAllStale(), 0, 'nothing fresh left to mark')
  t.equal(await store.clear(), 1)
  await t.rejects(store.leaseStamp(), /keeps no leases/)
})

t.test('a sample of keys leaves out an entry past its expiry that the sweep has not dropped yet', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0 })
  t.teardown(() => store.close())
  await store.set(entry(clock, 'short', { expiresAt: clock.now() + 1000 }))
  await store.set(entry(clock, 'long'))
  t.same((await store.sampleKeys(10)).sort(), ['long', 'short'])
  clock.advance(1000)
  t.same(await store.sampleKeys(10), ['long'])
  t.same(await store.sampleKeys(1), ['long'], 'and the limit counts live keys')
})

t.test('LRU eviction past maxEntries drops the least recently used and unindexes it', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ maxEntries: 3, now: clock.now, sweepIntervalMs: 0 })
  const evicted: string[] = []
  store.onEviction((e, reason) => evicted.push(`${e.key}:${reason}`))
  for (const key of ['a', 'b', 'c']) await store.set(entry(clock, key, { userId: 'u' }))
  await store.get('a', clock.now())
  await store.set(entry(clock, 'd', { userId: 'u' }))
  t.same(evicted, ['b:evict'])
  t.same((await store.userKeys('u')).sort(), ['a', 'c', 'd'])
})

t.test('maxBytes bounds the accounted bytes', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ maxBytes: 1000, now: clock.now, sweepIntervalMs: 0 })
  for (let i = 0; i < 50; i++) await store.set(entry(clock, `k${i}`, { size: 100 }))
  const { entries, bytes } = await store.size()
  t.equal(entries, 10)
  t.equal(bytes, 1000)
})

t.test('an entry larger than the whole cache is not kept and leaves no index behind', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ maxBytes: 1000, now: clock.now, sweepIntervalMs: 0 })
  await store.set(entry(clock, 'big', { size: 5000, userId: 'u' }))
  t.equal(await store.get('big', clock.now()), undefined)
  t.same(await store.userKeys('u'), [])
})

t.test('an overwrite with the same user and tags keeps the memberships and moves the expiry', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ maxBytes: 1000, now: clock.now, sweepIntervalMs: 0 })
  await store.set(entry(clock, 'k', { userId: 'u', tags: ['t'], expiresAt: clock.now() + 1000 }))
  await store.set(entry(clock, 'k', { userId: 'u', tags: ['t'], expiresAt: clock.now() + 60_000 }))
  t.same(await store.userKeys('u'), ['k'])
  t.same(await store.tagKeys('t'), ['k'])
  clock.advance(2000)
  await store.sweep()
  t.ok(await store.get('k', clock.now()), 'the entry lives by its new expiry, not the old one')
  clock.advance(60_000)
  t.equal(await store.sweep(), 1, 'and the sweep drops it at the new expiry')
  t.same(await store.userKeys('u'), [])

  await store.set(entry(clock, 'k', { userId: 'u', tags: ['t'], size: 10 }))
  await store.set(entry(clock, 'k', { userId: 'u', tags: ['t'], size: 5000 }))
  t.equal(await store.get('k', clock.now()), undefined, 'an overwrite too large to keep removes the old entry')
  t.same(await store.userKeys('u'), [], 'and its memberships')
  t.same(await store.tagKeys('t'), [])
})

t.test('reads through the CacheService answer from getLocal alone, hits and certain misses', async (t) => {
  const clock = new FakeClock()
  class Counting extends MemoryStore {
    gets = 0
    override async get(key: string, now: number) {
      this.gets++
      return super.get(key, now)
    }
  }
  const store = new Counting({ now: clock.now, sweepIntervalMs: 0 })
  const cache = new CacheService({ store, now: clock.now })
  t.teardown(() => cache.close())
  await cache.write('k', { value: 1, ttlMs: 1000 })
  t.equal((await cache.read('k')).entry?.value, '1')
  t.equal(store.getLocal('absent', clock.now()), null, 'a miss is certain: null, not "ask get"')
  t.ok((await cache.read('absent')).lease, 'a miss gets its lease')
  clock.advance(1000)
  t.ok((await cache.read('k')).lease, 'an expired entry is a miss')
  t.equal(store.gets, 0, 'no read went to the async get')
})

t.test('a user reaching more keys than the lease book holds refuses every older lease', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ maxLeaseScopes: 2, now: clock.now, sweepIntervalMs: 0 })
  for (const key of ['a', 'b', 'c']) await store.set(entry(clock, key, { userId: 'u' }))
  const lease = await store.leaseStamp()
  await store.invalidate({ userIds: ['u'] }, 'delete', clock.now())
  t.equal(await store.set(entry(clock, 'unrelated'), lease), 'lease_invalidated', 'errs towards refusing')
  t.equal(await store.set(entry(clock, 'unrelated'), await store.leaseStamp()), 'ok', 'a newer lease writes')
})

t.test('the sweep drops expired entries eagerly and reports them as expired', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0 })
  const expired: string[] = []
  store.onEviction((e, reason) => expired.push(`${e.key}:${reason}`))
  await store.set(entry(clock, 'short', { userId: 'u', expiresAt: clock.now() + 1500 }))
  await store.set(entry(clock, 'long', { userId: 'u', expiresAt: clock.now() + 60_000 }))
  t.equal(await store.sweep(), 0)
  clock.advance(3000)
  t.equal(await store.sweep(), 1)
  t.same(expired, ['short:expire'])
  t.same(await store.userKeys('u'), ['long'])
  t.equal((await store.size()).entries, 1)
})

t.test('a prefix invalidation over many entries yields to the event loop', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0 })
  for (let i = 0; i < 200_000; i++) {
    store.setSync(entry(clock, `${i % 2 ? 'odd' : 'even'}:${i}`, { expiresAt: clock.now() + 1000 + (i % 100) * 1000 }))
  }
  let ticks = 0
  const timer = setInterval(() => ticks++, 1)
  const count = await store.invalidate({ prefixes: ['odd:'] }, 'delete', clock.now())
  clearInterval(timer)
  t.equal(count, 100_000)
  t.equal((await store.size()).entries, 100_000)
  t.ok(ticks > 0, `timers ran ${ticks} times during the scan`)
})

t.test('a user or a tag reaching many entries is invalidated in slices that let other work run', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0 })
  for (let i = 0; i < 100_000; i++) {
    store.setSync(entry(clock, `k:${i}`, i % 2 ? { userId: 'big' } : { userId: `u${i}`, tags: ['wide'] }))
  }
  for (const selector of [{ userIds: ['big'] }, { tags: ['wide'] }]) {
    let ticks = 0
    const timer = setInterval(() => ticks++, 1)
    // Written while the run is going: a key it has yet to reach (invalidated too: the safe
    // side) and a key it never took (kept).
    const rewritten = selector.userIds ? entry(clock, 'k:99999', { userId: 'big' }) : entry(clock, 'k:99998', { userId: 'u99998', tags: ['wide'] })
    const lease = await store.leaseStamp()
    const first = selector.userIds ? 'k:1' : 'k:0' // the run's first key
    let refused: Promise<string> | undefined
    setImmediate(() => {
      store.setSync(rewritten)
      store.setSync(entry(clock, 'late', { userId: 'big', tags: ['wide'] }))
      // A lease from before the invalidation, on a key the run has reached, naming another user.
      refused = store.set(entry(clock, first, { userId: 'someone-else' }), lease)
    })
    const count = await store.invalidate(selector, 'delete', clock.now())
    clearInterval(timer)
    t.equal(count, 50_000, `${JSON.stringify(selector)}: every entry it reached`)
    t.ok(ticks > 0, `timers ran ${ticks} times during the run`)
    t.equal(await store.peek(rewritten.key, clock.now()), undefined, 'a key rewritten before the run reached it is gone')
    t.not(await store.peek('late', clock.now()), undefined, 'a key written after the run took its keys is kept')
    t.equal(await refused, 'lease_invalidated', 'a lease from before the run is refused on a key it reached')
    await store.invalidate({ keys: ['late'] }, 'delete', clock.now())
  }
  t.equal((await store.size()).entries, 0)
})

t.test('a sliced user run refuses older leases until it is done, and never lowers a newer stamp', async (t) => {
  const clock = new FakeClock()
  // sliceMs 0: the run yields every 64 keys, however fast the machine.
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0, sliceMs: 0 })
  t.teardown(() => store.close())
  const big = () => {
    for (let i = 0; i < 1000; i++) store.setSync(entry(clock, `u:${i}`, { userId: 'U' }))
    store.setSync(entry(clock, 'k', { userId: 'U' })) // the last key the run reaches
  }
  // A lease from before the run, on a key the run has not reached yet, writing no user.
  const before = await store.leaseStamp()
  big()
  let run = store.invalidate({ userIds: ['U'] }, 'delete', clock.now())
  t.equal(await store.set(entry(clock, 'k', { value: 'STALE' }), before), 'lease_invalidated', 'refused while the run goes')
  await run
  t.equal(await store.peek('k', clock.now()), undefined, 'k is gone')

  // A newer invalidation of k while an older run is still on its way to k: the run's stamp
  // must not undo the newer one, or a lease issued between them would write.
  big()
  run = store.invalidate({ userIds: ['U'] }, 'delete', clock.now())
  await store.invalidate({ keys: ['k'] }, 'delete', clock.now())
  const between = await store.leaseStamp()
  await store.invalidate({ keys: ['k'] }, 'delete', clock.now())
  await run
  t.equal(await store.set(entry(clock, 'k', { value: 'OLD' }), between), 'lease_invalidated', 'refused after the run too')
  t.equal(await store.peek('k', clock.now()), undefined)
})

t.test('a sliced run invalidates only what is still in the set when it gets there, each entry once', async (t) => {
  const clock = new FakeClock()
  const store = new MemoryStore({ now: clock.now, sweepIntervalMs: 0, sliceMs: 0 })
  t.teardown(() => store.close())
  for (let i = 0; i < 1000; i++) store.setSync(entry(clock, `u:${i}`, { userId: 'U' }))
  store.setSync(entry(clock, 'x', { userId: 'U', tags: ['T'] })) // in both sets, last in U's
  const run = store.invalidate({ userIds: ['U'], tags: ['T'] }, 'delete', clock.now())
  // While the run is on its way, x is written again for someone else, with no tags.
  store.setSync(entry(clock, 'x', { userId: 'V', value: 'newer' }))
  t.equal(await run, 1000, 'the user\'s 1000, not x, and nothing counted twice')
  t.equal((await store.peek('x', clock.now()))?.value, 'newer', 'the newer write is kept')
})
