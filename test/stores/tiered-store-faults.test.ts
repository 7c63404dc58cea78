// Cluster mode under Redis faults: the real redis-server is killed and restarted on the same
// port, and the bus connection is dropped with CLIENT KILL, in the middle of the tests.
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import t, { type Test } from 'tap'
import { TieredStore, type TieredStoreOptions } from '../../src/stores/tiered-store.js'
import { build, call, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'
import { RedisServer, freePort, requireRedisServer, startRedis, waitUntil } from '../helpers/redis-server.js'

const tiered = (app: FastifyInstance) => app.cache.store as TieredStore

const fillL1 = (app: FastifyInstance, key: string) =>
  waitUntil(async () => {
    await get(app, key)
    return (await tiered(app).l1Peek(key, app.cache.now())) !== undefined
  })

const readyStatus = async (app: FastifyInstance) => (await app.inject({ url: '/health/ready' })).statusCode

/** A connected TieredStore on a redis-server of its own, and the bus states it reports. */
async function watchedStore(t: Test, options: Omit<TieredStoreOptions, 'redisUrl'>) {
  const server = await startRedis(t)
  const states: boolean[] = []
  const store = new TieredStore({ redisUrl: server.url, sweepIntervalMs: 0, onBusState: (up) => states.push(up), ...options })
  t.teardown(() => store.close())
  t.ok(await store.connect(10_000))
  return { server, store, states }
}

/** Replaces `Redis#ping` until the test ends; `send` sends the real PING. */
function patchPing(t: Test, replacement: (send: () => Promise<unknown>) => Promise<unknown>) {
  const ping = Redis.prototype.ping
  Redis.prototype.ping = function (this: Redis, ...args: unknown[]) {
    return replacement(() => (ping as (...a: unknown[]) => Promise<unknown>).apply(this, args))
  } as typeof ping
  t.teardown(() => void (Redis.prototype.ping = ping))
}

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  const rules = [{ event: 'persona.updated', invalidate: { userIds: ['{{data.userId}}'] } }]
  const a = await build(t, { redisUrl: redis.url, configFile: { rules } })
  const b = await build(t, { redisUrl: redis.url })
  const origin = await OriginServer.start(t)
  origin.values.set('/users/1/dashboard', 'from the origin')
  const withOrigin = await build(t, { redisUrl: redis.url, configFile: { origins: [dashboardOrigin(origin)] } })
  const busStates: boolean[] = []
  b.cache.on('bus_state', ({ connected }) => busStates.push(connected))

  t.test('with Redis down: reads answer from L1 or miss, writes and invalidations are 503, ready is 503', async (t) => {
    await put(a, 'cached', { value: 'v1', userId: 'u1' })
    await put(a, 'dropped', { value: 'v1' })
    await put(a, 'kept', { value: 'v1' })
    t.ok(await fillL1(a, 'kept'))
    for (const app of [a, b]) {
      t.ok(await fillL1(app, 'cached'))
      t.ok(await fillL1(app, 'dropped'))
    }
    const failedBefore = (await call(a, { url: '/v1/stats' })).json().invalidations.failed
    const oldLease = (await get(a, 'leased')).json().lease as string
    const token = (await call(a, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'fault test' } })).json().token
    // An origin's entry, stale-marked, with a copy in withOrigin's L1 (a plain read of it misses,
    // and fills L1 without queueing a refresh).
    origin.values.set('/users/3/dashboard', 'loaded before')
    t.equal((await get(withOrigin, 'dashboard:3', '?load=true')).statusCode, 200)
    t.equal((await call(a, { method: 'DELETE', url: '/v1/entries/dashboard%3A3?mode=stale', key: 'invalidate' })).statusCode, 200)
    t.ok(
      await waitUntil(async () => {
        await get(withOrigin, 'dashboard:3')
        return (await tiered(withOrigin).l1Peek('dashboard:3', withOrigin.cache.now()))?.stale === true
      }),
      'the stale copy is in L1',
    )

    await redis.stop()
    t.ok(await waitUntil(async () => (await readyStatus(a)) === 503 && (await readyStatus(b)) === 503), 'ready flips to 503')
    t.ok(await waitUntil(() => busStates.includes(false)), 'bus_state reports the bus down')
    t.match((await b.inject({ url: '/metrics' })).body, /^cachewarden_bus_connected 0$/m, 'the bus gauge is 0')

    const hit = await get(b, 'cached')
    t.equal(hit.statusCode, 200, 'an L1 copy still answers')
    t.equal(hit.json().value, 'v1')
    const miss = await get(b, 'never-cached')
    t.equal(miss.statusCode, 404, 'a key not in L1 is a miss, not a 5xx')
    t.type(miss.json().lease, 'string')
    const batch = await call(b, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['cached', 'never-cached'] } })
    t.equal(batch.statusCode, 200)
    t.same(batch.json().missing, ['never-cached'])
    // Inspection cannot answer "no entry" when it cannot ask Redis: 503, or the L1 copy.
    const inspected = await call(b, { url: '/v1/debug/entries/never-cached' })
    t.equal(inspected.statusCode, 503, 'debug of a key not in L1 is 503, not a 404')
    t.equal(inspected.json().error, 'backend_unavailable')
    t.equal((await call(b, { url: '/v1/debug/entries/cached' })).statusCode, 200, 'debug of an L1 copy answers from it')
    const check = await call(b, {
      method: 'POST',
      url: '/v1/consistency',
      payload: { against: 'provided', entries: [{ key: 'cached', value: 'v1' }, { key: 'never-cached', value: 1 }] },
    })
    t.equal(check.statusCode, 200)
    t.equal(check.json().consistent, 0, 'an L1 copy that matches is not known consistent: Redis cannot be compared')
    t.same(check.json().missing, [], 'a key it cannot look up is not reported missing')
    t.match(check.json().errors, [
      { key: 'cached', error: 'l1-vs-redis: Redis is unavailable' },
      { key: 'never-cached', error: /backend_unavailable/ },
    ])
    t.equal(check.json().checked, 2, 'each key in one list')
    const differs = await call(b, { method: 'POST', url: '/v1/consistency', payload: { against: 'provided', entries: [{ key: 'cached', value: 'v2' }] } })
    t.same(differs.json().stale, ['cached'], 'an L1 copy that differs from the truth is stale all the same')
    t.same(differs.json().errors, [])

    const loaded = await get(withOrigin, 'dashboard:1', '?load=true')
    t.equal(loaded.statusCode, 503, 'a load it cannot store is 503')
    t.equal(loaded.json().error, 'backend_unavailable')
    t.match(loaded.json().message, /Redis/)
    t.notMatch(loaded.json().message, /origin/, 'the origin is not blamed for Redis')
    // The origin answers but Redis cannot take the entry: the stale one stays served.
    const callsBefore = origin.calls
    const keptStale = await get(withOrigin, 'dashboard:3', '?load=true')
    t.equal(keptStale.statusCode, 200, 'a load Redis cannot take serves the stale entry the key holds')
    t.match(keptStale.json(), { value: 'loaded before', stale: true })
    t.equal(origin.calls, callsBefore + 1, 'once the origin was asked')
    const atOnce = await get(withOrigin, 'dashboard:3', '?load=true&allowStale=true')
    t.equal(atOnce.statusCode, 200, 'and ?allowStale serves it at once: the failed write left the copy')
    t.equal(atOnce.json().stale, true)
    // A failing origin gives its fill lease back, which cannot reach Redis: that failure is
    // swallowed (the claim runs out), and the caller hears about the origin, not about Redis.
    origin.failAll = 500
    const failed = await get(withOrigin, 'dashboard:2', '?load=true')
    origin.failAll = undefined
    t.equal(failed.statusCode, 503, 'an origin that fails while Redis is down is 503')
    t.match(failed.json().message, /origin/, 'naming the origin')
    t.notMatch(failed.json().message, /Redis/, 'not the give-back of the lease that Redis could not take')

    const write = await call(a, { method: 'PUT', url: '/v1/entries/x', payload: { value: 1 } })
    t.equal(write.statusCode, 503)
    t.equal(write.json().error, 'backend_unavailable')
    const overwrite = await call(a, { method: 'PUT', url: '/v1/entries/kept', payload: { value: 'v2' } })
    t.equal(overwrite.statusCode, 503)
    const copy = await get(a, 'kept')
    t.equal(copy.statusCode, 200, 'a write never sent to Redis leaves the L1 copy as it was')
    t.equal(copy.json().value, 'v1')
    const leased = await call(a, { method: 'PUT', url: '/v1/entries/never-cached', payload: { value: 1, lease: miss.json().lease } })
    t.equal(leased.statusCode, 503, 'a leased write is 503 too, not a 409')
    // Giving a fill lease back cannot reach the claim in Redis: say so rather than a 204.
    const release = await call(a, { method: 'POST', url: '/v1/entries/leased/release', payload: { lease: oldLease } })
    t.equal(release.statusCode, 503, 'a fill lease given back while Redis is down is 503, not 204')
    t.equal(release.json().error, 'backend_unavailable')

    const inv = await call(a, { method: 'DELETE', url: '/v1/entries/dropped', key: 'invalidate' })
    t.equal(inv.statusCode, 503)
    t.equal(inv.json().error, 'backend_unavailable')
    t.equal((await get(a, 'dropped')).statusCode, 404, 'the failed invalidation still dropped the local L1 copy')
    const stats = (await call(a, { url: '/v1/stats' })).json()
    t.equal(stats.invalidations.failed, failedBefore + 1, 'the failure is counted')
    const users = await call(a, { method: 'DELETE', url: '/v1/users/u1/entries', key: 'invalidate' })
    t.equal(users.statusCode, 503)
    t.equal((await get(a, 'cached')).statusCode, 404, 'a user selector drops the local copies too')
    // An event with an id cannot be claimed, so its invalidations are not attempted: a failure too.
    for (const id of [undefined, 'evt-down-1']) {
      const before = (await call(a, { url: '/v1/stats' })).json().invalidations.failed
      const event = await call(a, { method: 'POST', url: '/v1/events', key: 'invalidate', payload: { id, type: 'persona.updated', data: { userId: 'u1' } } })
      t.equal(event.statusCode, 503, `event ${id ?? 'without an id'}`)
      t.equal(event.json().error, 'backend_unavailable')
      t.equal((await call(a, { url: '/v1/stats' })).json().invalidations.failed, before + 1, `event ${id ?? 'without an id'}: counted as failed`)
    }
    t.match((await a.inject({ url: '/metrics' })).body, /^cachewarden_invalidation_failures_total\{source="events"\} 2$/m)
    const unmatched = await call(a, { method: 'POST', url: '/v1/events', key: 'invalidate', payload: { id: 'evt-down-2', type: 'nobody.cares', data: {} } })
    t.same(unmatched.json(), { matched: 0, invalidations: [] }, 'an event no rule matches needs no Redis')

    // Both steps of an emergency clear need Redis (tokens live there, for every instance to see):
    // 503, audited as failed, nothing cleared.
    const noToken = await call(a, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'while down' } })
    t.equal(noToken.statusCode, 503)
    t.equal(noToken.json().error, 'backend_unavailable')
    t.match((await call(a, { url: '/v1/debug/audit?limit=1' })).json(), [{ action: 'clear_token_issued', outcome: 'failed', reason: 'while down' }])
    const failuresBefore = (await call(a, { url: '/v1/stats' })).json().invalidations.failed
    const failedClear = await call(a, { method: 'POST', url: '/v1/admin/clear', payload: { token } })
    t.equal(failedClear.statusCode, 503)
    t.equal(failedClear.json().error, 'backend_unavailable')
    t.match((await call(a, { url: '/v1/debug/audit?limit=1' })).json(), [{ action: 'clear', outcome: 'failed' }])
    t.equal((await call(a, { url: '/v1/stats' })).json().invalidations.failed, failuresBefore + 1, 'a clear that fails is a failed invalidation')
    t.match((await a.inject({ url: '/metrics' })).body, /^cachewarden_invalidation_failures_total\{source="admin"\} 1$/m, 'counted for alerts')
    t.equal((await get(a, 'kept')).statusCode, 200, 'nothing was cleared (the L1 copy still answers)')

    const busDowns = busStates.length
    await redis.start()
    t.ok(await waitUntil(async () => (await readyStatus(a)) === 200 && (await readyStatus(b)) === 200, 15_000), 'ready is back to 200')
    t.equal(busStates.at(-1), true, 'bus_state reports the bus up again')
    t.match((await b.inject({ url: '/metrics' })).body, /^cachewarden_bus_connected 1$/m, 'the bus gauge is back to 1')
    t.ok(busStates.length > busDowns)

    // Redis came back empty; every L1 was flushed on reconnect, so nothing older is served.
    t.same(await tiered(b).l1Size(), { entries: 0, bytes: 0 }, 'b flushed its L1 on reconnect')
    t.equal((await get(b, 'cached')).statusCode, 404, 'no stale read after recovery')
    await put(a, 'cached', { value: 'v2' })
    t.equal((await get(b, 'cached')).json().value, 'v2')
    // Redis lost its sequences with its data: a lease from before must not be taken for a new one.
    for (let i = 0; i < 5; i++) await call(b, { method: 'DELETE', url: `/v1/entries/other-${i}`, key: 'invalidate' })
    const stale = await call(a, { method: 'PUT', url: '/v1/entries/leased', payload: { value: 'old', lease: oldLease } })
    t.equal(stale.statusCode, 409, 'a lease from before the data loss is refused')
    const again = await call(a, { method: 'DELETE', url: '/v1/entries/cached', key: 'invalidate' })
    t.equal(again.statusCode, 200, 'invalidations work again without a restart')
    t.ok(await waitUntil(async () => (await get(b, 'cached')).statusCode === 404))
    const retried = await call(a, { method: 'POST', url: '/v1/admin/clear', payload: { token } })
    t.equal(retried.json().error, 'clear_token_invalid', 'the token went with the data Redis lost')
  })

  t.test('no acknowledged invalidation is lost when Redis dies in the middle of a stream of them', async (t) => {
    const keys = Array.from({ length: 60 }, (_, i) => `stream:${i}`)
    for (const key of keys) await put(a, key, { value: key })
    for (const key of keys) t.ok(await fillL1(b, key))
    const failedBefore = (await call(a, { url: '/v1/stats' })).json().invalidations.failed
    const results: Array<{ key: string; status: number }> = []
    const invalidations = (async () => {
      for (const key of keys) {
        const res = await call(a, { method: 'DELETE', url: `/v1/entries/${encodeURIComponent(key)}`, key: 'invalidate' })
        results.push({ key, status: res.statusCode })
        await new Promise((r) => setTimeout(r, 5))
      }
    })()
    await waitUntil(() => results.length >= 15)
    await redis.stop()
    await invalidations
    const acked = results.filter((r) => r.status === 200)
    const failed = results.filter((r) => r.status === 503)
    t.equal(acked.length + failed.length, keys.length, 'every answer is 200 or 503')
    t.ok(acked.length >= 15 && failed.length > 0, `${acked.length} acknowledged, ${failed.length} failed`)
    const stats = (await call(a, { url: '/v1/stats' })).json()
    t.equal(stats.invalidations.failed - failedBefore, failed.length, 'every 503 is reported as a failed invalidation')
    // Acknowledged means applied in Redis and published: b dropped its copy, while still down.
    // Except perhaps the last: SIGKILL can land after Redis wrote a's reply and before it wrote
    // b's message (seen once in a loaded full run); b flushes its L1 when the bus comes back.
    for (const { key } of acked.slice(0, -1)) t.equal(await tiered(b).l1Peek(key, b.cache.now()), undefined, `${key} left b's L1`)
    await redis.start()
    t.ok(await waitUntil(async () => (await readyStatus(a)) === 200 && (await readyStatus(b)) === 200, 15_000))
    for (const { key } of acked) t.equal((await get(b, key)).statusCode, 404)
  })

  t.test('a dropped bus connection is noticed, flushes L1 on reconnect and loses no acknowledged invalidation', async (t) => {
    const admin = new Redis(redis.url)
    t.teardown(() => admin.disconnect())
    const keys = Array.from({ length: 40 }, (_, i) => `bus:${i}`)
    for (const key of keys) await put(a, key, { value: key })
    for (const key of keys) t.ok(await fillL1(b, key))
    const before = busStates.length
    const acked: string[] = []
    const invalidations = (async () => {
      for (const key of keys) {
        const res = await call(a, { method: 'DELETE', url: `/v1/entries/${encodeURIComponent(key)}`, key: 'invalidate' })
        t.equal(res.statusCode, 200, 'Redis is up: every invalidation is acknowledged')
        if (res.statusCode === 200) acked.push(key)
        await new Promise((r) => setTimeout(r, 2))
      }
    })()
    await waitUntil(() => acked.length >= 10)
    const killed = await admin.client('KILL', 'TYPE', 'pubsub')
    t.ok(Number(killed) >= 2, 'both subscribers were cut')
    await invalidations
    t.ok(await waitUntil(() => busStates.length >= before + 2 && busStates.at(-1) === true), 'b saw the bus go down and come back')
    t.same(busStates.slice(before, before + 2), [false, true])
    for (const key of acked) t.equal((await get(b, key)).statusCode, 404, `${key} is a miss on b`)
    t.equal(await readyStatus(b), 200)
  })

  t.test('an instance started while Redis is down answers at once and becomes ready when Redis comes up', async (t) => {
    const late = new RedisServer(await freePort())
    t.teardown(() => late.stop())
    const started = Date.now()
    const app = await build(t, { redisUrl: late.url })
    t.ok(Date.now() - started < 15_000, 'the start did not hang on Redis')
    t.equal(await readyStatus(app), 503)
    t.equal((await get(app, 'k')).statusCode, 404, 'a read is a miss, not a 5xx')
    t.equal((await call(app, { method: 'PUT', url: '/v1/entries/k', payload: { value: 1 } })).statusCode, 503)
    await late.start()
    t.ok(await waitUntil(async () => (await readyStatus(app)) === 200, 15_000), 'ready once Redis is up')
    await put(app, 'k', { value: 1 })
    t.equal((await get(app, 'k')).statusCode, 200)
  })

  t.test('a frozen Redis takes the bus down (its sockets stay open) until it answers again, then L1 is flushed', async (t) => {
    const { server: frozen, store, states } = await watchedStore(t, { commandTimeoutMs: 500, busPingMs: 100 })
    const now = Date.now
    const base = { etag: 'e', userId: undefined, tags: undefined, createdAt: now(), expiresAt: now() + 60_000, hits: 0, lastAccessAt: now(), stale: false, origin: undefined, size: 10 }
    await store.set({ ...base, key: 'cached', value: '1' })
    t.ok(await waitUntil(async () => (await store.get('cached', now()), (await store.l1Peek('cached', now())) !== undefined)))
    t.same(states, [true])

    frozen.pause(true)
    t.teardown(() => frozen.pause(false))
    t.ok(await waitUntil(() => states.length === 2, 5000), 'the unanswered bus PING is noticed')
    t.same(states, [true, false], 'the bus is reported down while Redis is frozen')
    t.equal(store.ready(), false)
    t.equal((await store.get('cached', now()))?.value, '1', 'an L1 copy still answers while Redis does not')

    frozen.pause(false)
    t.ok(await waitUntil(() => states.length === 3, 10_000), 'the bus comes back')
    t.same(states, [true, false, true])
    t.equal(await store.l1Peek('cached', now()), undefined, 'and L1 was flushed: what the bus missed is not trusted')
    t.ok(await waitUntil(() => store.ready(), 10_000), 'the command connection, cut by the timed-out read, is back too')
    t.equal((await store.get('cached', now()))?.value, '1', 'the entry is read again from Redis')
  })

  t.test("a stall of this process's event loop longer than the command timeout does not take the bus down", async (t) => {
    const { states } = await watchedStore(t, { commandTimeoutMs: 200, busPingMs: 50 })
    // The PING leaves after its turn's poll for I/O, and the loop then stalls (a real busy
    // wait): its answer waits on the socket while the PING's timer runs out, and the timer
    // comes first in the next turn.
    let stalls = 0
    patchPing(t, (send) => {
      if (stalls === 3) return send()
      stalls++
      return new Promise((resolve, reject) =>
        setImmediate(() => {
          send().then(resolve, reject)
          const until = Date.now() + 500
          while (Date.now() < until);
        }),
      )
    })
    t.ok(await waitUntil(() => stalls === 3, 5000))
    await new Promise((resolve) => setTimeout(resolve, 300))
    t.same(states, [true], 'the bus stayed up through three stalls of 500 ms, with a 200 ms timeout')
  })

  t.test('bus messages arriving since a PING show the connection alive, even when its answer is late', async (t) => {
    const { server, states } = await watchedStore(t, { commandTimeoutMs: 100, busPingMs: 30 })
    // Every PING is sent for real, but its answer never reaches the store: only the bus's
    // other traffic can show it alive.
    patchPing(t, (send) => {
      send().catch(() => {})
      return new Promise(() => {})
    })
    const publisher = new Redis(server.url)
    t.teardown(() => publisher.disconnect())
    const chatter = setInterval(() => void publisher.publish('{cw}:bus', JSON.stringify({ f: 'elsewhere', w: 'chatter' })), 10)
    await new Promise((resolve) => setTimeout(resolve, 600))
    t.same(states, [true], 'messages every 10 ms kept the bus up through some 20 unanswered PINGs')
    clearInterval(chatter)
    t.ok(await waitUntil(() => states.length >= 2, 5000), 'once the messages stop, an unanswered PING drops the bus')
    t.equal(states[1], false)
  })

  t.test('an unreachable Redis is named in the log (host and port, never the password), once in a while', async (t) => {
    const port = await freePort() // nothing listens there
    const lines: Array<{ obj: Record<string, unknown>; msg: string }> = []
    const log = (obj: Record<string, unknown>, msg: string) => void lines.push({ obj, msg })
    const logger = { info: log, warn: log, error: log, debug: log } as unknown as ConstructorParameters<typeof TieredStore>[0]['logger']
    const store = new TieredStore({ redisUrl: `redis://:hunter2@127.0.0.1:${port}`, sweepIntervalMs: 0, logger })
    t.teardown(() => store.close())
    t.equal(await store.connect(1500), false)
    const errors = lines.filter((l) => l.msg === 'Redis connection error: retrying')
    t.equal(errors.length, 1, 'one line for the retries of 1.5 s')
    t.equal(errors[0]!.obj.redis, `127.0.0.1:${port}`)
    t.equal(errors[0]!.obj.failuresNotLogged, 0, 'the first of them, nothing held back before it')
    t.match(errors[0]!.obj.err, /ECONNREFUSED/)
    t.notMatch(JSON.stringify(lines), /hunter2/)
  })

  t.test('a frozen Redis makes requests fail fast instead of hanging', async (t) => {
    const frozen = await startRedis(t)
    const now = Date.now
    const store = new TieredStore({ redisUrl: frozen.url, commandTimeoutMs: 1000, sweepIntervalMs: 0 })
    t.teardown(() => store.close())
    t.ok(await store.connect(10_000))
    const base = { etag: 'e', userId: undefined, tags: undefined, createdAt: now(), expiresAt: now() + 60_000, hits: 0, lastAccessAt: now(), stale: false, origin: undefined, size: 10 }
    for (const key of ['cached', 'written']) {
      await store.set({ ...base, key, value: '1' })
      t.ok(await waitUntil(async () => (await store.get(key, now()), (await store.l1Peek(key, now())) !== undefined)))
    }
    t.equal(await store.healthy(), true)
    frozen.pause(true)
    t.teardown(() => frozen.pause(false))
    t.equal(store.ready(), true, 'the sockets are still open')
    t.equal(await store.healthy(), false, 'but readiness asks Redis, which does not answer')
    let started = Date.now()
    t.equal((await store.get('cached', now()))?.value, '1', 'an L1 hit does not touch Redis')
    // A write sent to the frozen Redis times out, and may land when Redis wakes: its L1 copy goes.
    await t.rejects(store.set({ ...base, key: 'written', value: '2' }), { name: 'CacheError', code: 'backend_unavailable' })
    t.ok(Date.now() - started < 2500, `the write failed in ${Date.now() - started} ms (one command timeout)`)
    t.equal(await store.l1Peek('written', now()), undefined, 'and the L1 copy of the key it was sent for is dropped')
    t.equal(await store.get('not-cached', now()), undefined, 'a miss')
    // That timeout dropped the connection: the next requests fail at once instead of each
    // waiting out its own second.
    t.equal(store.ready(), false, 'not ready once a command timed out')
    started = Date.now()
    t.equal(await store.get('not-cached-2', now()), undefined, 'another miss')
    t.same(await store.claimFill('not-cached-2', 'h', 2000, now()), { stamp: { epoch: 'offline', seq: 0 }, left: 0 }, 'whose lease can never write')
    await t.rejects(store.set({ ...base, key: 'x', value: '2' }), { name: 'CacheError', code: 'backend_unavailable' })
    await t.rejects(store.invalidate({ userIds: ['u'] }, 'delete', now()), { name: 'CacheError', code: 'backend_unavailable' })
    t.ok(Date.now() - started < 500, `a miss, its lease, a write and an invalidation failed in ${Date.now() - started} ms`)
    frozen.pause(false)
    t.ok(await waitUntil(async () => {
      try {
        return (await store.set({ ...base, key: 'x', value: '3' })) === 'ok'
      } catch {
        return false
      }
    }), 'writes work again once Redis answers')
    t.equal(await store.healthy(), true, 'and it is ready again')
  })
}
