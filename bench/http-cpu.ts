// Server CPU time per request (user + system, from /proc/<pid>/stat) for GET hits, against
// the bare Fastify route: a measure that scheduling noise on a shared 2-core machine moves
// much less than req/s. `node --import tsx bench/http-cpu.ts [requests=100000] [rounds=5]`.
// Linux only (reads /proc).
import { readFileSync } from 'node:fs'
import autocannon from 'autocannon'
import { BENCH_SECRET } from './servers/http-target.js'
import { startTarget, type Target } from './lib.js'

const requests = Number(process.argv[2] ?? 100_000)
const rounds = Number(process.argv[3] ?? 5)
const ENTRIES = 100_000
const auth = { authorization: `Bearer ${BENCH_SECRET}` }
const randomKey = () => `user%3A${Math.floor(Math.random() * ENTRIES)}%3Adashboard`

/** CPU ticks (1/100 s) the process has used so far. */
function cpuTicks(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
  return Number(fields[11]) + Number(fields[12])
}

async function microsPerRequest(target: Target, path: () => string, headers: Record<string, string>) {
  const before = cpuTicks(target.child.pid!)
  const r = await autocannon({
    url: `http://127.0.0.1:${target.port}`,
    connections: 20,
    amount: requests,
    requests: [{ headers, setupRequest: (req) => ({ ...req, path: path() }) }],
  })
  return ((cpuTicks(target.child.pid!) - before) * 10_000) / r.requests.total
}

const sides = {
  'bare Fastify GET route, constant JSON': { target: await startTarget('bench/servers/http-target.ts', ['bare']), path: () => `/bare/${randomKey()}`, headers: {} },
  'cachewarden GET hit, auth on, metrics on': {
    target: await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)]),
    path: () => `/v1/entries/${randomKey()}`,
    headers: auth,
  },
  'cachewarden GET hit, auth on, metrics off': {
    target: await startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)], { BENCH_METRICS: '0' }),
    path: () => `/v1/entries/${randomKey()}`,
    headers: auth,
  },
}
const samples: Record<string, number[]> = {}
try {
  for (let r = 0; r <= rounds; r++) {
    for (const [name, side] of Object.entries(sides)) {
      const us = await microsPerRequest(side.target, side.path, side.headers)
      if (r > 0) (samples[name] ??= []).push(us) // round 0 warms up
    }
  }
} finally {
  for (const side of Object.values(sides)) await side.target.stop()
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const bare = median(samples['bare Fastify GET route, constant JSON']!)
console.log(`${requests.toLocaleString('en')} requests per side and round, ${rounds} rounds, 20 connections\n`)
console.log('| server | CPU µs per request (median) | all rounds | bare / this |')
console.log('|---|---|---|---|')
for (const [name, xs] of Object.entries(samples)) {
  console.log(`| ${name} | ${median(xs).toFixed(1)} | ${xs.map((x) => x.toFixed(1)).join(' ')} | ${(bare / median(xs)).toFixed(3)} |`)
}
process.exit(0) // autocannon leaves handles open
