// sql/cachewarden.sql's trigger function on its own, in a real PostgreSQL database: what it
// sends for row changes, and the mistakes it refuses (README, "PostgreSQL triggers").
import pg from 'pg'
import t, { type Test } from 'tap'
import { createDatabase, postgresAvailable, waitFor } from '../helpers/postgres.js'

const available = await postgresAvailable(t)

/** A database with the function, a `rows` table, and a second connection collecting notifications. */
async function setup(t: Test) {
  const { url, db } = await createDatabase(t)
  await db.query(`CREATE TABLE rows (id serial PRIMARY KEY, user_id text, x text, y text)`)
  const listener = new pg.Client({ connectionString: url })
  await listener.connect()
  t.teardown(() => listener.end())
  const heard: Array<Record<string, unknown>> = []
  listener.on('notification', (n) => heard.push(JSON.parse(n.payload ?? 'null')))
  await listener.query('LISTEN cachewarden')
  /** Runs `sql`, then a marker notification, and returns what was heard before the marker. */
  const notified = async (sql: string, params: unknown[] = []) => {
    heard.length = 0
    await db.query(sql, params)
    await db.query(`SELECT pg_notify('cachewarden', '{"marker":true}')`)
    await waitFor(() => heard.some((p) => p.marker === true), 10_000, 'the marker')
    return heard.filter((p) => p.marker !== true)
  }
  return { db, notified }
}

t.test('attached BEFORE or FOR EACH STATEMENT, it refuses the write instead of cancelling it or doing nothing', { skip: !available }, async (t) => {
  const { db, notified } = await setup(t)
  await db.query(`CREATE TRIGGER rows_before BEFORE INSERT OR UPDATE OR DELETE ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id')`)
  await t.rejects(db.query(`INSERT INTO rows (user_id) VALUES ('42')`), /must be attached AFTER \.\.\. FOR EACH ROW \(on public\.rows it is BEFORE/)
  await db.query(`DROP TRIGGER rows_before ON rows`)
  await db.query(`CREATE TRIGGER rows_statement AFTER INSERT ON rows FOR EACH STATEMENT EXECUTE FUNCTION cachewarden_notify('nosuchcolumn')`)
  await t.rejects(db.query(`INSERT INTO rows (user_id) VALUES ('42')`), /FOR EACH STATEMENT/)
  await db.query(`DROP TRIGGER rows_statement ON rows`)
  t.equal((await db.query('SELECT count(*)::int AS n FROM rows')).rows[0].n, 0, 'nothing was written by the refused statements')
  await db.query(`CREATE TRIGGER rows_cw AFTER INSERT OR UPDATE OR DELETE ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id')`)
  t.same(await notified(`INSERT INTO rows (user_id) VALUES ('42')`), [{ userIds: ['42'], tags: [], mode: 'delete', reason: 'public.rows INSERT' }])
  t.equal((await db.query('SELECT count(*)::int AS n FROM rows')).rows[0].n, 1, 'attached AFTER, the row is written')
  await db.query(`CREATE TRIGGER rows_typo AFTER INSERT ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('usr_id')`)
  await t.rejects(db.query(`INSERT INTO rows (user_id) VALUES ('43')`), /has no column "usr_id"/, 'a misspelt column fails the write')
})

t.test('tag templates are filled in one pass: a value holding a placeholder is kept as it is', { skip: !available }, async (t) => {
  const { db, notified } = await setup(t)
  await db.query(`CREATE TRIGGER rows_cw AFTER INSERT ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('', 'a:{x}:{y}', '{y}{y}', 'none:{x}')`)
  const sent = await notified(`INSERT INTO rows (x, y) VALUES ('{y}', 'Y')`)
  t.same(sent.map((p) => p.tags), [['a:{y}:Y', 'YY', 'none:{y}']])
  const skipped = await notified(`INSERT INTO rows (x, y) VALUES ('1', NULL)`)
  t.same(skipped.map((p) => p.tags), [['none:1']], 'a template with a NULL column is skipped')
})

t.test('a user or tag no entry could carry (over 128 bytes) is left out; the rest still go', { skip: !available }, async (t) => {
  const { db, notified } = await setup(t)
  await db.query(`CREATE TRIGGER rows_cw AFTER INSERT OR UPDATE ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', 't:{x}')`)
  await notified(`INSERT INTO rows (user_id, x) VALUES ('43', 'ok')`)
  const sent = await notified(`UPDATE rows SET user_id = $1, x = $2 WHERE user_id = '43'`, ['u'.repeat(129), 'é'.repeat(64)])
  t.same(sent, [{ userIds: ['43'], tags: ['t:ok'], mode: 'delete', reason: 'public.rows UPDATE' }], 'the old user and tag; the new ones are too long')
  // 8 KB of user id used to make pg_notify fail the application's own write.
  const huge = await notified(`INSERT INTO rows (user_id, x) VALUES ($1, 'fine')`, ['u'.repeat(8192)])
  t.same(huge, [{ userIds: [], tags: ['t:fine'], mode: 'delete', reason: 'public.rows INSERT' }])
})

t.test('a selector longer than one notification holds goes out as several, and the write succeeds', { skip: !available }, async (t) => {
  const { db, notified } = await setup(t)
  // 40 templates of 100-byte tags, for the old row and the new: some 8 KB of tags.
  const templates = Array.from({ length: 40 }, (_, i) => `'t${String(i).padStart(2, '0')}:{x}'`).join(', ')
  await db.query(`CREATE TRIGGER rows_cw AFTER INSERT OR UPDATE ON rows FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', ${templates}, 'mode=stale')`)
  await notified(`INSERT INTO rows (user_id, x) VALUES ('1', $1)`, ['a'.repeat(96)])
  const sent = await notified(`UPDATE rows SET user_id = '2', x = $1`, ['b'.repeat(96)])
  t.ok(sent.length > 1, `${sent.length} notifications`)
  t.same(sent[0], { userIds: ['1', '2'], mode: 'stale', reason: 'public.rows UPDATE' }, 'the users first')
  const tags = sent.slice(1).flatMap((p) => p.tags as string[])
  t.equal(tags.length, 80, 'every tag of both rows, once')
  t.ok(tags.includes(`t00:${'a'.repeat(96)}`) && tags.includes(`t39:${'b'.repeat(96)}`))
  t.ok(sent.slice(1).every((p) => p.mode === 'stale' && (p.tags as string[]).length === 1))
})
