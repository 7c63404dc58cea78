import t from 'tap'
import { FakeClock, build, call, get, put } from '../helpers/build.js'

t.test('debug/users lists a user\'s entries with sizes, ages and hits', async (t) => {
  const clock = new FakeClock()
  const app = await build(t, {}, { now: clock.now })
  await put(app, 'b', { value: 'bb', userId: 'u1', tags: ['t'] })
  await put(app, 'a', { value: { x: 1 }, userId: 'u1', ttlMs: 10_000 })
  await put(app, 'other', { value: 1, userId: 'u2' })
  clock.advance(2000)
  await get(app, 'a')
  await get(app, 'a')
  const res = await call(app, { method: 'GET', url: '/v1/debug/users/u1' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.equal(body.userId, 'u1')
  t.equal(body.count, 2)
  t.same(body.entries.map((e: { key: string }) => e.key), ['a', 'b'])
  const a = body.entries[0]
  t.match(a, { key: 'a', tags: [], ageMs: 2000, ttlMs: 10_000, ttlRemainingMs: 8000, hits: 2, stale: false })
  t.equal(a.sizeBytes, 'a'.length + '{"x":1}'.length + 'u1'.length)
  t.equal(body.bytes, body.entries[0].sizeBytes + body.entries[1].sizeBytes)
  t.equal(a.lastAccessAt, new Date(clock.ms).toISOString())
  t.type(a.etag, 'string')
  t.same((await call(app, { method: 'GET', url: '/v1/debug/users/nobody' })).json(), { userId: 'nobody', count: 0, bytes: 0, entries: [] })
})

t.test('debug/entries shows value and metadata without counting a hit, stale included', async (t) => {
  const app = await build(t)
  await put(app, 'k/1', { value: { deep: [1] }, userId: 'u', tags: ['x'] })
  await call(app, { method: 'DELETE', url: '/v1/entries/k%2F1?mode=stale' })
  const res = await call(app, { method: 'GET', url: '/v1/debug/entries/k%2F1' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { key: 'k/1', value: { deep: [1] }, userId: 'u', tags: ['x'], stale: true, hits: 0, ttlMs: 300_000 })
})

t.test('stats count hits, misses, sets and invalidations, and reset zeroes them', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 1, userId: 'u' })
  await put(app, 'b', { value: 2 })
  await get(app, 'a')
  await get(app, 'a')
  await get(app, 'nope')
  await call(app, { method: 'DELETE', url: '/v1/users/u/entries' })
  await call(app, { method: 'POST', url: '/v1/invalidations', payload: { tags: ['t'], prefixes: ['x'] } })
  const stats = (await call(app, { method: 'GET', url: '/v1/stats' })).json()
  t.match(stats, {
    entries: 1,
    hits: 2,
    misses: 1,
    hitRatio: 2 / 3,
    sets: 2,
    evictions: 0,
    invalidations: { bySelector: { user: 1, tag: 1, prefix: 1 }, bySource: { api: 2 }, failed: 0 },
    leases: { issued: 1, rejected: 0 },
  })
  t.equal(stats.bytes, 'b'.length + '2'.length)
  t.match(stats.invalidations.last, { selector: { tags: ['t'], prefixes: ['x'] }, source: 'api' })
  t.same((await call(app, { method: 'POST', url: '/v1/stats/reset' })).json(), { reset: true })
  const after = (await call(app, { method: 'GET', url: '/v1/stats' })).json()
  t.match(after, { entries: 1, hits: 0, misses: 0, hitRatio: 0, sets: 0, invalidations: { bySelector: {}, bySource: {}, failed: 0, last: null } })
  t.equal(app.cache.totals.hits, 2, 'the monotonic totals behind the metrics keep counting')
})

t.test('LRU evictions are counted', async (t) => {
  const app = await build(t, { maxEntries: 2 })
  for (const key of ['a', 'b', 'c', 'd']) await put(app, key, { value: key })
  t.equal((await call(app, { method: 'GET', url: '/v1/stats' })).json().evictions, 2)
})
