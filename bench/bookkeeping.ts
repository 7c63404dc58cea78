// The core's bounded bookkeeping once it is full, against the same work while it is not, in
// one run: lease stamps (an invalidation of 1000 distinct keys stamps 1000 scopes; the book
// holds 100 000) and fill claims (a batch-get of 1000 new keys claims 1000 fills; at most
// 100 000 are kept, all live here: the clock stands still). Each phase reports the median
// time per call and the longest event-loop block while it ran.
// `node --expose-gc --import tsx bench/bookkeeping.ts [calls per phase = 100]`
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { CacheService } from '../src/cache/cache-service.js'
import { MemoryStore } from '../src/stores/memory-store.js'

const CALLS = Number(process.argv[2] ?? 100)
const BATCH = 1000
const BOUND = 100_000
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!
const gc = () => (globalThis as { gc?: () => void }).gc?.()

/** Times `calls` calls of `run(i)` from call number `from`, watching the event loop. */
async function phase(from: number, calls: number, run: (i: number) => Promise<unknown>): Promise<{ ms: number; blockMs: number }> {
  gc()
  const monitor = monitorEventLoopDelay({ resolution: 1 })
  monitor.enable()
  const times: number[] = []
  for (let i = from; i < from + calls; i++) {
    const t0 = performance.now()
    await run(i)
    times.push(performance.now() - t0)
    // A turn of the loop between calls, as between requests: the monitor samples there.
    await new Promise((resolve) => setImmediate(resolve))
  }
  monitor.disable()
  return { ms: median(times), blockMs: monitor.max / 1e6 }
}

const now = Date.now()
const cache = new CacheService({ store: new MemoryStore({ sweepIntervalMs: 0 }), now: () => now })
const keys = (i: number) => Array.from({ length: BATCH }, (_, j) => `k:${i}:${j}`)
const rows: string[] = []
for (const [name, run] of [
  ['invalidation of 1000 keys (lease stamps)', (i: number) => cache.invalidate({ keys: keys(i) }, { source: 'api' })],
  ['batch-get of 1000 missing keys (fill claims)', (i: number) => cache.readMany(keys(i + 1_000_000))],
] as const) {
  // Under the bound: the first calls. Full: once BOUND / BATCH calls have filled it, and
  // as many again have pushed the first ones out.
  const under = await phase(0, Math.min(CALLS, BOUND / BATCH / 2), run)
  for (let i = BOUND / BATCH / 2; i < (2 * BOUND) / BATCH; i++) await run(i)
  const full = await phase((2 * BOUND) / BATCH, CALLS, run)
  rows.push(`| ${name} | ${under.ms.toFixed(2)} / ${full.ms.toFixed(2)} | ${(full.ms / under.ms).toFixed(2)} | ${under.blockMs.toFixed(1)} / ${full.blockMs.toFixed(1)} |`)
}
console.log(`node ${process.version}, ${new Date().toISOString()}, ${CALLS} calls per phase`)
console.log('| call | median ms, under the bound / full | ratio | longest loop block ms, under / full |')
console.log('|---|---|---|---|')
for (const row of rows) console.log(row)
await cache.close()
