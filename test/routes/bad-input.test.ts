import { request } from 'node:http'
import { gzipSync } from 'node:zlib'
import t from 'tap'
import { buildApp } from '../../src/app.js'
import { TEST_API_KEYS, build, call } from '../helpers/build.js'
import { serve } from '../helpers/serve.js'

// Every bad input the contract names gets its 4xx and code, never a 5xx.

type Case = {
  name: string
  method: 'GET' | 'PUT' | 'POST' | 'DELETE'
  url: string
  payload?: unknown
  headers?: Record<string, string>
  status: number
  error: string
  message?: RegExp
}

const deep = (n: number) => JSON.parse('{"a":'.repeat(n) + '1' + '}'.repeat(n))

const cases: Case[] = [
  { name: 'value missing', method: 'PUT', url: '/v1/entries/k', payload: { ttlMs: 5 }, status: 400, error: 'invalid_request', message: /value/ },
  { name: 'ttlMs a string', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, ttlMs: '100' }, status: 400, error: 'invalid_request', message: /ttlMs/ },
  { name: 'ttlMs zero', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, ttlMs: 0 }, status: 400, error: 'invalid_request', message: /ttlMs/ },
  { name: 'ttlMs over 30 days', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, ttlMs: 30 * 86_400_000 + 1 }, status: 400, error: 'invalid_request', message: /ttlMs/ },
  { name: 'ttlMs fractional', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, ttlMs: 1.5 }, status: 400, error: 'invalid_request', message: /ttlMs/ },
  { name: 'userId a number', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, userId: 42 }, status: 400, error: 'invalid_request', message: /userId/ },
  { name: 'userId empty', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, userId: '' }, status: 400, error: 'invalid_request', message: /userId/ },
  { name: 'userId over 128 bytes', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, userId: 'é'.repeat(65) }, status: 400, error: 'invalid_request', message: /userId/ },
  { name: 'tags not an array', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, tags: 'a' }, status: 400, error: 'invalid_request', message: /tags/ },
  { name: 'too many tags', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, tags: Array.from({ length: 33 }, (_, i) => `t${i}`) }, status: 400, error: 'invalid_request', message: /tags/ },
  { name: 'a tag over 128 bytes', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, tags: ['x'.repeat(129)] }, status: 400, error: 'invalid_request', message: /tags\[0\]/ },
  { name: 'an empty tag', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, tags: [''] }, status: 400, error: 'invalid_request', message: /tags\[0\]/ },
  { name: 'a number JSON.parse reads as Infinity', method: 'PUT', url: '/v1/entries/k', payload: '{"value":{"n":[1e400]}}', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request', message: /value/ },
  { name: 'a negative one', method: 'PUT', url: '/v1/entries/k', payload: '{"value":-1e400}', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request', message: /value/ },
  { name: 'value nested 65 deep', method: 'PUT', url: '/v1/entries/k', payload: { value: deep(65) }, status: 400, error: 'invalid_request', message: /value/ },
  { name: 'key over 512 bytes', method: 'PUT', url: `/v1/entries/${'k'.repeat(513)}`, payload: { value: 1 }, status: 400, error: 'invalid_request', message: /key/ },
  { name: 'key with a control character', method: 'PUT', url: '/v1/entries/a%00b', payload: { value: 1 }, status: 400, error: 'invalid_request', message: /key/ },
  { name: 'key with a newline', method: 'GET', url: '/v1/entries/a%0Ab', status: 400, error: 'invalid_request', message: /key/ },
  { name: 'key with broken percent-encoding', method: 'GET', url: '/v1/entries/a%zz', status: 400, error: 'invalid_request' },
  { name: 'key with a lone surrogate', method: 'GET', url: '/v1/entries/a%ED%A0%80', status: 400, error: 'invalid_request' },
  { name: 'body not JSON', method: 'PUT', url: '/v1/entries/k', payload: '{"value": ', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request' },
  { name: 'stats reset body not JSON', method: 'POST', url: '/v1/stats/reset', payload: '{', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request' },
  { name: 'body not an object', method: 'PUT', url: '/v1/entries/k', payload: '[1,2]', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request' },
  { name: 'body with __proto__', method: 'PUT', url: '/v1/entries/k', payload: '{"value":{"__proto__":{"admin":true}}}', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request' },
  { name: 'an empty JSON body on a PUT', method: 'PUT', url: '/v1/entries/k', payload: '', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request', message: /body/ },
  { name: 'an empty JSON body on batch-get', method: 'POST', url: '/v1/entries/batch-get', payload: '', headers: { 'content-type': 'application/json' }, status: 400, error: 'invalid_request', message: /body/ },
  { name: 'wrong content type', method: 'PUT', url: '/v1/entries/k', payload: 'value=1', headers: { 'content-type': 'text/plain' }, status: 400, error: 'invalid_request', message: /must be application\/json/ },
  { name: 'JSON sent as text/plain', method: 'PUT', url: '/v1/entries/k', payload: '{"value":1}', headers: { 'content-type': 'text/plain' }, status: 400, error: 'invalid_request', message: /must be application\/json/ },
  { name: 'a malformed lease', method: 'PUT', url: '/v1/entries/k', payload: { value: 1, lease: 'not-a-lease' }, status: 400, error: 'invalid_request', message: /lease/ },
  { name: 'allowStale not a boolean', method: 'GET', url: '/v1/entries/k?allowStale=maybe', status: 400, error: 'invalid_request', message: /allowStale/ },
  { name: 'batch-get over 1000 keys', method: 'POST', url: '/v1/entries/batch-get', payload: { keys: Array.from({ length: 1001 }, (_, i) => `k${i}`) }, status: 400, error: 'invalid_request', message: /keys/ },
  { name: 'batch-get keys missing', method: 'POST', url: '/v1/entries/batch-get', payload: {}, status: 400, error: 'invalid_request', message: /keys/ },
  { name: 'batch-get a bad key', method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['ok', ''] }, status: 400, error: 'invalid_request', message: /keys\[1\]/ },
  { name: 'batch-set over 1000 entries', method: 'POST', url: '/v1/entries/batch-set', payload: { entries: Array.from({ length: 1001 }, (_, i) => ({ key: `k${i}`, value: i })) }, status: 400, error: 'invalid_request', message: /entries/ },
  { name: 'a user id over 128 bytes on the shorthand', method: 'DELETE', url: `/v1/users/${'u'.repeat(129)}/entries`, status: 400, error: 'invalid_request', message: /^userId is longer/ },
  { name: 'a tag with a control character on the shorthand', method: 'DELETE', url: '/v1/tags/a%01b/entries', status: 400, error: 'invalid_request', message: /^tag must not contain/ },
  { name: 'a key over 512 bytes on DELETE', method: 'DELETE', url: `/v1/entries/${'k'.repeat(513)}`, status: 400, error: 'invalid_request', message: /^key is longer/ },
  { name: 'mode unknown on a shorthand', method: 'DELETE', url: '/v1/users/u/entries?mode=purge', status: 400, error: 'invalid_request', message: /mode/ },
  { name: 'limit out of range', method: 'GET', url: '/v1/debug/invalidations?limit=0', status: 400, error: 'invalid_request', message: /limit/ },
  { name: 'unknown route', method: 'GET', url: '/v1/nothing', status: 404, error: 'not_found' },
  { name: 'empty key', method: 'GET', url: '/v1/entries/', status: 400, error: 'invalid_request', message: /key/ },
  { name: 'debug entry missing', method: 'GET', url: '/v1/debug/entries/none', status: 404, error: 'not_found' },
  { name: 'an unknown route with a long path', method: 'GET', url: `/v1/${'p'.repeat(5000)}`, status: 404, error: 'not_found', message: /^no route GET \/v1\/p{196}…$/ },
  { name: 'a docs file not there', method: 'GET', url: '/docs/static/nothing.js', status: 404, error: 'not_found' },
]

t.test('every bad input gets its 4xx code and the error shape', async (t) => {
  const app = await build(t)
  for (const c of cases) {
    const res = await call(app, {
      method: c.method,
      url: c.url,
      headers: c.headers,
      ...(c.payload === undefined ? {} : { payload: c.payload as string }),
    })
    t.equal(res.statusCode, c.status, `${c.name}: status (${res.body.slice(0, 120)})`)
    const body = res.json()
    t.equal(body.error, c.error, `${c.name}: code`)
    t.type(body.message, 'string', `${c.name}: message`)
    if (c.message) t.match(body.message, c.message, `${c.name}: message names the field`)
  }
})

t.test('a value outside an enumeration is named with the values allowed', async (t) => {
  const app = await build(t)
  const cases: Array<[Parameters<typeof call>[1], string]> = [
    [{ method: 'POST', url: '/v1/invalidations', payload: { keys: ['a'], mode: 'soft' } }, 'body.mode must be one of "delete", "stale"'],
    [{ method: 'DELETE', url: '/v1/users/u/entries?mode=soft' }, 'querystring.mode must be one of "delete", "stale"'],
    [{ method: 'POST', url: '/v1/consistency', payload: { against: 'truth' } }, 'body.against must be one of "provided", "origin"'],
  ]
  for (const [request, message] of cases) {
    const res = await call(app, request)
    t.equal(res.statusCode, 400)
    t.same(res.json(), { error: 'invalid_request', message })
  }
})

t.test('a body that is not UTF-8 is a 400, never read as U+FFFD (which would make different ids one)', async (t) => {
  const app = await build(t)
  const raw = (text: string) => Buffer.from(text, 'latin1') // each char one byte, \xff and all
  const json = { 'content-type': 'application/json' }
  await call(app, { method: 'PUT', url: '/v1/entries/k', payload: { value: 1, userId: 'u\uFFFD' } })
  for (const [url, body] of [
    ['/v1/entries/k2', '{"value":1,"userId":"u\xfe"}'],
    ['/v1/entries/batch-set', '{"entries":[{"key":"k\xff","value":1}]}'],
    ['/v1/invalidations', '{"userIds":["u\xc0"]}'],
    ['/v1/entries/batch-get', '{"keys":["\xed\xa0\x80"]}'], // an encoded surrogate
  ] as const) {
    const method = url === '/v1/entries/k2' ? 'PUT' : 'POST'
    const res = await call(app, { method, url, payload: raw(body), headers: json })
    t.equal(res.statusCode, 400, url)
    t.same(res.json(), { error: 'invalid_request', message: 'the body is not valid UTF-8' })
  }
  t.equal((await call(app, { method: 'GET', url: '/v1/entries/k' })).statusCode, 200, "the U+FFFD user's entry was not invalidated")
  const ok = await call(app, { method: 'PUT', url: '/v1/entries/k3', payload: Buffer.from('{"value":"\u00e9t\u00e9 \u{1F600}"}', 'utf8'), headers: json })
  t.equal(ok.statusCode, 200, 'well-formed UTF-8, multi-byte and all, is read as sent')
  t.equal((await call(app, { method: 'GET', url: '/v1/entries/k3' })).json().value, 'été 😀')
})

t.test('a compressed body is a 400 that says bodies are sent uncompressed', async (t) => {
  const app = await build(t)
  const res = await call(app, {
    method: 'PUT',
    url: '/v1/entries/k',
    payload: gzipSync(JSON.stringify({ value: 1 })),
    headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
  })
  t.equal(res.statusCode, 400)
  t.same(res.json(), { error: 'invalid_request', message: 'the body must be sent uncompressed (Content-Encoding gzip is not supported)' })
  // The header decides, not the bytes: a plain JSON body that says it is gzipped is refused too.
  const claimed = await call(app, {
    method: 'PUT',
    url: '/v1/entries/k',
    payload: JSON.stringify({ value: 1 }),
    headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
  })
  t.equal(claimed.statusCode, 400)
  t.same(claimed.json(), { error: 'invalid_request', message: 'the body must be sent uncompressed (Content-Encoding gzip is not supported)' })
  t.equal((await call(app, { method: 'GET', url: '/v1/entries/k' })).statusCode, 404, 'and nothing was written')
  const identity = await call(app, {
    method: 'PUT',
    url: '/v1/entries/k',
    payload: JSON.stringify({ value: 1 }),
    headers: { 'content-type': 'application/json', 'content-encoding': 'identity' },
  })
  t.equal(identity.statusCode, 200, 'identity is no encoding')
  const plain = await call(app, { method: 'PUT', url: '/v1/entries/k', payload: '{"value":', headers: { 'content-type': 'application/json' } })
  t.match(plain.json().message, /not valid JSON/, 'without the header, bad JSON is still called bad JSON')
})

t.test('a key of exactly 512 bytes and a value 64 deep are accepted', async (t) => {
  const app = await build(t)
  const key = 'é'.repeat(256) // 512 bytes of UTF-8
  t.equal((await call(app, { method: 'PUT', url: `/v1/entries/${encodeURIComponent(key)}`, payload: { value: deep(63) } })).statusCode, 200)
  t.equal((await call(app, { method: 'GET', url: `/v1/entries/${encodeURIComponent(key)}` })).statusCode, 200)
})

t.test('routes without a body take an empty one sent as JSON or text (clients that always send the header)', async (t) => {
  const app = await build(t)
  // text/plain too: what fetch sends for `body: ''`.
  for (const type of ['application/json', 'text/plain;charset=UTF-8']) {
    await call(app, { method: 'PUT', url: '/v1/entries/k', payload: { value: 1, userId: 'u' } })
    for (const [method, url] of [
      ['GET', '/v1/entries/k'],
      ['DELETE', '/v1/entries/k'],
      ['DELETE', '/v1/users/u/entries'],
      ['DELETE', '/v1/tags/t/entries'],
      ['POST', '/v1/stats/reset'],
      ['GET', '/v1/stats'],
    ] as const) {
      const res = await call(app, { method, url, headers: { 'content-type': type }, payload: '' })
      t.equal(res.statusCode, 200, `${method} ${url}, ${type} (${res.body.slice(0, 100)})`)
    }
  }
})

t.test('an error never leaks a stack trace', async (t) => {
  const app = await buildApp({ apiKeys: TEST_API_KEYS })
  t.teardown(() => app.close())
  app.get('/boom', { config: { scope: 'read' } }, async () => {
    throw new Error('secret internals at /src/x.ts:1')
  })
  const res = await call(app, { method: 'GET', url: '/boom' })
  t.equal(res.statusCode, 500)
  t.same(res.json(), { error: 'internal_error', message: 'an internal error occurred; it has been logged' })
})

t.test("a docs path that climbs out of the static folder is 403 forbidden, in the contract's shape", async (t) => {
  const { url } = await serve(t)
  // Sent as is: fetch and inject would resolve the dots before the server saw them.
  const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const path = '/docs/static/%2e%2e/%2e%2e/package.json'
    const req = request({ host: '127.0.0.1', port: Number(new URL(url).port), path }, (res) => {
      let body = ''
      res.setEncoding('utf8').on('data', (chunk: string) => (body += chunk)).on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject).end()
  })
  t.equal(res.status, 403)
  t.same(JSON.parse(res.body), { error: 'forbidden', message: 'the path leaves the folder the docs are served from' })
  t.notMatch(res.body, /cachewarden|"version"/, 'no file from outside the folder')
})
