// GET-hit and PUT throughput of cachewarden against a bare Fastify route returning a
// constant JSON, in the same run: `node --import tsx bench/http.ts [seconds] [rounds]`.
// Each server runs in its own process; autocannon runs here.
import { BENCH_SECRET } from './servers/http-target.js'
import { load, ratio, startTarget, type LoadResult } from './lib.js'

const seconds = Number(process.argv[2] ?? 10)
const rounds = Number(process.argv[3] ?? 2)
const ENTRIES = 100_000
const auth = { authorization: `Bearer ${BENCH_SECRET}` }
const body = JSON.stringify({ value: { id: 1, name: 'user-1', plan: 'pro', widgets: [1, 2, 3, 4, 5], note: 'x'.repeat(120) }, ttlMs: 3_600_000, userId: '1' })
const randomKey = () => `user%3A${Math.floor(Math.random() * ENTRIES)}%3Adashboard`

const bare = await startTarget('bench/servers/http-target.ts', ['bare'])
const cw = await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)])

const results: Record<string, LoadResult[]> = { bare: [], barePut: [], get: [], put: [] }
try {
  // Warm up both, then alternate so drift in machine load hits both sides alike.
  await load({ url: `http://127.0.0.1:${bare.port}/bare/x`, duration: 2 })
  await load({ url: `http://127.0.0.1:${cw.port}/v1/entries/user%3A1%3Adashboard`, headers: auth, duration: 2 })
  for (let r = 0; r < rounds; r++) {
    results.bare!.push(await load({ url: `http://127.0.0.1:${bare.port}`, duration: seconds, requests: [{ setupRequest: (req) => ({ ...req, path: `/bare/${randomKey()}` }) }] }))
    results.barePut!.push(
      await load({
        url: `http://127.0.0.1:${bare.port}`,
        duration: seconds,
        requests: [{ method: 'PUT', headers: { 'content-type': 'application/json' }, body, setupRequest: (req) => ({ ...req, path: `/bare/${randomKey()}` }) }],
      }),
    )
    results.get!.push(
      await load({
        url: `http://127.0.0.1:${cw.port}`,
        duration: seconds,
        requests: [{ method: 'GET', headers: auth, setupRequest: (req) => ({ ...req, path: `/v1/entries/${randomKey()}` }) }],
      }),
    )
    results.put!.push(
      await load({
        url: `http://127.0.0.1:${cw.port}`,
        duration: seconds,
        requests: [{ method: 'PUT', headers: { ...auth, 'content-type': 'application/json' }, body, setupRequest: (req) => ({ ...req, path: `/v1/entries/${randomKey()}` }) }],
      }),
    )
  }
} finally {
  await bare.stop()
  await cw.stop()
}

const mean = (rs: LoadResult[]) => Math.round(rs.reduce((n, r) => n + r.rps, 0) / rs.length)
const b = mean(results.bare!)
const g = mean(results.get!)
const p = mean(results.put!)
const bp = mean(results.barePut!)
const bad = [...results.get!, ...results.put!].reduce((n, r) => n + r.errors + r.non2xx, 0)
console.log(JSON.stringify({ seconds, rounds, results }, null, 2))
console.log(`\n| run | req/s (mean of ${rounds}) | p99 ms (last round) | ratio to bare |`)
console.log('|---|---|---|---|')
console.log(`| bare Fastify GET route, constant JSON | ${b} | ${results.bare!.at(-1)!.p99} | 1.000 |`)
console.log(`| GET hit, random key of ${ENTRIES / 1000}k, auth on | ${g} | ${results.get!.at(-1)!.p99} | **${ratio(g, b)}** of bare GET |`)
console.log(`| bare Fastify PUT route, same JSON body, constant JSON reply | ${bp} | ${results.barePut!.at(-1)!.p99} | 1.000 |`)
console.log(`| PUT 200-byte value, random key, auth on | ${p} | ${results.put!.at(-1)!.p99} | **${ratio(p, bp)}** of bare PUT (${ratio(p, b)} of bare GET) |`)
console.log(`\nerrors or non-2xx responses during the cachewarden runs: ${bad}`)
