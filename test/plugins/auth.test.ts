import t from 'tap'
import { defaultConfig } from '../../src/config.js'
import { KEYS, build, call, put } from '../helpers/build.js'

t.test('no key, an unknown key or a malformed header is 401 unauthorized', async (t) => {
  const app = await build(t)
  for (const authorization of [undefined, 'Bearer nope', `Basic ${KEYS.admin}`, 'Bearer', `Bearer ${KEYS.admin}x`, `bearer${KEYS.admin}`]) {
    const res = await app.inject({ method: 'GET', url: '/v1/entries/k', headers: authorization ? { authorization } : {} })
    t.equal(res.statusCode, 401, String(authorization))
    t.same(Object.keys(res.json()).sort(), ['error', 'message'])
    t.equal(res.json().error, 'unauthorized')
    t.equal(res.headers['www-authenticate'], 'Bearer realm="cachewarden"', 'says which scheme would do')
  }
  const forbidden = await call(app, { method: 'GET', url: '/v1/stats', key: 'read' })
  t.equal(forbidden.statusCode, 403)
  t.equal(forbidden.headers['www-authenticate'], undefined, 'a 403 asks for no other credentials')
})

t.test('each route needs its scope and admin implies all', async (t) => {
  const app = await build(t)
  await put(app, 'k', { value: 1 })
  const routes = [
    { method: 'GET', url: '/v1/entries/k', scope: 'read' },
    { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['k'] }, scope: 'read' },
    { method: 'PUT', url: '/v1/entries/k', payload: { value: 2 }, scope: 'write' },
    { method: 'POST', url: '/v1/entries/batch-set', payload: { entries: [] }, scope: 'write' },
    { method: 'DELETE', url: '/v1/entries/x', scope: 'invalidate' },
    { method: 'POST', url: '/v1/invalidations', payload: { keys: ['x'] }, scope: 'invalidate' },
    { method: 'DELETE', url: '/v1/users/u/entries', scope: 'invalidate' },
    { method: 'DELETE', url: '/v1/tags/t/entries', scope: 'invalidate' },
    { method: 'GET', url: '/v1/debug/users/u', scope: 'admin' },
    { method: 'GET', url: '/v1/debug/entries/k', scope: 'admin' },
    { method: 'GET', url: '/v1/debug/invalidations', scope: 'admin' },
    { method: 'GET', url: '/v1/stats', scope: 'admin' },
    { method: 'POST', url: '/v1/stats/reset', scope: 'admin' },
    { method: 'GET', url: '/v1/debug/audit', scope: 'admin' },
    { method: 'POST', url: '/v1/consistency', payload: { against: 'provided', entries: [{ key: 'k', value: 1 }] }, scope: 'admin' },
    { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'scope test' }, scope: 'admin' },
    { method: 'POST', url: '/v1/admin/clear', payload: { token: 'not-a-token' }, scope: 'admin' },
    { method: 'POST', url: '/v1/events', payload: { type: 'nothing.happened', data: {} }, scope: 'invalidate' },
    { method: 'POST', url: '/v1/warm', payload: { keys: ['k'] }, scope: 'write' },
    { method: 'POST', url: '/v1/entries/k/refresh', scope: 'write' },
  ] as const
  for (const route of routes) {
    for (const key of ['read', 'write', 'invalidate', 'admin'] as const) {
      const res = await call(app, { method: route.method, url: route.url, key, ...('payload' in route ? { payload: route.payload } : {}) })
      const allowed = key === 'admin' || key === route.scope
      // Allowed means past auth: the route may still refuse the request itself (a bad clear
      // token, no origin to refresh from), but never as unauthorized or forbidden.
      if (allowed) t.notOk(['unauthorized', 'forbidden'].includes(res.json().error), `${route.method} ${route.url} with ${key}: ${res.statusCode}`)
      else {
        t.equal(res.statusCode, 403, `${route.method} ${route.url} with ${key}`)
        t.equal(res.json().error, 'forbidden')
      }
    }
  }
  const both = await call(app, { method: 'PUT', url: '/v1/entries/k', payload: { value: 3 }, key: 'readwrite' })
  t.equal(both.statusCode, 200, 'a key with read+write writes')
})

t.test('health routes need no key', async (t) => {
  const app = await build(t)
  t.equal((await app.inject({ url: '/health/live' })).statusCode, 200)
  const ready = await app.inject({ url: '/health/ready' })
  t.equal(ready.statusCode, 200)
  t.equal(ready.json().status, 'ready')
})

t.test('with no keys configured every authenticated route is closed', async (t) => {
  const app = await build(t, { apiKeys: [] })
  t.equal((await app.inject({ url: '/v1/entries/k', headers: { authorization: 'Bearer anything' } })).statusCode, 401)
})

t.test('every documented operation that declares bearer auth refuses a request without a key', async (t) => {
  // With the auth-failure limit on as configured by default: requests with no key are not
  // guesses, so however many there are they stay 401s.
  const app = await build(t, { security: { ...defaultConfig().security, authFailureLimitMax: 2 } })
  const doc = app.swagger() as { paths: Record<string, Record<string, { security?: Array<Record<string, unknown>> }>> }
  let checked = 0
  for (const [path, operations] of Object.entries(doc.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      // Not /metrics: open unless METRICS_TOKEN is set (its scheme is optional, `{}` first).
      if (!operation.security?.some((scheme) => 'bearerAuth' in scheme)) continue
      const url = path.replace(/\{[^}]+\}/g, 'x')
      const res = await app.inject({ method: method.toUpperCase() as 'GET', url })
      t.equal(res.statusCode, 401, `${method.toUpperCase()} ${path}`)
      checked++
    }
  }
  t.ok(checked >= 20, `checked ${checked} secured operations`)
})
