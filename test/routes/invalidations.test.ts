import t from 'tap'
import { build, call, get, put } from '../helpers/build.js'

const invalidate = (app: Parameters<typeof call>[0], payload: object) =>
  call(app, { method: 'POST', url: '/v1/invalidations', payload, key: 'invalidate' })

async function seed(app: Parameters<typeof call>[0]) {
  for (const user of ['u1', 'u2', 'u3']) {
    for (let i = 0; i < 5; i++) {
      await put(app, `dash:${user}:${i}`, { value: { user, i }, userId: user, tags: [`analytics:${user}`, i % 2 ? 'odd' : 'even'] })
    }
  }
  await put(app, 'global:config', { value: 'shared', tags: ['config'] })
}

async function present(app: Parameters<typeof call>[0]) {
  const keys: string[] = []
  for (const user of ['u1', 'u2', 'u3']) {
    for (let i = 0; i < 5; i++) if ((await get(app, `dash:${user}:${i}`)).statusCode === 200) keys.push(`dash:${user}:${i}`)
  }
  if ((await get(app, 'global:config')).statusCode === 200) keys.push('global:config')
  return keys
}

t.test('invalidating a user removes exactly that user\'s entries', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await call(app, { method: 'DELETE', url: '/v1/users/u2/entries', key: 'invalidate' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { invalidated: 5, mode: 'delete' })
  const left = await present(app)
  t.equal(left.length, 11)
  t.notOk(left.some((k) => k.startsWith('dash:u2:')), 'no entry of u2 is left')
  t.ok(left.includes('global:config'))
  for (const user of ['u1', 'u3']) t.equal(left.filter((k) => k.startsWith(`dash:${user}:`)).length, 5, `${user} is intact`)
})

t.test('invalidating by tag removes every entry carrying it', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await call(app, { method: 'DELETE', url: '/v1/tags/odd/entries', key: 'invalidate' })
  t.equal(res.json().invalidated, 6)
  const left = await present(app)
  t.equal(left.length, 10)
  t.notOk(left.some((k) => /:[13]$/.test(k)))
})

t.test('invalidating by prefix removes every key that starts with it', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await invalidate(app, { prefixes: ['dash:u1:', 'dash:u3:1'] })
  t.equal(res.statusCode, 200)
  t.equal(res.json().invalidated, 6)
  const left = await present(app)
  t.notOk(left.some((k) => k.startsWith('dash:u1:')))
  t.notOk(left.includes('dash:u3:1'))
  t.ok(left.includes('dash:u3:2'))
})

t.test('a selector combines lists and counts each entry once', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await invalidate(app, { keys: ['dash:u1:0', 'global:config'], userIds: ['u1'], tags: ['analytics:u1'], prefixes: ['dash:u1'] })
  t.equal(res.json().invalidated, 6)
  t.equal((await present(app)).length, 10)
})

t.test('stale mode keeps entries for allowStale readers only', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await call(app, { method: 'DELETE', url: '/v1/users/u1/entries?mode=stale', key: 'invalidate' })
  t.match(res.json(), { invalidated: 5, mode: 'stale' })
  const miss = await get(app, 'dash:u1:0')
  t.equal(miss.statusCode, 404, 'a plain read of a stale entry is a miss')
  t.type(miss.json().lease, 'string', 'and carries a lease to refresh it')
  const stale = await get(app, 'dash:u1:0', '?allowStale=true')
  t.equal(stale.statusCode, 200)
  t.equal(stale.json().stale, true)
  t.same(stale.json().value, { user: 'u1', i: 0 })
  t.equal((await get(app, 'dash:u2:0')).json().stale, false)
  // Writing a fresh value clears the mark.
  await put(app, 'dash:u1:0', { value: 'fresh', userId: 'u1' })
  t.equal((await get(app, 'dash:u1:0')).json().stale, false)
  // A later delete-mode invalidation still removes stale entries.
  t.equal((await invalidate(app, { userIds: ['u1'] })).json().invalidated, 5)
})

t.test('the shorthands and POST take the same modes', async (t) => {
  const app = await build(t)
  await seed(app)
  t.match((await invalidate(app, { tags: ['config'], mode: 'stale', reason: 'test' })).json(), { invalidated: 1, mode: 'stale' })
  t.match((await call(app, { method: 'DELETE', url: '/v1/tags/config/entries?mode=delete', key: 'invalidate' })).json(), {
    invalidated: 1,
    mode: 'delete',
  })
})

t.test('a null field of a selector counts as absent, as in a write', async (t) => {
  const app = await build(t)
  await seed(app)
  const res = await invalidate(app, { keys: ['global:config'], userIds: null, tags: null, prefixes: null, mode: null, reason: null })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { invalidated: 1, mode: 'delete' })
  t.equal((await present(app)).length, 15, 'only the named key went')
})

t.test('user ids and tags with reserved URL characters work in the shorthands', async (t) => {
  const app = await build(t)
  await put(app, 'k1', { value: 1, userId: 'org/42:alice@example.com', tags: ['a b/c'] })
  await put(app, 'k2', { value: 2, userId: 'org/42:alice@example.com' })
  const res = await call(app, { method: 'DELETE', url: `/v1/tags/${encodeURIComponent('a b/c')}/entries`, key: 'invalidate' })
  t.equal(res.json().invalidated, 1)
  const res2 = await call(app, { method: 'DELETE', url: `/v1/users/${encodeURIComponent('org/42:alice@example.com')}/entries`, key: 'invalidate' })
  t.equal(res2.json().invalidated, 1)
})

t.test('invalid selectors are 400 invalid_request naming the field', async (t) => {
  const app = await build(t)
  const cases: Array<[object, RegExp]> = [
    [{}, /at least one/],
    [{ keys: [] }, /at least one/],
    [{ prefixes: [''] }, /prefixes\[0\]/],
    [{ prefixes: null }, /at least one/], // null is absent: it never matches everything
    [{ prefixes: [null] }, /prefixes\.0 must be string/],
    [{ userIds: ['x'.repeat(129)] }, /userIds\[0\]/],
    [{ tags: [5] }, /tags/],
    [{ keys: Array.from({ length: 1001 }, (_, i) => `k${i}`) }, /keys/],
    [{ keys: ['a'], mode: 'explode' }, /mode/],
    [{ keys: ['bad\u0000key'] }, /keys\[0\]/],
  ]
  for (const [payload, message] of cases) {
    const res = await invalidate(app, payload)
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 60))
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, message)
  }
})

t.test('the invalidation log records every invalidation, newest first', async (t) => {
  const app = await build(t)
  await seed(app)
  await invalidate(app, { userIds: ['u1'], reason: 'persona updated' })
  await call(app, { method: 'DELETE', url: '/v1/tags/odd/entries', key: 'invalidate' })
  const res = await call(app, { method: 'GET', url: '/v1/debug/invalidations?limit=10' })
  t.equal(res.statusCode, 200)
  const log = res.json()
  t.ok(Array.isArray(log), "the log is a JSON array, newest first")
  t.equal(log.length, 2)
  t.match(log[0], { selector: { tags: ['odd'] }, mode: 'delete', source: 'api', invalidated: 4, actor: 'invalidator' })
  t.match(log[1], { selector: { userIds: ['u1'] }, invalidated: 5, reason: 'persona updated' })
  t.type(log[0].at, 'string')
  t.type(log[0].durationMs, 'number')
  t.equal((await call(app, { method: 'GET', url: '/v1/debug/invalidations?limit=1' })).json().length, 1)
})
