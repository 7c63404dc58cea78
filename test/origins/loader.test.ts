import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import { buildApp } from '../../src/app.js'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import { defaultBodyLimit } from '../../src/config.js'
import { CONNECTIONS_PER_ORIGIN } from '../../src/origins/loader.js'
import { TEST_API_KEYS, build, get } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'
import type { CacheServiceEvents } from '../../src/cache/cache-service.js'

type Attempt = CacheServiceEvents['origin_request'][0]

t.test('failed attempts are retried with exponential backoff and jitter until one succeeds', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/1/dashboard', 'v')
  origin.failNext = 3
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { retries: 3, backoffMs: 40 })] } })
  const attempts: Attempt[] = []
  app.cache.on('origin_request', (e) => attempts.push(e))
  const res = await get(app, 'dashboard:1', '?load=true')
  t.equal(res.statusCode, 200)
  t.equal(origin.calls, 4)
  t.same(attempts.map((a) => a.result), ['error', 'error', 'error', 'success'])
  t.ok(attempts.every((a) => a.origin === 'dashboards' && a.durationMs >= 0))
  // Equal jitter: the wait before retry n is in [base*2^n/2, base*2^n]; check the floors only
  // (timers never fire early, but a shared machine may make them late).
  const gaps = origin.arrivals.slice(1).map((at, i) => at - origin.arrivals[i]!)
  t.ok(gaps[0]! >= 20 - 2, `first wait ${gaps[0]} >= 20 ms`)
  t.ok(gaps[1]! >= 40 - 2, `second wait ${gaps[1]} >= 40 ms`)
  t.ok(gaps[2]! >= 80 - 2, `third wait ${gaps[2]} >= 80 ms`)
})

t.test('the backoff doubles per attempt, is capped, and its jitter spans the upper half', async (t) => {
  const origin = await OriginServer.start(t)
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })
  const client = app.origins.client
  const samples = Array.from({ length: 2000 }, () => client.backoff(100, 2))
  t.ok(samples.every((ms) => ms >= 200 && ms <= 400), 'attempt 2 of base 100 waits 200-400 ms')
  t.ok(Math.max(...samples) - Math.min(...samples) > 100, 'jitter spreads the waits')
  t.ok(client.backoff(1000, 30) <= 10_000, 'capped at 10 s')
})

t.test('retries stop at the configured count and the error is a 503; every attempt is counted', async (t) => {
  const origin = await OriginServer.start(t)
  origin.failAll = 502
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { retries: 2, backoffMs: 5 })] } })
  const attempts: Attempt[] = []
  app.cache.on('origin_request', (e) => attempts.push(e))
  const res = await get(app, 'dashboard:1', '?load=true')
  t.equal(res.statusCode, 503)
  t.match(res.json().message, /after 3 attempts/)
  t.equal(origin.calls, 3)
  t.same(attempts.map((a) => a.result), ['error', 'error', 'error'])
})

t.test('a 4xx other than 404, 408 and 429 is not retried', async (t) => {
  const origin = await OriginServer.start(t)
  origin.failAll = 403
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { retries: 3, backoffMs: 5 })] } })
  t.equal((await get(app, 'dashboard:1', '?load=true')).statusCode, 503)
  t.equal(origin.calls, 1)
})

t.test('a slow origin times out per attempt, is retried, and reports timeouts', async (t) => {
  const origin = await OriginServer.start(t)
  origin.hang = true
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { timeoutMs: 100, retries: 1, backoffMs: 5 })] } })
  const attempts: Attempt[] = []
  app.cache.on('origin_request', (e) => attempts.push(e))
  const res = await get(app, 'dashboard:1', '?load=true')
  t.equal(res.statusCode, 503)
  t.match(res.json().message, /timed out after 100 ms/)
  t.same(attempts.map((a) => a.result), ['timeout', 'timeout'])
  t.ok(attempts.every((a) => a.durationMs >= 95), 'each attempt waited for its timeout')
})

t.test('a body that is not JSON, or larger than the value limit, fails without retry; a pretty-printed value within it loads', async (t) => {
  let calls = 0
  const fits = { rows: Array.from({ length: 20 }, (_, i) => ({ id: i, n: 'abcdefghij' })) }
  const server = createServer((req, res) => {
    calls++
    if (req.url === '/users/text/dashboard') res.end('not json')
    else if (req.url === '/users/pretty/dashboard') res.end(JSON.stringify(fits, null, 8))
    else if (req.url === '/users/huge/dashboard') res.end(JSON.stringify('x'.repeat(100_000)))
    else res.end(JSON.stringify('x'.repeat(5000)))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  t.teardown(() => new Promise((r) => server.close(r)))
  const port = (server.address() as AddressInfo).port
  const spec = { name: 'o', keyPattern: 'dashboard:{userId}', url: `http://127.0.0.1:${port}/users/{userId}/dashboard`, retries: 2, backoffMs: 5 }
  const app = await build(t, { configFile: { origins: [spec] }, limits: { ...DEFAULT_LIMITS, maxValueBytes: 1024 } })
  const text = await get(app, 'dashboard:text', '?load=true')
  t.equal(text.statusCode, 503)
  t.match(text.json().message, /not JSON/)
  const big = await get(app, 'dashboard:big', '?load=true')
  t.equal(big.statusCode, 503)
  t.match(big.json().message, /refuses: .*larger than 1024 bytes/, 'a body the client reads, whose value the write refuses')
  const huge = await get(app, 'dashboard:huge', '?load=true')
  t.equal(huge.statusCode, 503)
  t.match(huge.json().message, `more than ${defaultBodyLimit(1024)} bytes`, 'a body past what a client may send is cut off unread')
  t.equal(calls, 3, 'none retried')
  t.ok(JSON.stringify(fits, null, 8).length > 1024 && JSON.stringify(fits).length <= 1024)
  const pretty = await get(app, 'dashboard:pretty', '?load=true')
  t.equal(pretty.statusCode, 200, 'a value within the limit loads though its body, pretty-printed, is over it')
  t.same(pretty.json().value, fits)
})

t.test('attempts queued behind the connection cap wait for a slot before their timeout starts', async (t) => {
  const origin = await OriginServer.start(t)
  const ids = Array.from({ length: CONNECTIONS_PER_ORIGIN + 4 }, (_, i) => String(i))
  for (const id of ids) origin.values.set(`/users/${id}/dashboard`, { id })
  // Each answer takes 700 ms against a 1000 ms timeout: the last four wait 700 ms for a slot
  // and answer at 1400 ms, past their timeout if the wait counted against the attempt.
  origin.delayMs = 700
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { timeoutMs: 1000 })] } })
  const attempts: Attempt[] = []
  app.cache.on('origin_request', (e) => attempts.push(e))
  const started = performance.now()
  const codes = await Promise.all(ids.map(async (id) => (await get(app, `dashboard:${id}`, '?load=true')).statusCode))
  const elapsed = performance.now() - started
  t.same(codes, ids.map(() => 200), 'every load answered, none timed out in the queue')
  t.ok(elapsed >= 2 * 700 - 20, `they queued: two waves took ${Math.round(elapsed)} ms`)
  t.equal(origin.calls, ids.length, 'one attempt each')
  t.equal(origin.maxInFlight, CONNECTIONS_PER_ORIGIN, 'never more in flight than the cap')
  // Counting the wait, the queued four would take 1400 ms or more (a busy machine adds to 700, not 700 more);
  // 50 ms under that leaves room for a timer that fires early, as the wave check above does.
  const slowest = Math.max(...attempts.map((a) => a.durationMs))
  t.ok(attempts.every((a) => a.result === 'success') && slowest < 2 * 700 - 50, `an attempt's duration excludes its wait for a slot (slowest ${Math.round(slowest)} ms)`)
})

t.test('an attempt waits for a slot at most timeoutMs, then fails as a timeout', async (t) => {
  const origin = await OriginServer.start(t)
  origin.hang = true
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin, { timeoutMs: 300 })] } })
  const attempts: Attempt[] = []
  app.cache.on('origin_request', (e) => attempts.push(e))
  const ids = Array.from({ length: CONNECTIONS_PER_ORIGIN + 3 }, (_, i) => String(i))
  const started = performance.now()
  const answers = await Promise.all(
    ids.map(async (id) => {
      const res = await get(app, `dashboard:${id}`, '?load=true')
      return { status: res.statusCode, message: res.json().message as string, at: performance.now() - started }
    }),
  )
  t.ok(answers.every((a) => a.status === 503))
  const queued = answers.filter((a) => /no free connection within 300 ms/.test(a.message))
  t.equal(queued.length, 3, 'the three past the cap gave up waiting')
  t.equal(answers.filter((a) => /timed out after 300 ms/.test(a.message)).length, CONNECTIONS_PER_ORIGIN)
  t.ok(queued.every((a) => a.at < 2 * 300), 'after one timeout, not behind the hung attempts\' timeouts as well')
  t.equal(origin.calls, CONNECTIONS_PER_ORIGIN, 'they never reached the origin')
  t.equal(attempts.filter((a) => a.result === 'timeout').length, ids.length, 'each counted as a timed-out attempt')
})

t.test('closing the client fails the attempts waiting for a slot', async (t) => {
  const origin = await OriginServer.start(t)
  origin.hang = true
  const app = await buildApp({ apiKeys: TEST_API_KEYS, configFile: { origins: [dashboardOrigin(origin, { timeoutMs: 60_000 })] } })
  await app.ready()
  const pending = Array.from({ length: CONNECTIONS_PER_ORIGIN + 3 }, (_, i) => app.origins.refresh(`dashboard:${i}`).catch((e: Error) => e))
  await origin.waitForCalls(CONNECTIONS_PER_ORIGIN)
  await new Promise((r) => setTimeout(r, 50))
  t.equal(origin.calls, CONNECTIONS_PER_ORIGIN, 'the rest wait for a slot')
  await app.close()
  const errors = await Promise.all(pending)
  t.ok(errors.every((e) => e instanceof Error), 'every call, in flight or waiting, fails')
  // Not "unreachable": the origin did nothing wrong (an aborted call said `unreachable (20)`).
  t.equal(errors.filter((e) => /shutting down/.test((e as Error).message)).length, CONNECTIONS_PER_ORIGIN + 3, 'in flight or waiting, each as shutting down')
})

t.test('closing the app aborts an origin call in flight without crashing', async (t) => {
  // Built by hand: the test closes the app itself, mid-call.
  const origin = await OriginServer.start(t)
  origin.hang = true
  const app = await buildApp({ apiKeys: TEST_API_KEYS, configFile: { origins: [dashboardOrigin(origin, { timeoutMs: 60_000 })] } })
  await app.ready()
  const pending = app.origins.refresh('dashboard:1').catch((e: Error) => e)
  await origin.waitForCalls(1)
  await app.close()
  const error = await pending
  t.type(error, Error)
})
