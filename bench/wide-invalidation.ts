// A tag on many entries, invalidated in cluster mode: one Lua script over every member (the
// baseline: `indexBatch` unbounded) against the default batches of 1000, in the same run, on
// a redis-server of its own. What matters is the longest script (Redis serves no other client
// while one runs; past the 2 s command timeout the invalidation fails with 503), read from
// Redis' SLOWLOG: `node --import tsx bench/wide-invalidation.ts [members...]`.
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { TieredStore } from '../src/stores/tiered-store.js'
import { RedisServer, freePort } from '../test/helpers/redis-server.js'

const sizes = process.argv.slice(2).map(Number).filter(Boolean)
if (sizes.length === 0) sizes.push(10_000, 60_000, 200_000)
const value = JSON.stringify({ note: 'x'.repeat(180) })

const server = new RedisServer(await freePort())
await server.start()
const admin = new Redis(server.url)
const rows: string[] = []
async function slowlog(): Promise<Array<[number, number, number, string[]]>> {
  for (;;) {
    try {
      return (await admin.slowlog('GET', 100_000)) as Array<[number, number, number, string[]]>
    } catch (error) {
      if (!/^BUSY/.test((error as Error).message)) throw error
      await sleep(100)
    }
  }
}
let n = 0
try {
  for (const members of sizes) {
    const row: string[] = [members.toLocaleString('en')]
    for (const indexBatch of [Number.MAX_SAFE_INTEGER, 1000]) {
      const store = new TieredStore({ redisUrl: server.url, namespace: `wide${n++}`, sweepIntervalMs: 0, maxEntries: 10_000_000, maxBytes: 16 * 1024 ** 3, indexBatch })
      await store.connect()
      const now = Date.now()
      for (let i = 0; i < members; i += 500) {
        const batch = Array.from({ length: Math.min(500, members - i) }, (_, j) => `w:${i + j}`)
        await Promise.all(batch.map((key, j) => store.set({ key, value, etag: 'e', userId: `u${(i + j) % 1000}`, tags: ['wide'], createdAt: now, expiresAt: now + 3_600_000, hits: 0, lastAccessAt: now, stale: false, origin: undefined, size: 200 })))
      }
      await admin.config('SET', 'slowlog-log-slower-than', '0')
      await admin.slowlog('RESET')
      const t0 = performance.now()
      let outcome: string
      try {
        outcome = String(await store.invalidate({ tags: ['wide'] }, 'delete', Date.now()))
      } catch (error) {
        outcome = `503 (${(error as Error).message})`
      }
      const total = performance.now() - t0
      // Queued behind a script that outlived the timeout, SLOWLOG GET waits for it to end; past
      // Redis' busy-reply threshold (5 s, on a slow machine) it is refused with BUSY: ask again.
      const log = await slowlog()
      await admin.config('SET', 'slowlog-log-slower-than', '10000')
      const longest = Math.max(...log.filter((e) => /^eval/i.test(e[3][0] ?? '')).map((e) => e[2])) / 1000
      row.push(outcome, total.toFixed(0), longest.toFixed(1))
      await store.close()
    }
    rows.push(`| ${row.join(' | ')} |`)
  }
} finally {
  admin.disconnect()
  await server.stop()
}
console.log('| members | one script: invalidated | total ms | longest script ms | batches of 1000: invalidated | total ms | longest script ms |')
console.log('|---|---|---|---|---|---|---|')
for (const row of rows) console.log(row)
process.exit(0)
