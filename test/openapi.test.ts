import { readFileSync } from 'node:fs'
import t from 'tap'
import { renderOpenApi } from '../src/openapi.js'
import { build } from './helpers/build.js'

const committedPath = new URL('../openapi/openapi.json', import.meta.url)

interface Operation {
  summary?: string
  description?: string
  tags?: string[]
  security?: Array<Record<string, unknown>>
  responses: Record<string, unknown>
}

t.test('openapi/openapi.json is what the route schemas generate', async (t) => {
  const fresh = await renderOpenApi()
  let committed = ''
  try {
    committed = readFileSync(committedPath, 'utf8')
  } catch {
    // Missing counts as out of date.
  }
  if (committed !== fresh) {
    t.fail('openapi/openapi.json is out of date with the route schemas: run npm run openapi and commit the result')
    return
  }
  t.pass('openapi/openapi.json is up to date')
})

t.test('every operation is documented, and authenticated ones carry the bearer scheme', async (t) => {
  const doc = JSON.parse(await renderOpenApi()) as {
    openapi: string
    components: { securitySchemes: Record<string, unknown> }
    paths: Record<string, Record<string, Operation>>
  }
  t.match(doc.openapi, /^3\./)
  t.same(doc.components.securitySchemes.bearerAuth, {
    type: 'http',
    scheme: 'bearer',
    description: 'An API key secret (CACHEWARDEN_API_KEYS)',
  })
  t.same(doc.components.securitySchemes.metricsToken, { type: 'http', scheme: 'bearer', description: 'METRICS_TOKEN, for /metrics only, when it is set' })
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const name = `${method.toUpperCase()} ${path}`
      t.ok(op.summary, `${name} has a summary`)
      t.ok(op.description, `${name} has a description`)
      t.ok(op.tags?.length, `${name} has a tag`)
      t.ok(Object.keys(op.responses).some((s) => s.startsWith('2')), `${name} documents its success`)
      for (const [status, r] of Object.entries(op.responses)) {
        const description = (r as { description?: string }).description
        t.ok(description && description !== 'Default Response', `${name} ${status} says what it is (${description})`)
      }
      // Any of these may be sent a body, and a body that is not JSON is a 400 on every one.
      if (['post', 'put', 'patch', 'delete'].includes(method)) {
        t.ok(op.responses['400'], `${name} documents its 400`)
        t.ok(op.responses['413'], `${name} documents its 413: a body is read, up to the body limit`)
      }
      // Every /v1 query string refuses a parameter it does not have (not the stream's).
      if (path.startsWith('/v1/') && path !== '/v1/invalidations/stream') t.ok(op.responses['400'], `${name} documents its 400`)
      if (op.responses['429']) {
        t.ok((op.responses['429'] as { headers?: Record<string, unknown> }).headers?.['Retry-After'], `${name}: a 429 says when to retry`)
      }
      if (name === 'GET /metrics') {
        t.same(op.security, [{}, { metricsToken: [] }], 'GET /metrics: open, or its own METRICS_TOKEN scheme')
        t.ok(op.responses['401'], 'GET /metrics documents its 401')
      } else if (op.security) {
        t.same(op.security, [{ bearerAuth: [] }], `${name} names the bearer scheme`)
        t.ok(op.responses['401'] && op.responses['403'], `${name} documents 401 and 403`)
      }
    }
  }
  // The routes that need a key are exactly those the document marks as secured.
  const secured = Object.entries(doc.paths).flatMap(([path, methods]) =>
    Object.entries(methods)
      .filter(([, op]) => op.security?.some((scheme) => 'bearerAuth' in scheme))
      .map(([method]) => `${method.toUpperCase()} ${path}`),
  )
  for (const [method, url] of [['GET', '/v1/stats'], ['PUT', '/v1/entries/{key}'], ['GET', '/v1/invalidations/stream']]) {
    t.ok(secured.includes(`${method} ${url}`), `${method} ${url} is secured`)
  }
  for (const [method, url] of [['GET', '/metrics'], ['GET', '/health/live']]) {
    t.notOk(secured.includes(`${method} ${url}`), `${method} ${url} is open`)
  }
  // HEAD on an entry and on the stream is documented beside its GET: the same statuses, no bodies.
  for (const path of ['/v1/entries/{key}', '/v1/invalidations/stream']) {
    const head = doc.paths[path]!.head!
    t.same(Object.keys(head.responses), Object.keys(doc.paths[path]!.get!.responses), `HEAD ${path}`)
    t.notOk(Object.values(head.responses).some((r) => (r as { content?: unknown }).content !== undefined), `HEAD ${path}: no bodies`)
  }
  const streamParams = (doc.paths['/v1/invalidations/stream']!.get as unknown as { parameters: Array<{ in: string; name: string }> }).parameters
  t.match(streamParams, [{ in: 'header', name: 'last-event-id' }], 'the stream documents Last-Event-ID')
  // A conditional read: If-None-Match in, ETag out on the 200 and the 304.
  const read = doc.paths['/v1/entries/{key}']!.get as unknown as { parameters: Array<{ in: string; name: string }>; responses: Record<string, { headers?: Record<string, unknown> }> }
  t.ok(read.parameters.some((p) => p.in === 'header' && p.name === 'if-none-match'), 'GET /v1/entries/{key} documents If-None-Match')
  for (const status of ['200', '304']) t.ok(read.responses[status]?.headers?.etag, `GET /v1/entries/{key} ${status} documents its ETag`)
})

t.test('GET /docs serves Swagger UI and GET /docs/json the document', async (t) => {
  const app = await build(t)
  const ui = await app.inject({ method: 'GET', url: '/docs' })
  t.equal(ui.statusCode, 200)
  t.match(ui.headers['content-type'], /text\/html/)
  t.match(ui.body, /swagger-ui/i)
  const json = await app.inject({ method: 'GET', url: '/docs/json' })
  t.equal(json.statusCode, 200)
  const doc = json.json()
  t.equal(doc.info.title, 'cachewarden')
  t.ok(doc.paths['/v1/entries/{key}'].get, 'lists the routes')
  t.notOk(Object.keys(doc.paths).some((p) => p.startsWith('/docs')), 'the docs routes are not in the document')
})
