// Invalidating one user's 10 entries through the core, at 10k, 100k and 1M entries,
// against a scan over all keys (what a hand-written cache without an index does):
// `node --expose-gc --import tsx bench/invalidation.ts [sizes...]`. Seeding leaves garbage; with
// --expose-gc it is collected before timing, so a major GC of the seed does not land in a sample.
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { CacheService } from '../src/cache/cache-service.js'
import { MemoryStore } from '../src/stores/memory-store.js'

const sizes = process.argv.slice(2).map(Number).filter(Boolean)
if (sizes.length === 0) sizes.push(10_000, 100_000, 1_000_000)
const PER_USER = 10
const SAMPLES = 200
const value = JSON.stringify({ note: 'x'.repeat(180) })

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))]!
const fmt = (ms: number) => (ms < 1 ? ms.toFixed(4) : ms.toFixed(1))

function stored(key: string, userId: string | undefined, tags: string[] | undefined, now: number, i: number) {
  return {
    key,
    value,
    etag: 'e',
    userId,
    tags,
    createdAt: now,
    expiresAt: now + 3_600_000 + (i % 3600) * 1000,
    hits: 0,
    lastAccessAt: now,
    stale: false,
    origin: undefined,
    size: 20 + value.length,
  }
}

function seed(store: MemoryStore, n: number, now: number) {
  for (let i = 0; i < n; i++) {
    const user = String(Math.floor(i / PER_USER))
    store.setSync(stored(`user:${user}:item:${i % PER_USER}`, user, undefined, now, i))
  }
}

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * Runs one invalidation while the event loop's delay is watched, and returns its table row.
 * The monitor records a block only once its timer has ticked, so it starts 5 ms before the
 * run and stops 5 ms after (a run that never yielded showed as 0 otherwise).
 */
async function watched(n: number, run: () => Promise<{ invalidated: number }>): Promise<string> {
  const monitor = monitorEventLoopDelay({ resolution: 1 })
  monitor.enable()
  await pause(5)
  const t0 = performance.now()
  const { invalidated } = await run()
  const ms = performance.now() - t0
  await pause(5)
  monitor.disable()
  return `| ${n.toLocaleString('en')} | ${invalidated.toLocaleString('en')} | ${fmt(ms)} | ${fmt(monitor.max / 1e6)} |`
}

const rows: string[] = []
const prefixRows: string[] = []
const tagRows: string[] = []
const allRows: string[] = []
for (const n of sizes) {
  const now = Date.now()
  const store = new MemoryStore({ maxEntries: n * 2, maxBytes: 4 * 1024 ** 3, sweepIntervalMs: 0 })
  const cache = new CacheService({ store })
  seed(store, n, now)
  const users = n / PER_USER
  // Warm the code path, then time SAMPLES invalidations of distinct users.
  for (let i = 0; i < 50; i++) await cache.invalidate({ userIds: [String(Math.floor((i * users) / SAMPLES) + 1)] }, { source: 'api' })
  ;(globalThis as { gc?: () => void }).gc?.()
  const times: number[] = []
  let removed = 0
  for (let i = 0; i < SAMPLES; i++) {
    const user = String(Math.floor((i * users) / SAMPLES))
    const t0 = performance.now()
    const r = await cache.invalidate({ userIds: [user] }, { source: 'api' })
    times.push(performance.now() - t0)
    removed += r.invalidated
  }
  if (removed !== SAMPLES * PER_USER) throw new Error(`expected ${SAMPLES * PER_USER} removed, got ${removed}`)

  // Baseline: find the user's keys by scanning every entry, then delete them.
  const scanTimes: number[] = []
  const scanUsers = [10, 20, 30].map((i) => String(Math.floor((i * users) / SAMPLES) + 2))
  for (const user of scanUsers) {
    const t0 = performance.now()
    const doomed: string[] = []
    for (const e of store.snapshot().entries) if (e.userId === user) doomed.push(e.key)
    await store.invalidate({ keys: doomed }, 'delete', now)
    scanTimes.push(performance.now() - t0)
    if (doomed.length !== PER_USER) throw new Error(`scan found ${doomed.length}`)
  }
  // A prefix invalidation over the whole key space, while the event loop's delay is watched:
  // the scan must yield often enough that no other request waits more than 10 ms.
  prefixRows.push(await watched(n, () => cache.invalidate({ prefixes: ['user:1'] }, { source: 'api' })))

  // A tag on a tenth as many entries again: invalidated in slices too, watched the same way.
  for (let i = 0; i < n / 10; i++) store.setSync(stored(`wide:${i}`, undefined, ['wide'], now, i))
  ;(globalThis as { gc?: () => void }).gc?.() // as after the seed: the new entries' GC is not the invalidation's
  tagRows.push(
    await watched(n, async () => {
      const tagged = await cache.invalidate({ tags: ['wide'] }, { source: 'api' })
      if (tagged.invalidated !== n / 10) throw new Error(`expected ${n / 10} tagged entries, got ${tagged.invalidated}`)
      return tagged
    }),
  )

  // Last, a prefix that matches every entry left (nearly all of the cache): deleting that many
  // entries frees a large part of the heap, and the loop is watched for GC pauses as well.
  const { entries: left } = await store.size() // the tag's entries are gone: all under user:
  ;(globalThis as { gc?: () => void }).gc?.()
  allRows.push(
    await watched(n, async () => {
      const all = await cache.invalidate({ prefixes: ['user:'] }, { source: 'api' })
      if (all.invalidated !== left) throw new Error(`expected ${left} entries under user:, got ${all.invalidated}`)
      return all
    }),
  )

  const p50 = pct(times, 50)
  const scan = pct(scanTimes, 50)
  rows.push(`| ${n.toLocaleString('en')} | ${fmt(p50)} | ${fmt(pct(times, 99))} | ${fmt(scan)} | ${Math.round(scan / p50).toLocaleString('en')}x |`)
  await cache.close()
}
console.log('| entries | indexed p50 ms | indexed p99 ms | full scan ms (median of 3) | scan / indexed |')
console.log('|---|---|---|---|---|')
for (const row of rows) console.log(row)
const blockTable = (title: string, tableRows: string[]) => {
  console.log(`\n${title}:\n`)
  console.log('| entries | invalidated | total ms | longest event-loop block ms |')
  console.log('|---|---|---|---|')
  for (const row of tableRows) console.log(row)
}
blockTable('Prefix invalidation of `user:1` (every key of users 1, 10-19, 100-199, ...) over the whole cache', prefixRows)
blockTable('Tag invalidation of one tag on a tenth as many entries as the cache holds', tagRows)
blockTable('Prefix invalidation of `user:`, every entry left in the cache', allRows)
