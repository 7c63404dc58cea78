// GET-hit throughput with and without the metrics plugin, measured in the same run.
//   node --import tsx bench/metrics.ts            (about 30 s)
// Rounds alternate (off, on, off, on…) so a neighbour's load on a shared machine hits both.
import autocannon from 'autocannon'
import type { FastifyInstance } from 'fastify'
import { Histogram, Registry } from 'prom-client'
import { buildApp } from '../src/app.js'
import { parseApiKeys } from '../src/config.js'
import { LatencyHistogram } from '../src/plugins/latency-histogram.js'

const SECRET = 'bench-secret-0123456789'
const ROUNDS = Number(process.env.ROUNDS ?? 3)
const SECONDS = Number(process.env.SECONDS ?? 4)
const CONNECTIONS = 10

async function start(metrics: boolean): Promise<{ app: FastifyInstance; url: string }> {
  const app = await buildApp({ apiKeys: parseApiKeys(`bench:admin:${SECRET}`) }, { metrics })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  const url = `http://127.0.0.1:${address.port}`
  const put = await fetch(`${url}/v1/entries/dashboard%3A42`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
    body: JSON.stringify({ value: { widgets: [1, 2, 3], title: 'a typical small dashboard value' }, ttlMs: 3_600_000 }),
  })
  if (put.status !== 200) throw new Error(`PUT failed: ${put.status}`)
  return { app, url }
}

async function run(url: string, duration: number) {
  const result = await autocannon({
    url: `${url}/v1/entries/dashboard%3A42`,
    headers: { authorization: `Bearer ${SECRET}` },
    connections: CONNECTIONS,
    duration,
  })
  if (result.non2xx > 0 || result.errors > 0) throw new Error(`${result.non2xx} non-2xx, ${result.errors} errors`)
  return { rps: result.requests.average, p99: result.latency.p99 }
}

const off = await start(false)
const on = await start(true)
await run(off.url, 1) // warm-up (JIT, connection pools)
await run(on.url, 1)

const results = { off: [] as number[], on: [] as number[], offP99: [] as number[], onP99: [] as number[] }
for (let i = 0; i < ROUNDS; i++) {
  const a = await run(off.url, SECONDS)
  const b = await run(on.url, SECONDS)
  results.off.push(a.rps)
  results.offP99.push(a.p99)
  results.on.push(b.rps)
  results.onP99.push(b.p99)
  console.log(`round ${i + 1}: without metrics ${a.rps.toFixed(0)} req/s, with metrics ${b.rps.toFixed(0)} req/s`)
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length
const scrape = await fetch(`${on.url}/metrics`).then((r) => r.text())
const observed = /cachewarden_http_request_duration_seconds_count\{route="\/v1\/entries\/:key",method="GET",status_code="200"\} (\d+)/.exec(scrape)
console.log(`\nGET hit, ${CONNECTIONS} connections, ${ROUNDS} x ${SECONDS} s each, Node ${process.version}`)
console.log(`without metrics plugin: ${mean(results.off).toFixed(0)} req/s (p99 ${mean(results.offP99).toFixed(2)} ms)`)
console.log(`with metrics plugin:    ${mean(results.on).toFixed(0)} req/s (p99 ${mean(results.onP99).toFixed(2)} ms)`)
console.log(`ratio with/without:     ${(mean(results.on) / mean(results.off)).toFixed(3)}`)
console.log(`requests the histogram counted: ${observed?.[1] ?? 'none'}`)

// The hook's own cost, which the noisy end-to-end numbers cannot resolve: the observe the
// onResponse hook makes (a LatencyHistogram child), in a tight loop, against prom-client's
// Histogram observe with the same labels (what the hook used before).
const BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
const histogram = new Histogram({ name: 'bench_seconds', help: 'bench', labelNames: ['route', 'method', 'status_code'], buckets: BUCKETS, registers: [new Registry()] })
const child = new LatencyHistogram('bench_latency_seconds', 'bench', BUCKETS, new Registry()).child({ route: '/v1/entries/:key', method: 'GET', status_code: 200 })
const N = 500_000
function timeIt(fn: () => void): number {
  for (let i = 0; i < 50_000; i++) fn()
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < N; i++) fn()
  return Number(process.hrtime.bigint() - t0) / N
}
const promNs = timeIt(() => histogram.observe({ route: '/v1/entries/:key', method: 'GET', status_code: 200 }, 0.0002))
const ns = timeIt(() => child.observe(0.0002))
console.log(`one observe, prom-client Histogram (baseline): ${promNs.toFixed(0)} ns`)
console.log(`one observe, LatencyHistogram child (the hook's work): ${ns.toFixed(0)} ns, ${((ns / 1e9) * mean(results.off) * 100).toFixed(2)}% of a core at the measured rate`)
await off.app.close()
await on.app.close()
