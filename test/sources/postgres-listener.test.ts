import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import t, { type Test } from 'tap'
import type { InvalidationRecord } from '../../src/cache/types.js'
import { buildApp } from '../../src/app.js'
import { PostgresListener } from '../../src/sources/postgres-listener.js'
import { loadConfig, type Config } from '../../src/config.js'
import { TEST_API_KEYS, build, call, get, put } from '../helpers/build.js'
import { PG_ADMIN_URL, createDatabase, postgresAvailable, waitFor } from '../helpers/postgres.js'

const available = await postgresAvailable(t)

/** A database with `personas` and the trigger attached, and an app listening to it. */
async function setup(t: Test, config: Partial<Config> = {}, logLines: string[] = []) {
  const { url, name, db } = await createDatabase(t)
  await db.query(`CREATE TABLE personas (id serial PRIMARY KEY, user_id text, bio text)`)
  await db.query(`
    CREATE TRIGGER personas_cachewarden AFTER INSERT OR UPDATE OR DELETE ON personas
    FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', 'analytics:{user_id}')`)
  // A unique application name, so killing "our" listener never touches another test's.
  const appName = `cw_listener_${randomBytes(4).toString('hex')}`
  const pgUrl = `${url}?application_name=${appName}`
  const app = await build(t, { pgUrl, ...config }, {
    logger: { level: 'warn', stream: { write: (line: string) => void logLines.push(line) } },
  })
  await waitFor(async () => (await app.inject({ url: '/health/ready' })).statusCode === 200, 20_000, 'the listener to be ready')
  return { app, db, name, appName }
}

/** Resolves with the next invalidation from the `postgres` source. */
function nextPostgresInvalidation(app: FastifyInstance): Promise<InvalidationRecord> {
  return new Promise((resolve) => {
    const onInvalidation = (record: InvalidationRecord) => {
      if (record.source !== 'postgres') return
      app.cache.off('invalidation', onInvalidation)
      resolve(record)
    }
    app.cache.on('invalidation', onInvalidation)
  })
}

const KEYS = ['dash:42', 'report:42', 'dash:43', 'report:43', 'dash:44', 'report:44', 'misc']

async function seed(app: FastifyInstance) {
  for (const user of ['42', '43', '44']) {
    await put(app, `dash:${user}`, { value: { user }, userId: user })
    // No userId: only the tag the trigger names can reach it.
    await put(app, `report:${user}`, { value: { user }, tags: [`analytics:${user}`] })
  }
  await put(app, 'misc', { value: 1 })
}

async function present(app: FastifyInstance): Promise<string[]> {
  const out: string[] = []
  for (const key of KEYS) if ((await get(app, key)).statusCode === 200) out.push(key)
  return out
}

t.test('row changes invalidate exactly the entries of the users and tags they touch', { skip: !available }, async (t) => {
  const { app, db } = await setup(t)
  const delays: number[] = []
  const change = async (sql: string, params: unknown[]) => {
    await seed(app)
    const invalidation = nextPostgresInvalidation(app)
    const started = performance.now()
    await db.query(sql, params) // autocommit: the NOTIFY is delivered on this commit
    const record = await invalidation
    delays.push(performance.now() - started)
    return record
  }

  let record = await change(`INSERT INTO personas (user_id, bio) VALUES ($1, 'hi')`, ['42'])
  t.same(record.selector, { userIds: ['42'], tags: ['analytics:42'] })
  t.equal(record.reason, 'public.personas INSERT')
  t.equal(record.invalidated, 2)
  t.same(await present(app), ['dash:43', 'report:43', 'dash:44', 'report:44', 'misc'], 'insert: user 42 and analytics:42 only')

  record = await change(`UPDATE personas SET bio = 'hello' WHERE user_id = $1`, ['42'])
  t.equal(record.reason, 'public.personas UPDATE')
  t.same(await present(app), ['dash:43', 'report:43', 'dash:44', 'report:44', 'misc'], 'update: user 42 and analytics:42 only')

  record = await change(`UPDATE personas SET user_id = $2 WHERE user_id = $1`, ['42', '43'])
  t.same(record.selector, { userIds: ['42', '43'], tags: ['analytics:42', 'analytics:43'] })
  t.equal(record.invalidated, 4)
  t.same(await present(app), ['dash:44', 'report:44', 'misc'], 'user change: the old and the new user')

  record = await change(`DELETE FROM personas WHERE user_id = $1`, ['43'])
  t.equal(record.reason, 'public.personas DELETE')
  t.same(await present(app), ['dash:42', 'report:42', 'dash:44', 'report:44', 'misc'], 'delete: user 43 and analytics:43 only')

  const stats = await call(app, { url: '/v1/stats' })
  t.equal(stats.json().invalidations.bySource.postgres, 4)
  t.comment(`statement-to-invalidation delays (ms): ${delays.map((d) => d.toFixed(2)).join(', ')}`)
})

t.test('an update that changes nothing sends nothing', { skip: !available }, async (t) => {
  const { app, db } = await setup(t)
  await db.query(`INSERT INTO personas (user_id, bio) VALUES ('42', 'same')`)
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 1, 20_000, 'the insert notification')
  await put(app, 'dash:42', { value: 1, userId: '42' })
  await db.query(`UPDATE personas SET bio = 'same'`)
  // A later change proves the queue was drained past the no-op update.
  await db.query(`SELECT pg_notify('cachewarden', '{"keys":["marker"]}')`)
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 2, 20_000, 'the marker notification')
  t.equal((await get(app, 'dash:42')).statusCode, 200)
  t.same(app.cache.recentInvalidations(1)[0]!.selector, { keys: ['marker'] })
})

t.test('a malformed notification is logged and counted, and the listener goes on', { skip: !available }, async (t) => {
  const lines: string[] = []
  const { app, db } = await setup(t, {}, lines)
  await put(app, 'dash:42', { value: 1, userId: '42' })
  await put(app, 'dash:43', { value: 1, userId: '43' })
  const garbage = [
    'garbage', '[1,2]', '{"nope":["x"]}', '{"userIds":[""]}', '{"userIds":"42"}', '{"mode":"burn","keys":["a"]}', '{}', '{"userIds":null}',
    // malformed beside a name no entry can carry: not the silent no-op a row of only such names is
    `{"userIds":["${'u'.repeat(200)}"],"keys":5}`,
  ]
  for (const payload of garbage) await db.query(`SELECT pg_notify('cachewarden', $1)`, [payload])
  // null fields are absent, as in POST /v1/invalidations
  await db.query(`SELECT pg_notify('cachewarden', $1)`, ['{"userIds":["42"],"tags":null,"mode":"stale","reason":null}'])
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 1, 20_000, 'the good notification')
  t.equal(app.cache.totals.invalidationFailures.postgres, garbage.length, 'every bad payload counted')
  const warnings = lines.map((l) => JSON.parse(l)).filter((l) => l.msg === 'malformed postgres notification')
  t.equal(warnings.length, garbage.length, 'every bad payload logged')
  t.equal(warnings[0].payload, 'garbage')
  t.equal(warnings[0].level, 40)
  t.equal((await get(app, 'dash:42', '?allowStale=true')).json().stale, true, 'the good one still applied, in stale mode')
  t.equal((await get(app, 'dash:43')).statusCode, 200)
  t.equal((await app.inject({ url: '/health/ready' })).statusCode, 200)
  const stats = await call(app, { url: '/v1/stats' })
  t.equal(stats.json().invalidations.failed, garbage.length)
})

t.test('a list over the batch limit is applied in slices, and an overlong reason is cut, not refused', { skip: !available }, async (t) => {
  const lines: string[] = []
  const { app, db } = await setup(t, { limits: { ...loadConfig({}).limits, maxBatch: 3 } }, lines)
  // A trigger with many tag templates names more tags than an API request may: the database's
  // word must still be applied, every name in it.
  const tags = Array.from({ length: 7 }, (_, i) => `t${i}`)
  for (const tag of tags) await put(app, `tagged:${tag}`, { value: 1, tags: [tag] })
  await put(app, 'user:9', { value: 1, userId: '9' })
  await put(app, 'other', { value: 1, tags: ['t99'] })
  const reason = '😀'.repeat(1500) // two UTF-16 units each: cut by code point, never half a pair
  await db.query(`SELECT pg_notify('cachewarden', $1)`, [JSON.stringify({ userIds: ['9'], tags, reason })])
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 3, 20_000, 'three slices')
  for (const tag of tags) t.equal((await get(app, `tagged:${tag}`)).statusCode, 404, `tagged:${tag} invalidated`)
  t.equal((await get(app, 'user:9')).statusCode, 404, 'the user too')
  t.equal((await get(app, 'other')).statusCode, 200, 'nothing else')
  const records = app.cache.recentInvalidations(3).reverse()
  t.same(records.map((r) => r.selector), [{ userIds: ['9'], tags: ['t0', 't1', 't2'] }, { tags: ['t3', 't4', 't5'] }, { tags: ['t6'] }])
  t.equal(records[0]!.reason, '😀'.repeat(1024), 'the reason cut to the API limit, in characters')
  t.notOk(app.cache.totals.invalidationFailures.postgres, 'no failure counted')
  t.notOk(lines.some((l) => l.includes('malformed')), 'nothing logged as malformed')

  // A malformed name far down a long list sinks the whole notification, not just its slice.
  for (const tag of tags) await put(app, `tagged:${tag}`, { value: 1, tags: [tag] })
  await db.query(`SELECT pg_notify('cachewarden', $1)`, [JSON.stringify({ tags: [...tags, ''] })])
  await db.query(`SELECT pg_notify('cachewarden', '{"keys":["marker"]}')`)
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 4, 20_000, 'the marker notification')
  for (const tag of tags) t.equal((await get(app, `tagged:${tag}`)).statusCode, 200, `tagged:${tag} untouched`)
  t.equal(app.cache.totals.invalidationFailures.postgres, 1, 'one failure, for the one notification')
  t.equal(lines.filter((l) => l.includes('malformed postgres notification')).length, 1, 'logged once')
})

t.test('a channel with capitals is warned about at start: an unquoted NOTIFY would miss it', async (t) => {
  const app = await build(t)
  const warnings: string[] = []
  const logger = { warn: (_o: unknown, msg: string) => void warnings.push(msg), info: () => {}, error: () => {}, debug: () => {} }
  new PostgresListener({ url: 'postgres://127.0.0.1:1/x', channel: 'CacheEvents', cache: app.cache, logger: logger as never })
  t.match(warnings, [/^PG_CHANNEL has capitals: a hand-written NOTIFY must quote it \(NOTIFY "CacheEvents", …\)[^]*"cacheevents"/])
  new PostgresListener({ url: 'postgres://127.0.0.1:1/x', channel: 'cache_events', cache: app.cache, logger: logger as never })
  t.equal(warnings.length, 1, 'not for a lowercase one')
  t.throws(() => new PostgresListener({ url: 'postgres://127.0.0.1:1/x', channel: 'drop table;', cache: app.cache }), /plain SQL identifier/)
})

t.test('a row moving to a user id no entry can carry still invalidates the user it left', { skip: !available }, async (t) => {
  const lines: string[] = []
  const { app, db } = await setup(t, {}, lines)
  await db.query(`INSERT INTO personas (user_id) VALUES ('43'), ('44')`)
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 2, 20_000, 'the inserts')
  await seed(app)
  // A control character (the server leaves it out) and 130 bytes (the trigger does).
  await db.query(`UPDATE personas SET user_id = $1 WHERE user_id = '43'`, ['45\n'])
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 3, 20_000, 'the first update')
  t.same(app.cache.recentInvalidations(1)[0]!.selector, { userIds: ['43'], tags: ['analytics:43'] }, 'the old user and tag, without the new user')
  await db.query(`UPDATE personas SET user_id = $1 WHERE user_id = '44'`, ['é'.repeat(65)])
  await waitFor(() => app.cache.totals.invalidationsBySource.postgres === 4, 20_000, 'the second update')
  t.same(await present(app), ['dash:42', 'report:42', 'misc'], "43's and 44's entries are gone")
  t.equal(app.cache.totals.invalidationFailures.postgres ?? 0, 0, 'nothing counted as failed: nothing was lost')
  const left = lines.map((l) => JSON.parse(l)).filter((l) => l.msg === 'a postgres notification names what no entry can carry: left out')
  // The 130-byte user and its tag never reached the server: the trigger leaves out what is over 128 bytes.
  t.same(left.map((l) => l.left), [['45\n', 'analytics:45\n']])
})

/** A TCP proxy to PostgreSQL that can freeze (connections stay open, nothing gets through), or lose LISTEN queries only. */
async function freezableProxy(t: Test, target: URL) {
  let frozen = false
  let loseListen = false
  const held: Array<() => void> = []
  const sockets = new Set<Socket>()
  const forward = (from: Socket, to: Socket) =>
    from.on('data', (chunk: Buffer) => {
      if (loseListen && chunk.includes('LISTEN "')) return // gone, as on a network that dropped it
      if (frozen) held.push(() => to.write(chunk))
      else to.write(chunk)
    })
  const server = createServer((client) => {
    const upstream = connect(Number(target.port || 5432), target.hostname)
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on('error', () => {})
      s.on('close', () => (client.destroy(), upstream.destroy(), sockets.delete(s)))
    }
    forward(client, upstream)
    forward(upstream, client)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const s of sockets) s.destroy()
    return new Promise((resolve) => server.close(resolve))
  })
  const url = new URL(target)
  url.port = String((server.address() as AddressInfo).port)
  return {
    url: url.toString(),
    freeze: () => void (frozen = true),
    loseListen: (lose: boolean) => void (loseListen = lose),
    thaw: () => {
      frozen = false
      for (const send of held.splice(0)) send()
    },
  }
}

t.test('a LISTEN that is never answered counts as a failed connect and is retried, not waited on forever', { skip: !available }, async (t) => {
  const { url } = await createDatabase(t)
  const proxy = await freezableProxy(t, new URL(url))
  const app = await build(t)
  proxy.loseListen(true)
  const listener = new PostgresListener({ url: proxy.url, channel: 'cachewarden', cache: app.cache, connectTimeoutMs: 500, minBackoffMs: 50, maxBackoffMs: 200 })
  t.teardown(() => listener.close())
  listener.start()
  await new Promise((resolve) => setTimeout(resolve, 1500)) // past the connect timeout: given up, tried again
  t.notOk(listener.listening)
  proxy.loseListen(false)
  await waitFor(() => listener.listening, 10_000, 'the listener to listen once a LISTEN gets through')
  t.pass('listening')
})

t.test('a listener connection that stops answering (a stalled or cut network) is noticed, and the policy covers what it missed', { skip: !available }, async (t) => {
  const { url, db } = await createDatabase(t)
  const proxy = await freezableProxy(t, new URL(url))
  const app = await build(t)
  const listener = new PostgresListener({ url: proxy.url, channel: 'cachewarden', cache: app.cache, healthCheckMs: 200, connectTimeoutMs: 1000, minBackoffMs: 50, maxBackoffMs: 200 })
  t.teardown(() => listener.close())
  listener.start()
  await waitFor(() => listener.listening, 20_000, 'the listener')
  await put(app, 'dash:7', { value: 1, userId: '7' })
  proxy.freeze()
  await waitFor(() => !listener.listening, 5000, 'the stalled connection to be noticed')
  await db.query(`SELECT pg_notify('cachewarden', '{"userIds":["7"]}')`) // lost: nothing listens
  proxy.thaw()
  await waitFor(() => listener.listening, 20_000, 'the listener to listen again')
  t.equal((await get(app, 'dash:7')).statusCode, 404, 'the missed notification is covered by the reconnect policy')
  t.equal((await get(app, 'dash:7', '?allowStale=true')).json().stale, true)
  t.match(app.cache.recentInvalidations(1)[0], { selector: { all: true }, source: 'postgres' })
})

/** Kills the listener's backend and checks readiness through the loss until it listens again. */
async function killListener(t: Test, app: FastifyInstance, db: import('pg').Client, appName: string) {
  const states: boolean[] = []
  const check = app.readinessChecks.find((c) => c.name === 'postgres')!
  // Asked the moment the listener reports the loss: the first retry is ~100 ms away.
  let readyAtLoss: boolean | Promise<boolean> | undefined
  let probe: Promise<Awaited<ReturnType<FastifyInstance['inject']>>> | undefined
  let back: () => void
  const up = new Promise<void>((resolve) => (back = resolve))
  app.cache.on('pg_listener_state', ({ connected }) => {
    states.push(connected)
    if (!connected && probe === undefined) {
      readyAtLoss = check.ready()
      probe = app.inject({ url: '/health/ready' })
    }
    if (connected) back()
  })
  const down = once(app.cache, 'pg_listener_state')
  const { rows } = await db.query(
    `SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity
      WHERE application_name = $1 AND query ILIKE 'LISTEN%'`,
    [appName],
  )
  t.same(rows, [{ killed: true }], 'exactly one listener backend killed')
  t.same(await down, [{ connected: false }])
  t.equal(readyAtLoss, false)
  const ready = await probe!
  t.equal(ready.statusCode, 503, 'not ready while not listening')
  t.same(ready.json().checks, { postgres: false })
  await up
  t.equal((await app.inject({ url: '/health/ready' })).statusCode, 200, 'ready again once listening')
  t.same(states, [false, true])
}

t.test('a killed listener reconnects, flips readiness, and marks everything stale', { skip: !available }, async (t) => {
  const { app, db, appName } = await setup(t)
  await put(app, 'dash:42', { value: 1, userId: '42' })
  await put(app, 'misc', { value: 2 })
  const miss = await get(app, 'filled-later')
  const lease = miss.json().lease as string
  t.ok(lease)

  await killListener(t, app, db, appName)

  t.equal((await get(app, 'dash:42')).statusCode, 404, 'stale entries are misses')
  const stale = await get(app, 'misc', '?allowStale=true')
  t.equal(stale.statusCode, 200)
  t.equal(stale.json().stale, true, 'kept for allowStale readers')
  const write = await call(app, { method: 'PUT', url: '/v1/entries/filled-later', payload: { value: 'old', lease } })
  t.equal(write.statusCode, 409, 'a lease issued before the reconnect is void')
  const [last] = (await call(app, { url: '/v1/debug/invalidations?limit=1' })).json()
  t.match(last, { selector: { all: true }, source: 'postgres', mode: 'stale', invalidated: 2, actor: 'postgres-listener' })
  t.match(last.reason, /reconnected/)
  t.equal((await call(app, { url: '/v1/stats' })).json().invalidations.bySelector.all, 1)

  // And it listens again for real.
  await put(app, 'dash:43', { value: 1, userId: '43' })
  const next = nextPostgresInvalidation(app)
  await db.query(`INSERT INTO personas (user_id) VALUES ('43')`)
  t.same((await next).selector, { userIds: ['43'], tags: ['analytics:43'] })
  t.equal((await get(app, 'dash:43', '?allowStale=true')).statusCode, 404)
})

t.test('the clear policy drops everything on a reconnect; none keeps it', { skip: !available }, async (t) => {
  t.test('clear', async (t) => {
    const { app, db, appName } = await setup(t, { pgReconnectPolicy: 'clear' })
    await put(app, 'misc', { value: 2 })
    await killListener(t, app, db, appName)
    t.equal((await get(app, 'misc', '?allowStale=true')).statusCode, 404)
  })
  t.test('none', async (t) => {
    const { app, db, appName } = await setup(t, { pgReconnectPolicy: 'none' })
    await put(app, 'misc', { value: 2 })
    await killListener(t, app, db, appName)
    const res = await get(app, 'misc')
    t.equal(res.statusCode, 200)
    t.equal(res.json().stale, false)
  })
})

t.test('with the policy on start, the first connect marks entries stale too', { skip: !available }, async (t) => {
  const { url } = await createDatabase(t)
  const app = await buildApp({ apiKeys: TEST_API_KEYS, pgUrl: url, pgReconnectPolicyOnStart: true })
  t.teardown(() => app.close())
  // Written before ready, i.e. before the listener starts: it may predate notifications.
  await app.cache.write('early', { value: 1 })
  await app.ready()
  await waitFor(async () => (await app.inject({ url: '/health/ready' })).statusCode === 200, 20_000, 'ready')
  t.equal((await get(app, 'early', '?allowStale=true')).json().stale, true)
  t.equal(app.cache.recentInvalidations(1)[0]!.reason, 'postgres listener started: entries may predate it')
})

t.test('a database that appears after start is listened to, and what was cached meanwhile is marked stale', { skip: !available }, async (t) => {
  const name = `cw_test_late_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL })
  await admin.connect()
  t.teardown(async () => {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  })
  const url = new URL(PG_ADMIN_URL)
  url.pathname = `/${name}`
  const app = await build(t, { pgUrl: url.toString() })
  // Cached while the listener cannot listen: a change now would not be notified.
  await put(app, 'meanwhile', { value: 1 })
  t.equal((await app.inject({ url: '/health/ready' })).statusCode, 503)
  await admin.query(`CREATE DATABASE ${name}`)
  await waitFor(async () => (await app.inject({ url: '/health/ready' })).statusCode === 200, 30_000, 'the listener to connect')
  t.equal((await get(app, 'meanwhile')).statusCode, 404)
  t.equal((await get(app, 'meanwhile', '?allowStale=true')).json().stale, true)
})

t.test('an unreachable database leaves the app serving but not ready, and closing does not hang', async (t) => {
  // Port 1 refuses at once; nothing is listening there.
  const app = await build(t, { pgUrl: 'postgres://postgres@127.0.0.1:1/none' })
  await put(app, 'k', { value: 1 })
  t.equal((await get(app, 'k')).statusCode, 200)
  const ready = await app.inject({ url: '/health/ready' })
  t.equal(ready.statusCode, 503)
  t.same(ready.json(), { status: 'unavailable', checks: { postgres: false } })
  await new Promise((resolve) => setTimeout(resolve, 300)) // a few retries
  t.equal((await app.inject({ url: '/health/ready' })).statusCode, 503)
})

t.test('without PG_URL there is no postgres readiness check', async (t) => {
  const app = await build(t)
  const ready = await app.inject({ url: '/health/ready' })
  t.equal(ready.statusCode, 200)
  t.same(ready.json().checks, {})
})

t.test('the reconnect policy settings are validated at start', async (t) => {
  t.equal(loadConfig({}).pgReconnectPolicy, 'stale-all')
  t.equal(loadConfig({}).pgReconnectPolicyOnStart, false)
  t.equal(loadConfig({ PG_RECONNECT_POLICY: 'clear', PG_RECONNECT_POLICY_ON_START: 'true' }).pgReconnectPolicy, 'clear')
  t.equal(loadConfig({ PG_RECONNECT_POLICY_ON_START: 'true' }).pgReconnectPolicyOnStart, true)
  t.throws(() => loadConfig({ PG_RECONNECT_POLICY: 'wipe' }), {
    variable: 'PG_RECONNECT_POLICY',
    message: 'PG_RECONNECT_POLICY: must be one of stale-all, clear, none, got "wipe"',
  })
  t.throws(() => loadConfig({ PG_RECONNECT_POLICY_ON_START: 'yes' }), { name: 'ConfigError', message: /^PG_RECONNECT_POLICY_ON_START: / })
})
