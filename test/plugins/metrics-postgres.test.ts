import { randomBytes } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import t from 'tap'
import { build, put } from '../helpers/build.js'
import { createDatabase, postgresAvailable, waitFor } from '../helpers/postgres.js'
import { parseScrape, valueOf } from '../helpers/prometheus.js'

const available = await postgresAvailable(t)

async function metric(app: FastifyInstance, name: string, labels: Record<string, string> = {}) {
  return valueOf(parseScrape((await app.inject({ url: '/metrics' })).body), name, labels)
}

t.test('with a real PostgreSQL listener, /metrics follows its connection and its invalidations', { skip: !available }, async (t) => {
  const { url, db } = await createDatabase(t)
  await db.query(`CREATE TABLE personas (id serial PRIMARY KEY, user_id text, bio text)`)
  await db.query(`
    CREATE TRIGGER personas_cachewarden AFTER INSERT OR UPDATE OR DELETE ON personas
    FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', 'analytics:{user_id}')`)
  const appName = `cw_metrics_${randomBytes(4).toString('hex')}`
  const app = await build(t, { pgUrl: `${url}?application_name=${appName}` }, { logger: { level: 'silent' } })

  await waitFor(async () => (await metric(app, 'cachewarden_pg_listener_connected')) === 1, 20_000, 'the listener gauge to be 1')
  t.equal(await metric(app, 'cachewarden_pg_listener_connected'), 1, 'connected')
  t.equal(await metric(app, 'cachewarden_bus_connected'), 0, 'no bus without REDIS_URL')

  await put(app, 'dash:42', { value: 1, userId: '42' })
  await db.query(`INSERT INTO personas (user_id, bio) VALUES ('42', 'x')`)
  await waitFor(
    async () => (await metric(app, 'cachewarden_invalidated_entries_total', { selector: 'user' })) === 1,
    20_000,
    'the trigger\'s invalidation to be counted',
  )
  t.ok(
    ((await metric(app, 'cachewarden_invalidations_total', { selector: 'user', source: 'postgres', mode: 'delete' })) ?? 0) >= 1,
    'counted with source postgres',
  )

  // Kill the listener's backend: the gauge drops to 0, then comes back when it reconnects.
  // Read right after each state change, so a fast reconnect cannot slip between two scrapes.
  const gauge = app.metrics.registry.getSingleMetric('cachewarden_pg_listener_connected')!
  const seen: number[] = []
  app.cache.on('pg_listener_state', () => {
    void gauge.get().then((m) => seen.push(m.values[0]!.value))
  })
  const { rows } = await db.query(
    `SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`,
    [appName],
  )
  t.ok(rows.length >= 1, 'killed the listener backend')
  await waitFor(() => seen.length >= 2, 30_000, 'the loss and the reconnect')
  t.same(seen.slice(0, 2), [0, 1], 'the gauge followed the loss and the reconnect')
  t.equal(await metric(app, 'cachewarden_pg_listener_connected'), 1)
  // The default reconnect policy marks everything stale: an invalidation of selector "all".
  await waitFor(
    async () => ((await metric(app, 'cachewarden_invalidations_total', { selector: 'all', source: 'postgres', mode: 'stale' })) ?? 0) >= 1,
    20_000,
    'the reconnect policy to be counted',
  )
  t.pass('the reconnect policy is counted under selector all')
})
