import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { FakeClock, build, call, get, put } from '../helpers/build.js'
import { DESIGN_METRICS, parseScrape, valueOf, type Scrape } from '../helpers/prometheus.js'

// Distinctive names, so finding one inside any label value is unambiguous.
const USER = 'usr-7f3a91'
const OTHER_USER = 'usr-b22c40'
const TAG = 'tg-zq81x'
const KEY_PREFIX = 'kx9-'
const key = (n: number) => `${KEY_PREFIX}${n}`
const UNMATCHED_URL = '/no-such-route-q4w'

async function scrape(app: FastifyInstance, headers: Record<string, string> = {}): Promise<Scrape> {
  const res = await app.inject({ method: 'GET', url: '/metrics', headers })
  if (res.statusCode !== 200) throw new Error(`/metrics answered ${res.statusCode}`)
  if (!String(res.headers['content-type']).startsWith('text/plain')) throw new Error('not the text format')
  return parseScrape(res.body)
}

/** Reads, writes, misses, one invalidation of each selector kind, a lease rejection and an LRU eviction. */
async function exercise(app: FastifyInstance) {
  await put(app, key(1), { value: { a: 1 }, userId: USER, tags: [TAG] })
  await put(app, key(2), { value: { a: 2 }, userId: USER })
  await put(app, key(3), { value: { a: 3 }, tags: [TAG] })
  await put(app, key(4), { value: { a: 4 }, userId: OTHER_USER }) // the 4th entry: key(1) is evicted
  await get(app, key(2)) // hit
  await get(app, key(3)) // hit
  const miss = await get(app, key(1)) // miss: evicted
  if (miss.statusCode !== 404) throw new Error('expected the LRU to have evicted key 1')
  const lease = miss.json().lease

  const inv = (payload: object) => call(app, { method: 'POST', url: '/v1/invalidations', payload, key: 'invalidate' })
  await inv({ keys: [key(1)] }) // voids the lease
  const rejected = await call(app, { method: 'PUT', url: `/v1/entries/${key(1)}`, payload: { value: 1, lease } })
  if (rejected.statusCode !== 409) throw new Error(`expected 409, got ${rejected.statusCode}`)
  await inv({ userIds: [USER], mode: 'stale' })
  await call(app, { method: 'DELETE', url: `/v1/tags/${TAG}/entries`, key: 'invalidate' })
  await inv({ prefixes: [KEY_PREFIX] })
  await call(app, { method: 'GET', url: UNMATCHED_URL })
  await call(app, { method: 'GET', url: '/v1/entries/%zz' }) // refused before routing: bad percent-encoding
  await call(app, { method: 'DELETE', url: `/v1/entries/${'k'.repeat(2000)}`, key: 'invalidate' }) // and an over-long key
  await call(app, { method: 'GET', url: `/v1/debug/users/${OTHER_USER}` })
  await app.inject({ method: 'GET', url: '/docs/json' })
}

t.test('a scrape after real traffic has every DESIGN metric and the counts of what happened', async (t) => {
  const clock = new FakeClock()
  const app = await build(t, { maxEntries: 3 }, { now: clock.now })
  await exercise(app)
  clock.advance(5000)
  await call(app, { method: 'DELETE', url: `/v1/users/${OTHER_USER}/entries`, key: 'invalidate' })
  const s = await scrape(app)

  for (const name of DESIGN_METRICS) t.ok(s.types.has(name), `${name} is exposed`)
  t.equal(s.types.get('cachewarden_http_request_duration_seconds'), 'histogram')
  t.equal(s.types.get('cachewarden_origin_request_duration_seconds'), 'histogram')
  t.equal(s.types.get('cachewarden_cache_hits_total'), 'counter')
  t.equal(s.types.get('cachewarden_cache_entries'), 'gauge')
  t.ok(s.types.has('process_cpu_user_seconds_total'), 'prom-client process metrics are there')
  t.ok(s.types.has('nodejs_heap_size_used_bytes'), 'prom-client Node.js metrics are there')

  t.equal(valueOf(s, 'cachewarden_cache_hits_total'), 2)
  t.equal(valueOf(s, 'cachewarden_cache_misses_total'), 1)
  t.equal(valueOf(s, 'cachewarden_cache_sets_total'), 4)
  t.equal(valueOf(s, 'cachewarden_cache_evictions_total', { reason: 'evict' }), 1)
  t.equal(valueOf(s, 'cachewarden_cache_evictions_total', { reason: 'expire' }), 0)
  t.equal(valueOf(s, 'cachewarden_lease_rejections_total'), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'key', source: 'api', mode: 'delete' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'user', source: 'api', mode: 'stale' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'user', source: 'api', mode: 'delete' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'tag', source: 'api', mode: 'delete' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'prefix', source: 'api', mode: 'delete' }), 1)
  // user (stale): key 2; tag: key 3; prefix: the stale key 2 and key 4; OTHER_USER: nothing left.
  t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector: 'user' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector: 'tag' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector: 'prefix' }), 2)
  t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector: 'key' }), 0)
  t.equal(valueOf(s, 'cachewarden_invalidation_failures_total', { source: 'api' }), 0)
  t.equal(valueOf(s, 'cachewarden_last_invalidation_timestamp_seconds'), clock.ms / 1000, 'the time of the last one')
  t.equal(valueOf(s, 'cachewarden_cache_entries'), 0)
  t.equal(valueOf(s, 'cachewarden_cache_bytes'), 0)
  t.equal(valueOf(s, 'cachewarden_bus_connected'), 0, 'gauges exist at 0 with the feature off')
  t.equal(valueOf(s, 'cachewarden_pg_listener_connected'), 0)
  t.equal(valueOf(s, 'cachewarden_refreshes_total', { result: 'success' }), 0)

  const http = (labels: Record<string, string>) => valueOf(s, 'cachewarden_http_request_duration_seconds_count', labels)
  t.equal(http({ route: '/v1/entries/:key', method: 'PUT', status_code: '200' }), 4, 'route is the pattern')
  t.equal(http({ route: '/v1/entries/:key', method: 'PUT', status_code: '409' }), 1)
  t.equal(http({ route: '/v1/entries/:key', method: 'GET', status_code: '404' }), 1)
  t.equal(http({ route: 'unmatched', method: 'GET', status_code: '404' }), 1, 'an unmatched URL gets a fixed label')
  t.equal(http({ route: 'unmatched', method: 'GET', status_code: '400' }), 1, 'a URL refused before routing is counted too')
  t.equal(http({ route: 'unmatched', method: 'DELETE', status_code: '400' }), 1)
  t.equal(http({ route: '/v1/debug/users/:userId', method: 'GET', status_code: '200' }), 1)
  t.equal(http({ route: '/v1/tags/:tag/entries', method: 'DELETE', status_code: '200' }), 1)
  t.equal(http({ route: '/docs/json', method: 'GET', status_code: '200' }), 1, 'the docs routes too')

  // Cardinality: no label value is (or contains) a key, user id, tag or raw URL used above.
  const forbidden = [USER, OTHER_USER, TAG, KEY_PREFIX, UNMATCHED_URL]
  const leaks = s.samples.flatMap((sample) =>
    Object.entries(sample.labels)
      .filter(([, v]) => forbidden.some((f) => v.includes(f)))
      .map(([k, v]) => `${sample.name}{${k}="${v}"}`),
  )
  t.same(leaks, [], 'no label carries a key, a user id, a tag or a raw URL')
  const labelNames = new Set(s.samples.filter((x) => x.name.startsWith('cachewarden_')).flatMap((x) => Object.keys(x.labels)))
  const bounded = ['le', 'method', 'mode', 'origin', 'reason', 'result', 'route', 'selector', 'source', 'status_code']
  t.same([...labelNames].filter((l) => !bounded.includes(l)), [], 'only bounded label names')
})

t.test('the counters never go back, even when the stats summary is reset', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 1 })
  await get(app, 'a')
  const reset = await call(app, { method: 'POST', url: '/v1/stats/reset' })
  t.equal(reset.statusCode, 200)
  t.equal((await call(app, { method: 'GET', url: '/v1/stats' })).json().hits, 0, 'the summary is zeroed')
  const s = await scrape(app)
  t.equal(valueOf(s, 'cachewarden_cache_hits_total'), 1, 'the Prometheus counter is not')
  t.equal(valueOf(s, 'cachewarden_cache_sets_total'), 1)
})

t.test('origin, refresh, bus and listener metrics follow the core telemetry events', async (t) => {
  const app = await build(t)
  const before = await scrape(app)
  t.equal(before.samples.filter((x) => x.name.startsWith('cachewarden_origin_')).length, 0, 'no samples before any origin call')

  app.cache.emit('origin_request', { origin: 'dashboards', result: 'success', durationMs: 30 })
  app.cache.emit('origin_request', { origin: 'dashboards', result: 'timeout', durationMs: 2000 })
  app.cache.emit('refresh', { result: 'success' })
  app.cache.emit('refresh', { result: 'error' })
  app.cache.emit('refresh', { result: 'error' })
  app.cache.emit('bus_state', { connected: true })
  app.cache.emit('pg_listener_state', { connected: true })
  app.cache.emit('pg_listener_state', { connected: false })
  const s = await scrape(app)
  t.equal(valueOf(s, 'cachewarden_origin_requests_total', { origin: 'dashboards', result: 'success' }), 1)
  t.equal(valueOf(s, 'cachewarden_origin_requests_total', { origin: 'dashboards', result: 'timeout' }), 1)
  t.equal(valueOf(s, 'cachewarden_origin_request_duration_seconds_count', { origin: 'dashboards' }), 2)
  t.equal(valueOf(s, 'cachewarden_origin_request_duration_seconds_sum', { origin: 'dashboards' }), 2.03)
  t.equal(valueOf(s, 'cachewarden_origin_request_duration_seconds_bucket', { origin: 'dashboards', le: '0.05' }), 1)
  t.equal(valueOf(s, 'cachewarden_refreshes_total', { result: 'success' }), 1)
  t.equal(valueOf(s, 'cachewarden_refreshes_total', { result: 'error' }), 2)
  t.equal(valueOf(s, 'cachewarden_bus_connected'), 1)
  t.equal(valueOf(s, 'cachewarden_pg_listener_connected'), 0)
})

t.test('invalidation failures are counted by source from the core totals', async (t) => {
  const app = await build(t)
  app.cache.countFailure('postgres')
  app.cache.countFailure('postgres')
  const s = await scrape(app)
  t.equal(valueOf(s, 'cachewarden_invalidation_failures_total', { source: 'postgres' }), 2)
  t.equal(valueOf(s, 'cachewarden_invalidation_failures_total', { source: 'events' }), 0, 'known sources start at 0')
})

t.test('a fresh scrape shows every invalidation series at 0, before any invalidation', async (t) => {
  const app = await build(t)
  const s = await scrape(app)
  for (const selector of ['key', 'user', 'tag', 'prefix', 'all']) {
    t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector }), 0, `invalidated_entries_total{selector="${selector}"}`)
    for (const mode of ['delete', 'stale']) {
      t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector, source: 'api', mode }), 0, `invalidations_total ${selector} api ${mode}`)
    }
  }
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'user', source: 'postgres', mode: 'stale' }), 0)
})

t.test('two apps in one process keep separate registries', async (t) => {
  const one = await build(t)
  const two = await build(t)
  await put(one, 'a', { value: 1 })
  await get(one, 'a')
  t.equal(valueOf(await scrape(one), 'cachewarden_cache_hits_total'), 1)
  t.equal(valueOf(await scrape(two), 'cachewarden_cache_hits_total'), 0)
  t.ok((await scrape(two)).types.has('process_cpu_user_seconds_total'), 'both expose the process metrics')
})

t.test('METRICS_TOKEN closes /metrics to requests without it', async (t) => {
  const app = await build(t, { metricsToken: 'scrape-token-123' })
  const none = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(none.statusCode, 401)
  t.equal(none.json().error, 'unauthorized')
  t.equal(none.headers['www-authenticate'], 'Bearer realm="cachewarden"')
  const wrong = await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer nope' } })
  t.equal(wrong.statusCode, 401)
  const apiKey = await call(app, { method: 'GET', url: '/metrics' })
  t.equal(apiKey.statusCode, 401, 'an API key is not the metrics token')
  const s = await scrape(app, { authorization: 'Bearer scrape-token-123' })
  t.ok(s.types.has('cachewarden_cache_hits_total'))

  const open = await build(t)
  t.equal((await open.inject({ method: 'GET', url: '/metrics' })).statusCode, 200, 'open without a token configured')
})

t.test('a scrape reads the store size once and survives a store that cannot answer', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 'x' })
  const store = app.cache.store
  const original = store.size.bind(store)
  let calls = 0
  let failing = false
  store.size = async () => {
    calls++
    if (failing) throw new Error('backend down')
    return original()
  }
  const first = await scrape(app)
  t.equal(calls, 1, 'entries and bytes share one size() call')
  t.equal(valueOf(first, 'cachewarden_cache_entries'), 1)
  const bytes = valueOf(first, 'cachewarden_cache_bytes')
  t.ok(bytes !== undefined && bytes > 0)
  failing = true
  const second = await scrape(app)
  t.equal(valueOf(second, 'cachewarden_cache_entries'), 1, 'the last known value stays')
  t.equal(valueOf(second, 'cachewarden_cache_bytes'), bytes)
  t.equal(valueOf(second, 'cachewarden_cache_hits_total'), 0, 'and the rest of the scrape is there')
})

t.test('marking everything stale and the emergency clear count under selector "all"', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 1 })
  await put(app, 'b', { value: 2 })
  await app.cache.markAllStale({ source: 'postgres' })
  await put(app, 'c', { value: 3 })
  await app.cache.clear('admin', 'test')
  const s = await scrape(app)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'all', source: 'postgres', mode: 'stale' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidations_total', { selector: 'all', source: 'admin', mode: 'delete' }), 1)
  t.equal(valueOf(s, 'cachewarden_invalidated_entries_total', { selector: 'all' }), 5, '2 marked stale, then 3 cleared')
  // The PostgreSQL listener's `clear` policy clears under its own source.
  await app.cache.clear('postgres-listener', 'reconnected', 'postgres')
  const after = await scrape(app)
  t.equal(valueOf(after, 'cachewarden_invalidations_total', { selector: 'all', source: 'postgres', mode: 'delete' }), 1)
  t.equal(valueOf(after, 'cachewarden_invalidations_total', { selector: 'all', source: 'admin', mode: 'delete' }), 1, 'not counted as the emergency clear')
})

t.test('the request latency histogram counts every request, also after the registry is reset', async (t) => {
  const app = await build(t)
  await put(app, key(1), { value: 1 })
  for (let i = 0; i < 3; i++) await get(app, key(1))
  const count = (s: Scrape) => valueOf(s, 'cachewarden_http_request_duration_seconds_count', { route: '/v1/entries/:key', method: 'GET', status_code: '200' })
  const inf = (s: Scrape) => valueOf(s, 'cachewarden_http_request_duration_seconds_bucket', { route: '/v1/entries/:key', method: 'GET', status_code: '200', le: '+Inf' })
  let s = await scrape(app)
  t.equal(count(s), 3)
  t.equal(inf(s), 3, 'the +Inf bucket holds every observation')
  app.metrics.registry.resetMetrics()
  await get(app, key(1))
  s = await scrape(app)
  t.equal(count(s), 1, 'a route seen before the reset is counted again from zero')
  t.equal(inf(s), 1)
})
