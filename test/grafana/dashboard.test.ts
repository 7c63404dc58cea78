import { readFileSync } from 'node:fs'
import { parser } from '@prometheus-io/lezer-promql'
import t from 'tap'
import { parse as parseYaml } from 'yaml'
import { build, call, get, put } from '../helpers/build.js'
import { parseScrape, type Scrape } from '../helpers/prometheus.js'

const root = new URL('../../', import.meta.url)
const dashboard = JSON.parse(readFileSync(new URL('grafana/cachewarden-dashboard.json', root), 'utf8'))
const alertsText = readFileSync(new URL('grafana/alerts.yml', root), 'utf8')

interface Panel {
  id: number
  type: string
  title: string
  datasource?: { type: string; uid: string }
  targets?: Array<{ expr: string; datasource?: { uid: string } }>
  panels?: Panel[]
}

const panels: Panel[] = (dashboard.panels as Panel[]).flatMap((p) => [p, ...(p.panels ?? [])])
const dashboardExprs = panels.flatMap((p) => (p.targets ?? []).map((target) => ({ panel: p.title, expr: target.expr })))

/** Metric names a PromQL expression uses (ours and prom-client's process metrics). */
function metricNames(expr: string): string[] {
  const names = expr.match(/\b(?:cachewarden|process|nodejs)_[a-zA-Z0-9_]+\b/g) ?? []
  return [...new Set(names)]
}

/** PromQL syntax errors, with Grafana's `$__rate_interval` and `$instance` stood in for. */
function promqlErrors(expr: string): string[] {
  const plain = expr.replaceAll('$__rate_interval', '5m').replaceAll('$instance', '.*')
  const errors: string[] = []
  parser.parse(plain).iterate({
    enter: (node) => {
      if (node.type.isError) errors.push(`syntax error at ${node.from}: …${plain.slice(Math.max(0, node.from - 20), node.from + 20)}…`)
    },
  })
  return errors
}

async function realScrape(t: { teardown(fn: () => unknown): void }): Promise<Scrape> {
  const app = await build(t)
  await put(app, 'a', { value: 1 })
  await get(app, 'a')
  await call(app, { method: 'DELETE', url: '/v1/entries/a', key: 'invalidate' })
  const res = await app.inject({ method: 'GET', url: '/metrics' })
  return parseScrape(res.body)
}

t.test('every metric the dashboard plots exists in a real scrape', async (t) => {
  const scrape = await realScrape(t)
  t.ok(dashboardExprs.length >= 15, `the dashboard has queries (${dashboardExprs.length})`)
  for (const { panel, expr } of dashboardExprs) {
    const names = metricNames(expr)
    t.ok(names.length > 0, `"${panel}" queries a metric`)
    for (const name of names) t.ok(scrape.queryable.has(name), `"${panel}": ${name} is exposed`)
    t.same(promqlErrors(expr), [], `"${panel}": the query parses`)
  }
})

t.test('the dashboard is importable with the data source as a variable', async (t) => {
  t.equal(dashboard.uid, 'cachewarden')
  t.equal(typeof dashboard.title, 'string')
  t.equal(typeof dashboard.schemaVersion, 'number')
  const variables = dashboard.templating.list as Array<{ name: string; type: string; query: unknown }>
  const ds = variables.find((v) => v.name === 'datasource')
  t.same({ type: ds?.type, query: ds?.query }, { type: 'datasource', query: 'prometheus' })
  const ids = panels.map((p) => p.id)
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique')
  for (const p of panels.filter((p) => p.type !== 'row')) {
    t.same(p.datasource, { type: 'prometheus', uid: '${datasource}' }, `"${p.title}" uses the variable`)
    for (const target of p.targets ?? []) t.equal(target.datasource?.uid, '${datasource}')
  }
  t.notMatch(JSON.stringify(dashboard), /"uid":\s*"(?!\$\{datasource\}|cachewarden")/, 'no hard-coded data source uid')

  const titles = panels.map((p) => p.title.toLowerCase()).join(' | ')
  for (const topic of ['request rate', 'p50', 'p99', 'hit ratio', 'entries', 'bytes', 'evictions', 'invalidations by selector',
    'source', 'invalidated entries', 'failures', 'lease rejections', 'origin', 'refreshes', 'bus', 'listener']) {
    t.ok(titles.includes(topic), `a panel for ${topic}`)
  }
})

t.test('the alert rules are well formed and use only exposed metrics', async (t) => {
  const scrape = await realScrape(t)
  const doc = parseYaml(alertsText) as { groups: Array<{ name: string; rules: Array<Record<string, unknown>> }> }
  t.ok(Array.isArray(doc.groups) && doc.groups.length > 0, 'has groups')
  const alerts: string[] = []
  for (const group of doc.groups) {
    t.equal(typeof group.name, 'string', 'the group has a name')
    t.ok(Array.isArray(group.rules) && group.rules.length > 0, `group ${group.name} has rules`)
    for (const rule of group.rules) {
      const name = rule.alert as string
      t.match(name, /^[A-Z][A-Za-z0-9]+$/, 'alert is a CamelCase name')
      alerts.push(name)
      t.same(Object.keys(rule).filter((k) => !['alert', 'expr', 'for', 'labels', 'annotations', 'keep_firing_for'].includes(k)), [], `${name}: no unknown fields`)
      t.equal(typeof rule.expr, 'string', `${name}: expr`)
      t.match(rule.for, /^\d+[smhd]$/, `${name}: for is a duration`)
      const labels = rule.labels as Record<string, string>
      t.ok(['warning', 'critical'].includes(labels?.severity), `${name}: severity label`)
      const annotations = rule.annotations as Record<string, string>
      t.ok(annotations?.summary && annotations?.description, `${name}: summary and description`)
      t.same(promqlErrors(rule.expr as string), [], `${name}: expr parses`)
      const names = metricNames(rule.expr as string)
      t.ok(names.length > 0, `${name}: uses a metric`)
      for (const metric of names) t.ok(scrape.queryable.has(metric), `${name}: ${metric} is exposed`)
    }
  }
  t.equal(new Set(alerts).size, alerts.length, 'alert names are unique')
  for (const needed of ['HitRatio', 'InvalidationFailures', 'BusDown', 'PgListenerDown', 'P99Latency']) {
    t.ok(alerts.some((a) => a.includes(needed)), `an alert for ${needed}`)
  }
})

t.test('the PromQL check itself rejects a broken query', async (t) => {
  t.not(promqlErrors('sum(rate(cachewarden_cache_hits_total[5m]) /').length, 0)
})
