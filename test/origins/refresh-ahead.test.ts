import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { FakeClock, auth, build, call, captureLogs, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin, voidBothLoads } from '../helpers/origin-server.js'

const dash = (id: string) => `/users/${id}/dashboard`
const TTL = 10_000

async function setup(t: { teardown(fn: () => unknown): void }, extra: Record<string, unknown> = {}, refreshConcurrency = 3) {
  const origin = await OriginServer.start(t)
  const clock = new FakeClock()
  const app = await build(t, { refreshConcurrency, configFile: { origins: [dashboardOrigin(origin, { ttlMs: TTL, ...extra })] } }, { now: clock.now })
  const refreshes: string[] = []
  app.cache.on('refresh', (e) => refreshes.push(e.result))
  return { origin, clock, app, refreshes }
}

async function load(app: FastifyInstance, origin: OriginServer, ids: string[], value = 'v1') {
  for (const id of ids) {
    origin.values.set(dash(id), `${value}-${id}`)
    const res = await get(app, `dashboard:${id}`, '?load=true')
    if (res.statusCode !== 200) throw new Error(`load ${id}: ${res.statusCode}`)
  }
}

t.test('a read after refreshAhead of the TTL refreshes the entry in the background, not before', async (t) => {
  const { origin, clock, app, refreshes } = await setup(t)
  await load(app, origin, ['1'])
  origin.values.set(dash('1'), 'v2')
  clock.advance(0.79 * TTL)
  t.equal((await get(app, 'dashboard:1')).json().value, 'v1-1')
  await app.origins.refresher.drain()
  t.equal(origin.calls, 1, 'no refresh at 79%')
  clock.advance(0.02 * TTL)
  const res = await get(app, 'dashboard:1')
  t.equal(res.json().value, 'v1-1', 'the read itself is served from the cache')
  await app.origins.refresher.drain()
  t.equal(origin.calls, 2, 'refreshed at 81%')
  t.same(refreshes, ['success'])
  const fresh = await get(app, 'dashboard:1')
  t.equal(fresh.json().value, 'v2')
  t.equal(fresh.json().ttlRemainingMs, TTL, 'a new TTL from now')
  await app.origins.refresher.drain()
  t.equal(origin.calls, 2, 'the fresh entry is not refreshed again')
})

t.test('refreshAhead is per origin', async (t) => {
  const { origin, clock, app } = await setup(t, { refreshAhead: 0.5 })
  await load(app, origin, ['1'])
  clock.advance(0.51 * TTL)
  await get(app, 'dashboard:1')
  await app.origins.refresher.drain()
  t.equal(origin.calls, 2)
})

t.test('at most REFRESH_CONCURRENCY refreshes run at once', async (t) => {
  const { origin, clock, app } = await setup(t, {}, 3)
  const ids = Array.from({ length: 20 }, (_, i) => String(i))
  await load(app, origin, ids)
  origin.maxInFlight = 0
  origin.hold()
  clock.advance(0.9 * TTL)
  for (const id of ids) t.equal((await get(app, `dashboard:${id}`)).statusCode, 200)
  await origin.waitForCalls(20 + 3)
  // Give any refresh beyond the bound every chance to start before looking.
  await new Promise((r) => setTimeout(r, 100))
  t.equal(origin.inFlight, 3)
  t.equal(app.origins.refresher.pending, 17)
  origin.release()
  await app.origins.refresher.drain()
  t.equal(origin.calls, 40, 'every key refreshed once')
  t.equal(origin.maxInFlight, 3)
})

t.test('the busiest keys are refreshed first', async (t) => {
  const { origin, clock, app } = await setup(t, {}, 1)
  const ids = ['blocker', 'a', 'b', 'c', 'd']
  await load(app, origin, ids)
  // Hits before the threshold: a 1, b 5, c 3, d 9.
  for (const [id, n] of [['a', 1], ['b', 5], ['c', 3], ['d', 9]] as const) {
    for (let i = 0; i < n; i++) await get(app, `dashboard:${id}`)
  }
  origin.hold()
  clock.advance(0.9 * TTL)
  await get(app, 'dashboard:blocker') // takes the one slot
  await origin.waitForCalls(ids.length + 1)
  for (const id of ['a', 'b', 'c', 'd']) await get(app, `dashboard:${id}`)
  origin.release()
  await app.origins.refresher.drain()
  t.same(origin.log.slice(ids.length), ['blocker', 'd', 'b', 'c', 'a'].map(dash))
})

t.test('hits on a key waiting in the queue move it ahead of keys that were busier when queued', async (t) => {
  const { origin, clock, app } = await setup(t, {}, 1)
  await load(app, origin, ['blocker', 'a', 'b'])
  for (let i = 0; i < 5; i++) await get(app, 'dashboard:b')
  origin.hold()
  clock.advance(0.9 * TTL)
  await get(app, 'dashboard:blocker') // takes the one slot
  await origin.waitForCalls(4)
  await get(app, 'dashboard:b') // queued with 6 hits
  await get(app, 'dashboard:a') // queued with 1
  for (let i = 0; i < 10; i++) await get(app, 'dashboard:a') // 11 while it waits
  t.equal(app.origins.refresher.pending, 2)
  origin.release()
  await app.origins.refresher.drain()
  t.same(origin.log.slice(3), ['blocker', 'a', 'b'].map(dash))
})

t.test('a key is never refreshed twice at once, however often it is read', async (t) => {
  const { origin, clock, app } = await setup(t)
  await load(app, origin, ['1'])
  origin.hold()
  clock.advance(0.9 * TTL)
  await Promise.all(Array.from({ length: 50 }, () => get(app, 'dashboard:1')))
  await origin.waitForCalls(2)
  await new Promise((r) => setTimeout(r, 50))
  t.equal(origin.calls, 2)
  origin.release()
  await app.origins.refresher.drain()
  t.equal(origin.calls, 2)
})

t.test('a queued key refreshed by other means meanwhile is not refreshed again', async (t) => {
  const { origin, clock, app } = await setup(t, {}, 1)
  await load(app, origin, ['blocker', 'a'])
  origin.holdPath = dash('blocker')
  origin.hold()
  clock.advance(0.9 * TTL)
  await get(app, 'dashboard:blocker')
  await origin.waitForCalls(3)
  await get(app, 'dashboard:a')
  t.equal(app.origins.refresher.pending, 1, 'a is queued behind the blocker')
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/dashboard%3Aa/refresh' })).statusCode, 200)
  const calls = origin.calls
  t.equal(calls, 4)
  origin.release()
  await app.origins.refresher.drain()
  t.equal(origin.calls, calls, 'the queued refresh found a fresh entry and skipped it')
})

t.test('batch-get hits schedule refreshes too', async (t) => {
  const { origin, clock, app } = await setup(t)
  await load(app, origin, ['1', '2'])
  clock.advance(0.9 * TTL)
  await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['dashboard:1', 'dashboard:2'] } })
  await app.origins.refresher.drain()
  t.equal(origin.calls, 4)
})

t.test('a failing origin keeps the old entry served; a stale entry stays readable with ?allowStale', async (t) => {
  // A long TTL, so the cooldowns below do not run the entry out.
  const ttlMs = 60_000
  const { origin, clock, app, refreshes } = await setup(t, { retries: 1, backoffMs: 5, ttlMs })
  await load(app, origin, ['1'])
  origin.failAll = 500
  clock.advance(0.81 * ttlMs)
  t.equal((await get(app, 'dashboard:1')).json().value, 'v1-1')
  await app.origins.refresher.drain()
  t.same(refreshes, ['error'])
  t.equal(origin.calls, 3, 'one refresh: two attempts')
  t.equal((await get(app, 'dashboard:1')).json().value, 'v1-1', 'still served after the failure')
  await app.origins.refresher.drain()
  t.equal(origin.calls, 3, 'no new attempt during the cooldown after a failure')

  // Marked stale: readable with ?allowStale (each such read asks for a refresh), not without.
  await call(app, { method: 'DELETE', url: '/v1/entries/dashboard%3A1?mode=stale' })
  t.equal((await get(app, 'dashboard:1')).statusCode, 404)
  clock.advance(1001)
  const stale = await get(app, 'dashboard:1', '?allowStale=true')
  t.equal(stale.statusCode, 200)
  t.equal(stale.json().stale, true)
  t.equal(stale.json().value, 'v1-1')
  await app.origins.refresher.drain()
  t.same(refreshes, ['error', 'error'])
  t.equal((await get(app, 'dashboard:1', '?allowStale=true')).json().value, 'v1-1', 'still served while the origin fails')
  const loaded = await get(app, 'dashboard:1', '?load=true')
  t.same([loaded.statusCode, loaded.json().value, loaded.json().stale], [200, 'v1-1', true], 'a load without allowStale, the origin down: the stale value, marked')

  origin.failAll = undefined
  origin.values.set(dash('1'), 'v2')
  clock.advance(1001)
  await get(app, 'dashboard:1', '?allowStale=true')
  await app.origins.refresher.drain()
  const fresh = await get(app, 'dashboard:1')
  t.equal(fresh.json().value, 'v2')
  t.equal(fresh.json().stale, false)
})

t.test('POST /v1/entries/:key/refresh reloads now and replies with the new entry', async (t) => {
  const { origin, app, refreshes } = await setup(t)
  await load(app, origin, ['1'])
  origin.values.set(dash('1'), { n: 2 })
  const res = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A1/refresh', key: 'write' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.same(Object.keys(body).sort(), ['etag', 'expiresAt', 'key'])
  t.equal(body.key, 'dashboard:1')
  const entry = await get(app, 'dashboard:1')
  t.equal(entry.json().etag, body.etag)
  t.same(entry.json().value, { n: 2 })
  t.same(refreshes, ['success'])
})

t.test('a forced refresh: 404 with no origin or no data, 503 keeping the old entry when the origin fails, 403 without write', async (t) => {
  const { origin, app, refreshes } = await setup(t)
  await load(app, origin, ['1'])
  const none = await call(app, { method: 'POST', url: '/v1/entries/profile%3A1/refresh' })
  t.equal(none.statusCode, 404)
  t.equal(none.json().error, 'not_found')
  t.match(none.json().message, /no origin/)
  const gone = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3Anobody/refresh' })
  t.equal(gone.statusCode, 404)
  // Cached, then gone from the origin: the forced refresh removes it rather than leave it served.
  await put(app, 'dashboard:deleted', { value: 'kept by mistake' })
  const removed = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3Adeleted/refresh' })
  t.equal(removed.statusCode, 404)
  t.match(removed.json().message, /has no data .*the cached entry was removed/)
  t.equal((await get(app, 'dashboard:deleted')).statusCode, 404)
  t.match(app.cache.recentInvalidations(1)[0], { selector: { keys: ['dashboard:deleted'] }, source: 'api', actor: 'admin' })
  origin.failAll = 500
  const down = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A1/refresh' })
  t.equal(down.statusCode, 503)
  t.equal(down.json().error, 'backend_unavailable')
  t.equal((await get(app, 'dashboard:1')).json().value, 'v1-1')
  t.same(refreshes, ['success', 'success', 'error'])
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A1/refresh', key: 'read' })).statusCode, 403)
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A1/refresh', key: null })).statusCode, 401)
})

t.test('a forced refresh whose load and retry invalidations both void: 409 lease_invalidated, nothing cached', async (t) => {
  const { origin, app } = await setup(t)
  await load(app, origin, ['7'])
  origin.values.set(dash('7'), 'read before the changes')
  origin.hold()
  const pending = call(app, { method: 'POST', url: '/v1/entries/dashboard%3A7/refresh' })
  await voidBothLoads(origin, 1, () => call(app, { method: 'DELETE', url: '/v1/users/7/entries' }))
  const res = await pending
  t.equal(res.statusCode, 409)
  t.equal(res.json().error, 'lease_invalidated')
  t.match(res.json().message, /nothing was cached; refresh again/)
  t.equal((await get(app, 'dashboard:7')).statusCode, 404, 'not cached')
  origin.values.set(dash('7'), 'current')
  const again = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A7/refresh' })
  t.equal(again.statusCode, 200, 'refreshed again, with nothing in its way')
  t.equal((await get(app, 'dashboard:7')).json().value, 'current')
})

t.test('a key with a slash is refreshed through its encoded form', async (t) => {
  const { origin, app } = await setup(t)
  origin.values.set('/users/a%2Fb/dashboard', 1)
  const res = await call(app, { method: 'POST', url: `/v1/entries/${encodeURIComponent('dashboard:a/b')}/refresh` })
  t.equal(res.statusCode, 200)
  t.equal(res.json().key, 'dashboard:a/b')
})

t.test('with no origins configured, hits run no hook at all', async (t) => {
  const app = await build(t)
  t.equal(app.cache.onHit, undefined)
})

t.test('refresh failures during an outage are logged once per origin per interval, with the count', async (t) => {
  const origin = await OriginServer.start(t)
  const clock = new FakeClock()
  const { records, stream } = captureLogs()
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { ttlMs: TTL })] } }, { now: clock.now, logger: { level: 'warn', stream } })
  const ids = Array.from({ length: 10 }, (_, i) => String(i))
  await load(app, origin, ids)
  origin.failAll = 500
  clock.advance(0.9 * TTL)
  for (const id of ids) await get(app, `dashboard:${id}`)
  await app.origins.refresher.drain()
  const warnings = records().filter((l) => l.msg === 'refresh-ahead failed; the cached entry stays')
  t.equal(warnings.length, 1)
  t.equal(warnings[0]!.origin, 'dashboards')
  t.notMatch(JSON.stringify(records()), /127\.0\.0\.1/, 'no origin URL in the logs')
})

t.test('an entry whose key gives a user no entry can carry is not refreshed, and is cooled down, not queued on every hit', async (t) => {
  const origin = await OriginServer.start(t)
  const clock = new FakeClock()
  const { records, stream } = captureLogs()
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { ttlMs: TTL })] } }, { now: clock.now, logger: { level: 'warn', stream } })
  const key = `dashboard:${'u'.repeat(200)}` // a client wrote it; its origin would file it under a 200-byte user id
  await put(app, key, { value: 'by hand', ttlMs: TTL })
  const scheduled: string[] = []
  const schedule = app.origins.refresher.schedule.bind(app.origins.refresher)
  app.origins.refresher.schedule = (k, hits) => {
    scheduled.push(k)
    schedule(k, hits)
  }
  clock.advance(0.81 * TTL) // past refreshAhead, 1.9 s left
  await get(app, key)
  await app.origins.refresher.drain()
  t.same(scheduled, [key], 'queued by the first hit past refreshAhead')
  t.equal(origin.calls, 0, 'the origin is never called')
  t.match(records().find((l) => l.msg === 'refresh-ahead failed; the cached entry stays'), { origin: 'dashboards', err: /userId is longer than 128 bytes/ })
  clock.advance(1200) // past a failed refresh's cooldown (1 s), not past the entry's life
  await get(app, key)
  await app.origins.refresher.drain()
  t.same(scheduled, [key], 'later hits do not queue it again')
  t.equal((await get(app, key)).json().value, 'by hand', 'still served')
})

t.test('once shutdown begins, queued refreshes do not start', async (t) => {
  const origin = await OriginServer.start(t)
  const other = await OriginServer.start(t) // serves the request that keeps the shutdown waiting
  const clock = new FakeClock()
  const origins = [dashboardOrigin(origin, { ttlMs: TTL }), { ...dashboardOrigin(other), name: 'other', keyPattern: 'other:{userId}' }]
  const app = await build(t, { refreshConcurrency: 1, configFile: { origins } }, { now: clock.now })
  const ids = ['1', '2', '3']
  await load(app, origin, ids)
  origin.hold()
  clock.advance(0.9 * TTL)
  for (const id of ids) await get(app, `dashboard:${id}`)
  await origin.waitForCalls(3 + 1)
  t.equal(app.origins.refresher.pending, 2, 'one refresh running, two queued')
  // A request in flight over HTTP holds the app between preClose and onClose.
  other.values.set(dash('9'), 'v')
  other.hold()
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const inFlight = fetch(`http://127.0.0.1:${port}/v1/entries/other%3A9?load=true`, { headers: auth() })
  await other.waitForCalls(1)
  const closed = app.close()
  await new Promise((r) => setTimeout(r, 50)) // preClose has run
  origin.release() // the running refresh finishes; the queue would start the next
  await app.origins.refresher.drain()
  t.equal(origin.calls, 4, 'the queued refreshes never started')
  other.release()
  t.equal((await inFlight).status, 200, 'the request in flight is answered')
  await closed
  t.equal(origin.calls, 4)
})
