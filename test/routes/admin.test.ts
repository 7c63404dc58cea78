import t, { type Test } from 'tap'
import { DEFAULT_SECURITY, parseApiKeys } from '../../src/config.js'
import { AUDIT_REFUSALS_PER_WINDOW } from '../../src/cache/audit-log.js'
import { FakeClock, KEYS, TEST_API_KEYS, auth, build, call, get, put } from '../helpers/build.js'

// A second admin key, to prove a token is bound to the key that asked for it.
const OTHER_ADMIN = 'other-admin-secret-0123456789'
const keys = [...TEST_API_KEYS, ...parseApiKeys(`ops:admin:${OTHER_ADMIN}`)]

async function setup(t: Test, security = {}) {
  const clock = new FakeClock()
  const app = await build(t, { apiKeys: keys, security: { ...DEFAULT_SECURITY, clearRateLimitMax: 0, ...security } }, { now: clock.now })
  for (let i = 0; i < 20; i++) await put(app, `k${i}`, { value: { i }, userId: `u${i % 3}` })
  return { app, clock }
}

const issue = (app: Awaited<ReturnType<typeof setup>>['app'], reason = 'bad deploy', headers?: Record<string, string>) =>
  call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason }, headers })

const clear = (app: Awaited<ReturnType<typeof setup>>['app'], payload: unknown, headers?: Record<string, string>) =>
  call(app, { method: 'POST', url: '/v1/admin/clear', payload: payload as object, headers })

async function allStillThere(t: Test, app: Awaited<ReturnType<typeof setup>>['app']) {
  for (let i = 0; i < 20; i++) {
    const res = await get(app, `k${i}`)
    t.equal(res.statusCode, 200, `k${i} is still readable`)
  }
  const stats = await call(app, { method: 'GET', url: '/v1/stats' })
  t.equal(stats.json().entries, 20)
}

t.test('a token from step 1 clears everything once, and the clear is audited', async (t) => {
  const { app, clock } = await setup(t)
  const res = await issue(app)
  t.equal(res.statusCode, 200)
  const { token, expiresAt } = res.json()
  t.match(token, /^cwclr_[A-Za-z0-9_-]{40,}$/)
  t.equal(expiresAt, new Date(clock.ms + 60_000).toISOString())

  const done = await clear(app, { token })
  t.equal(done.statusCode, 200)
  t.same(done.json(), { cleared: 20 })
  t.equal((await get(app, 'k0')).statusCode, 404)

  const audit = (await call(app, { method: 'GET', url: '/v1/debug/audit' })).json()
  t.match(audit[0], { actor: 'admin', action: 'clear', reason: 'bad deploy', outcome: 'succeeded', detail: 'cleared 20 entries' })
  t.match(audit[1], { actor: 'admin', action: 'clear_token_issued', reason: 'bad deploy', outcome: 'succeeded' })
  t.equal(audit.length, 2, 'audited once, as the clear')
  t.notMatch(JSON.stringify(audit), token, 'the audit log never holds the token')

  // A clear is an invalidation of everything (DESIGN 4): in the invalidation log and the stats.
  const [record] = (await call(app, { method: 'GET', url: '/v1/debug/invalidations?limit=1' })).json()
  t.match(record, { selector: { all: true }, mode: 'delete', source: 'admin', invalidated: 20, actor: 'admin' })
  const stats = (await call(app, { method: 'GET', url: '/v1/stats' })).json()
  t.match(stats.invalidations, { bySelector: { all: 1 }, bySource: { admin: 1 }, last: { id: record.id } })
})

t.test('the clear voids leases handed out before it', async (t) => {
  const { app } = await setup(t)
  const miss = await get(app, 'fresh')
  t.equal(miss.statusCode, 404)
  const { token } = (await issue(app)).json()
  t.equal((await clear(app, { token })).statusCode, 200)
  const late = await call(app, { method: 'PUT', url: '/v1/entries/fresh', payload: { value: 1, lease: miss.json().lease } })
  t.equal(late.statusCode, 409)
  t.equal(late.json().error, 'lease_invalidated')
})

t.test('a missing token is refused and clears nothing', async (t) => {
  const { app } = await setup(t)
  for (const payload of [{}, { token: '' }, { token: null }, { token: 42 }, { token: ['x'] }]) {
    const res = await clear(app, payload)
    t.equal(res.statusCode, 403, JSON.stringify(payload))
    t.equal(res.json().error, 'clear_token_invalid')
  }
  const noBody = await app.inject({ method: 'POST', url: '/v1/admin/clear', headers: { authorization: `Bearer ${KEYS.admin}` } })
  t.equal(noBody.statusCode, 403)
  t.equal(noBody.json().error, 'clear_token_invalid')
  await allStillThere(t, app)
})

t.test('a wrong token is refused and clears nothing', async (t) => {
  const { app } = await setup(t)
  const { token } = (await issue(app)).json()
  const wrong = token.slice(0, -1) + (token.endsWith('A') ? 'B' : 'A')
  for (const candidate of [wrong, 'cwclr_' + 'A'.repeat(43), 'x'.repeat(10_000), token.toUpperCase()]) {
    const res = await clear(app, { token: candidate })
    t.equal(res.statusCode, 403)
    t.equal(res.json().error, 'clear_token_invalid')
    t.notMatch(res.body, candidate.slice(0, 40), 'the refusal does not echo the token')
  }
  await allStillThere(t, app)
  // The real token survived the wrong guesses.
  t.equal((await clear(app, { token })).statusCode, 200)
})

t.test('an expired token is refused and clears nothing (fake clock)', async (t) => {
  const { app, clock } = await setup(t)
  const { token } = (await issue(app)).json()
  clock.advance(60_000)
  const res = await clear(app, { token })
  t.equal(res.statusCode, 403)
  t.equal(res.json().error, 'clear_token_invalid')
  t.match(res.json().message, /expired/)
  await allStillThere(t, app)
})

t.test('a token is still good one millisecond before it expires', async (t) => {
  const { app, clock } = await setup(t)
  const { token } = (await issue(app)).json()
  clock.advance(59_999)
  t.equal((await clear(app, { token })).statusCode, 200)
})

t.test('a used token is refused the second time and clears nothing more', async (t) => {
  const { app } = await setup(t)
  const { token } = (await issue(app)).json()
  t.equal((await clear(app, { token })).statusCode, 200)
  await put(app, 'after', { value: 'written after the clear' })
  const again = await clear(app, { token })
  t.equal(again.statusCode, 403)
  t.equal(again.json().error, 'clear_token_invalid')
  t.equal((await get(app, 'after')).statusCode, 200, 'the entry written after the clear survives')
})

t.test('two concurrent clears with one token: exactly one succeeds', async (t) => {
  const { app } = await setup(t)
  const { token } = (await issue(app)).json()
  const results = await Promise.all([clear(app, { token }), clear(app, { token }), clear(app, { token })])
  t.same(results.map((r) => r.statusCode).sort(), [200, 403, 403])
})

t.test('another key\'s token is refused, clears nothing, and stays good for its owner', async (t) => {
  const { app } = await setup(t)
  const { token } = (await issue(app)).json()
  const res = await clear(app, { token }, { authorization: `Bearer ${OTHER_ADMIN}` })
  t.equal(res.statusCode, 403)
  t.equal(res.json().error, 'clear_token_invalid')
  t.match(res.json().message, /another key/)
  await allStillThere(t, app)
  t.equal((await clear(app, { token })).statusCode, 200)
})

t.test('keys without the admin scope cannot get or use a token', async (t) => {
  const { app } = await setup(t)
  const { token } = (await issue(app)).json()
  for (const key of ['read', 'write', 'invalidate', 'readwrite'] as const) {
    const asked = await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'x' }, key })
    t.equal(asked.statusCode, 403)
    t.equal(asked.json().error, 'forbidden')
    const used = await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token }, key })
    t.equal(used.statusCode, 403)
    t.equal(used.json().error, 'forbidden')
  }
  const anonymous = await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token }, key: null })
  t.equal(anonymous.statusCode, 401)
  await allStillThere(t, app)
})

t.test('step 1 needs a reason', async (t) => {
  const { app } = await setup(t)
  for (const payload of [{}, { reason: '' }, { reason: '   ' }, { reason: '\t\n' }, { reason: 7 }, { reason: 'x'.repeat(1025) }]) {
    const res = await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload })
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 40))
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, /reason/, 'the message names the field')
  }
})

t.test('refused clears are audited with their cause, never with the token', async (t) => {
  const { app, clock } = await setup(t)
  const { token } = (await issue(app, 'expiring')).json()
  clock.advance(61_000)
  await clear(app, { token })
  await clear(app, { token: 'nope' })
  const entries = (await call(app, { method: 'GET', url: '/v1/debug/audit?limit=2' })).json()
  t.equal(entries.length, 2)
  t.match(entries[0], { action: 'clear', outcome: 'refused', actor: 'admin', detail: /not one cachewarden issued/ })
  t.match(entries[1], { action: 'clear', outcome: 'refused', reason: 'expiring', detail: /expired/ })
  t.notMatch(JSON.stringify(entries), token)
})

t.test('every refused attempt by a key is audited once: a bad body, a missing scope, a body over the limit; not one with no key', async (t) => {
  const { app } = await setup(t)
  const audit = async () => (await call(app, { method: 'GET', url: '/v1/debug/audit?limit=1000' })).json() as Array<Record<string, unknown>>
  await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: '  ' } })
  await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'x'.repeat(1025) } })
  await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'no scope' }, key: 'write' })
  await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token: 'whatever' }, key: 'invalidate' })
  await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token: 'x'.repeat(7 * 1024 * 1024) } })
  await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token: 'whatever' }, key: null })
  await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token: 'whatever' }, headers: { authorization: 'Bearer not-a-key' } })
  const entries = (await audit()).reverse()
  t.match(entries, [
    { action: 'clear_token_issued', actor: 'admin', outcome: 'refused', reason: '  ', detail: '400 invalid_request: reason must not be blank' },
    { action: 'clear_token_issued', actor: 'admin', outcome: 'refused', reason: 'x'.repeat(1024), detail: /^400 invalid_request: body\.reason must NOT have more than 1024 characters/ },
    // Refused before its body was read: no reason to record.
    { action: 'clear_token_issued', actor: 'writer', outcome: 'refused', reason: null, detail: '403 forbidden: this key lacks the "admin" scope' },
    { action: 'clear', actor: 'invalidator', outcome: 'refused', reason: null, detail: '403 forbidden: this key lacks the "admin" scope' },
    { action: 'clear', actor: 'admin', outcome: 'refused', reason: null, detail: /^413 payload_too_large/ },
  ])
  t.equal(entries.length, 5, 'one record each; none for the requests without a valid key')
  // What a handler records is not recorded again from its reply.
  await clear(app, { token: 'nope' })
  const refused = (await audit()).filter((e) => e.action === 'clear' && e.actor === 'admin')
  t.equal(refused.length, 2)
  t.match(refused[0], { detail: /not one cachewarden issued/ })
})

t.test('a key\'s refused attempts are recorded ten times a window, then counted in one record when the window ends', async (t) => {
  const { app, clock } = await setup(t)
  t.equal((await issue(app, 'the real one')).statusCode, 200)
  for (let i = 0; i < 25; i++) {
    t.equal((await clear(app, { token: 'x' }, auth('read'))).statusCode, 403)
  }
  const audit = async () => (await call(app, { method: 'GET', url: '/v1/debug/audit?limit=1000' })).json() as Array<Record<string, string>>
  let entries = await audit()
  t.equal(entries.filter((e) => e.actor === 'reader').length, AUDIT_REFUSALS_PER_WINDOW, 'ten recorded')
  t.ok(entries.some((e) => e.reason === 'the real one'), 'the real record stays')
  // Another key, and another step, have their own count.
  await issue(app, 'scope?', auth('write'))
  t.equal((await audit()).filter((e) => e.actor === 'writer').length, 1)
  clock.advance(60_000)
  await clear(app, { token: 'x' }, auth('read'))
  entries = await audit()
  t.equal(entries.filter((e) => e.actor === 'reader').length, AUDIT_REFUSALS_PER_WINDOW + 2)
  t.match(entries[1], { actor: 'reader', action: 'clear', outcome: 'refused', detail: '15 more refused attempts of this key at this step were not recorded (over 10 in 60 s)' })
  t.match(entries[0], { actor: 'reader', action: 'clear', outcome: 'refused', detail: /^403 forbidden/ }, 'then a new window')

  // A flood that just stops is counted all the same: at the latest when the app closes.
  for (let i = 0; i < 12; i++) t.equal((await issue(app, ' ')).statusCode, 400)
  t.equal((await issue(app, 'after all')).statusCode, 200)
  t.match((await audit())[0], { actor: 'admin', action: 'clear_token_issued', outcome: 'succeeded', detail: 'valid 60 s' })
  await app.close()
  t.match(app.audit.recent(1)[0], { actor: 'admin', action: 'clear_token_issued', outcome: 'refused', detail: /^2 more refused attempts/ })
})

t.test('both steps are rate-limited per key with 429 rate_limited', async (t) => {
  const { app } = await setup(t, { clearRateLimitMax: 2, clearRateLimitWindowMs: 60_000 })
  t.equal((await issue(app)).statusCode, 200)
  t.equal((await issue(app)).statusCode, 200)
  const limited = await issue(app)
  t.equal(limited.statusCode, 429)
  t.same(Object.keys(limited.json()).sort(), ['error', 'message'])
  t.equal(limited.json().error, 'rate_limited')
  t.ok(Number(limited.headers['retry-after']) > 0, 'with Retry-After')
  // Another admin key has its own budget.
  t.equal((await issue(app, 'ops', { authorization: `Bearer ${OTHER_ADMIN}` })).statusCode, 200)

  t.equal((await clear(app, { token: 'a' })).statusCode, 403)
  t.equal((await clear(app, { token: 'b' })).statusCode, 403)
  const third = await clear(app, { token: 'c' })
  t.equal(third.statusCode, 429)
  t.equal(third.json().error, 'rate_limited')
  await allStillThere(t, app)

  const audit = (await call(app, { method: 'GET', url: '/v1/debug/audit' })).json()
  // As any refusal: the status, code and message sent; step 1's with its reason.
  t.match(
    audit.find((e: { action: string; detail: string }) => e.action === 'clear' && e.detail.startsWith('429')),
    { outcome: 'refused', detail: /^429 rate_limited: / },
  )
  t.match(
    audit.find((e: { action: string; detail: string }) => e.action === 'clear_token_issued' && e.detail.startsWith('429')),
    { outcome: 'refused', detail: /^429 rate_limited: / },
  )
  t.equal(audit.filter((e: { detail: string }) => /rate/.test(e.detail)).length, 2, 'each 429 audited once')
})

t.test('with the default limit, an operator walking every refusal and a clear in one minute is not rate-limited', async (t) => {
  const { app } = await setup(t, { clearRateLimitMax: DEFAULT_SECURITY.clearRateLimitMax })
  const other = { authorization: `Bearer ${OTHER_ADMIN}` }
  const codes: number[] = []
  codes.push((await clear(app, {})).statusCode) // missing
  codes.push((await clear(app, { token: 'cwclr_wrong' })).statusCode) // wrong
  codes.push((await clear(app, { token: (await issue(app, 'theirs', other)).json().token })).statusCode) // another key's
  const token = (await issue(app)).json().token
  codes.push((await clear(app, { token })).statusCode) // the clear
  codes.push((await clear(app, { token })).statusCode) // reused
  const again = (await issue(app)).json().token
  codes.push((await clear(app, { token: again })).statusCode, (await clear(app, { token: again })).statusCode)
  t.same(codes, [403, 403, 403, 200, 403, 200, 403], 'seven calls, none rate-limited')
  // The limit is still there: the same key keeps calling within the minute.
  const statuses = []
  for (let i = 0; i < DEFAULT_SECURITY.clearRateLimitMax; i++) statuses.push((await clear(app, { token: 'cwclr_wrong' })).statusCode)
  const max = DEFAULT_SECURITY.clearRateLimitMax
  t.equal(statuses.indexOf(429), max - codes.length, `call ${max + 1} within the window is the first 429`)
})

t.test('the token store is bounded: the oldest outstanding tokens are forgotten', async (t) => {
  const { app } = await setup(t)
  const first = (await issue(app)).json().token
  for (let i = 0; i < 100; i++) t.equal((await issue(app)).statusCode, 200)
  const last = (await issue(app)).json().token
  t.equal((await clear(app, { token: first })).statusCode, 403, 'the oldest token was dropped')
  t.equal((await clear(app, { token: last })).statusCode, 200)
})

t.test('the audit log lists stats resets and prefix or bulk invalidations, not small ones', async (t) => {
  const { app } = await setup(t)
  for (let i = 0; i < 120; i++) await put(app, `bulk:${i}`, { value: i, tags: ['bulk'] })
  await call(app, { method: 'DELETE', url: '/v1/entries/k1', key: 'invalidate' })
  await call(app, { method: 'POST', url: '/v1/invalidations', payload: { userIds: ['u0'] }, key: 'invalidate' })
  await call(app, { method: 'POST', url: '/v1/invalidations', payload: { prefixes: ['k1'], reason: 'k1x gone' }, key: 'invalidate' })
  await call(app, { method: 'DELETE', url: '/v1/tags/bulk/entries?mode=stale', key: 'invalidate' })
  await call(app, { method: 'POST', url: '/v1/stats/reset' })

  const entries = (await call(app, { method: 'GET', url: '/v1/debug/audit' })).json()
  t.equal(entries.length, 3, 'small exact invalidations are not audited')
  t.match(entries[0], { actor: 'admin', action: 'stats_reset', outcome: 'succeeded', reason: null })
  t.match(entries[1], { actor: 'invalidator', action: 'invalidation', detail: /by 1 tags: 120 entries marked stale/ })
  t.match(entries[2], { actor: 'invalidator', action: 'invalidation', reason: 'k1x gone', detail: /by 1 prefixes: \d+ entries deleted/ })
  t.notMatch(JSON.stringify(entries), /bulk|"k1"/, 'selector values stay out of the audit log')
  for (const e of entries) t.same(Object.keys(e).sort(), ['action', 'actor', 'at', 'detail', 'outcome', 'reason'])

  t.equal((await call(app, { method: 'GET', url: '/v1/debug/audit?limit=1' })).json().length, 1)
  t.equal((await call(app, { method: 'GET', url: '/v1/debug/audit?limit=0' })).statusCode, 400)
  t.equal((await call(app, { method: 'GET', url: '/v1/debug/audit', key: 'read' })).statusCode, 403)
})

t.test('invalidations of everything: marking all stale is described as such, another instance\'s is not audited here', async (t) => {
  const { app } = await setup(t)
  for (let i = 0; i < 120; i++) await put(app, `all:${i}`, { value: i })
  await app.cache.markAllStale({ source: 'postgres', actor: 'postgres-listener', reason: 'reconnected' })
  app.cache.recordBusInvalidation({ all: true }, 'delete', 150) // another instance's clear, as the bus reports it
  app.cache.recordBusInvalidation({ all: true }, 'stale', 150)
  const entries = (await call(app, { method: 'GET', url: '/v1/debug/audit' })).json()
  t.equal(entries.length, 1, 'only the local one')
  t.match(entries[0], { actor: 'postgres-listener', action: 'invalidation', detail: /^postgres invalidation of everything: 140 entries marked stale/ }) // 20 from setup
})

t.test('the audit ring keeps only AUDIT_LOG_SIZE records', async (t) => {
  const clock = new FakeClock()
  const app = await build(t, { apiKeys: keys, security: { ...DEFAULT_SECURITY, clearRateLimitMax: 0, auditLogSize: 3 } }, { now: clock.now })
  for (let i = 0; i < 5; i++) await issue(app, `r${i}`)
  const entries = (await call(app, { method: 'GET', url: '/v1/debug/audit?limit=1000' })).json()
  t.same(entries.map((e: { reason: string }) => e.reason), ['r4', 'r3', 'r2'])
})
