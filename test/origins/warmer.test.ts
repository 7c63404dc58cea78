import t from 'tap'
import { auth, build, call, captureLogs, get } from '../helpers/build.js'
import { OriginServer, dashboardOrigin, voidBothLoads } from '../helpers/origin-server.js'

const dash = (id: string) => `/users/${id}/dashboard`

function twoOrigins(origin: OriginServer) {
  return [
    dashboardOrigin(origin),
    { name: 'prefs', keyPattern: 'prefs:{userId}', url: `${origin.base}/prefs/{userId}`, ttlMs: 10_000 },
    // Two parts: userIds cannot name its keys, so warming by user skips it.
    { name: 'reports', keyPattern: 'report:{userId}:{month}', url: `${origin.base}/reports/{userId}/{month}` },
  ]
}

t.test('POST /v1/warm loads keys and expands userIds through every {userId} origin', async (t) => {
  const origin = await OriginServer.start(t)
  for (const id of ['1', '2']) {
    origin.values.set(dash(id), `d${id}`)
    origin.values.set(`/prefs/${id}`, `p${id}`)
  }
  origin.values.set('/reports/1/2026-01', 'r')
  const app = await build(t, { configFile: { origins: twoOrigins(origin) } })
  const refreshes: string[] = []
  app.cache.on('refresh', (e) => refreshes.push(e.result))
  const res = await call(app, {
    method: 'POST',
    url: '/v1/warm',
    key: 'write',
    payload: { keys: ['report:1:2026-01', 'dashboard:1', 'nothing:here'], userIds: ['1', '2', '3'] },
  })
  t.equal(res.statusCode, 200)
  const body = res.json()
  // report:1:2026-01, dashboard:1 (once), nothing:here, prefs:1, dashboard:2, prefs:2, dashboard:3, prefs:3
  t.equal(body.requested, 8)
  t.equal(body.loaded, 5)
  t.equal(body.failed, 3)
  t.same(body.errors.map((e: { key: string }) => e.key).sort(), ['dashboard:3', 'nothing:here', 'prefs:3'])
  t.equal(refreshes.filter((r) => r === 'success').length, 7, 'a load per origin-served key')
  for (const [key, value] of [['dashboard:2', 'd2'], ['prefs:1', 'p1'], ['report:1:2026-01', 'r']]) {
    t.equal((await get(app, key!)).json().value, value)
  }
})

t.test('a warm runs at most 5 origin loads at once', async (t) => {
  const origin = await OriginServer.start(t)
  const ids = Array.from({ length: 20 }, (_, i) => String(i))
  for (const id of ids) origin.values.set(dash(id), id)
  origin.delayMs = 50
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: ids } })
  t.equal(res.json().loaded, 20)
  t.ok(origin.maxInFlight <= 5, `at most 5 at once (saw ${origin.maxInFlight})`)
  t.ok(origin.maxInFlight > 1, 'but more than one')
})

t.test('a failing origin fails its keys in the summary, not the request', async (t) => {
  const origin = await OriginServer.start(t)
  origin.failAll = 500
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const res = await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: ['1', '2'] } })
  t.equal(res.statusCode, 200)
  t.same({ ...res.json(), errors: res.json().errors.length }, { requested: 2, loaded: 0, failed: 2, errors: 2 })
})

t.test('a key whose load and retry invalidations both void fails in the summary: it was not cached', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('1'), 'read before the changes')
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  origin.hold()
  const pending = call(app, { method: 'POST', url: '/v1/warm', payload: { keys: ['dashboard:1'] } })
  await voidBothLoads(origin, 0, () => call(app, { method: 'DELETE', url: '/v1/users/1/entries' }))
  const res = await pending
  t.same(res.json(), {
    requested: 1,
    loaded: 0,
    failed: 1,
    errors: [{ key: 'dashboard:1', error: 'invalidations of the key landed during the load and its retry: not cached' }],
  })
  t.equal((await get(app, 'dashboard:1')).statusCode, 404)
})

t.test('POST /v1/warm checks its input and its scope', async (t) => {
  const origin = await OriginServer.start(t)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const bad = await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: ['ok', ''] } })
  t.equal(bad.statusCode, 400)
  t.equal(bad.json().error, 'invalid_request')
  t.match(bad.json().message, /keys\[1\]/)
  const many = await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: Array.from({ length: 1001 }, (_, i) => `${i}`) } })
  t.equal(many.statusCode, 400)
  t.equal((await call(app, { method: 'POST', url: '/v1/warm', payload: {}, key: 'read' })).statusCode, 403)
  const empty = await call(app, { method: 'POST', url: '/v1/warm', payload: {} })
  t.same(empty.json(), { requested: 0, loaded: 0, failed: 0, errors: [] })
  // A list sent as null counts as absent, as in a selector.
  origin.values.set(dash('1'), 'one')
  const nulls = await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: null, userIds: ['1'] } })
  t.equal(nulls.statusCode, 200, nulls.body)
  t.same(nulls.json(), { requested: 1, loaded: 1, failed: 0, errors: [] })
  t.same((await call(app, { method: 'POST', url: '/v1/warm', payload: { keys: null, userIds: null } })).json(), { requested: 0, loaded: 0, failed: 0, errors: [] })
})

t.test('warm.onStartup loads its set once the app is ready, and warm.intervalMs again and again', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('1'), 'one')
  origin.values.set(dash('2'), 'two')
  const app = await build(t, {
    configFile: { origins: [dashboardOrigin(origin)], warm: { onStartup: { userIds: ['1'], keys: ['dashboard:2'] }, intervalMs: 100 } },
  })
  await origin.waitForCalls(2)
  await new Promise((r) => setTimeout(r, 20))
  t.equal((await get(app, 'dashboard:1')).json().value, 'one')
  t.equal((await get(app, 'dashboard:2')).json().value, 'two')
  origin.values.set(dash('1'), 'uno')
  await origin.waitForCalls(6) // two more rounds
  await new Promise((r) => setTimeout(r, 20))
  t.equal((await get(app, 'dashboard:1')).json().value, 'uno', 're-warmed')
})

t.test('closing the app stops the warm interval', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set(dash('1'), 'one')
  const { buildApp } = await import('../../src/app.js')
  // Counted in the log: once closed, the origin client refuses every call anyway, so the
  // origin's call count could not show a warm that still ran.
  let started = 0
  const stream = { write: (line: string) => void (line.includes('"warm started"') && started++) }
  const app = await buildApp(
    { configFile: { origins: [dashboardOrigin(origin)], warm: { onStartup: { userIds: ['1'] }, intervalMs: 100 } } },
    { logger: { level: 'info', stream } },
  )
  await app.ready()
  await origin.waitForCalls(1)
  await new Promise((r) => setTimeout(r, 250))
  t.ok(started >= 2, 'the interval warms while the app runs')
  await app.close()
  const before = started
  await new Promise((r) => setTimeout(r, 300))
  t.equal(started, before, 'and no warm starts once it is closed')
})

t.test('once shutdown begins, a warm under way loads no further key', async (t) => {
  const origin = await OriginServer.start(t)
  const other = await OriginServer.start(t) // serves the request that keeps the shutdown waiting
  const keys = Array.from({ length: 20 }, (_, i) => `dashboard:${i}`)
  for (let i = 0; i < 20; i++) origin.values.set(dash(String(i)), i)
  origin.hold()
  other.values.set(dash('9'), 'v')
  other.hold()
  const origins = [dashboardOrigin(origin), { ...dashboardOrigin(other), name: 'other', keyPattern: 'other:{userId}' }]
  const app = await build(t, { configFile: { origins, warm: { onStartup: { keys, userIds: [] } } } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  await origin.waitForCalls(5) // the warm's first five loads, held
  const { port } = app.server.address() as { port: number }
  const inFlight = fetch(`http://127.0.0.1:${port}/v1/entries/other%3A9?load=true`, { headers: auth() })
  await other.waitForCalls(1)
  const closed = app.close()
  await new Promise((r) => setTimeout(r, 50)) // preClose has run
  origin.release() // the five finish; the warm would go on with the other fifteen
  await new Promise((r) => setTimeout(r, 300))
  t.equal(origin.calls, 5, 'no further key was loaded')
  other.release()
  t.equal((await inFlight).status, 200, 'the request in flight is answered')
  await closed
  t.equal(origin.calls, 5)
})

t.test('once shutdown begins, POST /v1/warm loads no further key and replies with what it did', async (t) => {
  const origin = await OriginServer.start(t)
  const keys = Array.from({ length: 20 }, (_, i) => `dashboard:${i}`)
  for (let i = 0; i < 20; i++) origin.values.set(dash(String(i)), i)
  origin.hold()
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const reply = fetch(`http://127.0.0.1:${port}/v1/warm`, {
    method: 'POST',
    headers: { ...auth(), 'content-type': 'application/json' },
    body: JSON.stringify({ keys }),
  })
  await origin.waitForCalls(5)
  const closed = app.close()
  await new Promise((r) => setTimeout(r, 50)) // preClose has run
  origin.release()
  const res = await reply
  t.equal(res.status, 200)
  t.match(await res.json(), { requested: 20, loaded: 5, failed: 0 })
  await closed
  t.equal(origin.calls, 5, 'no further key was loaded')
})

t.test('a warm logs when it starts, its progress, and its counts when it ends', async (t) => {
  const origin = await OriginServer.start(t)
  const ids = Array.from({ length: 250 }, (_, i) => String(i))
  for (const id of ids.slice(0, 200)) origin.values.set(dash(id), id)
  const { records, stream } = captureLogs()
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } }, { logger: { level: 'info', stream } })
  await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: ids } })
  const warmLines = records().filter((l) => typeof l.msg === 'string' && (l.msg as string).startsWith('warm '))
  t.same(warmLines.map((l) => l.msg), ['warm started', 'warm progress', 'warm progress', 'warm finished'])
  t.match(warmLines[3], { requested: 250, loaded: 200, failed: 50 })
})
