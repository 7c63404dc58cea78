// Instructions a server executes per GET hit and per PUT, counted by valgrind's callgrind,
// against the bare Fastify routes: a count that a busy or unsteady machine does not move, where
// req/s and CPU time swing (a side's windows repeat until two in a row agree within 1%).
// `node --import tsx bench/http-instructions.ts [requests per window = 5000] [warm-up = 10000]`.
// Needs valgrind (Debian package `valgrind`). Everything runs some 50 times slower under it, so
// the servers hold 10 000 entries rather than 100 000.
// What it leaves out: the kernel (syscalls, loopback, wake-ups) and the time a cache miss costs
// (one instruction, however long it stalls), so it is a count of work, not a prediction of req/s.
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import autocannon from 'autocannon'
import { ratio, startTarget, type Target } from './lib.js'
import { auth, putRequest, randomKey as randomKeyAmong } from './servers/workload.js'

const measured = Number(process.argv[2] ?? 5000)
const warmUp = Number(process.argv[3] ?? 10_000)
const ENTRIES = 10_000
const MAX_WINDOWS = 6
const randomKey = () => randomKeyAmong(ENTRIES)

if (spawnSync('valgrind', ['--version']).error) {
  console.log('valgrind is not installed (Debian: apt-get install valgrind): nothing measured')
  process.exit(0)
}

const dir = mkdtempSync(join(tmpdir(), 'cachewarden-callgrind-'))
const callgrind = ['valgrind', '--quiet', '--tool=callgrind', `--callgrind-out-file=${join(dir, 'out.%p')}`]
// V8 single-threaded: compilation and garbage collection run on the main thread, when they
// are due, rather than on helper threads whose progress depends on scheduling. So the count is
// all the work a request causes, and V8's tiering finishes after a fixed number of requests.
const underCallgrind = { wrapper: callgrind, nodeFlags: ['--single-threaded'] }

/** Instructions per request since the last zeroing. */
function dumpCount(target: Target, requests: number): number {
  const pid = target.child.pid!
  execFileSync('callgrind_control', ['--dump', String(pid)], { stdio: 'ignore' })
  // Dumps are out.<pid>.<n>; the highest n is the one just written.
  const dumps = readdirSync(dir).flatMap((f) => {
    const m = new RegExp(`^out\\.${pid}\\.(\\d+)$`).exec(f)
    return m ? [{ f, n: Number(m[1]) }] : []
  })
  const last = dumps.reduce((a, b) => (b.n > a.n ? b : a))
  const total = /^summary: (\d+)$/m.exec(readFileSync(join(dir, last.f), 'utf8'))?.[1]
  if (total === undefined) throw new Error(`no summary line in ${last.f}`)
  return Number(total) / requests
}

async function drive(target: Target, path: () => string, amount: number, request: object) {
  const r = await autocannon({
    url: `http://127.0.0.1:${target.port}`,
    connections: 4,
    amount,
    requests: [{ ...request, setupRequest: (req) => ({ ...req, path: path() }) }],
  })
  if (r.non2xx || r.errors) throw new Error(`${r.non2xx} non-2xx responses and ${r.errors} errors from ${path()}`)
  return r.requests.total
}

interface Side {
  name: string
  target: Target
  path: () => string
  request: object
  baseline?: string
}

console.log(`starting the servers under callgrind (a minute or two)...`)
const [bare, naive, cw] = await Promise.all([
  startTarget('bench/servers/http-target.ts', ['bare'], {}, underCallgrind),
  startTarget('bench/servers/http-target.ts', ['naive', String(ENTRIES)], {}, underCallgrind),
  startTarget('bench/servers/http-target.ts', ['cachewarden', String(ENTRIES)], {}, underCallgrind),
])
const bareGet = 'bare Fastify GET route, constant JSON'
const barePut = 'bare Fastify PUT route, same JSON body, constant reply'
const get = { method: 'GET' }
const put = (headers: Record<string, string>) => ({ ...putRequest, headers: { ...putRequest.headers, ...headers } })
const sides: Side[] = [
  { name: bareGet, target: bare, path: () => `/bare/${randomKey()}`, request: get },
  { name: 'naive Fastify + lru-cache GET hit, no auth', target: naive, path: () => `/naive/${randomKey()}`, request: get, baseline: bareGet },
  { name: 'cachewarden GET hit, random key, auth on, metrics on', target: cw, path: () => `/v1/entries/${randomKey()}`, request: { ...get, headers: auth }, baseline: bareGet },
  { name: barePut, target: bare, path: () => `/bare/${randomKey()}`, request: put({}) },
  { name: 'naive Fastify + lru-cache PUT, no auth', target: naive, path: () => `/naive/${randomKey()}`, request: put({}), baseline: barePut },
  { name: 'cachewarden PUT, random key, auth on, metrics on', target: cw, path: () => `/v1/entries/${randomKey()}`, request: put(auth), baseline: barePut },
]
const settled = (windows: number[]) => windows.length >= 2 && Math.abs(windows.at(-1)! / windows.at(-2)! - 1) < 0.01
const counts = new Map<string, number[]>()
try {
  for (const side of sides) {
    await drive(side.target, side.path, warmUp, side.request)
    // V8 goes on optimizing for a while after the warm-up; until it is done, a window may run a
    // function unoptimized. Windows repeat until two in a row agree within 1%.
    const windows: number[] = []
    while (windows.length < MAX_WINDOWS && !settled(windows)) {
      execFileSync('callgrind_control', ['--zero', String(side.target.child.pid!)], { stdio: 'ignore' })
      windows.push(dumpCount(side.target, await drive(side.target, side.path, measured, side.request)))
    }
    counts.set(side.name, windows)
  }
} finally {
  await Promise.all([bare, naive, cw].map((t) => t.stop()))
  rmSync(dir, { recursive: true, force: true })
}

const format = (n: number) => Math.round(n).toLocaleString('en')
console.log(`\n${format(measured)} requests per window after ${format(warmUp)} to warm up, 4 connections, ${format(ENTRIES)} entries\n`)
console.log('| server | instructions per request | bare / this | windows |')
console.log('|---|---|---|---|')
for (const side of sides) {
  const windows = counts.get(side.name)!
  const count = windows.at(-1)!
  const base = counts.get(side.baseline ?? side.name)!.at(-1)!
  console.log(`| ${side.name} | ${format(count)} | ${ratio(base, count).toFixed(3)} | ${windows.map(format).join(' ')}${settled(windows) ? '' : ' (not settled)'} |`)
}
process.exit(0) // autocannon leaves handles open
