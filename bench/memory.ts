// Heap bytes per entry at 1M entries: cachewarden's MemoryStore (through the core, with the
// user index, and with a user plus one tag; and with the prefix index as well, as the
// TieredStore's L1 keeps it) against a raw lru-cache holding the same serialized values.
// Each variant runs in its own process:
// `node --import tsx bench/memory.ts [entries]`.
import { execFileSync } from 'node:child_process'
import { LRUCache } from 'lru-cache'
import { CacheService } from '../src/cache/cache-service.js'
import { MemoryStore } from '../src/stores/memory-store.js'

const N = Number(process.argv[2] ?? 1_000_000)
const variant = process.argv[3]

const valueOf = (i: number) => JSON.stringify({ id: i, name: `user-${i}`, plan: 'pro', widgets: [1, 2, 3, 4, 5], note: 'x'.repeat(120) })
const keyOf = (i: number) => `user:${Math.floor(i / 10)}:dashboard:${i % 10}`

function heap() {
  const gc = (globalThis as { gc?: () => void }).gc!
  gc()
  gc()
  return process.memoryUsage().heapUsed
}

if (variant) {
  const before = heap()
  if (variant === 'raw') {
    const lru = new LRUCache<string, string>({ max: N })
    for (let i = 0; i < N; i++) lru.set(keyOf(i), valueOf(i))
    ;(globalThis as { keep?: unknown }).keep = lru
  } else {
    const store = new MemoryStore({ maxEntries: N, maxBytes: 8 * 1024 ** 3, sweepIntervalMs: 0, prefixIndex: variant === 'user+tag+prefix' })
    const cache = new CacheService({ store })
    const withTag = variant !== 'user'
    for (let i = 0; i < N; i++) {
      const user = String(Math.floor(i / 10))
      // Parsed values, as the HTTP layer hands them over; the core stores them serialized.
      await cache.write(keyOf(i), { value: JSON.parse(valueOf(i)), userId: user, tags: withTag ? [`analytics:${user}`] : undefined, ttlMs: 3_600_000 })
    }
    ;(globalThis as { keep?: unknown }).keep = cache
  }
  const after = heap()
  process.stdout.write(JSON.stringify({ variant, bytesPerEntry: (after - before) / N }))
} else {
  const run = (v: string) =>
    JSON.parse(execFileSync(process.execPath, ['--expose-gc', '--max-old-space-size=8192', '--import', 'tsx', 'bench/memory.ts', String(N), v], { encoding: 'utf8' })) as {
      bytesPerEntry: number
    }
  const raw = run('raw')
  const user = run('user')
  const tag = run('user+tag')
  const prefix = run('user+tag+prefix')
  const valueBytes = valueOf(1).length
  console.log(`${N.toLocaleString('en')} entries, values of ${valueBytes} bytes serialized, 10 entries per user`)
  console.log('| store | heap bytes per entry | ratio to raw lru-cache |')
  console.log('|---|---|---|')
  console.log(`| raw lru-cache, key -> serialized value | ${Math.round(raw.bytesPerEntry)} | 1.00 |`)
  console.log(`| cachewarden MemoryStore, with userId | ${Math.round(user.bytesPerEntry)} | ${(user.bytesPerEntry / raw.bytesPerEntry).toFixed(2)} |`)
  console.log(`| cachewarden MemoryStore, with userId and one tag | ${Math.round(tag.bytesPerEntry)} | ${(tag.bytesPerEntry / raw.bytesPerEntry).toFixed(2)} |`)
  console.log(`| the same with the prefix index (the cluster's L1) | ${Math.round(prefix.bytesPerEntry)} | ${(prefix.bytesPerEntry / raw.bytesPerEntry).toFixed(2)} |`)
}
