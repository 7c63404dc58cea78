import type { FastifyInstance } from 'fastify'
import t from 'tap'
import { build, call, get, put, FakeClock } from '../helpers/build.js'

const rules = [
  { event: 'persona.updated', invalidate: { userIds: ['{{data.userId}}'], tags: ['analytics:{{data.userId}}'] } },
  // Cross-domain: the same event also reaches the team's reports, marked stale rather than deleted.
  { event: 'persona.updated', invalidate: { prefixes: ['team:{{data.team.id}}:'] }, mode: 'stale' },
  { event: 'plan.changed', invalidate: { keys: ['plan:{{data.planId}}'], tags: ['billing'] } },
]

async function app(t: Parameters<typeof build>[0], clock = new FakeClock()) {
  const app = await build(t, { configFile: { rules } }, { now: clock.now })
  await put(app, 'dash:42', { value: 1, userId: '42' })
  await put(app, 'report:42', { value: 1, tags: ['analytics:42'] })
  await put(app, 'dash:43', { value: 1, userId: '43', tags: ['analytics:43'] })
  await put(app, 'team:7:summary', { value: 1 })
  await put(app, 'team:8:summary', { value: 1 })
  await put(app, 'plan:pro', { value: 1 })
  await put(app, 'invoice:1', { value: 1, tags: ['billing'] })
  return app
}

const KEYS = ['dash:42', 'report:42', 'dash:43', 'team:7:summary', 'team:8:summary', 'plan:pro', 'invoice:1']

/** Keys still served fresh. */
async function fresh(app: FastifyInstance): Promise<string[]> {
  const out: string[] = []
  for (const key of KEYS) if ((await get(app, key)).statusCode === 200) out.push(key)
  return out
}

const send = (app: FastifyInstance, payload: unknown, key: 'invalidate' | 'admin' | 'read' | null = 'invalidate') =>
  call(app, { method: 'POST', url: '/v1/events', payload: payload as object, key })

t.test('an event runs every rule for its type, across domains, as event invalidations', async (t) => {
  const a = await app(t)
  const res = await send(a, { id: 'evt-1', type: 'persona.updated', data: { userId: '42', team: { id: 7 } } })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.equal(body.matched, 2)
  t.equal(body.invalidations.length, 2)
  t.match(body.invalidations[0], { invalidated: 2, mode: 'delete', id: String, durationMs: Number })
  t.match(body.invalidations[1], { invalidated: 1, mode: 'stale' })
  t.same(await fresh(a), ['dash:43', 'team:8:summary', 'plan:pro', 'invoice:1'])
  t.equal((await get(a, 'team:7:summary', '?allowStale=true')).json().stale, true, 'the stale rule kept the entry, stale')

  const records = (await call(a, { url: '/v1/debug/invalidations?limit=2' })).json()
  t.same(records.map((r: { source: string }) => r.source), ['events', 'events'])
  t.same(
    records.map((r: { selector: object }) => r.selector).sort((x: object, y: object) => JSON.stringify(x).localeCompare(JSON.stringify(y))),
    [{ prefixes: ['team:7:'] }, { tags: ['analytics:42'], userIds: ['42'] }],
  )
  t.match(records[0].reason, /^event persona\.updated evt-1 \(rules\[\d\]\)$/)
  t.equal(records[0].actor, 'invalidator')
  t.equal((await call(a, { url: '/v1/stats' })).json().invalidations.bySource.events, 2)
})

t.test('an event whose template cannot be filled is a 400 naming the field, and nothing is invalidated', async (t) => {
  const a = await app(t)
  // The first rule could be filled; the second (team.id) cannot: neither may run.
  const res = await send(a, { type: 'persona.updated', data: { userId: '42' } })
  t.equal(res.statusCode, 400)
  t.same(res.json(), {
    error: 'invalid_request',
    message: 'data.team.id is missing (needed by rules[1].invalidate.prefixes[0])',
  })
  t.same(await fresh(a), KEYS)
  t.equal(a.cache.totals.invalidations, 0)

  const nested = await send(a, { type: 'persona.updated', data: { userId: { id: 42 }, team: { id: 7 } } })
  t.equal(nested.statusCode, 400)
  t.match(nested.json().message, /^data\.userId must be a string, number or boolean/)
  t.same(await fresh(a), KEYS)

  // JSON.parse reads 1e400 as Infinity, which must not become the user id "Infinity".
  const huge = await call(a, {
    method: 'POST',
    url: '/v1/events',
    key: 'invalidate',
    headers: { 'content-type': 'application/json' },
    payload: '{"type":"persona.updated","data":{"userId":1e400,"team":{"id":7}}}',
  })
  t.equal(huge.statusCode, 400)
  t.same(huge.json(), { error: 'invalid_request', message: 'data.userId is out of range (needed by rules[0].invalidate.userIds[0])' })
  t.same(await fresh(a), KEYS)
})

t.test('an event type with no rule is a 200 that matches nothing', async (t) => {
  const a = await app(t)
  const res = await send(a, { type: 'nobody.cares', data: {} })
  t.equal(res.statusCode, 200)
  t.same(res.json(), { matched: 0, invalidations: [] })
  t.same(await fresh(a), KEYS)
})

t.test('a repeated event id within 10 minutes is applied once and gets the first reply', async (t) => {
  const clock = new FakeClock()
  const a = await app(t, clock)
  const event = { id: 'evt-9', type: 'plan.changed', data: { planId: 'pro' } }
  const first = await send(a, event)
  t.equal(first.statusCode, 200)
  t.equal(first.headers['idempotent-replayed'], undefined)
  t.equal(first.json().invalidations[0].invalidated, 2)

  await put(a, 'plan:pro', { value: 2, ttlMs: 3_600_000 })
  clock.advance(9 * 60 * 1000)
  const repeat = await send(a, event)
  t.equal(repeat.statusCode, 200)
  t.equal(repeat.headers['idempotent-replayed'], 'true')
  t.same(repeat.json(), first.json(), 'the first reply, id and all')
  t.equal((await get(a, 'plan:pro')).statusCode, 200, 'not applied again')
  t.equal(a.cache.totals.invalidations, 1)

  clock.advance(60 * 1000)
  const later = await send(a, event)
  t.equal(later.headers['idempotent-replayed'], undefined, 'forgotten after 10 minutes')
  t.equal((await get(a, 'plan:pro')).statusCode, 404)

  // Without an id (or with a null one: absent, as any optional field sent as null), every delivery applies.
  await send(a, { type: 'plan.changed', data: { planId: 'pro' } })
  await send(a, { type: 'plan.changed', data: { planId: 'pro' } })
  t.equal(a.cache.totals.invalidations, 4)
  for (let i = 0; i < 2; i++) {
    const res = await send(a, { id: null, type: 'plan.changed', data: { planId: 'pro' } })
    t.equal(res.statusCode, 200, res.body)
    t.equal(res.headers['idempotent-replayed'], undefined)
  }
  t.equal(a.cache.totals.invalidations, 6)
})

t.test('a rejected event is not remembered, so a corrected retry with its id applies', async (t) => {
  const a = await app(t)
  t.equal((await send(a, { id: 'evt-2', type: 'plan.changed', data: {} })).statusCode, 400)
  const retry = await send(a, { id: 'evt-2', type: 'plan.changed', data: { planId: 'pro' } })
  t.equal(retry.statusCode, 200)
  t.equal(retry.json().matched, 1)
  t.equal((await get(a, 'plan:pro')).statusCode, 404)
})

t.test('bad events are 400 invalid_request naming the field', async (t) => {
  const a = await app(t)
  const cases: Array<[unknown, RegExp]> = [
    [{ data: {} }, /body\.type is required/],
    [{ type: 'plan.changed' }, /body\.data is required/],
    [{ type: '', data: {} }, /body\.type/],
    [{ type: 7, data: {} }, /body\.type must be string/],
    [{ type: 'plan.changed', data: [1] }, /body\.data must be object/],
    [{ type: 'plan.changed', data: 'x' }, /body\.data must be object/],
    [{ id: '', type: 'plan.changed', data: { planId: 'pro' } }, /body\.id/],
    [{ id: 5, type: 'plan.changed', data: { planId: 'pro' } }, /body\.id must be string/],
    [{ type: 'x'.repeat(300), data: {} }, /body\.type/],
  ]
  for (const [payload, message] of cases) {
    const res = await send(a, payload)
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 60))
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, message)
  }
  const notJson = await call(a, { method: 'POST', url: '/v1/events', key: 'invalidate', payload: '{nope', headers: { 'content-type': 'application/json' } })
  t.equal(notJson.statusCode, 400)
  t.same(await fresh(a), KEYS)
})

t.test('events need the invalidate scope', async (t) => {
  const a = await app(t)
  const event = { type: 'plan.changed', data: { planId: 'pro' } }
  t.equal((await send(a, event, null)).statusCode, 401)
  t.equal((await send(a, event, 'read')).statusCode, 403)
  t.equal((await send(a, event, 'admin')).statusCode, 200)
})

t.test('an app with bad rules does not build', async (t) => {
  await t.rejects(build(t, { configFile: { rules: [{ event: 'x', invalidate: { keys: ['{{data.a'] } }] } }), {
    name: 'ConfigError',
    message: /^CONFIG_FILE: rules\[0\]\.invalidate\.keys\[0\]: .*malformed placeholder/,
  })
})
