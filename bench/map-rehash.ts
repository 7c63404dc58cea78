// The event-loop blocks no slicing can avoid in a very large cache: V8 rehashes a Map (and
// lru-cache's key map is one) in one step when it grows past a power of two, and when deletes
// leave it less than a quarter full. Times the one set or delete that crosses each such size,
// in a plain Map and in an lru-cache, against the median set or delete of the same run:
// `node --expose-gc --import tsx bench/map-rehash.ts [entries = 1000000]`.
import { LRUCache } from 'lru-cache'

const entries = Number(process.argv[2] ?? 1_000_000)
const key = (i: number) => `user:${i}:item:${i % 10}`
const gc = (globalThis as { gc?: () => void }).gc ?? (() => {})

interface Table {
  set(key: string, value: number): unknown
  delete(key: string): unknown
  readonly size: number
}

/** Sizes where a Map of up to `entries` rehashes: after growing to 2^k + 1, after shrinking to 2^k - 1. */
const powers: number[] = []
for (let p = 1 << 16; p < entries; p *= 2) powers.push(p)

function run(name: string, table: Table): string[] {
  const setAt = new Map<number, number>()
  const deleteAt = new Map<number, number>()
  const sets: number[] = []
  const deletes: number[] = []
  gc()
  for (let i = 0; i < entries; i++) {
    const t0 = performance.now()
    table.set(key(i), i)
    const ms = performance.now() - t0
    sets.push(ms)
    if (powers.includes(table.size - 1)) setAt.set(table.size, ms)
  }
  gc()
  for (let i = 0; i < entries; i++) {
    const t0 = performance.now()
    table.delete(key(i))
    const ms = performance.now() - t0
    deletes.push(ms)
    if (powers.includes(table.size + 1)) deleteAt.set(table.size, ms)
  }
  const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1]!
  const rows = [`| ${name} | median set / delete | ${(median(sets) * 1000).toFixed(2)} / ${(median(deletes) * 1000).toFixed(2)} µs |`]
  for (const [size, ms] of setAt) rows.push(`| ${name} | set to ${size.toLocaleString('en')} | ${ms.toFixed(1)} ms |`)
  for (const [size, ms] of [...deleteAt].reverse()) rows.push(`| ${name} | delete to ${size.toLocaleString('en')} | ${ms.toFixed(1)} ms |`)
  return rows
}

const rows = [
  ...run('Map', new Map<string, number>()),
  ...run('lru-cache', new LRUCache<string, number>({ max: entries * 2 })),
]
console.log(`${entries.toLocaleString('en')} string keys, set in order, then deleted in order (the sets and deletes that cross a power of two):\n`)
console.log('| table | step | time |')
console.log('|---|---|---|')
for (const row of rows) console.log(row)
