import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { request as httpRequest } from 'node:http'
import { connect, type Socket } from 'node:net'
import t, { type Test } from 'tap'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import { buildApp } from '../../src/app.js'
import { KEYS, TEST_API_KEYS, build, call, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'

const MiB = 1024 * 1024
const nest = (depth: number): unknown => (depth <= 1 ? [] : [nest(depth - 1)])
const putKey = (key: string) => `/v1/entries/${encodeURIComponent(key)}`

/**
 * Writes `bytes` on a new connection and resolves with everything that comes back once the
 * server closes the connection (or ends its side). `onFirstData` runs as the reply starts.
 * With `keepOpen`, this side is never closed (the socket goes into the list, to destroy at
 * teardown): what closes the connection is then the server alone.
 */
function exchange(port: number, bytes: string, options: { onFirstData?: (socket: Socket) => void; keepOpen?: Socket[] } = {}) {
  return new Promise<string>((resolve) => {
    let out = ''
    const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => socket.write(bytes))
    options.keepOpen?.push(socket)
    socket.setTimeout(20_000, () => socket.destroy())
    socket.on('data', (d) => {
      if (out === '') options.onFirstData?.(socket)
      out += d.toString('latin1')
    })
    socket.on('end', () => {
      if (options.keepOpen === undefined) socket.end()
      resolve(out)
    })
    socket.on('close', () => resolve(out))
    socket.on('error', () => resolve(out))
  })
}

t.test('bodies over the body limit are 413 payload_too_large on every route that takes one, as documented', async (t) => {
  const app = await build(t)
  // Every POST and PUT in the OpenAPI document, so a new route cannot be left out.
  const doc = (await app.inject({ method: 'GET', url: '/docs/json' })).json() as {
    paths: Record<string, Record<string, { responses: Record<string, unknown> }>>
  }
  const routes = Object.entries(doc.paths).flatMap(([path, ops]) =>
    Object.entries(ops)
      .filter(([method]) => method === 'post' || method === 'put')
      .map(([method, op]) => ({ method: method.toUpperCase() as 'POST' | 'PUT', url: path.replace('{key}', 'k'), op })),
  )
  t.ok(routes.length >= 11, `${routes.length} routes take a body`)
  const huge = JSON.stringify({ value: 'x'.repeat(40 * MiB) }) // past every limit, batch-set's 32 MiB too
  for (const { method, url, op } of routes) {
    t.ok(op.responses['413'], `${method} ${url} documents 413`)
    const res = await call(app, { method, url, payload: huge, headers: { 'content-type': 'application/json' } })
    t.equal(res.statusCode, 413, `${method} ${url}`)
    t.same(res.json(), { error: 'payload_too_large', message: res.json().message })
  }
})

t.test('each route\'s own limit: a write\'s is four values plus room, batch-set\'s is larger', async (t) => {
  const app = await build(t)
  const big = 'x'.repeat(5 * MiB)
  t.equal((await call(app, { method: 'PUT', url: '/v1/entries/k', payload: { value: big } })).statusCode, 413)
  t.equal((await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: big } })).statusCode, 413)
  const batch = await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: [{ key: 'b', value: big }] } })
  t.equal(batch.statusCode, 200, 'batch-set takes a body the PUT limit refuses')
  t.match(batch.json().results, [{ key: 'b', status: 413, error: 'value_too_large' }])
})

t.test('lists at every limit fit their route\'s body limit, even with every character escaped', async (t) => {
  const app = await build(t)
  // JSON may write any character as \u00XX: six bytes of body per byte of name.
  const escaped = (prefix: string, i: number, bytes: number) =>
    `"${[...`${prefix}${i}:`.padEnd(bytes, 'x')].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')}"`
  const list = (prefix: string, bytes: number) => `[${Array.from({ length: 1000 }, (_, i) => escaped(prefix, i, bytes)).join(',')}]`
  const json = { 'content-type': 'application/json' }

  const keys = `{"keys":${list('k', 512)}}`
  t.ok(keys.length > 3 * MiB - 100_000, `batch-get body of ${keys.length} bytes`)
  const got = await call(app, { method: 'POST', url: '/v1/entries/batch-get', headers: json, payload: keys })
  t.equal(got.statusCode, 200, 'batch-get of 1000 keys of 512 bytes')
  t.equal(got.json().missing.length, 1000)
  t.equal(got.json().missing[0].length, 512, 'the escapes decoded to the key')

  const selector = `{"keys":${list('k', 512)},"userIds":${list('u', 128)},"tags":${list('t', 128)},"prefixes":${list('p', 512)}}`
  const inv = await call(app, { method: 'POST', url: '/v1/invalidations', headers: json, payload: selector })
  t.equal(inv.statusCode, 200, `a selector with all four lists full (${selector.length} bytes)`)
})

t.test('a value over 1 MiB serialized is 413 value_too_large; exactly 1 MiB is stored', async (t) => {
  const app = await build(t)
  const exact = 'x'.repeat(DEFAULT_LIMITS.maxValueBytes - 2) // plus the two quotes
  t.equal((await call(app, { method: 'PUT', url: '/v1/entries/exact', payload: { value: exact } })).statusCode, 200)
  const over = await call(app, { method: 'PUT', url: '/v1/entries/over', payload: { value: exact + 'x' } })
  t.equal(over.statusCode, 413)
  t.equal(over.json().error, 'value_too_large')
  // Multi-byte characters count in UTF-8 bytes: 350k × 3 bytes is over 1 MiB in 350k characters.
  const wide = await call(app, { method: 'PUT', url: '/v1/entries/wide', payload: { value: '€'.repeat(350_000) } })
  t.equal(wide.statusCode, 413)
  t.equal(wide.json().error, 'value_too_large')
  const inBatch = await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: [{ key: 'a', value: exact + 'x' }, { key: 'b', value: 1 }] } })
  t.equal(inBatch.statusCode, 200)
  t.match(inBatch.json().results, [{ key: 'a', status: 413, error: 'value_too_large' }, { key: 'b', status: 200 }])
  t.equal((await get(app, 'over')).statusCode, 404)
  // Up to four times the limit the value is read and named; past that the body is cut off unread.
  for (const [chars, error] of [[2 * MiB, 'value_too_large'], [4 * MiB, 'value_too_large'], [4 * MiB + 64 * 1024, 'payload_too_large']] as const) {
    const res = await call(app, { method: 'PUT', url: '/v1/entries/over', payload: { value: 'x'.repeat(chars) } })
    t.equal(res.statusCode, 413, `${chars} characters`)
    t.equal(res.json().error, error, `${chars} characters`)
  }
})

t.test('values may nest 64 levels, not 65, and very deep JSON is a 400', async (t) => {
  const app = await build(t)
  t.equal((await call(app, { method: 'PUT', url: '/v1/entries/d64', payload: { value: nest(64) } })).statusCode, 200)
  const d65 = await call(app, { method: 'PUT', url: '/v1/entries/d65', payload: { value: nest(65) } })
  t.equal(d65.statusCode, 400)
  t.match(d65.json(), { error: 'invalid_request', message: /value is nested deeper than 64/ })
  // Half a million levels: must not overflow a stack anywhere.
  const deep = '{"value":' + '['.repeat(500_000) + ']'.repeat(500_000) + '}'
  const res = await app.inject({ method: 'PUT', url: '/v1/entries/deep', headers: { authorization: 'Bearer admin-secret-0123456789', 'content-type': 'application/json' }, payload: deep })
  t.equal(res.statusCode, 400)
  t.equal(res.json().error, 'invalid_request')
  const deepObj = '{"value":' + '{"a":'.repeat(150_000) + '1' + '}'.repeat(150_000) + '}'
  const res2 = await app.inject({ method: 'PUT', url: '/v1/entries/deep', headers: { authorization: 'Bearer admin-secret-0123456789', 'content-type': 'application/json' }, payload: deepObj })
  t.equal(res2.statusCode, 400)
})

t.test('keys are 1 to 512 UTF-8 bytes without control characters, in the path and in batches', async (t) => {
  const app = await build(t)
  const ok512 = 'k'.repeat(512)
  const euro170 = '€'.repeat(170) // 510 bytes
  const euro171 = '€'.repeat(171) // 513 bytes
  await put(app, ok512, { value: 1 })
  await put(app, euro170, { value: 1 })
  t.equal((await get(app, ok512)).statusCode, 200)
  for (const key of ['k'.repeat(513), euro171, 'a\u0000b', 'tab\there', 'new\nline', 'del\u007f', 'c1\u0085']) {
    const res = await call(app, { method: 'PUT', url: putKey(key), payload: { value: 1 } })
    t.equal(res.statusCode, 400, JSON.stringify(key.slice(0, 12)))
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, /^key /)
  }
  const batchGet = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['fine', euro171] } })
  t.equal(batchGet.statusCode, 400)
  t.match(batchGet.json().message, /keys\[1\]/)
  const batchSet = await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: [{ key: euro171, value: 1 }, { key: '', value: 1 }, { value: 1 }] } })
  t.same(batchSet.json().results.map((r: { status: number }) => r.status), [400, 400, 400])
  const inval = await call(app, { method: 'POST', url: '/v1/invalidations', payload: { keys: [euro171] } })
  t.equal(inval.statusCode, 400)
})

t.test('userIds and tags: 128 bytes each, at most 32 tags', async (t) => {
  const app = await build(t)
  const tags32 = Array.from({ length: 32 }, (_, i) => `t${i}`)
  t.equal((await call(app, { method: 'PUT', url: '/v1/entries/a', payload: { value: 1, userId: 'u'.repeat(128), tags: tags32 } })).statusCode, 200)
  for (const [payload, field] of [
    [{ value: 1, userId: 'u'.repeat(129) }, /userId/],
    [{ value: 1, userId: '' }, /userId/],
    [{ value: 1, tags: [...tags32, 'one-too-many'] }, /tags has more than 32/],
    [{ value: 1, tags: ['t'.repeat(129)] }, /tags\[0\]/],
    [{ value: 1, tags: [''] }, /tags\[0\]/],
    [{ value: 1, tags: ['ok', 'bad\u0001'] }, /tags\[1\]/],
    [{ value: 1, tags: Array.from({ length: 5000 }, (_, i) => `t${i}`) }, /tags/],
  ] as const) {
    const res = await call(app, { method: 'PUT', url: '/v1/entries/b', payload })
    t.equal(res.statusCode, 400)
    t.match(res.json(), { error: 'invalid_request', message: field })
  }
  t.equal((await call(app, { method: 'DELETE', url: `/v1/users/${'u'.repeat(129)}/entries` })).statusCode, 400)
  t.equal((await call(app, { method: 'DELETE', url: `/v1/tags/${'t'.repeat(129)}/entries` })).statusCode, 400)
  t.equal((await call(app, { method: 'GET', url: `/v1/debug/users/${'u'.repeat(129)}` })).statusCode, 400)
})

t.test('ttlMs is 1 ms to 30 days', async (t) => {
  const app = await build(t)
  for (const ttlMs of [1, 30 * 24 * 3600 * 1000]) {
    t.equal((await call(app, { method: 'PUT', url: '/v1/entries/t', payload: { value: 1, ttlMs } })).statusCode, 200)
  }
  for (const ttlMs of [0, -1, 30 * 24 * 3600 * 1000 + 1, 1.5, 1e300, '100']) {
    const res = await call(app, { method: 'PUT', url: '/v1/entries/t', payload: { value: 1, ttlMs } })
    t.equal(res.statusCode, 400, `ttlMs ${ttlMs}`)
    t.equal(res.json().error, 'invalid_request')
  }
})

t.test('batches and selector lists hold at most 1000 items; prefixes are never empty', async (t) => {
  const app = await build(t)
  const keys = (n: number) => Array.from({ length: n }, (_, i) => `k${i}`)
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: keys(1000) } })).statusCode, 200)
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: keys(1001) } })).statusCode, 400)
  const entries = (n: number) => keys(n).map((key) => ({ key, value: 1 }))
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: entries(1000) } })).statusCode, 200)
  t.equal((await call(app, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: entries(1001) } })).statusCode, 400)
  for (const kind of ['keys', 'userIds', 'tags', 'prefixes']) {
    t.equal((await call(app, { method: 'POST', url: '/v1/invalidations', payload: { [kind]: keys(1001) } })).statusCode, 400, kind)
  }
  for (const payload of [{}, { prefixes: [] }, { prefixes: [''] }, { prefixes: [null] }, { prefixes: ['p'.repeat(513)] }, { keys: [], tags: [] }]) {
    const res = await call(app, { method: 'POST', url: '/v1/invalidations', payload })
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 50))
    t.equal(res.json().error, 'invalid_request')
  }
  t.equal((await get(app, 'k0')).statusCode, 200, 'nothing was wiped by a refused selector')
})

t.test('__proto__ and constructor.prototype in a body are 400 invalid_request and pollute nothing', async (t) => {
  const app = await build(t)
  const bodies: Array<[string, string, string]> = [
    ['PUT', '/v1/entries/p', '{"value":1,"__proto__":{"polluted":true}}'],
    ['PUT', '/v1/entries/p', '{"value":{"a":{"__proto__":{"polluted":true}}}}'],
    ['PUT', '/v1/entries/p', '{"value":{"constructor":{"prototype":{"polluted":true}}}}'],
    ['POST', '/v1/entries/batch-set', '{"entries":[{"key":"p","value":1,"__proto__":{"polluted":true}}]}'],
    ['POST', '/v1/invalidations', '{"keys":["p"],"__proto__":{"polluted":true}}'],
    ['POST', '/v1/admin/clear-token', '{"reason":"x","__proto__":{"polluted":true}}'],
    ['POST', '/v1/admin/clear', '{"__proto__":{"token":"x"}}'],
  ]
  for (const [method, url, payload] of bodies) {
    const res = await app.inject({ method: method as 'PUT', url, payload, headers: { authorization: 'Bearer admin-secret-0123456789', 'content-type': 'application/json' } })
    t.equal(res.statusCode, 400, payload)
    t.equal(res.json().error, 'invalid_request')
    t.match(res.json().message, /__proto__/)
  }
  t.equal((await get(app, 'p')).statusCode, 404)
  t.equal(({} as Record<string, unknown>).polluted, undefined)
  t.equal((Object.prototype as unknown as Record<string, unknown>).polluted, undefined)
})

t.test('a value with a plain "constructor" or "toString" key is data, stored and read back as is', async (t) => {
  const app = await build(t)
  const value = { constructor: { name: 'x' }, toString: 'not a function', hasOwnProperty: 1, prototype: { polluted: true } }
  await put(app, 'odd', { value })
  const res = await get(app, 'odd')
  t.equal(res.statusCode, 200)
  t.same(res.json().value, value)
  t.equal(({} as Record<string, unknown>).polluted, undefined)
  t.equal(typeof ({}).toString, 'function')
  const batch = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['odd', 'constructor', '__proto__', 'toString'] } })
  t.equal(batch.statusCode, 200)
  t.same(Object.keys(batch.json().entries), ['odd'])
  t.same(batch.json().missing.sort(), ['__proto__', 'constructor', 'toString'])
  // Keys named like Object.prototype members are ordinary keys.
  for (const key of ['__proto__', 'constructor', 'hasOwnProperty']) {
    await put(app, key, { value: key, userId: key, tags: [key] })
    t.same((await get(app, key)).json().value, key)
  }
  const user = await call(app, { method: 'GET', url: '/v1/debug/users/__proto__' })
  t.equal(user.json().count, 1)
})

t.test('odd URL encodings are 400 or 404 with the contract body, never 5xx', async (t) => {
  const app = await build(t)
  await put(app, 'a/b', { value: 'slash' })
  await put(app, '%2F', { value: 'literal' })
  t.same((await call(app, { method: 'GET', url: '/v1/entries/a%2Fb' })).json().value, 'slash', '%2F is a slash inside the key')
  t.same((await call(app, { method: 'GET', url: '/v1/entries/%252F' })).json().value, 'literal', 'double encoding decodes once')
  const cases: Array<[string, number]> = [
    ['/v1/entries/%zz', 400],
    ['/v1/entries/%', 400],
    ['/v1/entries/%ff', 400],
    ['/v1/entries/%C0%AF', 400], // overlong UTF-8
    ['/v1/entries/%ED%A0%80', 400], // an encoded UTF-16 surrogate
    ['/v1/entries/a%00b', 400],
    ['/v1/entries/%0d%0aSet-Cookie:x', 400],
    [`/v1/entries/${'x'.repeat(5000)}`, 400],
    [`/v1/entries/${'%41'.repeat(600)}`, 400],
    ['/v1/entries/a/b', 404],
    ['/v1/entries/', 400],
    ['/v1/users/%zz/entries', 400],
    ['/v1/debug/users/%00', 400],
    ['/v1/debug/entries/%E0%A4%A', 400],
    ['/v1/nope/%zz', 400],
    ['/v1/entries/a?allowStale=%zz', 400],
    ['/v1/entries/a?allowStale=true&allowStale=false', 400],
  ]
  for (const [url, status] of cases) {
    const res = await call(app, { method: 'GET', url })
    t.equal(res.statusCode, status, url.slice(0, 60))
    t.match(res.json(), { error: status === 400 ? 'invalid_request' : 'not_found', message: String })
  }
  const del = await call(app, { method: 'DELETE', url: '/v1/entries/%zz' })
  t.equal(del.statusCode, 400)
})

t.test('a path parameter too long for the router is a 400 naming that parameter', async (t) => {
  const app = await build(t)
  const long = 'x'.repeat(5000)
  const cases: Array<[string, string, RegExp]> = [
    ['GET', `/v1/entries/${long}`, /^key is longer than 512 bytes$/],
    ['POST', `/v1/entries/${long}/refresh`, /^key is longer than 512 bytes$/],
    ['GET', `/v1/debug/entries/${long}`, /^key is longer than 512 bytes$/],
    ['DELETE', `/v1/users/${long}/entries`, /^userId is longer than 128 bytes$/],
    ['GET', `/v1/debug/users/${long}?x=1`, /^userId is longer than 128 bytes$/],
    ['DELETE', `/v1/tags/${long}/entries?mode=stale`, /^tag is longer than 128 bytes$/],
  ]
  for (const [method, url, message] of cases) {
    const res = await call(app, { method: method as 'GET', url })
    t.equal(res.statusCode, 400, `${method} ${url.slice(0, 20)}`)
    t.match(res.json(), { error: 'invalid_request', message }, `${method} ${url.slice(0, 20)}`)
  }
  // Below the router's limit, the route's own check answers the same way.
  const res = await call(app, { method: 'DELETE', url: `/v1/users/${'u'.repeat(129)}/entries` })
  t.match(res.json(), { error: 'invalid_request', message: /^userId is longer than 128 bytes$/ })

  // The router makes room for the longest of the three, whatever MAX_KEY_BYTES is.
  const small = await build(t, { limits: { ...DEFAULT_LIMITS, maxKeyBytes: 16 } })
  const userId = '\u00e9'.repeat(64) // 128 bytes, 384 characters %-encoded
  const ok = await call(small, { method: 'DELETE', url: `/v1/users/${encodeURIComponent(userId)}/entries` })
  t.equal(ok.statusCode, 200, 'a user id within its limit is not refused for being longer than a key')
  t.match((await call(small, { method: 'GET', url: `/v1/entries/${'k'.repeat(17)}` })).json(), { message: 'key is longer than 16 bytes' })
})

t.test('raw non-UTF-8 bytes and oversized headers over a real socket never get a 5xx', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const raw = (bytes: Buffer) =>
    new Promise<string>((resolve) => {
      const socket = connect(port, '127.0.0.1', () => socket.end(bytes))
      let out = ''
      socket.on('data', (d) => (out += d.toString('latin1')))
      socket.on('close', () => resolve(out))
      socket.on('error', () => resolve(out))
    })
  const status = (response: string) => Number(response.split(' ')[1])
  const requests = [
    Buffer.concat([Buffer.from('GET /v1/entries/'), Buffer.from([0xff, 0xfe, 0x80]), Buffer.from(' HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret-0123456789\r\nConnection: close\r\n\r\n')]),
    Buffer.concat([Buffer.from('GET /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer '), Buffer.from([0xff, 0xc0]), Buffer.from('\r\nConnection: close\r\n\r\n')]),
    Buffer.from(`GET /v1/entries/k HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\nConnection: close\r\n\r\n`),
    Buffer.from('PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret-0123456789\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{"val'),
    Buffer.from('GARBAGE\r\n\r\n'),
    Buffer.from(`GET /v1/entries/${'k'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`),
    Buffer.from('PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}'),
  ]
  for (const bytes of requests) {
    const response = await raw(bytes)
    const code = status(response)
    const head = response.split('\r\n')[0] || 'a closed socket'
    t.ok(response === '' || (code >= 400 && code < 500), `got ${head}`)
    if (response === '') continue
    // Even errors the HTTP parser finds, before Fastify routes anything, have the contract's shape.
    const body = JSON.parse(response.slice(response.indexOf('\r\n\r\n') + 4))
    t.same(Object.keys(body).sort(), ['error', 'message'], `${head}: {error, message}`)
    t.ok(['invalid_request', 'unauthorized', 'not_found'].includes(body.error), `${head}: ${body.error}`)
  }
  // And the server still answers.
  const ok = await new Promise<number>((resolve, reject) => {
    const req = httpRequest({ port, path: '/health/live' }, (res) => {
      res.resume()
      resolve(res.statusCode!)
    })
    req.on('error', reject)
    req.end()
  })
  t.equal(ok, 200)
})

t.test('CONNECT, an Expect other than 100-continue and a missing Host, which Node answers itself, get the contract\'s body', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // The client never closes its side: the server must close the connection, not only end its own.
  const open: Socket[] = []
  t.teardown(() => open.forEach((socket) => socket.destroy()))
  const raw = (bytes: string) => exchange(port, bytes, { keepOpen: open })
  const connections = () => new Promise<number>((resolve, reject) => app.server.getConnections((err, n) => (err ? reject(err) : resolve(n))))
  const connectReply = await raw('CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')
  t.match(connectReply, /^HTTP\/1\.1 404 Not Found\r\n/, 'CONNECT: 404')
  for (let i = 0; i < 100 && (await connections()) > 0; i++) await new Promise((resolve) => setTimeout(resolve, 20))
  t.equal(await connections(), 0, 'and the server closed the connection')
  t.same(JSON.parse(connectReply.slice(connectReply.indexOf('\r\n\r\n') + 4)), { error: 'not_found', message: 'no route CONNECT example.com:443' })
  const expectReply = await raw(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nExpect: something-else\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"value":1}`)
  t.match(expectReply, /^HTTP\/1\.1 417 Expectation Failed\r\n/, 'an unknown expectation: 417')
  t.same(JSON.parse(expectReply.slice(expectReply.indexOf('\r\n\r\n') + 4)), {
    error: 'invalid_request',
    message: 'Expect: something-else is not supported (only 100-continue)',
  })
  t.equal((await get(app, 'k')).statusCode, 404, 'and the request was not applied')

  const noHost = await raw(`PUT /v1/entries/k HTTP/1.1\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"value":1}`)
  t.match(noHost, /^HTTP\/1\.1 400 Bad Request\r\n/, 'HTTP/1.1 without Host: 400')
  t.same(JSON.parse(noHost.slice(noHost.indexOf('\r\n\r\n') + 4)), { error: 'invalid_request', message: 'an HTTP/1.1 request needs a Host header' })
  t.equal((await get(app, 'k')).statusCode, 404, 'and it was not applied')
  t.match(await raw('GET /health/live HTTP/1.0\r\n\r\n'), /^HTTP\/1\.1 200 OK\r\n/, 'HTTP/1.0 needs none')
})

t.test('junk pipelined behind a valid request: the valid one gets its own reply, then the 400; a stream is closed, not written into', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // One write: Node parses the junk while the PUT's handler is still reading its body.
  const body = JSON.stringify({ value: { pipelined: true }, userId: 'u1' })
  const putPipelined =
    `PUT /v1/entries/pipelined HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`
  const response = await exchange(port, `${putPipelined}GARBAGE\r\n\r\n`)
  t.match(response, /^HTTP\/1\.1 200 OK\r\n[^]*"etag"[^]*HTTP\/1\.1 400 Bad Request\r\n[^]*"the request is not valid HTTP"/, 'the PUT\'s 200, then the 400')
  t.equal(response.match(/HTTP\/1\.1 /g)?.length, 2, 'two replies, nothing else')
  t.same((await get(app, 'pipelined')).json().value, { pipelined: true }, 'and the PUT, acknowledged, is there')

  // Two valid requests and junk: both replies, in order.
  const two = await exchange(port, `${putPipelined}GET /v1/entries/pipelined HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\n\r\nGARBAGE\r\n\r\n`)
  t.match(two, /^HTTP\/1\.1 200 [^]*HTTP\/1\.1 200 [^]*"pipelined":true[^]*HTTP\/1\.1 400 /, 'the PUT\'s reply, the GET\'s, then the 400')

  // An invalidation stream already sending: junk from the client ends it, no 400 inside it.
  const stream = await exchange(port, `GET /v1/invalidations/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\n\r\n`, {
    onFirstData: (socket) => socket.write('GARBAGE\r\n\r\n'),
  })
  t.match(stream, /^HTTP\/1\.1 200 OK\r\n[^]*text\/event-stream/, 'the stream had started')
  t.notMatch(stream, /HTTP\/1\.1 400/, 'and no 400 was written into it')

  // A reply written whole but still draining to a client that reads slowly: sent in full, then the 400.
  const values = Array.from({ length: 20 }, (_, i) => `big${i}`)
  for (const key of values) await call(app, { method: 'PUT', url: `/v1/entries/${key}`, payload: { value: 'x'.repeat(900 * 1024) } })
  const keys = JSON.stringify({ keys: values })
  const draining = await new Promise<string>((resolve) => {
    const chunks: Buffer[] = []
    const socket = connect(port, '127.0.0.1', () => {
      socket.pause()
      socket.write(`POST /v1/entries/batch-get HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${keys.length}\r\n\r\n${keys}`)
      setTimeout(() => {
        socket.write('GARBAGE\r\n\r\n')
        setTimeout(() => socket.resume(), 300)
      }, 300)
    })
    socket.setTimeout(20_000, () => socket.destroy())
    socket.on('data', (d) => chunks.push(d))
    socket.on('close', () => resolve(Buffer.concat(chunks).toString('latin1')))
    socket.on('error', () => resolve(Buffer.concat(chunks).toString('latin1')))
  })
  const head = draining.slice(0, draining.indexOf('\r\n\r\n'))
  const length = Number(/content-length: (\d+)/i.exec(head)?.[1])
  t.ok(length > 16 * 1024 * 1024, `a ${length}-byte reply`)
  t.match(draining.slice(head.length + 4 + length), /^HTTP\/1\.1 400 Bad Request\r\n/, 'all of it arrived, then the 400')
})

const HELD_LOAD = `GET /v1/entries/dashboard%3A1?load=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\n\r\n`

/** A listening app whose origin holds its answers (HELD_LOAD's) until released. */
async function withHeldOrigin(t: Test) {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/1/dashboard', { user: '1' })
  origin.hold()
  const app = await buildApp({ apiKeys: TEST_API_KEYS, configFile: { origins: [dashboardOrigin(origin)] } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  return { origin, app, port }
}

/** withHeldOrigin, and a raw connection that sent `bytes`, starting with HELD_LOAD. */
async function withLoadInFlight(t: Test, bytes: string) {
  const { origin, app, port } = await withHeldOrigin(t)
  const received = { out: '' }
  const socket = connect(port, '127.0.0.1', () => socket.write(bytes))
  t.teardown(() => socket.destroy())
  socket.on('data', (d) => (received.out += d.toString()))
  const closed = new Promise((resolve) => socket.on('close', resolve))
  await origin.waitForCalls(1) // the load is in flight
  return { origin, app, socket, received, closed }
}

t.test('a request that arrives on an open connection while the server shuts down: 503 backend_unavailable, the one in flight finishes', async (t) => {
  const { origin, app, socket, received, closed } = await withLoadInFlight(t, HELD_LOAD)
  const closing = app.close()
  // The server stops listening after the preClose hooks ran: from then on the app is closing.
  while (app.server.listening) await new Promise((resolve) => setTimeout(resolve, 5))
  socket.write(`PUT /v1/entries/late HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"value":1}`)
  await new Promise((resolve) => setTimeout(resolve, 50))
  origin.release()
  await closing
  await closed
  const out = received.out
  t.match(out, /^HTTP\/1\.1 200 OK\r\n[^]*"user":"1"[^]*HTTP\/1\.1 503 Service Unavailable\r\n/, 'the load in flight was answered, then the 503')
  const last = out.slice(out.lastIndexOf('\r\n\r\n') + 4)
  t.same(JSON.parse(last), { error: 'backend_unavailable', message: 'this instance is shutting down; retry on another' })
  t.match(out.slice(out.lastIndexOf('HTTP/1.1 503')), /connection: close/i, 'and the connection closes')
})

t.test('requests pipelined before shutdown are all answered, then the connection closes', async (t) => {
  const write = `PUT /v1/entries/early HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"value":1}`
  // The write behind the load is applied meanwhile.
  const { origin, app, received, closed } = await withLoadInFlight(t, HELD_LOAD + write)
  while ((await app.cache.inspect('early')) === undefined) await new Promise((resolve) => setTimeout(resolve, 5))
  const closing = app.close()
  while (app.server.listening) await new Promise((resolve) => setTimeout(resolve, 5))
  origin.release()
  const released = performance.now()
  await closing
  await closed
  t.ok(performance.now() - released < 5000, 'the connection closed once its replies were sent')
  const replies = received.out.split(/(?=HTTP\/1\.1 )/)
  t.equal(replies.length, 2, 'two replies')
  t.match(replies[0], /^HTTP\/1\.1 200 OK\r\n[^]*"user":"1"/, 'the load')
  t.notMatch(replies[0], /connection: close/i, 'which keeps the connection for the reply behind it')
  // Its headers were written (queued) before shutdown began: they say keep-alive, and the
  // connection is ended once it is sent, not kept for the keep-alive timeout.
  t.match(replies[1], /^HTTP\/1\.1 200 OK\r\n[^]*"key":"early"/, 'the write, applied and answered')
})

/**
 * An app (SHUTDOWN_GRACE_MS `graceMs`) holding `mib` entries of 1 MiB, and a connection that
 * asked it for all of them in one batch-get and reads none of the reply yet.
 */
async function unreadReply(t: Test, { graceMs = 10_000, mib = 16 } = {}) {
  const app = await buildApp({ apiKeys: TEST_API_KEYS, shutdownGraceMs: graceMs })
  const keys = Array.from({ length: mib }, (_, i) => `big${i}`)
  for (const key of keys) await app.cache.write(key, { value: 'x'.repeat(MiB - 16) })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const slow = connect(port, '127.0.0.1')
  t.teardown(() => slow.destroy())
  slow.on('error', () => undefined)
  await once(slow, 'connect')
  const body = JSON.stringify({ keys })
  slow.write(`POST /v1/entries/batch-get HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  slow.pause()
  return { app, port, slow }
}

t.test('shutdown neither cuts a reply still draining to a slow reader nor waits on a request half-received', async (t) => {
  // A reader that asks for 24 MiB and reads none of it yet: the reply is ended, and waits in
  // the socket's buffers.
  const { app, port, slow } = await unreadReply(t, { mib: 24 })
  // A client that sent half its headers.
  const half = connect(port, '127.0.0.1')
  t.teardown(() => half.destroy())
  await once(half, 'connect')
  half.write('GET /v1/stats HTTP/1.1\r\nHost: x\r\n')
  const halfClosed = once(half, 'close')
  await new Promise((resolve) => setTimeout(resolve, 500)) // the reply is written (ended) by now
  const closing = app.close()
  const dropped = await Promise.race([halfClosed.then(() => true), new Promise((resolve) => setTimeout(resolve, 3000, false))])
  t.ok(dropped, 'the half-received request was dropped, not waited on')
  half.destroy() // (had it not been, the close would wait on it)
  const chunks: Buffer[] = []
  slow.on('data', (d: Buffer) => chunks.push(d))
  slow.resume()
  await once(slow, 'close')
  await closing
  const raw = Buffer.concat(chunks).toString()
  const length = Number(/content-length: (\d+)/i.exec(raw)?.[1])
  const received = Buffer.byteLength(raw.slice(raw.indexOf('\r\n\r\n') + 4))
  t.ok(length > 24 * (MiB - 16), 'a large reply')
  t.equal(received, length, 'received whole')
  t.equal(Object.keys(JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)).entries).length, 24)
})

t.test('a 413 reaches a client that is still sending its body (client in another process)', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // The client runs in its own process so that it uploads while the server answers, as a
  // real one does; closing the connection under it then reset the reply away (EPIPE).
  const client = `
    const outcomes = []
    for (const [method, path, mib] of [['PUT', '/v1/entries/k', 8], ['POST', '/v1/entries/batch-get', 9], ['POST', '/v1/entries/batch-set', 36]]) {
      const body = JSON.stringify({ value: 'x'.repeat(mib * 1024 * 1024) })
      for (let i = 0; i < 4; i++) {
        try {
          const res = await fetch('http://127.0.0.1:${port}' + path, { method, body, headers: { authorization: 'Bearer ${KEYS.admin}', 'content-type': 'application/json' } })
          outcomes.push(method + ' ' + path + ': ' + res.status + ' ' + (await res.json()).error)
        } catch (error) {
          outcomes.push(method + ' ' + path + ': ' + (error.cause?.code ?? error.message))
        }
      }
    }
    console.log(JSON.stringify(outcomes))`
  const child = spawn(process.execPath, ['--input-type=module', '-e', client], { stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.on('data', (d) => (out += d))
  await once(child, 'exit')
  const outcomes = JSON.parse(out) as string[]
  t.equal(outcomes.length, 12)
  for (const outcome of outcomes) t.match(outcome, /: 413 payload_too_large$/)
})

t.test('Expect: 100-continue: 100 only for a body the route will read; a body over the limit is refused before it is sent', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const head = (length: number, path = '/v1/entries/k', key: string = KEYS.admin) =>
    `PUT ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\nExpect: 100-continue\r\n\r\n`
  /** Sends the head, then the body once 100 comes; returns everything the server sent and whether the body went. */
  const exchange = (length: number, body: string, key?: string) =>
    new Promise<{ response: string; sentBody: boolean }>((resolve) => {
      let response = ''
      let sentBody = false
      const socket = connect(port, '127.0.0.1', () => socket.write(head(length, undefined, key)))
      socket.setTimeout(20_000, () => socket.destroy()) // a regression fails here, not at tap's 180 s
      socket.on('data', (d) => {
        response += d.toString()
        if (!sentBody && response.startsWith('HTTP/1.1 100 Continue\r\n\r\n')) {
          sentBody = true
          socket.write(body)
        }
        if (/\r\n\r\n[^]*\{[^]*\}$/.test(response.replace(/^HTTP\/1\.1 100 Continue\r\n\r\n/, ''))) socket.end()
      })
      socket.on('close', () => resolve({ response, sentBody }))
      socket.on('error', () => resolve({ response, sentBody }))
    })
  const small = JSON.stringify({ value: 'hello' })
  const ok = await exchange(Buffer.byteLength(small), small)
  t.ok(ok.sentBody, 'a body within the limit is asked for (100 Continue)')
  t.match(ok.response, /HTTP\/1\.1 200 OK/)
  const over = await exchange(9 * MiB, '')
  t.notOk(over.sentBody, 'no 100 for a body over the limit')
  t.match(over.response, /^HTTP\/1\.1 413 /, 'the 413 comes first')
  t.match(over.response, /"error":"payload_too_large"/)
  const unauthorized = await exchange(Buffer.byteLength(small), small, 'wrong-key')
  t.notOk(unauthorized.sentBody, 'no 100 for a request refused before its body is read')
  t.match(unauthorized.response, /^HTTP\/1\.1 401 /)
})

t.test('an upload that stalls after its 413 is cut off within seconds, not held open', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const started = Date.now()
  const { response, closedAfterMs } = await new Promise<{ response: string; closedAfterMs: number }>((resolve) => {
    let out = ''
    const socket = connect(port, '127.0.0.1', () => {
      // Announces 10 MiB, sends 2 MiB of it, then nothing.
      socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${10 * MiB}\r\n\r\n`)
      socket.write('x'.repeat(2 * MiB))
    })
    socket.setTimeout(30_000, () => socket.destroy())
    socket.on('data', (d) => (out += d.toString()))
    socket.on('close', () => resolve({ response: out, closedAfterMs: Date.now() - started }))
    socket.on('error', () => undefined)
  })
  t.match(response, /^HTTP\/1\.1 413 /, 'the 413 was sent')
  t.ok(closedAfterMs < 15_000, `the server closed the connection after ${closedAfterMs} ms (drain limits: 1 s without a byte, 5 s in all)`)
})

t.test('a request whose body stalls gets 408 after REQUEST_TIMEOUT_MS; a refused one is closed then too', async (t) => {
  const app = await build(t, { requestTimeoutMs: 1000 })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const stall = (key: string, length: number, sent: string) =>
    new Promise<{ response: string; closedAfterMs: number }>((resolve) => {
      const started = Date.now()
      let out = ''
      const socket = connect(port, '127.0.0.1', () =>
        socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n${sent}`),
      )
      socket.setTimeout(20_000, () => socket.destroy())
      socket.on('data', (d) => (out += d.toString()))
      socket.on('close', () => resolve({ response: out, closedAfterMs: Date.now() - started }))
      socket.on('error', () => undefined)
    })
  const slow = await stall(KEYS.admin, 100, '{"value":')
  t.match(slow.response, /^HTTP\/1\.1 408 [^]*"the request did not arrive in time"/, 'a stalled body is a 408')
  t.ok(slow.closedAfterMs < 10_000, `closed after ${slow.closedAfterMs} ms`)
  // Refused before its body is read: Node would read the rest of it for as long as it came.
  const refused = await stall('wrong-key', 100 * MiB, 'x'.repeat(64 * 1024))
  t.match(refused.response, /^HTTP\/1\.1 401 /)
  t.ok(refused.closedAfterMs < 10_000, `the connection of a refused, stalled upload closed after ${refused.closedAfterMs} ms`)
})

t.test('a 401 before the body is read: a huge upload is cut off at once, a small one is read and the connection reused', async (t) => {
  const app = await build(t) // REQUEST_TIMEOUT_MS at its default, 120 s: not what ends it
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // Declares 10 GiB and keeps sending (15 s at most) for as long as the server reads.
  const started = Date.now()
  const huge = await new Promise<{ response: string; sent: number }>((resolve) => {
    let out = ''
    let sent = 0
    const chunk = Buffer.alloc(1024 * 1024, 'x')
    const socket = connect(port, '127.0.0.1', () => {
      socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: ${10 * 1024 * MiB}\r\n\r\n`)
      const pump = () => {
        while (!socket.destroyed && Date.now() - started < 15_000) {
          sent += chunk.length
          if (!socket.write(chunk)) return void socket.once('drain', pump)
        }
        socket.destroy() // the server was still reading
      }
      pump()
    })
    socket.on('data', (d) => (out += d.toString()))
    socket.on('close', () => resolve({ response: out, sent }))
    socket.on('error', () => undefined)
  })
  const closedAfterMs = Date.now() - started
  t.match(huge.response, /^HTTP\/1\.1 401 [^]*connection: close/i, 'a 401 that says the connection closes')
  t.ok(huge.sent < 256 * MiB, `the server stopped reading after ${Math.round(huge.sent / MiB)} MiB (socket buffers), closed after ${closedAfterMs} ms`)

  const body = JSON.stringify({ value: 'x'.repeat(MiB) })
  const small = await exchange(
    port,
    `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
      'GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
  )
  t.match(small, /^HTTP\/1\.1 401 [^]*unauthorized[^]*HTTP\/1\.1 200 OK/, 'a 401, then the next request on the same connection')
})

t.test('after a 413 the rest of the body is read and the connection serves the next request', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const body = JSON.stringify({ value: 'x'.repeat(5 * MiB) })
  const requests =
    `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}` +
    'GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
  const response = await exchange(port, requests)
  t.match(response, /^HTTP\/1\.1 413 [^]*payload_too_large[^]*HTTP\/1\.1 200 OK/, 'a 413, then the next request on the same connection')
  const head = response.slice(0, response.indexOf('\r\n\r\n'))
  t.match(head, /\r\nconnection: keep-alive\r\n/i, 'which the 413 says')
  t.match(head, /\r\nkeep-alive: timeout=\d+(\r\n|$)/i, 'with its timeout, as Node says it')
})

/**
 * An upload from another process (so that it goes on while the server answers and closes,
 * as a real client's does): on one connection it writes `first`, then, once the test says
 * go (a line on its stdin; at once without `waitForGo`), `head`, then `chunks` chunks of
 * 256 KiB of `x` 5 ms apart (`gapMs`; with 0, as fast as the connection takes them; each
 * framed as a chunk with `chunked`), then `tail`. It prints `started` after the first 1 MiB
 * of the body, and at the end everything it received, the error, if any, that the
 * connection ended with, and how many bytes of the body it sent.
 */
function slowUpload(t: Test, port: number, o: { first?: string; waitForGo?: boolean; head: string; chunks: number; chunked?: boolean; tail?: string; gapMs?: number }) {
  const client = `
    import { connect } from 'node:net'
    import { once } from 'node:events'
    const o = ${JSON.stringify(o)}
    let out = ''
    let error
    const socket = connect({ port: ${port}, host: '127.0.0.1', allowHalfOpen: true })
    socket.on('data', (d) => (out += d.toString('latin1')))
    socket.on('error', (e) => (error = e.code ?? e.message))
    let sent = 0
    socket.on('close', () => {
      console.log(JSON.stringify({ out, error, sent }))
      process.exit(0)
    })
    await once(socket, 'connect')
    if (o.first) socket.write(o.first)
    if (o.waitForGo) await once(process.stdin, 'data')
    socket.write(o.head)
    const chunk = 'x'.repeat(256 * 1024)
    for (let i = 0; i < o.chunks && !socket.destroyed; i++) {
      const flowing = socket.write(o.chunked ? (chunk.length).toString(16) + '\\r\\n' + chunk + '\\r\\n' : chunk)
      sent += chunk.length
      if (i === 3) console.log('started')
      if (o.gapMs !== 0) await new Promise((resolve) => setTimeout(resolve, o.gapMs ?? 5))
      else if (!flowing) await new Promise((resolve) => { socket.once('drain', resolve); socket.once('close', resolve) })
    }
    if (!socket.destroyed) socket.end(o.tail ?? '')
    setTimeout(() => socket.destroy(), 15000).unref()`
  const child = spawn(process.execPath, ['--input-type=module', '-e', client], { stdio: ['pipe', 'pipe', 'pipe'] })
  let errors = ''
  child.stderr.on('data', (d) => (errors += d))
  t.teardown(() => child.kill())
  let printed = ''
  const started = new Promise<void>((resolve) =>
    child.stdout.on('data', (d) => {
      printed += d
      if (printed.includes('started\n')) resolve()
    }),
  )
  const result = once(child, 'close').then(([code]) => {
    if (code !== 0) throw new Error(`the client exited ${code}: ${errors}`)
    return JSON.parse(printed.trim().split('\n').at(-1)!) as { out: string; error?: string; sent: number }
  })
  return { go: () => child.stdin.write('go\n'), started, result }
}

/** slowUpload to a new app; with `shutdown`, the app starts closing once 1 MiB of the body is sent (and is closed on return). */
async function uploadToApp(t: Test, o: Parameters<typeof slowUpload>[2], { shutdown = false } = {}) {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const upload = slowUpload(t, port, o)
  const closed = shutdown ? upload.started.then(() => app.close()) : undefined
  const result = await upload.result
  await closed
  return result
}

/**
 * slowUpload on a connection whose first request is a load held at the origin; once the
 * app is shutting down, the upload (`o`) is pipelined behind it, and once 1 MiB of its body
 * is sent the load is released. Returns when the app has closed.
 */
async function uploadBehindLoadInShutdown(t: Test, o: Omit<Parameters<typeof slowUpload>[2], 'first' | 'waitForGo'>) {
  const { origin, app, port } = await withHeldOrigin(t)
  // The statuses of the replies the server wrote whole, in order (what the client read is `out`).
  const written: number[] = []
  app.server.on('request', (_req, res) => res.once('finish', () => written.push(res.statusCode)))
  const upload = slowUpload(t, port, { ...o, first: HELD_LOAD, waitForGo: true })
  await origin.waitForCalls(1)
  const closing = app.close()
  while (app.server.listening) await new Promise((resolve) => setTimeout(resolve, 5))
  upload.go()
  await upload.started
  origin.release()
  await closing
  return { app, written, ...(await upload.result) }
}

t.test('shutdown: a 503 to an upload pipelined behind a request in flight reaches the client, not a reset', async (t) => {
  const chunks = 16
  const { app, out, error } = await uploadBehindLoadInShutdown(t, {
    head: `PUT /v1/entries/late HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`,
    chunks,
  })
  t.match(out, /^HTTP\/1\.1 200 OK\r\n[^]*HTTP\/1\.1 503 Service Unavailable\r\n[^]*"backend_unavailable"/, 'the load in flight was answered, then the 503')
  t.equal(error, undefined, 'the connection closed cleanly')
  t.equal(await app.cache.inspect('late'), undefined, 'the upload was not applied')
})

t.test('shutdown: a 413 to a chunked upload in flight when shutdown begins reaches the client, not a reset', async (t) => {
  const { out, error } = await uploadToApp(
    t,
    {
      head: `PUT /v1/entries/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`,
      chunks: 48, // 12 MiB: over the 8 MiB body limit
      chunked: true,
      tail: '0\r\n\r\n',
    },
    { shutdown: true },
  )
  t.match(out, /^HTTP\/1\.1 413 Payload Too Large\r\n[^]*connection: close\r\n[^]*"payload_too_large"/i, 'the 413, closing the connection')
  t.equal(error, undefined, 'the connection closed cleanly')
})

t.test('shutdown: a connection still sending the body of a refused upload is closed once the body has come, not reset', async (t) => {
  const chunks = 24
  const head = `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`
  const { out, error } = await uploadToApp(t, { head, chunks }, { shutdown: true })
  t.match(out, /^HTTP\/1\.1 401 Unauthorized\r\n/, 'the 401')
  t.equal(error, undefined, 'the connection closed cleanly')
})

t.test('a 401 to an upload that asked to close the connection reaches the client; the connection closes once the body has come', async (t) => {
  const chunks = 24
  const head = `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`
  const { out, error } = await uploadToApp(t, { head, chunks })
  t.match(out, /^HTTP\/1\.1 401 Unauthorized\r\n[^]*connection: close\r\n/i, 'the 401, closing the connection')
  t.equal(error, undefined, 'the connection closed cleanly')
})

t.test('shutdown: the body after a 503 is thrown away up to 64 MiB, then the connection is cut', async (t) => {
  const { written, out, error, sent } = await uploadBehindLoadInShutdown(t, {
    head: `PUT /v1/entries/late HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`,
    chunks: 1600, // 400 MiB, as fast as it goes
    chunked: true,
    gapMs: 0,
  })
  // Written before the body was read; whether the client reads it before the cut's reset is
  // up to its scheduling (that it does is the test above, with a body that ends).
  t.same(written, [200, 503], 'the load\'s 200, then the 503, were written before the cut')
  if (!/HTTP\/1\.1 503 Service Unavailable\r\n/.test(out)) t.comment(`the client did not read the 503 before the reset (${error}; read ${JSON.stringify(out.slice(0, 80))})`)
  t.ok(sent < 200 * MiB, `the connection was cut after ${Math.round(sent / MiB)} MiB of the body`)
  t.ok(sent > 32 * MiB, 'by the byte limit, not the time limit')
})

t.test('a request pipelined behind a body read only to be thrown away is not run', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const sneaky = (key: string) =>
    `PUT /v1/entries/${key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"value":1}`
  /** Sends `head`, waits, then the body of `length` bytes with a PUT of `key` behind it, and ends its side. */
  const send = (head: string, length: number, key: string) =>
    new Promise<string>((resolve) => {
      let out = ''
      const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => {
        socket.write(head)
        setTimeout(() => socket.end('x'.repeat(length) + sneaky(key)), 300)
      })
      t.teardown(() => socket.destroy())
      socket.on('data', (d) => (out += d.toString('latin1')))
      socket.on('close', () => resolve(out))
      socket.on('error', () => resolve(out))
    })
  // Refused before routing (no Host), the connection closing: the rest of the body is read.
  const hostless = await send('PUT /v1/entries/a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n', 1000, 'after-hostless')
  t.match(hostless, /^HTTP\/1\.1 400 Bad Request\r\n[^]*"an HTTP\/1\.1 request needs a Host header"\}$/, 'only the 400')
  // Refused while waiting for its 100 Continue: no body was asked for, the connection just closes.
  const expecting = await send(
    `PUT /v1/entries/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n`,
    1000,
    'after-expect',
  )
  t.match(expecting, /^HTTP\/1\.1 401 Unauthorized\r\n[^]*\}$/, 'only the 401')
  t.equal(await app.cache.inspect('after-hostless'), undefined, 'the PUT behind the body was not applied')
  t.equal(await app.cache.inspect('after-expect'), undefined, 'nor the one behind the body no 100 asked for')
})

t.test('a refused request pipelined behind a reply still coming: its body is not read, nor the connection cut, before its turn', async (t) => {
  const { origin, app, socket, received, closed } = await withLoadInFlight(t, HELD_LOAD + 'PUT /v1/entries/a HTTP/1.1\r\nContent-Length: 10\r\n\r\n')
  await new Promise((resolve) => setTimeout(resolve, 1500)) // longer than a drain waits without a byte
  socket.write('0123456789')
  origin.release()
  await new Promise((resolve) => setTimeout(resolve, 200))
  socket.end()
  await closed
  t.match(received.out, /^HTTP\/1\.1 200 OK\r\n[^]*"user":"1"[^]*HTTP\/1\.1 400 Bad Request\r\n[^]*"an HTTP\/1\.1 request needs a Host header"/, 'the load, then the 400')
  await app.close()
})

t.test('shutdown: a refused upload whose body does not come holds the shutdown a second at most', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () =>
    socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: ${4 * MiB}\r\n\r\n`),
  )
  t.teardown(() => socket.destroy())
  socket.on('error', () => undefined)
  let out = ''
  socket.on('data', (d) => (out += d.toString()))
  while (!out.includes('"unauthorized"')) await new Promise((resolve) => setTimeout(resolve, 5))
  const started = performance.now()
  await app.close()
  const took = performance.now() - started
  t.ok(took < 2500, `closed after ${Math.round(took)} ms`)
})

t.test('an error reply to a request without a body keeps the connection, and says so', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const out = await exchange(port, `GET /v1/entries/a?bogus=1 HTTP/1.0\r\nAuthorization: Bearer ${KEYS.admin}\r\nConnection: keep-alive\r\n\r\n`, {
    onFirstData: (socket) => setTimeout(() => socket.end(), 100),
  })
  t.match(out, /^HTTP\/1\.1 400 Bad Request\r\n[^]*Connection: keep-alive\r\n/, 'a 400 that keeps the HTTP/1.0 connection')
})

t.test('a refused upload queued behind a reply that closes the connection does not hold the connection open', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // A body that is not JSON (its 400 closes the connection), then a refused upload behind it.
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () =>
    socket.write(
      `PUT /v1/entries/j HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{"v":` +
        `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n${'x'.repeat(1000)}`,
    ),
  )
  t.teardown(() => socket.destroy())
  socket.on('error', () => undefined)
  let out = ''
  socket.on('data', (d) => (out += d.toString()))
  while (!out.includes('}')) await new Promise((resolve) => setTimeout(resolve, 5))
  await new Promise((resolve) => setTimeout(resolve, 300))
  const open = await new Promise<number>((resolve, reject) => app.server.getConnections((error, count) => (error ? reject(error) : resolve(count))))
  t.match(out, /^HTTP\/1\.1 400 Bad Request\r\n/, 'the 400')
  t.equal(open, 0, 'the server closed the connection')
})

t.test('outside shutdown, an upload refused with a 413 may pause mid-body (a client that reads only once it has sent all)', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const { out, error, sentAll } = await new Promise<{ out: string; error?: string; sentAll: boolean }>((resolve) => {
    let out = ''
    let error: string | undefined
    let sentAll = false
    const socket = connect({ port, host: '127.0.0.1' }, () => {
      socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${10 * MiB}\r\n\r\n`)
      socket.write('x'.repeat(5 * MiB))
      setTimeout(() => {
        if (socket.destroyed) return
        sentAll = true
        socket.end('x'.repeat(5 * MiB))
      }, 1500)
    })
    t.teardown(() => socket.destroy())
    socket.on('data', (d) => (out += d.toString()))
    socket.on('error', (e: Error & { code?: string }) => (error = e.code ?? e.message))
    socket.on('close', () => resolve({ out, error, sentAll }))
  })
  t.match(out, /^HTTP\/1\.1 413 /, 'the 413')
  t.ok(sentAll, 'the connection was still open after the pause')
  t.equal(error, undefined, 'no reset')
})

t.test('a refusal that keeps an HTTP/1.0 keep-alive connection says so', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const out = await exchange(
    port,
    `PUT /v1/entries/k HTTP/1.0\r\nAuthorization: Bearer wrong-key\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello` +
      `GET /health/live HTTP/1.0\r\n\r\n`,
  )
  t.match(out, /^HTTP\/1\.1 401 Unauthorized\r\n[^]*Connection: keep-alive\r\n[^]*HTTP\/1\.1 200 OK\r\n/, 'the 401 keeps the connection and says so; the next request is answered')
})

t.test('shutdown: an upload whose 503 waits behind a load aborted at the cut: the shutdown ends within the grace', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/1/dashboard', { user: '1' })
  origin.hold() // never released: the load is aborted a second before the grace ends
  const app = await buildApp({ apiKeys: TEST_API_KEYS, shutdownGraceMs: 3000, configFile: { origins: [dashboardOrigin(origin)] } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  // An uploader that goes on sending after the server's FIN.
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => socket.write(HELD_LOAD))
  t.teardown(() => socket.destroy())
  socket.on('error', () => undefined)
  await origin.waitForCalls(1)
  const started = performance.now()
  const closing = app.close()
  while (app.server.listening) await new Promise((resolve) => setTimeout(resolve, 5))
  // Its 503 waits behind the load, whose abort comes with the cut.
  socket.write(`PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nContent-Length: ${20 * MiB}\r\n\r\n`)
  const trickle = setInterval(() => socket.writable && socket.write('x'.repeat(128 * 1024)), 100)
  t.teardown(() => clearInterval(trickle))
  await closing
  const took = performance.now() - started
  t.ok(took < 2800, `closed after ${Math.round(took)} ms, within the 3 s grace`)
})

t.test('a refused body queued behind a reply in progress is left unread until its turn', async (t) => {
  const { origin, app, socket, closed } = await withLoadInFlight(
    t,
    HELD_LOAD + `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`,
  )
  socket.on('error', () => undefined)
  const chunk = 'x'.repeat(MiB)
  const frame = `${chunk.length.toString(16)}\r\n${chunk}\r\n`
  let sent = 0
  const until = performance.now() + 1000
  while (performance.now() < until && !socket.destroyed) {
    // Waits at most 50 ms; the abort takes the listeners off (a lost race would leave them on).
    if (!socket.write(frame)) await once(socket, 'drain', { signal: AbortSignal.timeout(50) }).catch(() => undefined)
    else sent += chunk.length
  }
  t.ok(sent < 32 * MiB, `the client could send ${Math.round(sent / MiB)} MiB past the body limit while the reply ahead was held`)
  origin.release()
  socket.destroy()
  await closed
  await app.close()
})

t.test('a 400 for a bad URL reaches a client still uploading, as other refusals do', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const chunks = 16
  for (const path of ['/v1/entries/%zz', `/v1/entries/${'a'.repeat(5000)}`]) {
    const upload = slowUpload(t, port, {
      head: `PUT ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`,
      chunks,
    })
    const { out, error } = await upload.result
    t.match(out, /^HTTP\/1\.1 400 Bad Request\r\n[^]*"invalid_request"/, `the 400 (${path.slice(0, 20)})`)
    t.equal(error, undefined, 'the connection closed cleanly')
  }
})

t.test('a GET sent with a body: the reply reaches a client still uploading; a body over 64 MiB closes the connection', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const chunks = 16
  const upload = slowUpload(t, port, {
    head: `GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`,
    chunks,
  })
  const { out, error } = await upload.result
  t.match(out, /^HTTP\/1\.1 200 OK\r\n/, 'the 200')
  t.equal(error, undefined, 'the connection closed cleanly')
  const huge = await exchange(port, `GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: ${200 * MiB}\r\n\r\n${'x'.repeat(1024)}`)
  t.match(huge, /^HTTP\/1\.1 200 OK\r\n[^]*connection: close\r\n/i, 'a declared 200 MiB is not read: the connection closes after the reply')
})

t.test('a request refused before its body broke off gets one reply, not a second for the broken body', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const out = await exchange(port, 'POST /v1/invalidations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n', {
    onFirstData: (socket) => socket.write('zz\r\n'),
  })
  t.match(out, /^HTTP\/1\.1 401 Unauthorized\r\n/, 'the 401')
  t.equal(out.match(/HTTP\/1\.1 /g)?.length, 1, 'and nothing after it')
})

t.test('shutdown: a client that reads nothing of its reply does not hold the shutdown past the grace', async (t) => {
  const { app, slow } = await unreadReply(t, { graceMs: 2000 })
  await new Promise((resolve) => setTimeout(resolve, 500)) // the reply is written (ended) by now
  const started = performance.now()
  // Well within the grace: what follows the close (stores, origins) must fit in before it ends.
  const closed = await Promise.race([app.close().then(() => true), new Promise((resolve) => setTimeout(resolve, 1900, false))])
  t.ok(closed, `closed after ${Math.round(performance.now() - started)} ms, before the 2 s grace`)
})

t.test('a 417 for an Expect other than 100-continue reaches a client that sends its body anyway', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const chunks = 8
  for (const expect of ['foo', '100-continuex']) {
    const upload = slowUpload(t, port, {
      head: `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.admin}\r\nExpect: ${expect}\r\nContent-Type: application/json\r\nContent-Length: ${chunks * 256 * 1024}\r\n\r\n`,
      chunks,
    })
    const { out, error } = await upload.result
    t.match(out, new RegExp(`^HTTP/1\\.1 417 Expectation Failed\r\n[^]*"Expect: ${expect} is not supported \\(only 100-continue\\)"`), `the 417 (${expect})`)
    t.equal(error, undefined, 'the connection closed cleanly')
  }
})

t.test('shutdown: a reply still moving to a slow reader in the grace\'s last second is not cut', async (t) => {
  const { app, slow } = await unreadReply(t, { graceMs: 3000 })
  await new Promise((resolve) => setTimeout(resolve, 300))
  const closing = app.close()
  await new Promise((resolve) => setTimeout(resolve, 1500)) // then read, slowly, across the cut at 2 s
  let received = 0
  slow.on('data', (d: Buffer) => {
    received += d.length
    slow.pause()
    setTimeout(() => slow.resume(), 2)
  })
  slow.resume()
  await once(slow, 'close')
  await closing
  t.ok(received > 16 * (MiB - 16), `received ${received} bytes: the whole reply`)
})
