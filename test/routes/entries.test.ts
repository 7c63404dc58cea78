import t from 'tap'
import { BATCH_ITEM_FIELDS } from '../../src/cache/cache-service.js'
import { WriteBody } from '../../src/schemas/entries.js'
import { FakeClock, build, call, get, put } from '../helpers/build.js'

t.test('a written entry reads back with its metadata and ETag', async (t) => {
  const app = await build(t)
  const written = await put(app, 'dashboard:42', { value: { widgets: [1, 2] }, userId: '42', tags: ['analytics:42'], ttlMs: 60_000 })
  t.equal(written.key, 'dashboard:42')
  t.match(written.etag, /^[\w-]+$/)
  const res = await get(app, 'dashboard:42')
  t.equal(res.statusCode, 200)
  t.equal(res.headers.etag, `"${written.etag}"`)
  t.match(res.headers['content-type'], /application\/json/)
  const body = res.json()
  t.same(body.value, { widgets: [1, 2] })
  t.equal(body.userId, '42')
  t.same(body.tags, ['analytics:42'])
  t.equal(body.etag, written.etag)
  t.equal(body.stale, false)
  t.equal(body.expiresAt, written.expiresAt)
  t.ok(body.ttlRemainingMs > 59_000 && body.ttlRemainingMs <= 60_000)
})

t.test('keys with colons, slashes, spaces and non-ASCII round-trip', async (t) => {
  const app = await build(t)
  const keys = ['a:b:c', 'path/to/thing', 'with space', 'ünïcødé', '键/🔑', 'q?x=1&y=2', 'hash#frag', 'pct%20', '...', 'a/../b', '/leading', 'trailing/']
  for (const [i, key] of keys.entries()) await put(app, key, { value: i })
  for (const [i, key] of keys.entries()) {
    const res = await get(app, key)
    t.equal(res.statusCode, 200, key)
    t.equal(res.json().key, key)
    t.equal(res.json().value, i)
  }
})

t.test('any JSON value round-trips exactly', async (t) => {
  const app = await build(t)
  const values = [null, 0, -1.5, 'text', '', true, [], {}, [1, [2, [3]]], { nested: { a: 'ü', b: null } }]
  for (const [i, value] of values.entries()) {
    await put(app, `v${i}`, { value })
    t.same((await get(app, `v${i}`)).json().value, value, JSON.stringify(value))
  }
})

t.test('a miss is 404 not_found with a lease', async (t) => {
  const app = await build(t)
  const res = await get(app, 'nothing-here')
  t.equal(res.statusCode, 404)
  const body = res.json()
  t.equal(body.error, 'not_found')
  t.type(body.message, 'string')
  t.type(body.lease, 'string')
  t.equal(body.fill, true)
})

t.test('HEAD looks without side effects: no hit or miss counted, no lease taken', async (t) => {
  const app = await build(t)
  const head = (key: string, query = '', headers: Record<string, string> = {}) =>
    call(app, { method: 'HEAD', url: `/v1/entries/${encodeURIComponent(key)}${query}`, headers })
  const missing = await head('nothing-here')
  t.equal(missing.statusCode, 404)
  t.equal(missing.body, '', 'no body')
  t.equal((await get(app, 'nothing-here')).json().fill, true, 'the first GET miss still gets the fill lease')

  const { etag } = await put(app, 'k', { value: { a: 1 } })
  const before = { ...app.cache.totals }
  const hit = await head('k')
  t.equal(hit.statusCode, 200)
  t.equal(hit.headers.etag, `"${etag}"`)
  t.equal(hit.body, '')
  t.equal((await head('k', '', { 'if-none-match': `"${etag}"` })).statusCode, 304)
  t.equal((await head('other-missing')).statusCode, 404)
  t.equal(app.cache.totals.hits, before.hits, 'no hit counted')
  t.equal(app.cache.totals.misses, before.misses, 'no miss counted')
  t.equal(app.cache.totals.leasesIssued, before.leasesIssued, 'no lease issued')

  await call(app, { method: 'DELETE', url: '/v1/entries/k?mode=stale', key: 'invalidate' })
  t.equal((await head('k')).statusCode, 404, 'a stale entry is a miss')
  t.equal((await head('k', '?allowStale=true')).statusCode, 200, 'unless stale is allowed')
  t.equal((await head('\u0001')).statusCode, 400, 'a bad key is still a 400')
})

t.test('overwriting replaces the value, user and tags', async (t) => {
  const app = await build(t)
  await put(app, 'k', { value: 1, userId: 'u1', tags: ['a'] })
  await put(app, 'k', { value: 2, userId: 'u2', tags: ['b'] })
  const body = (await get(app, 'k')).json()
  t.equal(body.value, 2)
  t.equal(body.userId, 'u2')
  t.same(body.tags, ['b'])
  // The old user and tag no longer reach it.
  t.equal((await call(app, { method: 'DELETE', url: '/v1/users/u1/entries' })).json().invalidated, 0)
  t.equal((await call(app, { method: 'DELETE', url: '/v1/tags/a/entries' })).json().invalidated, 0)
  t.equal((await call(app, { method: 'DELETE', url: '/v1/users/u2/entries' })).json().invalidated, 1)
})

t.test('DELETE invalidates one key and reports it', async (t) => {
  const app = await build(t)
  await put(app, 'k', { value: 1 })
  const res = await call(app, { method: 'DELETE', url: '/v1/entries/k', key: 'invalidate' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { invalidated: 1, mode: 'delete' })
  t.type(res.json().id, 'string')
  t.type(res.json().durationMs, 'number')
  t.equal((await get(app, 'k')).statusCode, 404)
  t.equal((await call(app, { method: 'DELETE', url: '/v1/entries/k' })).json().invalidated, 0)
})

t.test('TTL expiry with a fake clock', async (t) => {
  const clock = new FakeClock()
  const app = await build(t, {}, { now: clock.now })
  await put(app, 'short', { value: 1, ttlMs: 1000, userId: 'u' })
  await put(app, 'default', { value: 2 })
  clock.advance(999)
  t.equal((await get(app, 'short')).json().ttlRemainingMs, 1)
  clock.advance(1)
  t.equal((await get(app, 'short')).statusCode, 404)
  t.equal((await get(app, 'default')).statusCode, 200)
  clock.advance(300_000 - 1000)
  t.equal((await get(app, 'default')).statusCode, 404, 'the default TTL is 300000 ms')
  const debug = (await call(app, { method: 'GET', url: '/v1/debug/users/u' })).json()
  t.equal(debug.count, 0, 'the user index forgot the expired entry')
})

t.test('batch-get answers in the order asked, each repeated key once', async (t) => {
  const app = await build(t)
  const keys = Array.from({ length: 200 }, (_, i) => `k${(i * 37) % 150}`)
  for (let i = 0; i < 150; i += 3) await put(app, `k${i}`, { value: i })
  const res = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys }, key: 'read' })
  const body = res.json()
  const firsts = [...new Set(keys)]
  t.same(Object.keys(body.entries), firsts.filter((k) => Number(k.slice(1)) % 3 === 0))
  t.same(body.missing, firsts.filter((k) => Number(k.slice(1)) % 3 !== 0))
  t.equal(Object.keys(body.leases).length, 100, 'one lease per missing key')
  t.equal(Object.values(body.leases).filter((l) => (l as { fill: boolean }).fill).length, 100, 'each the fill lease of its key')
})

t.test('batch-get returns hits, misses and a lease per miss', async (t) => {
  const app = await build(t)
  await put(app, 'a', { value: 'A' })
  await put(app, 'b/c', { value: 'B' })
  const res = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['a', 'b/c', 'x', 'y'] }, key: 'read' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.same(Object.keys(body.entries).sort(), ['a', 'b/c'])
  t.equal(body.entries.a.value, 'A')
  t.equal(body.entries['b/c'].value, 'B')
  t.same(body.missing.sort(), ['x', 'y'])
  t.type(body.leases.x.lease, 'string')
  t.equal(body.leases.x.fill, true)
})

t.test('batch-set writes the good entries and reports the bad one alone', async (t) => {
  const app = await build(t)
  const res = await call(app, {
    method: 'POST',
    url: '/v1/entries/batch-set',
    key: 'write',
    payload: {
      entries: [
        { key: 'ok1', value: 1, userId: 'u' },
        { key: 'bad', value: 2, ttlMs: -5 },
        { key: 'ok2', value: 3, tags: ['t'] },
        { value: 4 },
        { key: 'deep', value: JSON.parse('['.repeat(70) + ']'.repeat(70)) },
        { key: 'nothing' },
      ],
    },
  })
  t.equal(res.statusCode, 200)
  const results = res.json().results
  t.equal(results.length, 6)
  t.match(results[0], { key: 'ok1', status: 200 })
  t.type(results[0].etag, 'string')
  t.match(results[1], { key: 'bad', status: 400, error: 'invalid_request' })
  t.match(results[1].message, /ttlMs/)
  t.match(results[2], { key: 'ok2', status: 200 })
  t.match(results[3], { status: 400, error: 'invalid_request' })
  t.match(results[4], { key: 'deep', status: 400, error: 'invalid_request' })
  t.match(results[5], { key: 'nothing', status: 400, error: 'invalid_request' })
  t.equal((await get(app, 'ok1')).statusCode, 200)
  t.equal((await get(app, 'ok2')).statusCode, 200)
  t.equal((await get(app, 'bad')).statusCode, 404)
})

t.test('an entry larger than the whole cache (CACHE_MAX_BYTES) is 413 value_too_large, and the old one stays', async (t) => {
  const app = await build(t, { maxBytes: 4096 })
  await put(app, 'big', { value: 'small', userId: 'u' })
  const res = await call(app, { method: 'PUT', url: '/v1/entries/big', payload: { value: 'x'.repeat(5000), userId: 'u' } })
  t.equal(res.statusCode, 413)
  t.equal(res.json().error, 'value_too_large')
  t.match(res.json().message, /CACHE_MAX_BYTES 4096/)
  t.equal((await get(app, 'big')).json().value, 'small', 'nothing acknowledged, nothing lost')
  const batch = await call(app, {
    method: 'POST',
    url: '/v1/entries/batch-set',
    payload: { entries: [{ key: 'b1', value: 'x'.repeat(5000) }, { key: 'b2', value: 1 }] },
  })
  t.match(batch.json().results, [{ key: 'b1', status: 413, error: 'value_too_large' }, { key: 'b2', status: 200 }])
})

t.test('a value over the size limit is 413 value_too_large', async (t) => {
  const app = await build(t)
  const res = await call(app, { method: 'PUT', url: '/v1/entries/big', payload: { value: 'x'.repeat(1024 * 1024) } })
  t.equal(res.statusCode, 413)
  t.equal(res.json().error, 'value_too_large')
  const small = await build(t, { limits: { ...app.cache.limits, maxValueBytes: 100 } })
  const res2 = await call(small, { method: 'PUT', url: '/v1/entries/big', payload: { value: 'x'.repeat(200) } })
  t.equal(res2.statusCode, 413)
  t.equal(res2.json().error, 'value_too_large')
})

t.test('a body over the body limit is 413 payload_too_large', async (t) => {
  const app = await build(t, { bodyLimitBytes: 1024 })
  const res = await call(app, {
    method: 'PUT',
    url: '/v1/entries/big',
    payload: JSON.stringify({ value: 'x'.repeat(5000) }),
    headers: { 'content-type': 'application/json' },
  })
  t.equal(res.statusCode, 413)
  t.equal(res.json().error, 'payload_too_large')
})

t.test('a field a body does not have is a 400 naming it, not dropped without a word', async (t) => {
  const app = await build(t)
  // A misspelt userId would leave the entry out of its user's invalidations.
  const write = (payload: Record<string, unknown>) => call(app, { method: 'PUT', url: '/v1/entries/k', payload })
  const typo = await write({ value: 1, userid: '42' })
  t.equal(typo.statusCode, 400)
  t.same(typo.json(), { error: 'invalid_request', message: 'body.userid is not allowed' })
  // `origin` names the origin that loaded an entry: a client cannot claim one.
  t.same((await write({ value: 1, origin: 'dashboards' })).json(), { error: 'invalid_request', message: 'body.origin is not allowed' })
  t.equal((await get(app, 'k')).statusCode, 404, 'nothing was written')

  const batch = await call(app, {
    method: 'POST',
    url: '/v1/entries/batch-set',
    payload: { entries: [{ key: 'a', value: 1, userid: '42' }, { key: 'b', value: 2, origin: 'o' }, { key: 'c', value: 3, userId: '42' }] },
  })
  t.match(batch.json().results, [
    { key: 'a', status: 400, error: 'invalid_request', message: 'entries[0].userid is not allowed' },
    { key: 'b', status: 400, error: 'invalid_request', message: 'entries[1].origin is not allowed' },
    { key: 'c', status: 200 },
  ])
  t.equal((await get(app, 'a')).statusCode, 404)

  const bodies: Array<[string, Record<string, unknown>, string]> = [
    ['/v1/entries/batch-set', { entries: [], mode: 'x' }, 'body.mode is not allowed'],
    ['/v1/entries/batch-get', { keys: ['c'], allowStale: true }, 'body.allowStale is not allowed'],
    ['/v1/invalidations', { keys: ['c'], userids: ['42'] }, 'body.userids is not allowed'],
    ['/v1/warm', { keys: ['c'], userID: ['42'] }, 'body.userID is not allowed'],
    ['/v1/consistency', { against: 'provided', entries: [{ key: 'c', value: 3 }], repiar: 'invalidate' }, 'body.repiar is not allowed'],
  ]
  for (const [url, payload, message] of bodies) {
    const res = await call(app, { method: 'POST', url, payload })
    t.equal(res.statusCode, 400, url)
    t.same(res.json(), { error: 'invalid_request', message }, url)
  }
  t.equal((await get(app, 'c')).statusCode, 200, 'the invalidation with a misspelt list invalidated nothing')

  // Query strings too: a misspelt mode must not delete what was to be marked stale.
  const queries: Array<[string, string, string]> = [
    ['DELETE', '/v1/users/42/entries?Mode=stale', 'querystring.Mode is not allowed'],
    ['DELETE', '/v1/tags/t/entries?mdoe=stale', 'querystring.mdoe is not allowed'],
    ['DELETE', '/v1/entries/c?mode=stale&reason=x', 'querystring.reason is not allowed'],
    ['GET', '/v1/entries/c?allowstale=true', 'querystring.allowstale is not allowed'],
    ['HEAD', '/v1/entries/c?allowstale=true', ''],
    ['POST', '/v1/entries/batch-get?allowstale=true', 'querystring.allowstale is not allowed'],
    ['GET', '/v1/debug/invalidations?limt=5', 'querystring.limt is not allowed'],
  ]
  for (const [method, url, message] of queries) {
    const res = await call(app, { method: method as 'GET', url, payload: method === 'POST' ? { keys: ['c'] } : undefined })
    t.equal(res.statusCode, 400, `${method} ${url}`)
    if (message) t.same(res.json(), { error: 'invalid_request', message }, url)
  }
  t.match((await get(app, 'c')).json(), { value: 3, stale: false }, 'still there, not stale')

  // Routes that take no query parameter refuse any: the mode of POST /v1/invalidations is in its body.
  const none: Array<[string, string, Record<string, unknown> | undefined]> = [
    ['POST', '/v1/invalidations?mode=stale', { keys: ['c'] }],
    ['PUT', '/v1/entries/c?ttlMs=5', { value: 4 }],
    ['POST', '/v1/entries/batch-set?x=1', { entries: [{ key: 'c', value: 5 }] }],
    ['GET', '/v1/stats?verbose=1', undefined],
    ['GET', '/v1/debug/entries/c?allowStale=true', undefined],
  ]
  for (const [method, url, payload] of none) {
    const res = await call(app, { method: method as 'GET', url, payload })
    t.equal(res.statusCode, 400, `${method} ${url}`)
    t.match(res.json(), { error: 'invalid_request', message: /^querystring\.\w+ is not allowed$/ }, url)
  }
  t.match((await get(app, 'c')).json(), { value: 3, stale: false }, 'none of them wrote or invalidated')
  // The stream is left open to what EventSource polyfills add.
  const stream = await call(app, { method: 'HEAD', url: '/v1/invalidations/stream?lastEventId=1' })
  t.equal(stream.statusCode, 200)

  // A route that takes no body refuses one with fields in it: a mode sent there must not delete.
  const bodiless: Array<[string, string, unknown, string]> = [
    ['DELETE', '/v1/entries/c', { mode: 'stale' }, 'body.mode is not allowed (a DELETE takes its options in the query string)'],
    ['DELETE', '/v1/users/42/entries', { mode: 'stale' }, 'body.mode is not allowed (a DELETE takes its options in the query string)'],
    ['DELETE', '/v1/tags/t/entries?mode=stale', { reason: 'x' }, 'body.reason is not allowed (a DELETE takes its options in the query string)'],
    ['DELETE', '/v1/entries/c', ['stale'], 'DELETE /v1/entries/:key takes no body'],
    ['POST', '/v1/stats/reset', { all: true }, 'body.all is not allowed'],
  ]
  for (const [method, url, payload, message] of bodiless) {
    const res = await call(app, { method: method as 'DELETE', url, payload: payload as object })
    t.equal(res.statusCode, 400, `${method} ${url}`)
    t.same(res.json(), { error: 'invalid_request', message }, `${method} ${url}`)
  }
  // JSON null is a body too.
  const nullBody = await call(app, { method: 'DELETE', url: '/v1/entries/c', payload: 'null', headers: { 'content-type': 'application/json' } })
  t.same([nullBody.statusCode, nullBody.json()], [400, { error: 'invalid_request', message: 'DELETE /v1/entries/:key takes no body' }], 'a JSON null body')
  t.match((await get(app, 'c')).json(), { value: 3, stale: false }, 'none of them invalidated')
  // An empty object, or no body, is no option at all.
  t.equal((await call(app, { method: 'DELETE', url: '/v1/entries/c?mode=stale', payload: {} })).statusCode, 200)
  t.equal((await get(app, 'c', '?allowStale=true')).json().stale, true)
  // Fastify never reads a GET's body: the entry read, the hot path, carries no hook for it.
  const blocks: string[] = [] // a route's line, then its hooks' lines (•)
  for (const line of app.printRoutes({ commonPrefix: false, includeHooks: true }).split('\n')) {
    if (line.includes('•')) blocks[blocks.length - 1] += `\n${line}`
    else blocks.push(line)
  }
  const hooks = (route: string) => blocks.find((b) => b.split('\n')[0]!.includes(route)) ?? ''
  t.match(hooks('/v1/entries/:key (GET'), /onRequest/, 'the GET route and its hooks are listed')
  t.notMatch(hooks('/v1/entries/:key (GET'), /refuseBody/)
  t.match(hooks('/v1/entries/:key (DELETE'), /refuseBody/)
})

t.test("batch-set items take exactly the PUT body's fields plus key (the core keeps its own list)", async (t) => {
  t.same([...BATCH_ITEM_FIELDS].sort(), [...Object.keys(WriteBody.properties), 'key'].sort())
})
