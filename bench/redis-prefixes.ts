// One selector of many prefixes in cluster mode: one SCAN over Redis' keys for all of them
// (what `invalidate` does) against one SCAN each (the baseline: the same prefixes sent one
// selector at a time, which is what one selector cost before), in the same run, on a
// redis-server of its own, on the same entries refilled before each side.
// `node --import tsx bench/redis-prefixes.ts [entries = 100000] [prefixes...= 10 100]`
import { TieredStore } from '../src/stores/tiered-store.js'
import { RedisServer, freePort } from '../test/helpers/redis-server.js'

const [entriesArg, ...prefixArgs] = process.argv.slice(2).map(Number).filter(Boolean)
const ENTRIES = entriesArg ?? 100_000
const counts = prefixArgs.length > 0 ? prefixArgs : [10, 100]
const PER_USER = 10
const value = JSON.stringify({ note: 'x'.repeat(180) })

const server = new RedisServer(await freePort())
await server.start()
const store = new TieredStore({ redisUrl: server.url, sweepIntervalMs: 0, maxEntries: 10_000_000, maxBytes: 16 * 1024 ** 3 })
await store.connect()
const users = ENTRIES / PER_USER

async function fill(): Promise<void> {
  const now = Date.now()
  for (let i = 0; i < ENTRIES; i += 500) {
    await Promise.all(
      Array.from({ length: Math.min(500, ENTRIES - i) }, (_, j) => {
        const n = i + j
        const user = String(Math.floor(n / PER_USER))
        return store.set({ key: `user:${user}:item:${n % PER_USER}`, value, etag: 'e', userId: user, tags: undefined, createdAt: now, expiresAt: now + 3_600_000, hits: 0, lastAccessAt: now, stale: false, origin: undefined, size: 200 })
      }),
    )
  }
}

const rows: string[] = []
try {
  for (const count of counts) {
    const prefixes = Array.from({ length: count }, (_, i) => `user:${Math.floor((i * users) / count) + 7}:`)
    await fill()
    let t0 = performance.now()
    let each = 0
    for (const prefix of prefixes) each += await store.invalidate({ prefixes: [prefix] }, 'delete', Date.now())
    const eachMs = performance.now() - t0
    await fill()
    t0 = performance.now()
    const once = await store.invalidate({ prefixes }, 'delete', Date.now())
    const onceMs = performance.now() - t0
    if (once !== each || once !== count * PER_USER) throw new Error(`${count} prefixes: ${once} in one selector, ${each} one at a time`)
    rows.push(`| ${ENTRIES.toLocaleString('en')} | ${count} | ${once} | ${eachMs.toFixed(0)} | ${onceMs.toFixed(0)} | ${(eachMs / onceMs).toFixed(1)}x |`)
  }
} finally {
  await store.close()
  await server.stop()
}
console.log('| entries | prefixes | invalidated | one SCAN per prefix ms | one selector (one SCAN) ms | ratio |')
console.log('|---|---|---|---|---|---|')
for (const row of rows) console.log(row)
process.exit(0)
