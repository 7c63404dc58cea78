// The MemoryStore's prefix index (on in the TieredStore's L1) against the scan it replaces,
// in one process: a narrow prefix (one user's 10 entries) and a wide one (`user:1`, 11% of
// the keys) invalidated on two stores holding the same entries, one with the index; and
// what the index costs a fill of a new key. Then one selector of 1000 prefixes on the store
// without the index (memory mode's prefixMatcher) against testing every prefix on every key.
// `node --expose-gc --import tsx bench/prefix-index.ts [sizes...]` (default 100k 1M).
import { MemoryStore } from '../src/stores/memory-store.js'
import type { StoredEntry } from '../src/cache/types.js'

const sizes = process.argv.slice(2).map(Number).filter(Boolean)
if (sizes.length === 0) sizes.push(100_000, 1_000_000)
const PER_USER = 10
const NARROW = 50
const MANY = 1000
const many: string[] = []
const value = JSON.stringify({ note: 'x'.repeat(180) })
const gc = () => (globalThis as { gc?: () => void }).gc?.()
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!
const fmt = (ms: number) => (ms < 1 ? ms.toFixed(4) : ms.toFixed(1))

function stored(key: string, userId: string, now: number): StoredEntry {
  return { key, value, etag: 'e', userId, tags: undefined, createdAt: now, expiresAt: now + 3_600_000, hits: 0, lastAccessAt: now, stale: false, origin: undefined, size: 20 + value.length }
}

/** Writes entries [from, to) (users of 10) and returns the time taken, in ms. */
function seed(store: MemoryStore, from: number, to: number, now: number): number {
  const t0 = performance.now()
  for (let i = from; i < to; i++) {
    const user = String(Math.floor(i / PER_USER))
    store.setSync(stored(`user:${user}:item:${i % PER_USER}`, user, now))
  }
  return performance.now() - t0
}

console.log('| entries | fill µs/entry, scan / index | narrow prefix ms, scan / index | ratio | wide prefix ms, scan / index | ratio |')
console.log('|---|---|---|---|---|---|')
for (const n of sizes) {
  const now = Date.now()
  const plain = new MemoryStore({ maxEntries: n * 2, maxBytes: 8 * 1024 ** 3, sweepIntervalMs: 0, leases: false })
  const indexed = new MemoryStore({ maxEntries: n * 2, maxBytes: 8 * 1024 ** 3, sweepIntervalMs: 0, leases: false, prefixIndex: true })
  // Filled side by side in runs of 10 000, so both grow on the same heap.
  const fill = [0, 0]
  for (let i = 0; i < n; i += 10_000) {
    fill[0] += seed(plain, i, Math.min(n, i + 10_000), now)
    fill[1] += seed(indexed, i, Math.min(n, i + 10_000), now)
  }
  fill[0] = (fill[0]! * 1000) / n
  fill[1] = (fill[1]! * 1000) / n
  gc()
  const users = n / PER_USER
  const narrow = [[], []] as number[][]
  for (let i = 0; i < NARROW; i++) {
    const prefix = `user:${Math.floor((i * users) / NARROW) + 3}:`
    for (const [s, store] of (i % 2 === 0 ? [plain, indexed] : [indexed, plain]).entries()) {
      const t0 = performance.now()
      const count = await store.invalidate({ prefixes: [prefix] }, 'delete', now)
      narrow[store === plain ? 0 : 1]!.push(performance.now() - t0)
      if (count !== PER_USER) throw new Error(`${prefix} matched ${count} on store ${s}`)
    }
  }
  gc()
  const wide = [0, 0]
  for (const store of [plain, indexed]) {
    const t0 = performance.now()
    const count = await store.invalidate({ prefixes: ['user:1'] }, 'delete', now)
    wide[store === plain ? 0 : 1] = performance.now() - t0
    if (count < n / 10) throw new Error(`user:1 matched only ${count}`)
  }
  const [ns, ni] = [median(narrow[0]!), median(narrow[1]!)]
  console.log(
    `| ${n.toLocaleString('en')} | ${fill[0]!.toFixed(2)} / ${fill[1]!.toFixed(2)} | ${fmt(ns)} / ${fmt(ni)} | ${Math.round(ns / ni).toLocaleString('en')}x | ${fmt(wide[0]!)} / ${fmt(wide[1]!)} | ${(wide[0]! / wide[1]!).toFixed(1)}x |`,
  )

  // One selector of MANY prefixes (each one user's 10 entries) on the scanning store, against
  // the same pass over its keys testing each key against every prefix (what the scan did
  // before prefixMatcher, here without even deleting: a lower bound of its cost).
  gc()
  const prefixes = Array.from({ length: MANY }, (_, i) => `user:${Math.floor((i * users) / MANY) + 5}:`)
  const keys = [...plain.snapshot().entries].map((e) => e.key)
  let t0 = performance.now()
  let brute = 0
  for (const key of keys) if (prefixes.some((p) => key.startsWith(p))) brute++
  const bruteMs = performance.now() - t0
  t0 = performance.now()
  const count = await plain.invalidate({ prefixes }, 'delete', now)
  const manyMs = performance.now() - t0
  if (count !== brute || count === 0) throw new Error(`${MANY} prefixes: invalidated ${count}, brute force found ${brute}`)
  many.push(`| ${n.toLocaleString('en')} | ${MANY} | ${count} | ${fmt(bruteMs)} | ${fmt(manyMs)} | ${(bruteMs / manyMs).toFixed(1)}x |`)
  await Promise.all([plain.close(), indexed.close()])
}
console.log(`\nOne selector of ${MANY} prefixes on the store without the index (memory mode), against testing every key against every prefix:\n`)
console.log('| entries | prefixes | invalidated | every prefix per key ms (no deletes) | invalidate ms | ratio |')
console.log('|---|---|---|---|---|---|')
for (const row of many) console.log(row)
