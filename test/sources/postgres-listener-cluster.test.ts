// The PostgreSQL listener in cluster mode when Redis stops answering: a row change whose
// invalidation the store could not apply is owed, not lost. Real PostgreSQL, a real
// redis-server frozen with SIGSTOP (its data stays, as in a network partition).
import { randomBytes } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import t, { type Test } from 'tap'
import { PostgresListener } from '../../src/sources/postgres-listener.js'
import { build, get, put } from '../helpers/build.js'
import { createDatabase, postgresAvailable, waitFor } from '../helpers/postgres.js'
import { requireRedisServer, startRedis, type RedisServer } from '../helpers/redis-server.js'

const postgresCheck = (app: FastifyInstance) => app.readinessChecks.find((c) => c.name === 'postgres')!

/** A database whose `personas` rows notify for their `user_id`. */
async function personas(t: Test) {
  const { url, db } = await createDatabase(t)
  await db.query(`CREATE TABLE personas (id serial PRIMARY KEY, user_id text)`)
  await db.query(`
    CREATE TRIGGER personas_cachewarden AFTER INSERT OR UPDATE OR DELETE ON personas
    FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id')`)
  return { url, db }
}

/** Seeds one entry for each user (written on `writer`, read on `readers` into their L1s). */
async function seed(writer: FastifyInstance, readers: FastifyInstance[], users: string[]) {
  for (const user of users) {
    await put(writer, `dash:${user}`, { value: { user }, userId: user })
    for (const app of readers) if ((await get(app, `dash:${user}`)).statusCode !== 200) throw new Error(`dash:${user} not readable`)
  }
}

/** Freezes Redis until `postgres` invalidation failures on `app` reach `failures`, running `during` meanwhile. */
async function whileFrozen(t: Test, redis: RedisServer, app: FastifyInstance, failures: number, during: () => Promise<void>) {
  redis.pause(true)
  t.teardown(() => redis.pause(false))
  await during()
  await waitFor(() => (app.cache.totals.invalidationFailures.postgres ?? 0) >= failures, 20_000, 'the invalidations to fail')
}

/**
 * An app on `redisUrl` and a listener (its backend findable for `kill`) whose reconnect
 * policy, `markAllStale`, is counted in `tries`; returns once it listens.
 */
async function countedPolicy(t: Test, redisUrl: string, maxBackoffMs: number) {
  const { url, db } = await personas(t)
  const app = await build(t, { redisUrl })
  const counted = { tries: 0 }
  const markAllStale = app.cache.markAllStale.bind(app.cache)
  app.cache.markAllStale = (...args) => {
    counted.tries++
    return markAllStale(...args)
  }
  const appName = `cw_policy_${randomBytes(4).toString('hex')}`
  const listener = new PostgresListener({ url: `${url}?application_name=${appName}`, channel: 'cachewarden', cache: app.cache, minBackoffMs: 50, maxBackoffMs })
  t.teardown(() => listener.close())
  listener.start()
  await waitFor(() => listener.listening, 20_000, 'the listener')
  const kill = async () => (await db.query(`SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity WHERE application_name = $1`, [appName])).rows
  return { app, listener, kill, tries: () => counted.tries }
}

const available = requireRedisServer(t) && (await postgresAvailable(t))

t.test('a row change made while Redis is frozen is applied on every instance once Redis answers', { skip: !available }, async (t) => {
  const redis = await startRedis(t)
  const { url, db } = await personas(t)
  const a = await build(t, { redisUrl: redis.url, pgUrl: url })
  const b = await build(t, { redisUrl: redis.url }) // listens on the bus only
  await waitFor(async () => (await a.inject({ url: '/health/ready' })).statusCode === 200, 20_000, 'a to be ready')
  await seed(a, [a, b], ['42', '43', '44'])

  await whileFrozen(t, redis, a, 1, async () => {
    await db.query(`INSERT INTO personas (user_id) VALUES ('42')`)
    await db.query(`INSERT INTO personas (user_id) VALUES ('44')`)
  })
  t.equal(a.cache.totals.invalidationsBySource.postgres ?? 0, 0, 'nothing applied while Redis is frozen')
  t.equal(postgresCheck(a).ready(), true, 'the listener still listens: owing is not a lost connection')
  // Retries go on meanwhile (100 ms doubling); each notification's failure counts once.
  await new Promise((resolve) => setTimeout(resolve, 1500))
  t.equal(a.cache.totals.invalidationFailures.postgres, 1, "the first notification's failure counts once; the second waits behind it, untried")
  t.equal((await get(b, 'dash:42')).statusCode, 200, "b's L1 still has the copy: nothing reached it")

  redis.pause(false)
  await waitFor(() => a.cache.totals.invalidationsBySource.postgres === 2, 20_000, 'the owed notifications to be applied')
  const applied = a.cache.recentInvalidations(2).map((r) => r.selector)
  t.same(new Set(applied.map((s) => JSON.stringify(s))), new Set([JSON.stringify({ userIds: ['42'] }), JSON.stringify({ userIds: ['44'] })]), 'both, once each')
  await waitFor(async () => (await get(b, 'dash:44')).statusCode === 404, 20_000, "b's L1 to drop the copy")
  for (const app of [a, b]) {
    t.equal((await get(app, 'dash:42')).statusCode, 404)
    t.equal((await get(app, 'dash:44')).statusCode, 404)
    t.equal((await get(app, 'dash:43')).statusCode, 200, 'another user is untouched')
  }
  await waitFor(async () => (await a.inject({ url: '/health/ready' })).statusCode === 200, 20_000, 'a to be ready again')
})

t.test('past maxOwed, the reconnect policy covers the notifications that could not be applied', { skip: !available }, async (t) => {
  const redis = await startRedis(t)
  const { url, db } = await personas(t)
  const app = await build(t, { redisUrl: redis.url })
  const listener = new PostgresListener({ url, channel: 'cachewarden', cache: app.cache, maxOwed: 2, minBackoffMs: 50 })
  t.teardown(() => listener.close())
  listener.start()
  await waitFor(() => listener.listening, 20_000, 'the listener')
  await seed(app, [], ['42', '43', '44', '45'])

  await whileFrozen(t, redis, app, 1, async () => {
    for (const user of ['42', '43', '44']) await db.query(`INSERT INTO personas (user_id) VALUES ($1)`, [user])
  })
  await waitFor(() => listener.behind, 20_000, 'the listener to owe them')
  redis.pause(false)
  await waitFor(() => !listener.behind, 20_000, 'the policy to be applied')
  const [last] = app.cache.recentInvalidations(1)
  t.same(last!.selector, { all: true }, 'one mark-all-stale in their place')
  t.equal(last!.source, 'postgres')
  t.match(last!.reason, /could not be applied/)
  t.equal(app.cache.totals.invalidationsBySource.postgres, 1, 'the dropped notifications are not applied one by one as well')
  for (const user of ['42', '43', '44', '45']) t.equal((await get(app, `dash:${user}`)).statusCode, 404, `dash:${user} is a miss`)
  // 42's delete timed out against the frozen Redis, which may still run it once thawed; the
  // others never left: only the policy reached them.
  for (const user of ['43', '44', '45']) {
    t.equal((await get(app, `dash:${user}`, '?allowStale=true')).json().stale, true, `dash:${user} is kept, stale`)
  }
})

t.test('with the policy none, notifications past maxOwed are lost, and each counts as failed', { skip: !available }, async (t) => {
  const redis = await startRedis(t)
  const { url, db } = await personas(t)
  const app = await build(t, { redisUrl: redis.url })
  const listener = new PostgresListener({ url, channel: 'cachewarden', cache: app.cache, maxOwed: 1, minBackoffMs: 50, reconnectPolicy: 'none' })
  t.teardown(() => listener.close())
  listener.start()
  await waitFor(() => listener.listening, 20_000, 'the listener')
  await seed(app, [], ['42', '43', '44'])

  await whileFrozen(t, redis, app, 3, async () => {
    for (const user of ['42', '43', '44']) await db.query(`INSERT INTO personas (user_id) VALUES ($1)`, [user])
  })
  redis.pause(false)
  await waitFor(() => !listener.behind, 20_000, 'the listener to give up on them')
  t.equal(app.cache.totals.invalidationFailures.postgres, 3, 'the one tried, and the two dropped')
  t.equal(app.cache.totals.invalidationsBySource.postgres ?? 0, 0, 'nothing applied in their place')
  await waitFor(async () => (await get(app, 'dash:43')).statusCode === 200, 20_000, 'Redis to answer reads')
  t.equal((await get(app, 'dash:44')).statusCode, 200, 'a lost notification leaves its entry served: what none means')
})

t.test('a reconnect whose policy the store cannot apply (Redis down) is tried again until it is, and counts one failure', { skip: !available }, async (t) => {
  const redis = await startRedis(t)
  const { app, listener, kill, tries } = await countedPolicy(t, redis.url, 60_000)

  await redis.stop()
  t.same(await kill(), [{ killed: true }], 'the listener backend killed')
  // 50 ms doubling: after the 7th try the next is some 6.4 s away (±20%).
  await waitFor(() => tries() >= 7, 20_000, 'the policy to be tried again and again')
  t.equal(app.cache.totals.invalidationFailures.postgres, 1, 'one failure, however often it is tried')
  t.notOk(listener.listening, 'not listening (nor ready) while the policy is not applied')

  await redis.start()
  // The bus reconnecting (within a second) starts the next try at once, not after the backoff.
  await waitFor(() => listener.listening, 4000, 'the policy to be applied once Redis is back')
  t.equal(app.cache.totals.invalidationFailures.postgres, 1, 'still one')
  t.equal(app.cache.totals.invalidationsBySource.postgres, 1, 'applied once')
})

t.test('a listener connection lost while its reconnect policy waits on a frozen Redis is retried once that attempt ends', { skip: !available }, async (t) => {
  const redis = await startRedis(t)
  const { listener, kill, tries } = await countedPolicy(t, redis.url, 200)

  redis.pause(true)
  t.teardown(() => redis.pause(false))
  t.same(await kill(), [{ killed: true }], 'the listener backend killed')
  await waitFor(() => tries() >= 1, 20_000, 'the reconnect to apply its policy (held by the frozen Redis)')
  // The new connection is lost too while its policy waits; its retry comes due meanwhile.
  t.same(await kill(), [{ killed: true }], 'the new listener backend killed while the policy waits')
  await new Promise((resolve) => setTimeout(resolve, 300))
  redis.pause(false)
  await waitFor(() => listener.listening, 20_000, 'the listener to be back, its policy applied')
  t.pass('not stuck')
})
