// Server CPU time per request (user + system, from /proc/<pid>/stat) for GET hits and PUTs,
// against the bare Fastify routes: a measure that scheduling noise on a shared 2-core machine moves
// much less than req/s. Beside it, the garbage-collection pauses per request (the servers run
// with --trace-gc; pauses of the main thread only, not the concurrent marking of helper threads).
// `node --import tsx bench/http-cpu.ts [requests=100000] [rounds=5]`. Linux only (reads /proc).
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import autocannon from 'autocannon'
import { startTarget, type Target } from './lib.js'
import { auth, putRequest as put, randomKey as randomKeyAmong } from './servers/workload.js'

const requests = Number(process.argv[2] ?? 100_000)
const rounds = Number(process.argv[3] ?? 5)
const ENTRIES = 100_000
const randomKey = () => randomKeyAmong(ENTRIES)

/** CPU ticks (1/100 s) the process has used so far. */
function cpuTicks(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
  return Number(fields[11]) + Number(fields[12])
}


interface Side {
  target: Target
  path: () => string
  request?: { method: 'PUT'; body: string; headers: Record<string, string> }
  headers: Record<string, string>
}

/** Milliseconds each server has paused for GC so far, summed from its --trace-gc lines. */
const gcMs = new Map<Target, number>()
async function start(args: string[], env: Record<string, string> = {}) {
  const target = await startTarget('bench/servers/http-target.ts', args, env, { nodeFlags: ['--trace-gc'] })
  gcMs.set(target, 0)
  // "... Scavenge 10.2 (12.3) -> 9.8 (13.3) MB, 0.85 / 0.00 ms ...": the first figure is the pause.
  createInterface({ input: target.child.stdout! }).on('line', (line) => {
    const m = /(?:Scavenge|Mark-Compact|Mark-Sweep)\b.*?MB, ([\d.]+) \/ [\d.]+ ms/i.exec(line)
    if (m) gcMs.set(target, gcMs.get(target)! + Number(m[1]))
  })
  return target
}

async function microsPerRequest({ target, path, request, headers }: Side) {
  const before = cpuTicks(target.child.pid!)
  const gcBefore = gcMs.get(target)!
  const r = await autocannon({
    url: `http://127.0.0.1:${target.port}`,
    connections: 20,
    amount: requests,
    requests: [{ ...request, headers: { ...request?.headers, ...headers }, setupRequest: (req) => ({ ...req, path: path() }) }],
  })
  await new Promise((resolve) => setTimeout(resolve, 50)) // the last --trace-gc lines
  return {
    cpu: ((cpuTicks(target.child.pid!) - before) * 10_000) / r.requests.total,
    gc: ((gcMs.get(target)! - gcBefore) * 1000) / r.requests.total,
  }
}

const bare = await start(['bare'])
const naive = await start(['naive', String(ENTRIES)])
const naivePut = await start(['naive', String(ENTRIES)])
// GETs and PUTs go to servers of their own (the stateless bare one aside): a server that took
// PUTs has a churned store and more to collect, so its GETs would not compare with the
// metrics-off server's, which takes none.
const cw = await start(['cachewarden', String(ENTRIES)])
const cwNoMetrics = await start(['cachewarden', String(ENTRIES)], { BENCH_METRICS: '0' })
const cwPut = await start(['cachewarden', String(ENTRIES)])
const bareGet = 'bare Fastify GET route, constant JSON'
const barePut = 'bare Fastify PUT route, same JSON body, constant reply'
const sides: Record<string, Side & { baseline: string }> = {
  [bareGet]: { target: bare, path: () => `/bare/${randomKey()}`, headers: {}, baseline: bareGet },
  'naive Fastify + lru-cache GET hit, no auth': { target: naive, path: () => `/naive/${randomKey()}`, headers: {}, baseline: bareGet },
  'cachewarden GET hit, auth on, metrics on': { target: cw, path: () => `/v1/entries/${randomKey()}`, headers: auth, baseline: bareGet },
  'cachewarden GET hit, auth on, metrics off': { target: cwNoMetrics, path: () => `/v1/entries/${randomKey()}`, headers: auth, baseline: bareGet },
  [barePut]: { target: bare, path: () => `/bare/${randomKey()}`, request: put, headers: {}, baseline: barePut },
  'naive Fastify + lru-cache PUT, no auth': { target: naivePut, path: () => `/naive/${randomKey()}`, request: put, headers: {}, baseline: barePut },
  'cachewarden PUT, random key, auth on, metrics on': { target: cwPut, path: () => `/v1/entries/${randomKey()}`, request: put, headers: auth, baseline: barePut },
}
const samples: Record<string, { cpu: number; gc: number }[]> = {}
try {
  for (let r = 0; r <= rounds; r++) {
    for (const [name, side] of Object.entries(sides)) {
      const sample = await microsPerRequest(side)
      if (r > 0) (samples[name] ??= []).push(sample) // round 0 warms up
    }
  }
} finally {
  for (const target of [bare, naive, naivePut, cw, cwNoMetrics, cwPut]) await target.stop()
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const cpu = (name: string) => median(samples[name]!.map((s) => s.cpu))
console.log(`${requests.toLocaleString('en')} requests per side and round, ${rounds} rounds, 20 connections\n`)
console.log('| server | CPU µs per request (median) | all rounds | bare / this | GC pause µs per request (median) |')
console.log('|---|---|---|---|---|')
for (const [name, xs] of Object.entries(samples)) {
  const all = xs.map((x) => x.cpu.toFixed(1)).join(' ')
  const gc = median(xs.map((x) => x.gc)).toFixed(2)
  console.log(`| ${name} | ${cpu(name).toFixed(1)} | ${all} | ${(cpu(sides[name]!.baseline) / cpu(name)).toFixed(3)} | ${gc} |`)
}
process.exit(0) // autocannon leaves handles open
