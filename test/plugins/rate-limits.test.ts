import t from 'tap'
import { DEFAULT_SECURITY } from '../../src/config.js'
import { KEYS, build, call, get, put } from '../helpers/build.js'

const bad = { authorization: 'Bearer not-a-key-0123456789' }

const readK = (app: Awaited<ReturnType<typeof build>>) => call(app, { method: 'GET', url: '/v1/entries/k', key: 'read' })

t.test('after N failed authentications an IP gets 429 rate_limited, even with a right key it has not used yet', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 3, authFailureWindowMs: 60_000 } })
  await put(app, 'k', { value: 1 })
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })
    t.equal(res.statusCode, 401, `failure ${i + 1} is a 401`)
  }
  const blocked = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })
  t.equal(blocked.statusCode, 429)
  t.same(Object.keys(blocked.json()).sort(), ['error', 'message'])
  t.equal(blocked.json().error, 'rate_limited')
  t.ok(Number(blocked.headers['retry-after']) >= 1, 'with Retry-After')

  const right = await readK(app)
  t.equal(right.statusCode, 429, 'a right key new to a blocked IP is refused before it is checked')
  t.equal(right.json().error, 'rate_limited')
  // The admin key wrote 'k' from this address before the block: it keeps working, so a client
  // sharing an address (a NAT, a proxy) with whoever sends junk is not locked out with them.
  t.equal((await get(app, 'k')).statusCode, 200, 'a key that authenticated from this IP before passes')
  t.equal((await readK(app)).statusCode, 429, 'and lends nothing to another key')

  // A request with no credentials guesses nothing: it still gets its 401, not the block.
  const none = await app.inject({ method: 'GET', url: '/v1/entries/k' })
  t.equal(none.statusCode, 401, 'no Authorization header: 401 unauthorized, blocked address or not')
  t.equal(none.json().error, 'unauthorized')

  // Another address is not affected.
  const elsewhere = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: { authorization: `Bearer ${KEYS.read}` }, remoteAddress: '10.9.8.7' })
  t.equal(elsewhere.statusCode, 200)
  // Public routes stay open to probes.
  t.equal((await app.inject({ method: 'GET', url: '/health/live' })).statusCode, 200)
})

t.test('what proves a key at an address survives churn of remembered headers, and holds for any spelling of it', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 3, authFailureWindowMs: 60_000 } })
  await put(app, 'k', { value: 1 }) // the admin key, from 127.0.0.1
  for (let i = 0; i < 3; i++) await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })
  // Someone holding the read key, elsewhere, sends 300 spellings of it (more than the headers
  // remembered as valid, which are then forgotten all at once).
  for (let i = 0; i < 300; i++) {
    const res = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: { authorization: `Bearer ${' '.repeat(i)}${KEYS.read}` }, remoteAddress: '10.1.1.1' })
    if (res.statusCode !== 200) t.fail(`spelling ${i}: ${res.statusCode}`)
  }
  t.equal((await get(app, 'k')).statusCode, 200, 'the admin key still passes from its blocked address')
  const spelled = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: { authorization: `bearer   ${KEYS.admin}` } })
  t.equal(spelled.statusCode, 200, 'in another spelling too: it is the key that was proven, not the header')
  t.equal((await readK(app)).statusCode, 429, 'the read key, proven only at 10.1.1.1, is refused here')
})

t.test('the block ends with the window', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 2, authFailureWindowMs: 300 } })
  await put(app, 'k', { value: 1 })
  await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })
  await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })
  t.equal((await readK(app)).statusCode, 429)
  await new Promise((resolve) => setTimeout(resolve, 700))
  t.equal((await readK(app)).statusCode, 200)
})

t.test('failures further apart than the window never add up to a block', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 2, authFailureWindowMs: 300 } })
  await put(app, 'k', { value: 1 })
  for (let i = 0; i < 3; i++) {
    t.equal((await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })).statusCode, 401)
    t.equal((await get(app, 'k')).statusCode, 200, `after failure ${i + 1}, the right key still reads`)
    await new Promise((resolve) => setTimeout(resolve, 400))
  }
})

t.test('requests without credentials are not counted as failures', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 2 } })
  await put(app, 'k', { value: 1 })
  for (let i = 0; i < 10; i++) t.equal((await app.inject({ method: 'GET', url: '/v1/entries/k' })).statusCode, 401)
  t.equal((await get(app, 'k')).statusCode, 200, 'the address is not blocked')
  for (let i = 0; i < 2; i++) await app.inject({ method: 'GET', url: '/v1/entries/k', headers: { authorization: 'Basic eDp5' } })
  t.equal((await readK(app)).statusCode, 429, 'any wrong Authorization header counts, not only bearer ones')
})

t.test('successful requests do not count towards the failure limit', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 2 } })
  await put(app, 'k', { value: 1 })
  for (let i = 0; i < 50; i++) t.equal((await get(app, 'k')).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })).statusCode, 401)
})

t.test('AUTH_FAILURE_LIMIT_MAX=0 turns the failure limit off', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 0 } })
  for (let i = 0; i < 30; i++) {
    t.equal((await app.inject({ method: 'GET', url: '/v1/entries/k', headers: bad })).statusCode, 401)
  }
})

t.test('the entry routes have no rate limit by default', async (t) => {
  const app = await build(t)
  await put(app, 'k', { value: 1 })
  let limited = 0
  for (let i = 0; i < 1500; i++) {
    const res = await get(app, 'k')
    if (res.statusCode === 429) limited++
    if (res.headers['x-ratelimit-limit'] !== undefined) limited++
  }
  t.equal(limited, 0)
})

t.test('RATE_LIMIT_MAX limits every authenticated route per key, not the public ones', async (t) => {
  const app = await build(t, { security: { ...DEFAULT_SECURITY, rateLimitMax: 5, rateLimitWindowMs: 60_000 } })
  const statuses = []
  for (let i = 0; i < 7; i++) statuses.push((await call(app, { method: 'GET', url: '/v1/entries/k', key: 'read' })).statusCode)
  t.same(statuses, [404, 404, 404, 404, 404, 429, 429])
  const res = await call(app, { method: 'GET', url: '/v1/entries/k', key: 'read' })
  t.equal(res.json().error, 'rate_limited')
  t.equal((await call(app, { method: 'GET', url: '/v1/entries/k', key: 'readwrite' })).statusCode, 404, 'another key has its own budget')
  for (let i = 0; i < 10; i++) t.equal((await app.inject({ method: 'GET', url: '/health/live' })).statusCode, 200)
  // The invalidation stream's headers (written by Node, after a hijack) carry the limit too.
  const head = await call(app, { method: 'HEAD', url: '/v1/invalidations/stream', key: 'admin' })
  t.equal(head.statusCode, 200)
  t.equal(head.headers['x-ratelimit-limit'], '5', 'HEAD of the stream says its limit')
  t.match(head.headers['content-type'], /^text\/event-stream/)
})
