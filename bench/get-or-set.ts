// 200 concurrent callers want one cold key through a real server. getOrSet (leases + herd
// control) against the naive cache-aside baseline (get, miss, load, set), in the same run.
// Reports how many times the loader ran and the wait each caller saw (p50/p99/max).
//
//   node --import tsx bench/get-or-set.ts [callers=200] [loadMs=50] [rounds=5]
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildApp } from '../src/app.js'
import { CachewardenClient } from '../src/client/index.js'
import { parseApiKeys } from '../src/config.js'

const CALLERS = Number(process.argv[2] ?? 200)
const LOAD_MS = Number(process.argv[3] ?? 50)
const ROUNDS = Number(process.argv[4] ?? 5)
const CONNECTIONS = 64

const app = await buildApp({ apiKeys: parseApiKeys('bench:admin:bench-secret') })
await app.listen({ host: '127.0.0.1', port: 0 })
const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
const client = new CachewardenClient({ url, apiKey: 'bench-secret', connections: CONNECTIONS })

interface RoundResult {
  loads: number
  waits: number[]
}

async function round(key: string, caller: (loader: () => Promise<unknown>) => Promise<unknown>): Promise<RoundResult> {
  let loads = 0
  const loader = async () => {
    loads++
    await sleep(LOAD_MS)
    return { key, loadedAt: Date.now() }
  }
  const waits = await Promise.all(
    Array.from({ length: CALLERS }, async () => {
      const started = performance.now()
      await caller(loader)
      return performance.now() - started
    }),
  )
  return { loads, waits }
}

const naive = (key: string) => async (loader: () => Promise<unknown>) => {
  const hit = await client.get(key)
  if (hit !== undefined) return hit.value
  const value = await loader()
  await client.set(key, value)
  return value
}

const leased = (key: string) => (loader: () => Promise<unknown>) => client.getOrSet(key, loader)

const pct = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

function summarize(results: RoundResult[]) {
  const all = results.flatMap((r) => r.waits).sort((a, b) => a - b)
  return {
    loadsPerRound: results.map((r) => r.loads),
    medianLoads: median(results.map((r) => r.loads)),
    p50: pct(all, 50),
    p99: pct(all, 99),
    max: all[all.length - 1]!,
  }
}

// Warm up the server, the pool's sockets and the JIT on keys the rounds do not use.
for (let i = 0; i < 3; i++) {
  await round(`warm:naive:${i}`, naive(`warm:naive:${i}`))
  await round(`warm:lease:${i}`, leased(`warm:lease:${i}`))
}

const baseline: RoundResult[] = []
const withLeases: RoundResult[] = []
for (let i = 0; i < ROUNDS; i++) {
  // Interleaved, so a noisy neighbour on the shared machine hits both alike.
  baseline.push(await round(`naive:${i}`, naive(`naive:${i}`)))
  withLeases.push(await round(`lease:${i}`, leased(`lease:${i}`)))
}

const b = summarize(baseline)
const l = summarize(withLeases)
const f = (ms: number) => `${ms.toFixed(1)} ms`
console.log(`${CALLERS} concurrent callers, one cold key, loader ${LOAD_MS} ms, ${ROUNDS} rounds, ${CONNECTIONS} keep-alive connections, node ${process.version}`)
console.log('| caller | loader runs per round (median; all rounds) | wait p50 | wait p99 | wait max |')
console.log('|---|---|---|---|---|')
console.log(`| naive get-miss-load-set (baseline) | ${b.medianLoads}; ${b.loadsPerRound.join(', ')} | ${f(b.p50)} | ${f(b.p99)} | ${f(b.max)} |`)
console.log(`| client.getOrSet (leases) | ${l.medianLoads}; ${l.loadsPerRound.join(', ')} | ${f(l.p50)} | ${f(l.p99)} | ${f(l.max)} |`)
console.log(`loader runs: ${(b.medianLoads / l.medianLoads).toFixed(0)}x fewer with getOrSet; p99 wait: ${(l.p99 / b.p99).toFixed(2)}x the baseline's`)

await client.close()
await app.close()
