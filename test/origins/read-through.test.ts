import t from 'tap'
import { build, call, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin, voidBothLoads } from '../helpers/origin-server.js'

const dash = (id: string) => `/users/${id}/dashboard`

t.test('500 concurrent ?load=true reads of a cold key make one origin call and all get the value', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('42'), { widgets: 3 })
  origin.delayMs = 100
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const replies = await Promise.all(Array.from({ length: 500 }, () => get(app, 'dashboard:42', '?load=true')))
  t.equal(origin.calls, 1)
  t.same(new Set(replies.map((r) => r.statusCode)), new Set([200]))
  t.same(new Set(replies.map((r) => r.json().etag)).size, 1)
  const body = replies[0]!.json()
  t.same(body.value, { widgets: 3 })
  t.equal(body.userId, '42')
  t.same(body.tags, ['analytics:42'])
  const meta = (await call(app, { method: 'GET', url: '/v1/debug/entries/dashboard%3A42' })).json()
  t.equal(meta.origin, 'dashboards')
  t.equal((await get(app, 'dashboard:42')).statusCode, 200, 'the loaded value is cached')
  t.equal(origin.calls, 1)
})

t.test('without ?load=true a miss stays a plain miss and the origin is not called', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('1'), 1)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await get(app, 'dashboard:1')
  t.equal(res.statusCode, 404)
  t.type(res.json().lease, 'string')
  t.equal(origin.calls, 0)
})

t.test('a key no origin serves is a plain miss with a lease, even with ?load=true', async (t) => {
  const origin = await OriginServer.start(t)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await get(app, 'profile:42', '?load=true')
  t.equal(res.statusCode, 404)
  t.equal(res.json().error, 'not_found')
  t.type(res.json().lease, 'string')
  t.equal(origin.calls, 0)
})

t.test('an origin without data (404) is a plain miss, nothing cached', async (t) => {
  const origin = await OriginServer.start(t)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await get(app, 'dashboard:nobody', '?load=true')
  t.equal(res.statusCode, 404)
  t.type(res.json().lease, 'string')
  t.equal(origin.calls, 1)
})

t.test('a failing origin on a miss is 503 backend_unavailable for every waiter, and the app keeps serving', async (t) => {
  const origin = await OriginServer.start(t)
  origin.failAll = 500
  origin.delayMs = 50
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const replies = await Promise.all(Array.from({ length: 20 }, () => get(app, 'dashboard:7', '?load=true')))
  t.equal(origin.calls, 1)
  for (const r of replies) {
    t.equal(r.statusCode, 503)
    t.equal(r.json().error, 'backend_unavailable')
    t.match(r.json().message, /origin "dashboards" answered 500/)
  }
  origin.failAll = undefined
  origin.values.set(dash('7'), 'back')
  t.equal((await get(app, 'dashboard:7', '?load=true')).json().value, 'back')
})

t.test('a ?load=true miss loads at once even while a plain miss (GET or batch-get) holds the fill lease', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('5'), 'from the origin')
  origin.values.set(dash('6'), 'from the origin')
  // A fill lease far longer than the test's patience: waiting for it would show.
  const app = await build(t, { fillLeaseMs: 60_000, configFile: { origins: [dashboardOrigin(origin)] } })
  t.equal((await get(app, 'dashboard:5')).json().fill, true, 'a plain miss took the fill lease')
  const batch = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['dashboard:6'] } })
  t.equal(batch.json().leases['dashboard:6'].fill, true, 'so did a batch-get miss')
  const started = performance.now()
  for (const id of ['5', '6']) {
    const loaded = await get(app, `dashboard:${id}`, '?load=true')
    t.equal(loaded.statusCode, 200)
    t.equal(loaded.json().value, 'from the origin')
  }
  t.ok(performance.now() - started < 10_000, 'neither waited for the other lease to run out')
  t.equal(origin.calls, 2)
})

t.test('a stale value stays served while the origin fails: ?load=true gives the stale entry, marked stale', async (t) => {
  const origin = await OriginServer.start(t)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { retries: 0 })] } })
  await put(app, 'dashboard:8', { value: 'kept', userId: '8' })
  await call(app, { method: 'DELETE', url: '/v1/users/8/entries?mode=stale' })
  origin.failAll = 500
  const res = await get(app, 'dashboard:8', '?load=true')
  t.equal(res.statusCode, 200)
  t.same([res.json().value, res.json().stale], ['kept', true])
  t.equal(origin.calls, 1, 'the origin was asked first')
  t.equal((await get(app, 'dashboard:8')).statusCode, 404, 'a plain read still misses a stale entry')
  await call(app, { method: 'DELETE', url: '/v1/entries/dashboard%3A8' })
  t.equal((await get(app, 'dashboard:8', '?load=true')).statusCode, 503, 'with nothing kept, the failure is 503')
  origin.failAll = undefined
  origin.values.set(dash('8'), 'fresh')
  const fresh = await get(app, 'dashboard:8', '?load=true')
  t.same([fresh.json().value, fresh.json().stale], ['fresh', false], 'the origin back: loaded fresh')
})

t.test("a filler's failed load gives up its fill lease: the next miss fills at once", async (t) => {
  const origin = await OriginServer.start(t)
  origin.failAll = 500
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  t.equal((await get(app, 'dashboard:9', '?load=true')).statusCode, 503)
  const next = (await get(app, 'dashboard:9')).json()
  t.equal(next.fill, true, 'not fill:false for the rest of the failed fill lease')
})

t.test('an unreachable origin is 503, not a crash', async (t) => {
  const origin = await OriginServer.start(t)
  const spec = dashboardOrigin(origin)
  await origin.close()
  const app = await build(t, { configFile: { origins: [spec] } })
  const res = await get(app, 'dashboard:1', '?load=true')
  t.equal(res.statusCode, 503)
  t.equal(res.json().error, 'backend_unavailable')
  t.match(res.json().message, /unreachable/)
  t.notMatch(res.body, /127\.0\.0\.1/, 'the URL is not echoed')
})

t.test('key parts are URL-encoded into the origin URL', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/a%2Fb%20c%3F%23/dashboard', { ok: true })
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await get(app, 'dashboard:a/b c?#', '?load=true')
  t.equal(res.statusCode, 200)
  t.same(res.json().value, { ok: true })
  t.equal(res.json().userId, 'a/b c?#')
  t.same(origin.log, ['/users/a%2Fb%20c%3F%23/dashboard'])
})

t.test('a key part . or .. never reaches the origin: it would resolve to another path there', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set('/dashboard', 'another resource')
  origin.values.set('/users/dashboard', 'another resource')
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  for (const key of ['dashboard:..', 'dashboard:.']) {
    const res = await get(app, key, '?load=true')
    t.equal(res.statusCode, 404, `${key}: a plain miss, as for a key no origin serves`)
    t.type(res.json().lease, 'string')
  }
  const warm = await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: ['dashboard:..'] } })
  t.equal(warm.statusCode, 200)
  t.same(origin.log, [], 'the origin was never called')
  // Dots with anything else are one segment: the slash is encoded, nothing resolves.
  origin.values.set('/users/..%2Fx/dashboard', 'ok')
  t.equal((await get(app, 'dashboard:../x', '?load=true')).json().value, 'ok', 'a part holding dots and more is one encoded segment')
})

t.test('a key whose user or tag no entry can carry is 400 naming it, and the origin is never called', async (t) => {
  const origin = await OriginServer.start(t)
  const long = 'u'.repeat(200) // a valid key part, but over the 128-byte user id limit
  origin.values.set(dash(long), 1)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const key = `dashboard:${long}`
  const res = await get(app, key, '?load=true')
  t.equal(res.statusCode, 400)
  t.equal(res.json().error, 'invalid_request')
  t.match(res.json().message, /^origin "dashboards" cannot cache "dashboard:u+…": userId is longer than 128 bytes$/)
  const miss = await get(app, key)
  t.equal(miss.json().fill, true, 'the refused load gave its fill lease back')
  const refresh = await call(app, { method: 'POST', url: `/v1/entries/${encodeURIComponent(key)}/refresh` })
  t.equal(refresh.statusCode, 400)
  t.match(refresh.json().message, /userId is longer than 128 bytes/)
  const warm = (await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: [key] } })).json()
  t.equal(warm.failed, 1)
  t.match(warm.errors[0].error, /userId is longer than 128 bytes/)
  // An entry written under the key by hand: checking it against the origin reports why it cannot be,
  // and a refresh repair drops it (it could never be reloaded) rather than failing the whole check.
  await put(app, key, { value: 1 })
  const check = await call(app, { method: 'POST', url: '/v1/consistency', payload: { keys: [key], against: 'origin' } })
  t.equal(check.statusCode, 200)
  t.match(check.json().errors, [{ key, error: /userId is longer than 128 bytes/ }])
  const repair = await call(app, {
    method: 'POST',
    url: '/v1/consistency',
    payload: { against: 'provided', entries: [{ key, value: 2 }], repair: 'refresh' },
  })
  t.equal(repair.statusCode, 200)
  t.equal(repair.json().repaired, 1)
  t.equal((await get(app, key)).statusCode, 404)
  t.equal(origin.calls, 0, 'the origin was never called')
})

t.test('configured headers are sent to the origin', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('1'), 1)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { headers: { Authorization: 'Bearer s3cret' } })] } })
  await get(app, 'dashboard:1', '?load=true')
  t.equal(origin.headers[0]!.authorization, 'Bearer s3cret')
})

for (const leasesEnabled of [true, false]) {
  const name = leasesEnabled
    ? 'an invalidation during the load voids its lease: the value is reloaded once and the fresh one cached'
    : 'control: with lease checks off, the same race caches the old value (so the test above can fail)'
  t.test(name, async (t) => {
    const origin = await OriginServer.start(t)
    origin.values.set(dash('42'), 'old')
    const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } }, { leasesEnabled })
    origin.hold()
    const pending = get(app, 'dashboard:42', '?load=true')
    await origin.waitForCalls(1)
    // The origin has read 'old'; the data changes and its invalidation lands before the reply.
    origin.values.set(dash('42'), 'new')
    t.equal((await call(app, { method: 'DELETE', url: '/v1/users/42/entries' })).statusCode, 200)
    origin.release()
    const res = await pending
    t.equal(res.statusCode, 200)
    const cached = (await get(app, 'dashboard:42')).json().value
    if (leasesEnabled) {
      t.equal(origin.calls, 2, 'reloaded once')
      t.equal(res.json().value, 'new')
      t.equal(cached, 'new')
    } else {
      t.equal(origin.calls, 1)
      t.equal(cached, 'old')
    }
  })
}

t.test('a load voided twice returns the value uncached', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('42'), 'v')
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  origin.hold()
  const pending = get(app, 'dashboard:42', '?load=true')
  await voidBothLoads(origin, 0, () => call(app, { method: 'DELETE', url: '/v1/entries/dashboard%3A42' }))
  const res = await pending
  t.equal(res.statusCode, 200)
  t.equal(res.json().value, 'v')
  t.equal(origin.calls, 2)
  t.equal((await get(app, 'dashboard:42')).statusCode, 404, 'not cached')
})

t.test('a hit is served from the cache with ?load=true, and a stale entry with ?allowStale', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('5'), 'fresh')
  origin.delayMs = 50
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { refreshAhead: 1 })] } })
  await put(app, 'dashboard:5', { value: 'cached', userId: '5' })
  t.equal((await get(app, 'dashboard:5', '?load=true')).json().value, 'cached')
  t.equal(origin.calls, 0)
  await call(app, { method: 'DELETE', url: '/v1/entries/dashboard%3A5?mode=stale' })
  const stale = await get(app, 'dashboard:5', '?load=true&allowStale=true')
  t.equal(stale.statusCode, 200)
  t.equal(stale.json().value, 'cached')
  t.equal(stale.json().stale, true)
  await app.origins.refresher.drain()
  const loaded = await get(app, 'dashboard:5', '?load=true')
  t.equal(loaded.json().value, 'fresh')
  t.equal(loaded.json().stale, false)
})
