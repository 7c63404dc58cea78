import t from 'tap'
import { KEYS, build, call, captureLogs, put } from '../helpers/build.js'
import { freePort } from '../helpers/redis-server.js'

t.test('each invalidation logs one structured line with its counts and source, never values or secrets', async (t) => {
  const { lines, stream } = captureLogs()
  const app = await build(t, {}, { logger: { level: 'info', stream } })
  const secretValue = 'value-that-must-not-be-logged-91x'
  await put(app, 'acct:9:profile', { value: { secretValue }, userId: 'user-9z7', tags: ['tag-q5e'] })
  await put(app, 'acct:9:prefs', { value: { secretValue }, userId: 'user-9z7' })

  const res = await call(app, {
    method: 'POST',
    url: '/v1/invalidations',
    payload: { userIds: ['user-9z7'], tags: ['tag-q5e', 'tag-other'], mode: 'stale' },
    key: 'invalidate',
  })
  t.equal(res.statusCode, 200)
  await call(app, { method: 'DELETE', url: '/v1/entries/acct%3A9%3Aprofile', key: 'invalidate' })

  await app.cache.markAllStale({ source: 'postgres' })

  const records = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((r) => r.msg === 'invalidation')
  t.equal(records.length, 3, 'one line per invalidation')
  t.match(records[0], {
    level: 30,
    invalidation: res.json().id,
    source: 'api',
    mode: 'stale',
    selectors: { userIds: 1, tags: 2 },
    invalidated: 2,
    durationMs: Number,
  })
  t.match(records[1], { source: 'api', mode: 'delete', selectors: { keys: 1 }, invalidated: 1 }) // the stale entry is deleted
  t.match(records[2], { source: 'postgres', mode: 'stale', selectors: { all: true }, invalidated: 0 }, 'says it covered everything') // the one left was already stale

  const all = lines.join('\n')
  for (const secret of [secretValue, 'user-9z7', 'tag-q5e', 'acct:9', KEYS.invalidate, KEYS.admin]) {
    t.notOk(all.includes(secret), `the logs never contain ${secret.slice(0, 12)}…`)
  }
})

t.test('a failed invalidation logs one error line without a stack when its cause is known (Redis down)', async (t) => {
  const { lines, stream } = captureLogs()
  // Nothing listens on that port: every Redis command fails at once.
  const app = await build(t, { redisUrl: `redis://127.0.0.1:${await freePort()}` }, { logger: { level: 'info', stream } })
  const res = await call(app, { method: 'POST', url: '/v1/invalidations', payload: { userIds: ['u1'] }, key: 'invalidate' })
  t.equal(res.statusCode, 503)
  const failed = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((r) => r.msg === 'invalidation failed')
  t.equal(failed.length, 1)
  t.match(failed[0], { level: 50, error: 'backend_unavailable', reason: /Redis is unavailable/, source: 'api' })
  t.notMatch(JSON.stringify(failed[0]), /stack/, 'no stack')
})

t.test('while Redis is down, each kind of failed store call logs at most one warning per interval, however many fail', async (t) => {
  const { lines, stream } = captureLogs()
  const app = await build(t, { redisUrl: `redis://127.0.0.1:${await freePort()}` }, { logger: { level: 'info', stream } })
  for (let i = 0; i < 20; i++) {
    t.equal((await call(app, { method: 'PUT', url: `/v1/entries/k${i}`, payload: { value: i }, key: 'write' })).statusCode, 503)
    t.equal((await call(app, { method: 'POST', url: '/v1/invalidations', payload: { keys: [`k${i}`] }, key: 'invalidate' })).statusCode, 503)
  }
  const records = lines.map((l) => JSON.parse(l) as Record<string, unknown>)
  const warned = (msg: string) => records.filter((r) => r.msg === msg).length
  t.equal(warned('Redis write failed'), 1, 'one write failure logged of 20')
  t.equal(warned('Redis invalidation failed'), 1, 'one invalidation failure logged of 20')
  t.equal(warned('invalidation failed'), 20, 'yet every failed invalidation keeps its own line')
})
