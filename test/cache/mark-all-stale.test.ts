import t from 'tap'
import { CacheService } from '../../src/cache/cache-service.js'
import type { InvalidationRecord } from '../../src/cache/types.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import type { Store } from '../../src/stores/store.js'
import { FakeClock, build, call, get, put } from '../helpers/build.js'

function service(store?: Store) {
  const clock = new FakeClock()
  const warnings: string[] = []
  const logger = { info() {}, error() {}, warn: (_o: object, msg?: string) => void warnings.push(msg ?? '') }
  const cache = new CacheService({ store: store ?? new MemoryStore({ now: clock.now, sweepIntervalMs: 0 }), now: clock.now, logger })
  return { cache, clock, warnings }
}

t.test('markAllStale marks every entry stale once, voids older leases, and is recorded', async (t) => {
  const { cache } = service()
  t.teardown(() => cache.close())
  for (let i = 0; i < 50; i++) await cache.write(`k${i}`, { value: i, userId: i % 2 ? 'odd' : 'even' })
  await cache.invalidate({ keys: ['k0'] }, { mode: 'stale', source: 'api' })
  const miss = await cache.read('pending')
  const records: InvalidationRecord[] = []
  cache.on('invalidation', (r) => records.push(r))

  const result = await cache.markAllStale({ source: 'postgres', reason: 'test' })
  t.equal(result.invalidated, 49, 'the one already stale is not counted again')
  t.equal(result.mode, 'stale')
  t.equal((await cache.read('k7')).entry, undefined, 'a stale entry is a miss')
  t.equal((await cache.read('k7', true)).entry?.stale, true)
  t.same(records.map((r) => [r.source, r.selector]), [['postgres', { all: true }]])
  t.equal(cache.totals.invalidationsBySelector.all, 1)
  await t.rejects(cache.write('pending', { value: 'old', lease: miss.lease!.lease }), { code: 'lease_invalidated' })

  const again = await cache.read('pending')
  await cache.write('pending', { value: 'new', lease: again.lease!.lease })
  t.equal((await cache.read('pending')).entry?.value, '"new"', 'a lease issued after it still writes')
  t.equal((await cache.markAllStale({ source: 'postgres' })).invalidated, 1, 'only the fresh write is newly marked')
  t.equal((await cache.store.size()).entries, 51, 'nothing was deleted')
})

t.test('a store without markAllStale is cleared instead, with a warning', async (t) => {
  const inner = new MemoryStore({ sweepIntervalMs: 0 })
  // The same store minus the optional method, as a store written before it would be.
  const store: Store = {
    kind: 'legacy',
    maxBytes: inner.maxBytes,
    get: (k, n) => inner.get(k, n),
    peek: (k, n) => inner.peek(k, n),
    set: (e, l) => inner.set(e, l),
    invalidate: (s, m, n) => inner.invalidate(s, m, n),
    clear: () => inner.clear(),
    leaseStamp: () => inner.leaseStamp(),
    userEntries: (u, n) => inner.userEntries(u, n),
    userKeys: (u) => inner.userKeys(u),
    tagKeys: (tag) => inner.tagKeys(tag),
    sampleKeys: (l) => inner.sampleKeys(l),
    size: () => inner.size(),
    onEviction: (l) => inner.onEviction(l),
    close: () => inner.close(),
  }
  const { cache, warnings } = service(store)
  t.teardown(() => cache.close())
  await cache.write('a', { value: 1 })
  await cache.write('b', { value: 2 })
  const result = await cache.markAllStale({ source: 'postgres' })
  t.same([result.invalidated, result.mode], [2, 'delete'])
  t.equal((await cache.store.size()).entries, 0)
  t.same(warnings, ['store cannot mark all stale; clearing it'])
})

t.test('no client can send the selector all: the API takes only the four lists', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 1 })
  for (const payload of [{ all: true }, { all: true, keys: ['b'] }]) {
    const res = await call(app, { method: 'POST', url: '/v1/invalidations', payload })
    t.equal(res.statusCode, 400)
    t.match(res.json(), { error: 'invalid_request', message: 'body.all is not allowed' })
  }
  t.same(app.cache.recentInvalidations(1), [], 'nothing was invalidated')
  t.equal((await get(app, 'a')).statusCode, 200)
})
