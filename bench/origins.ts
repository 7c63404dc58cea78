// Origins benchmark: origin calls and client-side latency for
//  1. 500 concurrent `GET ?load=true` of one cold key (single flight), against two
//     baselines measured in the same run: 500 concurrent hits of a warm key, and 500
//     clients doing uncoordinated cache-aside (miss, fetch the origin themselves, PUT);
//  2. 10k reads over 1k keys while every key is past refreshAhead, against the same
//     10k reads before the threshold (no refreshes).
// Run: node --import tsx bench/origins.ts
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Pool } from 'undici'
import { buildApp } from '../src/app.js'
import { parseApiKeys } from '../src/config.js'

const SECRET = 'bench-secret-0123456789'
const ORIGIN_DELAY_MS = 20
const ROUNDS = 5
const CONCURRENT = 500
const KEYS = 1000
const READS = 10_000
const READ_WORKERS = 64
const TTL_MS = 600_000

let originCalls = 0
const origin = createServer((req, res) => {
  originCalls++
  setTimeout(() => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ path: req.url, widgets: [1, 2, 3], at: originCalls }))
  }, ORIGIN_DELAY_MS)
})
await new Promise<void>((r) => origin.listen(0, '127.0.0.1', r))
const originBase = `http://127.0.0.1:${(origin.address() as AddressInfo).port}`

let fakeNow = Date.now()
const app = await buildApp(
  {
    apiKeys: parseApiKeys(`bench:admin:${SECRET}`),
    configFile: {
      origins: [
        { name: 'dashboards', keyPattern: 'dashboard:{userId}', url: `${originBase}/users/{userId}/dashboard`, ttlMs: TTL_MS, refreshAhead: 0.8 },
      ],
    },
  },
  { now: () => fakeNow },
)
await app.listen({ host: '127.0.0.1', port: 0 })
const base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
const pool = new Pool(base, { connections: 128 })
const originPool = new Pool(originBase, { connections: 128 })
const headers = { authorization: `Bearer ${SECRET}` }

async function timed(fn: () => Promise<void>): Promise<number> {
  const started = performance.now()
  await fn()
  return performance.now() - started
}

async function getEntry(key: string, query = ''): Promise<number> {
  const res = await pool.request({ method: 'GET', path: `/v1/entries/${encodeURIComponent(key)}${query}`, headers })
  await res.body.dump()
  return res.statusCode
}

/** What a client without read-through does: miss, fetch the origin itself, PUT. */
async function cacheAside(key: string, userId: string): Promise<void> {
  if ((await getEntry(key)) === 200) return
  const res = await originPool.request({ method: 'GET', path: `/users/${userId}/dashboard` })
  const value = await res.body.json()
  const put = await pool.request({
    method: 'PUT',
    path: `/v1/entries/${encodeURIComponent(key)}`,
    headers: { ...headers, 'content-type': 'application/json' },
    body: JSON.stringify({ value, userId, ttlMs: TTL_MS }),
  })
  await put.body.dump()
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!
}
const fmt = (ms: number) => ms.toFixed(1)
const median = (xs: number[]) => pct(xs, 50)

// --- 1. one cold key, 500 concurrent readers -------------------------------------------
const results: Record<string, { calls: number[]; p50: number[]; p99: number[] }> = {}
const record = (name: string, calls: number, latencies: number[]) => {
  const r = (results[name] ??= { calls: [], p50: [], p99: [] })
  r.calls.push(calls)
  r.p50.push(pct(latencies, 50))
  r.p99.push(pct(latencies, 99))
}

// Warm up connections and JIT.
await Promise.all(Array.from({ length: 200 }, (_, i) => getEntry(`warmup:${i}`)))

for (let round = 0; round < ROUNDS; round++) {
  const before = originCalls
  const key = `dashboard:cold-${round}`
  const lat = await Promise.all(Array.from({ length: CONCURRENT }, () => timed(async () => {
    if ((await getEntry(key, '?load=true')) !== 200) throw new Error('load failed')
  })))
  record('read-through ?load=true (cold key)', originCalls - before, lat)

  const hits = await Promise.all(Array.from({ length: CONCURRENT }, () => timed(async () => {
    if ((await getEntry(key)) !== 200) throw new Error('hit failed')
  })))
  record('baseline: hits on the warm key', 0, hits)

  const beforeAside = originCalls
  const asideKey = `dashboard:aside-${round}`
  const aside = await Promise.all(Array.from({ length: CONCURRENT }, () => timed(() => cacheAside(asideKey, `aside-${round}`))))
  record('baseline: uncoordinated cache-aside (cold key)', originCalls - beforeAside, aside)
}

// --- 2. 10k reads over 1k keys, before and during refresh-ahead ------------------------
const warmStarted = performance.now()
const userIds = Array.from({ length: KEYS }, (_, i) => `u${i}`)
const warm = await pool.request({
  method: 'POST',
  path: '/v1/warm',
  headers: { ...headers, 'content-type': 'application/json' },
  body: JSON.stringify({ userIds }),
})
const warmed = (await warm.body.json()) as { loaded: number }
const warmMs = performance.now() - warmStarted
if (warmed.loaded !== KEYS) throw new Error(`warm loaded ${warmed.loaded}`)

// A fixed pseudo-random read order (uniform over the keys), the same for both phases.
let seed = 42
const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff)
const order = Array.from({ length: READS }, () => `dashboard:u${Math.floor(rand() * KEYS)}`)

async function readAll(): Promise<number[]> {
  const lat: number[] = []
  let next = 0
  await Promise.all(Array.from({ length: READ_WORKERS }, async () => {
    while (next < order.length) {
      const key = order[next++]!
      lat.push(await timed(async () => {
        if ((await getEntry(key)) !== 200) throw new Error(`read ${key} missed`)
      }))
    }
  }))
  return lat
}

fakeNow += 0.5 * TTL_MS
const beforeCalls = originCalls
const quiet = await readAll()
const quietCalls = originCalls - beforeCalls

fakeNow += 0.35 * TTL_MS // 85% of the TTL: every key read now asks for a refresh
const duringBefore = originCalls
const busyStarted = performance.now()
const busy = await readAll()
const busyMs = performance.now() - busyStarted
const callsDuring = originCalls - duringBefore
await app.origins.refresher.drain()
const callsTotal = originCalls - duringBefore
const distinct = new Set(order).size

// --- report -----------------------------------------------------------------------------
console.log(`node ${process.version}, origin delay ${ORIGIN_DELAY_MS} ms, ${ROUNDS} rounds (medians shown)\n`)
console.log(`1. ${CONCURRENT} concurrent readers of one cold key`)
console.log('| scenario | origin calls | p50 ms | p99 ms |')
console.log('|---|---|---|---|')
for (const [name, r] of Object.entries(results)) {
  console.log(`| ${name} | ${median(r.calls)} | ${fmt(median(r.p50))} | ${fmt(median(r.p99))} |`)
}
const rt = results['read-through ?load=true (cold key)']!
const hit = results['baseline: hits on the warm key']!
const aside = results['baseline: uncoordinated cache-aside (cold key)']!
console.log(`\nread-through p99 / hit p99: ${(median(rt.p99) / median(hit.p99)).toFixed(2)}x; ` +
  `origin calls: ${median(rt.calls)} vs ${median(aside.calls)} for cache-aside (${(median(aside.calls) / median(rt.calls)).toFixed(0)}x fewer)`)

console.log(`\n2. ${READS} reads over ${KEYS} keys (${distinct} distinct read), ${READ_WORKERS} at once; warm of ${KEYS} keys took ${warmMs.toFixed(0)} ms`)
console.log('| phase | origin calls | p50 ms | p99 ms |')
console.log('|---|---|---|---|')
console.log(`| baseline: at 50% of TTL (no refresh) | ${quietCalls} | ${fmt(pct(quiet, 50))} | ${fmt(pct(quiet, 99))} |`)
console.log(`| at 85% of TTL (refresh-ahead, REFRESH_CONCURRENCY=3) | ${callsDuring} during, ${callsTotal} after drain | ${fmt(pct(busy, 50))} | ${fmt(pct(busy, 99))} |`)
console.log(`\norigin calls / reads: ${(callsTotal / READS).toFixed(3)} (each read key refreshed once: ${callsTotal === distinct}); ` +
  `p99 during refresh / baseline: ${(pct(busy, 99) / pct(quiet, 99)).toFixed(2)}x; reads took ${busyMs.toFixed(0)} ms`)

await pool.close()
await originPool.close()
await app.close()
await new Promise((r) => origin.close(r))
