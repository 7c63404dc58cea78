import t from 'tap'
import { build, call, get } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'
import { parseScrape, valueOf } from '../helpers/prometheus.js'

t.test('origin calls and refreshes against a real origin show up in /metrics, labelled by origin name only', async (t) => {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/42/dashboard', { widgets: 3 })
  const app = await build(t, { configFile: { origins: [dashboardOrigin(origin)] } })

  t.equal((await get(app, 'dashboard:42', '?load=true')).statusCode, 200, 'read-through fill')
  const refreshed = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A42/refresh' })
  t.equal(refreshed.statusCode, 200, 'forced refresh')
  origin.failAll = 500
  const failed = await call(app, { method: 'POST', url: '/v1/entries/dashboard%3A42/refresh' })
  t.not(failed.statusCode, 200, 'a refresh against a failing origin fails')

  const s = parseScrape((await app.inject({ url: '/metrics' })).body)
  t.equal(valueOf(s, 'cachewarden_origin_requests_total', { origin: 'dashboards', result: 'success' }), 2)
  t.ok((valueOf(s, 'cachewarden_origin_requests_total', { origin: 'dashboards', result: 'error' }) ?? 0) >= 1, 'the failure counted')
  t.ok((valueOf(s, 'cachewarden_origin_request_duration_seconds_count', { origin: 'dashboards' }) ?? 0) >= 3, 'each call timed')
  t.ok((valueOf(s, 'cachewarden_refreshes_total', { result: 'success' }) ?? 0) >= 1, 'the refresh counted')
  t.ok((valueOf(s, 'cachewarden_refreshes_total', { result: 'error' }) ?? 0) >= 1, 'the failed refresh counted')
  const labelValues = s.samples.flatMap((x) => Object.values(x.labels))
  t.notOk(labelValues.some((v) => v.includes('42') || v.includes('127.0.0.1')), 'no user id or origin URL in a label')
})
