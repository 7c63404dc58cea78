// Server CPU time per request (user + system, from /proc/<pid>/stat) for GET hits and PUTs,
// against the bare Fastify routes: a measure that scheduling noise on a shared 2-core machine moves
// much less than req/s. `node --import tsx bench/http-cpu.ts [requests=100000] [rounds=5]`.
// Linux only (reads /proc).
import { readFileSync } from 'node:fs'
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

async function microsPerRequest({ target, path, request, headers }: Side) {
  const before = cpuTicks(target.child.pid!)
  const r = await autocannon({
    url: `http://127.0.0.1:${target.port}`,
    connections: 20,
    amount: requests,
    requests: [{ ...request, headers: { ...request?.headers, ...headers }, setupRequest: (req) => ({ ...req, path: path() }) }],
  })
  return ((cpuTicks(target.child.pid!) - before) * 10_000) / r.requests.total
}

const bare = await startTarget('bench/servers/http-target.ts', ['bare'])
const cw = await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)])
const cwNoMetrics = await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)], { BENCH_METRICS: '0' })
const bareGet = 'bare Fastify GET route, constant JSON'
const barePut = 'bare Fastify PUT route, same JSON body, constant reply'
const sides: Record<string, Side & { baseline: string }> = {
  [bareGet]: { target: bare, path: () => `/bare/${randomKey()}`, headers: {}, baseline: bareGet },
  'cachewarden GET hit, auth on, metrics on': { target: cw, path: () => `/v1/entries/${randomKey()}`, headers: auth, baseline: bareGet },
  'cachewarden GET hit, auth on, metrics off': { target: cwNoMetrics, path: () => `/v1/entries/${randomKey()}`, headers: auth, baseline: bareGet },
  [barePut]: { target: bare, path: () => `/bare/${randomKey()}`, request: put, headers: {}, baseline: barePut },
  'cachewarden PUT, random key, auth on, metrics on': { target: cw, path: () => `/v1/entries/${randomKey()}`, request: put, headers: auth, baseline: barePut },
}
const samples: Record<string, number[]> = {}
try {
  for (let r = 0; r <= rounds; r++) {
    for (const [name, side] of Object.entries(sides)) {
      const us = await microsPerRequest(side)
      if (r > 0) (samples[name] ??= []).push(us) // round 0 warms up
    }
  }
} finally {
  for (const target of [bare, cw, cwNoMetrics]) await target.stop()
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
console.log(`${requests.toLocaleString('en')} requests per side and round, ${rounds} rounds, 20 connections\n`)
console.log('| server | CPU µs per request (median) | all rounds | bare / this |')
console.log('|---|---|---|---|')
for (const [name, xs] of Object.entries(samples)) {
  const base = median(samples[sides[name]!.baseline]!)
  console.log(`| ${name} | ${median(xs).toFixed(1)} | ${xs.map((x) => x.toFixed(1)).join(' ')} | ${(base / median(xs)).toFixed(3)} |`)
}
process.exit(0) // autocannon leaves handles open
