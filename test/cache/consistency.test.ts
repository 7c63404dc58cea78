import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { DEFAULT_LIMITS, etagOf } from '../../src/cache/limits.js'
import { FakeClock, KEYS, build, call, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'
import { serve } from '../helpers/serve.js'

const dash = (id: string) => `/users/${id}/dashboard`
const USERS = Array.from({ length: 10 }, (_, i) => String(i))
const CHANGED = ['2', '5', '7']

/** Ten dashboards cached from the origin, then the origin's data for users 2, 5 and 7 changes. */
async function setup(t: { teardown(fn: () => unknown): void }) {
  const origin = await OriginServer.start(t)
  for (const id of USERS) origin.values.set(dash(id), { user: id, version: 1 })
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { ttlMs: 600_000 })] } })
  const warmed = await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: USERS } })
  if (warmed.json().loaded !== USERS.length) throw new Error(`warm: ${warmed.body}`)
  for (const id of CHANGED) origin.values.set(dash(id), { user: id, version: 2 })
  return { origin, app }
}

const check = (app: FastifyInstance, payload: Record<string, unknown>, key: 'admin' | 'write' = 'admin') =>
  call(app, { method: 'POST', url: '/v1/consistency', payload, key })

t.test('against the origin, a check finds exactly the entries whose origin data changed', async (t) => {
  const { app } = await setup(t)
  const res = await check(app, { userIds: USERS, against: 'origin' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.same(Object.keys(body).sort(), ['checked', 'consistent', 'durationMs', 'errors', 'missing', 'repaired', 'stale'])
  t.equal(body.checked, 10)
  t.equal(body.consistent, 7)
  t.same(body.stale, CHANGED.map((id) => `dashboard:${id}`))
  t.same(body.missing, [])
  t.same(body.errors, [])
  t.equal(body.repaired, 0)
  t.type(body.durationMs, 'number')
  t.same((await get(app, 'dashboard:2')).json().value, { user: '2', version: 1 }, 'repair "none" changes nothing')
})

t.test('a key the cache chose (a user\'s, the sample) that expired before it was looked at is no finding; a named one is missing', async (t) => {
  const origin = await OriginServer.start(t)
  for (const id of ['1', '2']) origin.values.set(dash(id), { user: id, version: 1 })
  const clock = new FakeClock()
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } }, { now: clock.now })
  await put(app, 'dashboard:1', { value: { user: '1', version: 1 }, userId: '1', ttlMs: 1000 })
  await put(app, 'dashboard:2', { value: { user: '2', version: 1 }, userId: '2', ttlMs: 60_000 })
  clock.advance(1000) // dashboard:1 is past its expiry, whether or not the sweep has dropped it
  for (const chosen of [{ userIds: ['1', '2'] }, { sample: 10 }]) {
    const body = (await check(app, { ...chosen, against: 'origin' })).json()
    t.match(body, { checked: 1, consistent: 1, missing: [] }, JSON.stringify(chosen))
  }
  t.match((await check(app, { keys: ['dashboard:1', 'dashboard:2'], against: 'origin' })).json(), { checked: 2, consistent: 1, missing: ['dashboard:1'] })
})

t.test('keys not cached are missing, keys no origin serves are errors, a sample covers the cache', async (t) => {
  const { app, origin } = await setup(t)
  await put(app, 'misc:1', { value: 1 })
  const res = await check(app, { keys: ['dashboard:2', 'dashboard:99', 'misc:1', 'dashboard:3'], against: 'origin' })
  const body = res.json()
  t.equal(body.checked, 4)
  t.equal(body.consistent, 1)
  t.same(body.stale, ['dashboard:2'])
  t.same(body.missing, ['dashboard:99'])
  t.same(body.errors, [{ key: 'misc:1', error: 'no origin serves this key' }])

  const sampled = (await check(app, { sample: 100, against: 'origin' })).json()
  t.equal(sampled.checked, 11)
  t.same([...sampled.stale].sort(), CHANGED.map((id) => `dashboard:${id}`))

  origin.failAll = 500
  const down = (await check(app, { keys: ['dashboard:1'], against: 'origin' })).json()
  t.equal(down.errors.length, 1)
  t.match(down.errors[0].error, /answered 500/)
  t.equal(down.consistent, 0)
})

t.test('repair "invalidate" deletes exactly the stale entries through the one invalidation function', async (t) => {
  const { app } = await setup(t)
  const body = (await check(app, { userIds: USERS, against: 'origin', repair: 'invalidate' })).json()
  t.equal(body.repaired, 3)
  for (const id of USERS) t.equal((await get(app, `dashboard:${id}`)).statusCode, CHANGED.includes(id) ? 404 : 200, `dashboard:${id}`)
  const log = (await call(app, { method: 'GET', url: '/v1/debug/invalidations?limit=1' })).json()[0]
  t.equal(log.source, 'consistency')
  t.same([...log.selector.keys].sort(), CHANGED.map((id) => `dashboard:${id}`))
  t.equal(log.actor, 'admin')
  const again = (await check(app, { userIds: USERS, against: 'origin' })).json()
  t.same(again.stale, [])
  t.equal(again.consistent, 7)
  const audit = (await call(app, { method: 'GET', url: '/v1/debug/audit?limit=10' })).json()
  const repairs = audit.filter((e: { action: string }) => e.action === 'consistency_repair')
  t.equal(repairs.length, 1, 'the repair is audited; the checks alone are not')
  t.match(repairs[0], { actor: 'admin', outcome: 'succeeded', detail: /repair=invalidate .*repaired=3/ })
})

t.test('repair "refresh" reloads exactly the stale entries, after which the check is clean', async (t) => {
  const { app, origin } = await setup(t)
  const before = origin.calls
  const refreshes: string[] = []
  app.cache.on('refresh', (e) => refreshes.push(e.result))
  const body = (await check(app, { userIds: USERS, against: 'origin', repair: 'refresh' })).json()
  t.equal(body.repaired, 3)
  t.equal(origin.calls - before, 10 + 3, 'one fetch per checked key, one reload per stale one')
  t.same(refreshes, ['success', 'success', 'success'])
  for (const id of CHANGED) t.same((await get(app, `dashboard:${id}`)).json().value, { user: id, version: 2 })
  const again = (await check(app, { userIds: USERS, against: 'origin' })).json()
  t.equal(again.consistent, 10)
  t.same(again.stale, [])
})

t.test('an entry whose origin no longer has data is stale; a refresh repair deletes it', async (t) => {
  const { app, origin } = await setup(t)
  origin.values.delete(dash('4'))
  const body = (await check(app, { keys: ['dashboard:4'], against: 'origin', repair: 'refresh' })).json()
  t.same(body.stale, ['dashboard:4'])
  t.equal(body.repaired, 1)
  t.equal((await get(app, 'dashboard:4')).statusCode, 404)
})

t.test('an origin value too large to cache is stale, and a refresh repair deletes it; a body too large to read is an error', async (t) => {
  const { app, origin } = await setup(t)
  origin.values.set(dash('4'), 'x'.repeat(DEFAULT_LIMITS.maxValueBytes + 1)) // read, then refused by the limits
  // Past the largest body read: its value cannot be told apart from a pretty-printed small one.
  origin.values.set(dash('6'), 'x'.repeat(5 * DEFAULT_LIMITS.maxValueBytes))
  const body = (await check(app, { keys: ['dashboard:4', 'dashboard:6'], against: 'origin', repair: 'refresh' })).json()
  t.same(body.stale, ['dashboard:4'])
  t.match(body.errors, [{ key: 'dashboard:6', error: /sent more than \d+ bytes/ }])
  t.equal(body.repaired, 1)
  t.equal((await get(app, 'dashboard:4')).statusCode, 404, 'the old value, which no reload can replace, is gone')
  t.equal((await get(app, 'dashboard:6')).statusCode, 200, 'an entry that could not be compared is kept')
})

t.test('against provided values and etags (quoted, weak or bare), only differing entries are stale', async (t) => {
  const { app } = await setup(t)
  const etag1 = (await get(app, 'dashboard:1')).json().etag
  await put(app, 'nul', { value: null })
  const body = (
    await check(app, {
      against: 'provided',
      entries: [
        { key: 'dashboard:0', value: { user: '0', version: 1 } },
        { key: 'dashboard:1', etag: `"${etag1}"` },
        { key: 'dashboard:2', value: { user: '2', version: 2 } },
        { key: 'dashboard:3', etag: 'W/"not-the-etag"' },
        { key: 'dashboard:4', etag: etagOf(JSON.stringify({ user: '4', version: 1 })) },
        { key: 'nul', value: null },
        { key: 'dashboard:99', value: 1 },
      ],
    })
  ).json()
  t.equal(body.checked, 7)
  t.equal(body.consistent, 4)
  t.same(body.stale, ['dashboard:2', 'dashboard:3'])
  t.same(body.missing, ['dashboard:99'])
  t.equal(body.repaired, 0)
})

t.test('an optional field sent as null counts as absent; a null value in provided mode is a value', async (t) => {
  const { app } = await setup(t)
  await put(app, 'nul', { value: null })
  const origin = await check(app, { against: 'origin', keys: null, userIds: ['2', '3'], sample: null, entries: null, repair: null })
  t.equal(origin.statusCode, 200, origin.body)
  t.match(origin.json(), { checked: 2, consistent: 1, stale: ['dashboard:2'] })
  const provided = await check(app, {
    against: 'provided',
    keys: null,
    userIds: null,
    sample: null,
    repair: null,
    entries: [
      { key: 'nul', value: null, etag: null },
      { key: 'dashboard:3', value: { user: '3', version: 1 }, etag: null },
    ],
  })
  t.equal(provided.statusCode, 200, provided.body)
  t.match(provided.json(), { checked: 2, consistent: 2, stale: [] })
  // Null names nothing: a check still needs something to check.
  const nothing = await check(app, { against: 'origin', keys: null, userIds: null, sample: null })
  t.equal(nothing.statusCode, 400)
  t.match(nothing.json().message, /name what to check/)
  const noTruth = await check(app, { against: 'provided', entries: [{ key: 'nul', etag: null }] })
  t.equal(noTruth.statusCode, 400)
  t.match(noTruth.json().message, /entries\[0\] needs a value or an etag/)
})

t.test('provided mode repairs: invalidate deletes, refresh reloads from the origin or deletes without one', async (t) => {
  const { app } = await setup(t)
  await put(app, 'misc:1', { value: 'old' })
  const entries = [
    { key: 'dashboard:2', value: { user: '2', version: 2 } },
    { key: 'misc:1', value: 'new' },
  ]
  const refreshed = (await check(app, { against: 'provided', entries, repair: 'refresh' })).json()
  t.same(refreshed.stale, ['dashboard:2', 'misc:1'])
  t.equal(refreshed.repaired, 2)
  t.same((await get(app, 'dashboard:2')).json().value, { user: '2', version: 2 })
  t.equal((await get(app, 'misc:1')).statusCode, 404, 'no origin: invalidated instead')

  const invalidated = (await check(app, { against: 'provided', entries: [{ key: 'dashboard:5', value: 'x' }], repair: 'invalidate' })).json()
  t.equal(invalidated.repaired, 1)
  t.equal((await get(app, 'dashboard:5')).statusCode, 404)
})

t.test('a malformed check is a 400 naming the problem, and the route needs admin', async (t) => {
  const { app } = await setup(t)
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ against: 'provided' }, /entries is required/],
    [{ against: 'provided', keys: ['a'], entries: [{ key: 'a', value: 1 }] }, /keys, userIds and sample are for against "origin"/],
    [{ against: 'provided', entries: [{ key: 'a' }] }, /entries\[0\] needs a value or an etag/],
    [{ against: 'provided', entries: [{ key: 'a', value: 1, etag: 'x' }] }, /entries\[0\] has both a value and an etag/],
    [{ against: 'provided', entries: [{ key: 'a', value: 1 }, { key: 'a', value: 2 }] }, /entries\[1\]\.key repeats/],
    [{ against: 'provided', entries: [{ key: '', value: 1 }] }, /entries\[0\]\.key/],
    [{ against: 'origin' }, /name what to check/],
    [{ against: 'origin', keys: [] }, /name what to check/],
    [{ against: 'origin', keys: [], userIds: [] }, /name what to check/],
    [{ against: 'origin', keys: ['a'], entries: [] }, /entries is for against "provided"/],
    [{ against: 'origin', userIds: [''] }, /userIds\[0\]/],
    [{ against: 'database', keys: ['a'] }, /against/],
    [{ against: 'origin', keys: ['a'], repair: 'fix' }, /repair/],
    [{ against: 'origin', sample: 0 }, /sample/],
  ]
  for (const [payload, message] of bad) {
    const res = await check(app, payload)
    t.equal(res.statusCode, 400, JSON.stringify(payload))
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, message)
  }
  t.equal((await check(app, { against: 'origin', keys: ['a'] }, 'write')).statusCode, 403)

})

t.test('a provided value no write could store (too deep, even for JSON.stringify, or too large) makes its key stale', async (t) => {
  const { app } = await setup(t)
  const deep = '['.repeat(100_000) + ']'.repeat(100_000)
  const check = (entries: string) =>
    call(app, { method: 'POST', url: '/v1/consistency', headers: { 'content-type': 'application/json' }, payload: `{"against":"provided","entries":[${entries}]}` })
  const res = await check(
    `{"key":"dashboard:1","value":${deep}},{"key":"dashboard:2","value":${JSON.stringify(nested(100))}},{"key":"not-cached","value":${deep}}`,
  )
  t.equal(res.statusCode, 200, 'not a 500 from a stack overflow, nor a 4xx for the whole check')
  t.same(res.json().stale, ['dashboard:1', 'dashboard:2'])
  t.same(res.json().missing, ['not-cached'])
  const large = await check(`{"key":"dashboard:3","value":"${'x'.repeat(DEFAULT_LIMITS.maxValueBytes)}"}`)
  t.equal(large.statusCode, 200)
  t.same(large.json().stale, ['dashboard:3'], 'a value over MAX_VALUE_BYTES differs from whatever is cached')
})

function nested(depth: number): unknown {
  let v: unknown = 1
  for (let i = 0; i < depth; i++) v = [v]
  return v
}

t.test('against origin with no origins configured is a 400', async (t) => {
  const app = await build(t)
  const res = await check(app, { against: 'origin', keys: ['a'] })
  t.equal(res.statusCode, 400)
  t.match(res.json().message, /no.*origins|none are configured/)
})

t.test('a registered copy check (cluster mode\'s L1 against Redis) adds its differing keys as stale, and the keys it could not compare as errors', async (t) => {
  const { app } = await setup(t)
  app.consistency.copyChecks.push({
    name: 'l1',
    compare: async (keys) => ({
      differing: keys.filter((k) => k === 'dashboard:0'),
      errors: ['dashboard:1', 'dashboard:2'].map((key) => ({ key, error: 'redis down' })),
    }),
  })
  const body = (await check(app, { userIds: USERS, against: 'origin' })).json()
  t.same([...body.stale].sort(), ['dashboard:0', ...CHANGED.map((id) => `dashboard:${id}`)], 'dashboard:2 differs from its origin: stale whatever the copy check says')
  t.same(body.errors, [{ key: 'dashboard:1', error: 'l1: redis down' }], 'a key the copy check could not compare is an error')
  t.equal(body.consistent, 5, 'and not also consistent')
  t.equal(body.checked, body.consistent + body.stale.length + body.missing.length + body.errors.length, 'each key in one list')
})

/**
 * Forty dashboards served over a real port, all changed at the origin since they were cached,
 * and a check of them with `repair`, sent by a caller that can go away (`leave()`).
 */
async function abandonable(t: Test, repair: 'invalidate' | 'refresh') {
  const origin = await OriginServer.start(t)
  const ids = Array.from({ length: 40 }, (_, i) => String(i))
  for (const id of ids) origin.values.set(dash(id), { user: id, version: 1 })
  const { app, url } = await serve(t, { configFile: { origins: [dashboardOrigin(origin, { ttlMs: 600_000 })] } })
  t.equal((await call(app, { method: 'POST', url: '/v1/warm', payload: { userIds: ids } })).json().loaded, ids.length)
  for (const id of ids) origin.values.set(dash(id), { user: id, version: 2 }) // every entry is stale now
  const before = origin.calls
  const gone = new AbortController()
  const pending = fetch(`${url}/v1/consistency`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.admin}`, 'content-type': 'application/json' },
    body: JSON.stringify({ userIds: ids, against: 'origin', repair }),
    signal: gone.signal,
  }).catch((e: Error) => e)
  const leave = async () => {
    gone.abort()
    t.type(await pending, Error)
    await new Promise((r) => setTimeout(r, 1000)) // the whole check would have gone on by now
  }
  const versions = () => Promise.all(ids.map(async (id) => (await get(app, `dashboard:${id}`)).json().value.version as number))
  return { app, origin, ids, leave, versions, before, calls: () => origin.calls - before }
}

t.test('a caller that goes away abandons the check: no further origin fetch, nothing repaired', async (t) => {
  const { app, origin, ids, leave, versions, before, calls } = await abandonable(t, 'invalidate')
  origin.delayMs = 200 // 40 keys, 5 at a time: 1.6 s for the whole check
  await origin.waitForCalls(before + 5)
  await leave()
  t.ok(calls() <= 10, `stopped fetching once the caller left (${calls()} of 40)`)
  t.same(await versions(), ids.map(() => 1), 'and repaired nothing')
  t.notOk((await call(app, { url: '/v1/debug/audit' })).body.includes('consistency_repair'), 'no repair audited')
})

t.test('a caller that goes away during a refresh repair stops it; what was repaired is audited', async (t) => {
  const { app, origin, ids, leave, versions, before, calls } = await abandonable(t, 'refresh')
  await origin.waitForCalls(before + ids.length) // the check fetched every key
  origin.delayMs = 200 // 40 reloads, 5 at a time: 1.6 s for the whole repair
  await origin.waitForCalls(before + ids.length + 5)
  await leave()
  const reloads = calls() - ids.length
  t.ok(reloads <= 10, `stopped reloading once the caller left (${reloads} of 40)`)
  const repaired = (await versions()).filter((v) => v === 2).length
  t.ok(repaired > 0 && repaired < ids.length, `${repaired} repaired before it stopped`)
  const [record] = (await call(app, { url: '/v1/debug/audit?limit=1' })).json()
  t.match(record, { action: 'consistency_repair', detail: new RegExp(`repaired=${repaired} .*abandoned by its caller`) }, 'the repairs made are audited')
})
