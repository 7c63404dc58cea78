import fc from 'fast-check'
import type { InjectOptions } from 'fastify'
import t from 'tap'
import { DEFAULT_SECURITY } from '../../src/config.js'
import { FakeClock, KEYS, build, get, put } from '../helpers/build.js'

// Thousands of random and malformed requests against every route, through app.inject:
// never a 5xx, never a crash, every error in the contract's shape, and the entries written
// before are all still there and unchanged afterwards.

const RUNS = Number(process.env.FUZZ_RUNS ?? 2500)
// Every protected name starts with this; a request that could name one is left out.
const MARK = 'Ω'
const PROTECTED = Array.from({ length: 40 }, (_, i) => ({
  key: `${MARK}protected:${i}`,
  value: { i, text: `value-${i}`, nested: { list: [i, i + 1] } },
  userId: `${MARK}user-${i % 4}`,
  tags: [`${MARK}tag-${i % 5}`],
}))

const name = fc.oneof(
  { weight: 4, arbitrary: fc.string({ minLength: 0, maxLength: 16 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 12 }) },
  { weight: 1, arbitrary: fc.constantFrom('__proto__', 'constructor', 'prototype', 'toString', 'a/b', '..', '.', '%', '%2F', '*', '') },
  { weight: 1, arbitrary: fc.integer({ min: 400, max: 3000 }).map((n) => 'k'.repeat(n)) },
)

// How a name becomes a path segment: properly, raw, twice, or with broken escapes.
const segment = fc.oneof(
  { weight: 4, arbitrary: name.map(encodeURIComponent) },
  { weight: 1, arbitrary: name },
  { weight: 1, arbitrary: name.map((n) => encodeURIComponent(encodeURIComponent(n))) },
  { weight: 1, arbitrary: fc.constantFrom('%zz', '%', '%0', '%00', '%ff', '%C0%AF', '%ED%A0%80', '%E0%A4%A', '%25', '%2e%2e', 'a%00b', '%0d%0a') },
  { weight: 1, arbitrary: fc.array(fc.integer({ min: 0, max: 255 }), { maxLength: 8 }).map((bytes) => bytes.map((b) => `%${b.toString(16).padStart(2, '0')}`).join('')) },
)

const ROUTES = [
  ['GET', '/v1/entries/:s'],
  ['PUT', '/v1/entries/:s'],
  ['DELETE', '/v1/entries/:s'],
  ['POST', '/v1/entries/batch-get'],
  ['POST', '/v1/entries/batch-set'],
  ['POST', '/v1/invalidations'],
  ['DELETE', '/v1/users/:s/entries'],
  ['DELETE', '/v1/tags/:s/entries'],
  ['GET', '/v1/debug/users/:s'],
  ['GET', '/v1/debug/entries/:s'],
  ['GET', '/v1/debug/invalidations'],
  ['GET', '/v1/debug/audit'],
  ['GET', '/v1/stats'],
  ['POST', '/v1/stats/reset'],
  ['POST', '/v1/admin/clear-token'],
  ['POST', '/v1/admin/clear'],
  ['GET', '/health/live'],
  ['GET', '/health/ready'],
] as const

const method = fc.constantFrom('GET', 'PUT', 'POST', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS') as fc.Arbitrary<InjectOptions['method']>

// [the route's own method, path]: most requests aim at a real route.
const target: fc.Arbitrary<readonly [string, string]> = fc.oneof(
  { weight: 8, arbitrary: fc.tuple(fc.constantFrom(...ROUTES), segment).map(([[m, p], s]) => [m, p.replace(':s', s)] as const) },
  { weight: 1, arbitrary: fc.webPath().map((p) => ['GET', p] as const) },
  { weight: 1, arbitrary: fc.string({ maxLength: 40 }).map((s) => ['POST', `/v1/${s}`] as const) },
  { weight: 1, arbitrary: fc.constantFrom('/', '//v1//entries//k', '/v1/entries', '/v1/entries/k/', '/V1/ENTRIES/k', '/v1/./entries/k', '/v1/entries/../stats', '/%2e%2e/v1/stats', '/v1/entries/k#frag').map((p) => ['GET', p] as const) },
)

const query = fc.oneof(
  { weight: 3, arbitrary: fc.constant('') },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom('allowStale', 'mode', 'limit', 'load', 'x', '__proto__'), fc.oneof(fc.constantFrom('true', 'false', 'stale', 'delete', '0', '-1', '1000', '1001', '1e3', '%zz', ''), fc.string({ maxLength: 10 }).map(encodeURIComponent))).map(([k, v]) => `?${k}=${v}`) },
  { weight: 1, arbitrary: fc.string({ maxLength: 30 }).map((s) => `?${s}`) },
)

const authorization = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(...Object.values(KEYS)).map((s) => `Bearer ${s}`) },
  { weight: 1, arbitrary: fc.constant(undefined) },
  { weight: 1, arbitrary: fc.constantFrom('Bearer', 'Bearer ', 'bearer admin-secret-0123456789', 'Basic YWRtaW46YWRtaW4=', `Bearer ${KEYS.admin} `, `Bearer  ${KEYS.admin}`, `Bearer ${KEYS.admin.slice(0, -1)}`) },
  { weight: 1, arbitrary: fc.string({ unit: 'binary-ascii', maxLength: 40 }).map((s) => `Bearer ${s}`) },
  { weight: 1, arbitrary: fc.integer({ min: 4000, max: 9000 }).map((n) => `Bearer ${'x'.repeat(n)}`) },
)

const contentType = fc.oneof(
  { weight: 6, arbitrary: fc.constant('application/json') },
  { weight: 1, arbitrary: fc.constantFrom(undefined, 'text/plain', 'application/json; charset=latin1', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/jsonx', '*/*', '') },
)

const leaf = fc.oneof(fc.string({ maxLength: 20 }), fc.integer(), fc.double(), fc.boolean(), fc.constant(null))
const nameList = fc.oneof(fc.array(name, { maxLength: 6 }), fc.array(leaf, { maxLength: 4 }), leaf)
const writeBody = fc.record(
  {
    key: name,
    value: fc.oneof(fc.jsonValue({ maxDepth: 4 }), fc.anything({ maxDepth: 3 })),
    ttlMs: fc.oneof(fc.integer({ min: -10, max: 4e9 }), leaf),
    userId: fc.oneof(name, leaf),
    tags: nameList,
    lease: fc.oneof(fc.string({ maxLength: 30 }), leaf, fc.record({ lease: fc.string({ maxLength: 20 }) })),
  },
  { requiredKeys: [] },
)
const structured = fc.oneof(
  writeBody,
  fc.record({ keys: nameList, userIds: nameList, tags: nameList, prefixes: nameList, mode: fc.oneof(fc.constantFrom('delete', 'stale'), leaf), reason: fc.oneof(fc.string({ maxLength: 30 }), leaf) }, { requiredKeys: [] }),
  fc.record({ entries: fc.oneof(fc.array(writeBody, { maxLength: 5 }), leaf) }, { requiredKeys: [] }),
  fc.record({ token: fc.oneof(fc.string({ maxLength: 60 }), leaf), reason: fc.oneof(fc.string({ maxLength: 40 }), leaf) }, { requiredKeys: [] }),
  fc.anything({ maxDepth: 3 }),
)

const deep = (n: number, open: string, close: string, inner = '1') => `{"value":${open.repeat(n)}${inner}${close.repeat(n)}}`
const body = fc.oneof(
  { weight: 2, arbitrary: fc.constant(undefined) },
  { weight: 8, arbitrary: structured.map((v) => JSON.stringify(v) ?? 'null') },
  { weight: 1, arbitrary: fc.json({ maxDepth: 3 }) },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 60 }) },
  { weight: 1, arbitrary: fc.tuple(structured, fc.nat()).map(([v, cut]) => { const s = JSON.stringify(v) ?? '{}'; return s.slice(0, cut % (s.length + 1)) }) },
  { weight: 1, arbitrary: fc.constantFrom('{"__proto__":{"polluted":1},"value":1}', '{"value":{"constructor":{"prototype":{"polluted":1}}}}', '{"keys":["a"],"__proto__":[]}', '{"value":1,"value":2}', '\u0000', '{"value":1}garbage', '[]', '"s"', '1e999999', '{"value":1e999}', '\ufeff{"value":1}') },
  { weight: 1, arbitrary: fc.integer({ min: 65, max: 400_000 }).map((n) => deep(n, '[', ']', '')) },
  { weight: 1, arbitrary: fc.integer({ min: 65, max: 100_000 }).map((n) => deep(n, '{"a":', '}')) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 6 }).map((mb) => JSON.stringify({ value: 'x'.repeat(mb * 1024 * 1024 - 100), keys: ['a'], entries: [], reason: 'x' })) },
  { weight: 1, arbitrary: fc.integer({ min: 1000, max: 1100 }).map((n) => JSON.stringify({ keys: Array.from({ length: n }, (_, i) => `x${i}`), entries: Array.from({ length: n }, (_, i) => ({ key: `x${i}`, value: i })) })) },
)

const extraHeaders = fc.dictionary(
  fc.constantFrom('if-none-match', 'x-forwarded-for', 'accept', 'accept-encoding', 'content-encoding', 'transfer-encoding', 'x-request-id', 'origin', 'cookie', 'accept-version'),
  fc.oneof(fc.string({ unit: 'binary-ascii', maxLength: 40 }).map((s) => s.replace(/[\r\n\0]/g, '')), fc.constantFrom('*', 'W/"x"', 'gzip', 'chunked', 'application/json', '1.0.0')),
  { maxKeys: 3 },
)

const requestArb = fc.record({
  method: fc.oneof({ weight: 4, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: method }),
  target,
  query,
  authorization,
  contentType,
  body,
  extraHeaders,
})

function decoded(url: string): string {
  try {
    return decodeURIComponent(decodeURIComponent(url))
  } catch {
    return url
  }
}

/** A request that might name a protected entry (or a prefix of one) is left out. */
function couldTouchProtected(url: string, payload: string | undefined): boolean {
  if (url.includes(MARK) || decoded(url).includes(MARK) || /%CE%A9/i.test(url)) return true
  if (payload === undefined) return false
  if (payload.includes(MARK) || /\\u03a9/i.test(payload)) return true
  return false
}

t.test('thousands of random and malformed requests: no 5xx, no crash, protected entries intact', async (t) => {
  const clock = new FakeClock()
  const app = await build(t, { security: { ...DEFAULT_SECURITY, authFailureLimitMax: 0 } }, { now: clock.now })
  for (const p of PROTECTED) await put(app, p.key, { value: p.value, userId: p.userId, tags: p.tags })

  const statuses = new Map<number, number>()
  let skipped = 0
  const started = Date.now()
  await fc.assert(
    fc.asyncProperty(requestArb, async (r) => {
      // Mostly the route's own method; sometimes any method on any path.
      const [ownMethod, path] = r.target
      const url = `${path.startsWith('/') ? '' : '/'}${path}${r.query}`
      const m = r.method ?? (ownMethod as InjectOptions['method'])
      if (couldTouchProtected(url, r.body)) {
        skipped++
        return true
      }
      const headers: Record<string, string> = { ...r.extraHeaders }
      if (r.authorization !== undefined) headers.authorization = r.authorization
      if (r.contentType !== undefined && r.body !== undefined) headers['content-type'] = r.contentType
      let res
      try {
        res = await app.inject({ method: m, url, headers, payload: r.body })
      } catch (error) {
        // light-my-request refuses some inputs before they reach the server (e.g. a bad header value).
        if (/invalid|header|url/i.test((error as Error).message)) return true
        throw error
      }
      statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1)
      if (res.statusCode >= 500) {
        throw new Error(`${m} ${url.slice(0, 120)} -> ${res.statusCode} ${res.body.slice(0, 200)}`)
      }
      if (res.statusCode >= 400 && m !== 'HEAD') {
        const parsed = JSON.parse(res.body) as { error?: unknown; message?: unknown }
        if (typeof parsed.error !== 'string' || typeof parsed.message !== 'string') {
          throw new Error(`${m} ${url.slice(0, 120)} -> ${res.statusCode} without {error, message}: ${res.body.slice(0, 200)}`)
        }
        if (/\n\s+at /.test(res.body)) throw new Error(`a stack leaked: ${res.body.slice(0, 200)}`)
      }
      return true
    }),
    { numRuns: RUNS, seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined },
  )
  const sent = [...statuses.values()].reduce((a, b) => a + b, 0)
  t.comment(`fuzz: ${sent} requests in ${Date.now() - started} ms, ${skipped} skipped; statuses ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`)
  t.ok(sent > RUNS * 0.8, 'most generated requests were sent')
  for (const s of [200, 400, 401, 404, 413]) t.ok(statuses.has(s), `the fuzz reached status ${s}`)

  for (const p of PROTECTED) {
    const res = await get(app, p.key)
    t.equal(res.statusCode, 200, `${p.key} is still readable`)
    t.same(res.json().value, p.value)
  }
  t.equal(({} as Record<string, unknown>).polluted, undefined, 'Object.prototype is untouched')
  t.equal((await app.inject({ method: 'GET', url: '/health/ready' })).statusCode, 200)
})
