// GET-hit and PUT throughput of cachewarden against bare Fastify routes, in the same run, with
// the naive Fastify + lru-cache service beside it for scale:
// `node --import tsx bench/http.ts [seconds=5] [rounds=6]`.
// Each server runs in its own process; autocannon runs here. On a 2-core machine single
// runs swing by ±20%, so the sides alternate within every round (the order rotates each
// round) and the headline is the median of the per-round ratios.
import { load, ratio, startTarget, type LoadResult } from './lib.js'
import { auth, putBody as body, randomKey as randomKeyAmong } from './servers/workload.js'

const seconds = Number(process.argv[2] ?? 5)
const rounds = Number(process.argv[3] ?? 6)
const ENTRIES = 100_000
const randomKey = () => randomKeyAmong(ENTRIES)

const bare = await startTarget('bench/servers/http-target.ts', ['bare'])
const naive = await startTarget('bench/servers/http-target.ts', ['naive', String(ENTRIES)])
const cw = await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)])
const json = { 'content-type': 'application/json' }

type Side = 'bareGet' | 'naiveGet' | 'get' | 'barePut' | 'naivePut' | 'put'
const runs: Record<Side, () => Promise<LoadResult>> = {
  bareGet: () => load({ url: `http://127.0.0.1:${bare.port}`, duration: seconds, requests: [{ setupRequest: (req) => ({ ...req, path: `/bare/${randomKey()}` }) }] }),
  naiveGet: () => load({ url: `http://127.0.0.1:${naive.port}`, duration: seconds, requests: [{ setupRequest: (req) => ({ ...req, path: `/naive/${randomKey()}` }) }] }),
  get: () =>
    load({
      url: `http://127.0.0.1:${cw.port}`,
      duration: seconds,
      requests: [{ method: 'GET', headers: auth, setupRequest: (req) => ({ ...req, path: `/v1/entries/${randomKey()}` }) }],
    }),
  barePut: () =>
    load({
      url: `http://127.0.0.1:${bare.port}`,
      duration: seconds,
      requests: [{ method: 'PUT', headers: json, body, setupRequest: (req) => ({ ...req, path: `/bare/${randomKey()}` }) }],
    }),
  naivePut: () =>
    load({
      url: `http://127.0.0.1:${naive.port}`,
      duration: seconds,
      requests: [{ method: 'PUT', headers: json, body, setupRequest: (req) => ({ ...req, path: `/naive/${randomKey()}` }) }],
    }),
  put: () =>
    load({
      url: `http://127.0.0.1:${cw.port}`,
      duration: seconds,
      requests: [{ method: 'PUT', headers: { ...auth, ...json }, body, setupRequest: (req) => ({ ...req, path: `/v1/entries/${randomKey()}` }) }],
    }),
}
const results: Record<Side, LoadResult[]> = { bareGet: [], naiveGet: [], get: [], barePut: [], naivePut: [], put: [] }
try {
  for (const side of Object.keys(runs) as Side[]) await runs[side]() // warm-up, not counted
  const order = Object.keys(runs) as Side[]
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < order.length; i++) {
      const side = order[(i + r) % order.length]!
      results[side].push(await runs[side]())
    }
  }
} finally {
  for (const target of [bare, naive, cw]) await target.stop()
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2
}
const rps = (side: Side) => Math.round(median(results[side].map((r) => r.rps)))
const roundRatios = (a: Side, b: Side) => results[a].map((r, i) => r.rps / results[b][i]!.rps)
const bad = [...results.naiveGet, ...results.get, ...results.naivePut, ...results.put].reduce((n, r) => n + r.errors + r.non2xx, 0)
const p99 = (side: Side) => median(results[side].map((r) => r.p99))
const fmt = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(' ')
function row(label: string, side: Side, baseline: Side, bold = '') {
  const ratios = roundRatios(side, baseline)
  console.log(`| ${label} | ${rps(side)} | ${p99(side)} | ${bold}${ratio(median(ratios), 1)}${bold} | ${fmt(ratios)} |`)
}

console.log(`${rounds} rounds of ${seconds} s per side, 50 connections, ${ENTRIES.toLocaleString('en')} entries\n`)
console.log('| run | req/s (median) | p99 ms (median) | ratio (median of rounds) | per-round ratios |')
console.log('|---|---|---|---|---|')
console.log(`| bare Fastify GET route, constant JSON | ${rps('bareGet')} | ${p99('bareGet')} | 1.000 | |`)
row('naive Fastify + lru-cache GET hit, no auth', 'naiveGet', 'bareGet')
row('GET hit, random key, 189-byte value, auth on', 'get', 'bareGet', '**')
console.log(`| bare Fastify PUT route, same JSON body, constant reply | ${rps('barePut')} | ${p99('barePut')} | 1.000 | |`)
row('naive Fastify + lru-cache PUT, no auth', 'naivePut', 'barePut')
row('PUT 189-byte value, random key, auth on', 'put', 'barePut', '**')
console.log(`\nerrors or non-2xx responses during the naive and cachewarden runs: ${bad}`)
process.exit(0) // autocannon leaves handles open
