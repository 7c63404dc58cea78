// Cluster mode benchmarks (BENCHMARKS.md, "Cluster mode"):
//   1. GET-hit throughput of a cluster-mode server (L1 hits) against a memory-mode server,
//      autocannon against real servers (child processes) started by this script; then the
//      same comparison in process, without HTTP (CacheService.read on each store).
//   2. Invalidation propagation: from one instance's invalidate() to another's L1.
//   3. batch-set and batch-get of 1000 keys, against the same keys one after another.
//   4. Invalidating a user with 10 entries among N entries in Redis, against SCAN MATCH + DEL.
//   5. L1 reads of hot keys on B while other instances invalidate a prefix no entry is under,
//      every 50 ms (each a run over B's whole L1, in slices), against the same reads alone.
// Run: node --import tsx bench/cluster-mode.ts [--entries 1000000] [--duration 4] [--skip-http] [--skip-scan] [--skip-runs] [--only-runs]
import { spawn, type ChildProcess } from 'node:child_process'
import { performance } from 'node:perf_hooks'
import autocannon from 'autocannon'
import { Redis } from 'ioredis'
import { CacheService } from '../src/cache/cache-service.js'
import { MemoryStore } from '../src/stores/memory-store.js'
import { TieredStore } from '../src/stores/tiered-store.js'
import { RedisServer, freePort, waitUntil } from '../test/helpers/redis-server.js'

const arg = (name: string, fallback: number) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? Number(process.argv[i + 1]) : fallback
}
const ENTRIES = arg('entries', 1_000_000)
const DURATION_S = arg('duration', 4)
const SECRET = 'bench-secret-0123456789'
const auth = { authorization: `Bearer ${SECRET}` }

const pct = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!
const fmt = (n: number, d = 2) => n.toFixed(d)

async function startServer(env: Record<string, string>): Promise<{ url: string; child: ChildProcess }> {
  const port = await freePort()
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    env: { ...process.env, ...env, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'warn', CACHEWARDEN_API_KEYS: `bench:admin:${SECRET}` },
    stdio: ['ignore', 'ignore', 'inherit'],
  })
  const url = `http://127.0.0.1:${port}`
  const up = await waitUntil(async () => {
    try {
      return (await fetch(`${url}/health/ready`)).status === 200
    } catch {
      return false
    }
  }, 30_000, 50)
  if (!up) throw new Error(`server with ${JSON.stringify(env)} did not become ready`)
  return { url, child }
}

async function getHitRps(url: string): Promise<number> {
  const res = await autocannon({ url: `${url}/v1/entries/hot:key`, headers: auth, connections: 16, duration: DURATION_S })
  if (res.non2xx > 0 || res.errors > 0) throw new Error(`${url}: ${res.non2xx} non-2xx, ${res.errors} errors`)
  return res.requests.average
}

async function throughput(redisUrl: string) {
  const memory = await startServer({})
  const cluster = await startServer({ REDIS_URL: redisUrl })
  try {
    for (const { url } of [memory, cluster]) {
      const put = await fetch(`${url}/v1/entries/hot:key`, {
        method: 'PUT',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ value: { user: 42, widgets: Array.from({ length: 20 }, (_, i) => ({ id: i, title: `widget ${i}` })) } }),
      })
      if (put.status !== 200) throw new Error(`PUT failed: ${put.status}`)
      await fetch(`${url}/v1/entries/hot:key`, { headers: auth }) // fills the L1
    }
    await getHitRps(memory.url) // warm-up of both JITs
    await getHitRps(cluster.url)
    const ratios: number[] = []
    const rows: string[] = []
    // Interleaved rounds, so a neighbour's load on the shared machine hits both sides alike;
    // the median of the per-round ratios is the result.
    for (let round = 0; round < 3; round++) {
      // Which side runs first alternates, so neither always gets the warmer slot.
      let mem: number, clu: number
      if (round % 2 === 0) {
        mem = await getHitRps(memory.url)
        clu = await getHitRps(cluster.url)
      } else {
        clu = await getHitRps(cluster.url)
        mem = await getHitRps(memory.url)
      }
      ratios.push(clu / mem)
      rows.push(`${fmt(mem, 0)} vs ${fmt(clu, 0)}`)
    }
    ratios.sort((x, y) => x - y)
    console.log(`GET hit req/s, memory vs cluster (L1 hit), per round: ${rows.join(', ')}; median ratio ${fmt(ratios[1]!)}`)
  } finally {
    memory.child.kill()
    cluster.child.kill()
  }
}

/** The same GET-hit comparison without HTTP: CacheService.read on each store, interleaved. */
async function coreReads(redisUrl: string) {
  const tiered = new TieredStore({ redisUrl, namespace: 'core' })
  await tiered.connect()
  const memory = new MemoryStore()
  const ms: Record<string, number[]> = { memory: [], tiered: [] }
  for (let round = 0; round < 6; round++) {
    for (const store of [memory, tiered]) {
      const cache = new CacheService({ store })
      await cache.write('hot', { value: { a: 1 } })
      await cache.read('hot')
      const t0 = performance.now()
      for (let i = 0; i < 200_000; i++) await cache.read('hot')
      ms[store.kind]!.push(performance.now() - t0)
    }
  }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!
  const mem = median(ms.memory!)
  const tie = median(ms.tiered!)
  console.log(`CacheService.read hit, 200k reads: memory ${fmt(mem, 0)} ms, tiered (L1) ${fmt(tie, 0)} ms, throughput ratio ${fmt(mem / tie)}`)
  await Promise.all([tiered.close(), memory.close()])
}

async function propagation(redisUrl: string) {
  const a = new TieredStore({ redisUrl, namespace: 'prop', sweepIntervalMs: 0 })
  const b = new TieredStore({ redisUrl, namespace: 'prop', sweepIntervalMs: 0 })
  await Promise.all([a.connect(), b.connect()])
  const N = 2000
  const fromCall: number[] = []
  const fromAck: number[] = []
  let applied: (() => void) | undefined
  b.onRemoteInvalidation((r) => r.write || applied?.())
  const now = Date.now()
  const put = (key: string) =>
    a.set({ key, value: '1', etag: 'e', userId: undefined, tags: undefined, createdAt: now, expiresAt: now + 600_000, hits: 0, lastAccessAt: now, stale: false, origin: undefined, size: 10 })
  // B's L1 holds other entries too, as a live L1 does.
  for (let i = 0; i < 1000; i++) await put(`other:${i}`)
  for (let i = 0; i < 1000; i++) await b.get(`other:${i}`, Date.now())
  for (let i = 0; i < N; i++) {
    const key = `prop:${i}`
    await put(key)
    await waitUntil(async () => (await b.get(key, Date.now()), (await b.l1Peek(key, Date.now())) !== undefined), 5000, 0)
    const arrived = new Promise<number>((resolve) => (applied = () => resolve(performance.now())))
    const start = performance.now()
    await a.invalidate({ keys: [key] }, 'delete', Date.now())
    const acked = performance.now()
    const at = await arrived
    if ((await b.l1Peek(key, Date.now())) !== undefined) throw new Error('the L1 copy survived')
    fromCall.push(at - start)
    fromAck.push(at - acked)
  }
  fromCall.sort((x, y) => x - y)
  fromAck.sort((x, y) => x - y)
  console.log(
    `propagation (${N} invalidations, A's call -> B's L1 dropped): p50 ${fmt(pct(fromCall, 50), 3)} ms, ` +
      `p99 ${fmt(pct(fromCall, 99), 3)} ms, max ${fmt(fromCall.at(-1)!, 3)} ms; after A's ack: p50 ${fmt(pct(fromAck, 50), 3)} ms, p99 ${fmt(pct(fromAck, 99), 3)} ms`,
  )
  await Promise.all([a.close(), b.close()])
}

/**
 * batch-set and batch-get of 1000 keys (half of the reads missing) through CacheService on a
 * TieredStore, against the same number of keys one after another (what the routes did before they
 * ran up to 32 keys at once). Writes on instance A, reads on instance B, whose L1 has never seen
 * the keys (as when another instance wrote them); each side has its own fresh keys every round,
 * and which side goes first alternates.
 */
async function batches(redisUrl: string) {
  const [a, b] = [new TieredStore({ redisUrl, namespace: 'batch' }), new TieredStore({ redisUrl, namespace: 'batch' })]
  await Promise.all([a.connect(), b.connect()])
  const [writer, reader] = [new CacheService({ store: a }), new CacheService({ store: b })]
  const value = { user: 42, widgets: Array.from({ length: 5 }, (_, i) => ({ id: i, title: `widget ${i}` })) }
  const ms: Record<'setOne' | 'setMany' | 'getOne' | 'getMany', number[]> = { setOne: [], setMany: [], getOne: [], getMany: [] }
  const time = async (name: keyof typeof ms, fn: () => Promise<unknown>) => {
    const t0 = performance.now()
    await fn()
    ms[name].push(performance.now() - t0)
  }
  const ROUNDS = 7 // the first is a warm-up
  for (let round = 0; round < ROUNDS; round++) {
    const items = (side: string) => Array.from({ length: 1000 }, (_, i) => ({ key: `b:${round}:${side}:${i}`, value, userId: `u${i % 100}` }))
    const reads = (side: string) => items(side).map((item, i) => (i % 2 === 0 ? item.key : `${item.key}:missing`))
    const sides = [
      () => time('setOne', () => items('one').reduce<Promise<unknown>>((p, item) => p.then(() => writer.write(item.key, item)), Promise.resolve())),
      () => time('setMany', () => writer.writeMany(items('many'))),
    ]
    for (const side of round % 2 === 0 ? sides : sides.reverse()) await side()
    const gets = [
      () => time('getOne', () => reads('one').reduce<Promise<unknown>>((p, key) => p.then(() => reader.read(key)), Promise.resolve())),
      () => time('getMany', () => reader.readMany(reads('many'))),
    ]
    for (const side of round % 2 === 0 ? gets : gets.reverse()) await side()
  }
  const median = (xs: number[]) => xs.slice(1).sort((x, y) => x - y)[Math.floor((xs.length - 1) / 2)]!
  const { setOne, setMany, getOne, getMany } = Object.fromEntries(Object.entries(ms).map(([k, xs]) => [k, median(xs)])) as Record<keyof typeof ms, number>
  console.log(
    `batch-set of 1000 (median of ${ROUNDS - 1} rounds): one after another ${fmt(setOne, 1)} ms, writeMany ${fmt(setMany, 1)} ms, ${fmt(setOne / setMany, 1)}x; ` +
      `batch-get of 1000, half missing, on another instance: one after another ${fmt(getOne, 1)} ms, readMany ${fmt(getMany, 1)} ms, ${fmt(getOne / getMany, 1)}x`,
  )
  await Promise.all([a.close(), b.close()])
}

// Bulk loader: writes `count` entries per call server-side, in exactly the layout of the
// store's set script (entry hash, user index, expiry index, bytes), without a round trip each.
const BULK_LOAD = `
local base = KEYS[1]
local pre = base .. (redis.call('GET', base .. 'g') or '0') .. ':'
local first, count, users = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local value, pttl = ARGV[6], tonumber(ARGV[7])
local bytes = 0
for j = first, first + count - 1 do
  local u = tostring(j % users)
  local k = 'user:' .. u .. ':item:' .. tostring(math.floor(j / users))
  local e = pre .. 'e:' .. k
  local z = #k + #value + #u
  redis.call('HSET', e, 'v', value, 'et', 'etag', 'c', ARGV[4], 'x', ARGV[5], 'z', z, 'h', 0, 'a', ARGV[4], 's', '0', 'u', u)
  redis.call('PEXPIRE', e, pttl)
  redis.call('SADD', pre .. 'u:' .. u, k)
  redis.call('PEXPIRE', pre .. 'u:' .. u, pttl)
  redis.call('ZADD', pre .. 'x', ARGV[5], k)
  bytes = bytes + z
end
redis.call('INCRBY', pre .. 'b', bytes)
return count
`

async function userVsScan(redisUrl: string) {
  const users = ENTRIES / 10
  const loader = new Redis(redisUrl)
  loader.defineCommand('bulkLoad', { numberOfKeys: 1, lua: BULK_LOAD })
  const base = '{big}:'
  const now = Date.now()
  const value = JSON.stringify({ widgets: [1, 2, 3], title: 'a dashboard' })
  const started = performance.now()
  const BATCH = 2000
  const bulk = loader as unknown as { bulkLoad(...args: Array<string | number>): Promise<number> }
  for (let i = 0; i < ENTRIES; i += BATCH) {
    await bulk.bulkLoad(base, i, Math.min(BATCH, ENTRIES - i), users, now, now + 3_600_000, value, 7_200_000)
  }
  const loadS = (performance.now() - started) / 1000
  const dbsize = await loader.dbsize()
  const memory = /used_memory_human:(\S+)/.exec(await loader.info('memory'))?.[1]
  console.log(
    `loaded ${ENTRIES} entries (${users} users x 10) with a Lua bulk loader in ${fmt(loadS, 1)} s (${fmt(ENTRIES / loadS, 0)}/s); ` +
      `Redis holds ${dbsize} keys in ${memory}`,
  )

  const store = new TieredStore({ redisUrl, namespace: 'big', sweepIntervalMs: 0, maxEntries: ENTRIES * 2, maxBytes: 1e12 })
  await store.connect()
  const indexed: number[] = []
  for (let u = 1; u <= 21; u++) {
    const t0 = performance.now()
    const n = await store.invalidate({ userIds: [String(u * 37)] }, 'delete', Date.now())
    indexed.push(performance.now() - t0)
    if (n !== 10) throw new Error(`user ${u * 37}: ${n} invalidated, expected 10`)
  }
  indexed.sort((x, y) => x - y)
  const scanned: number[] = []
  for (let u = 1; u <= 3; u++) {
    const t0 = performance.now()
    let cursor = '0'
    let deleted = 0
    do {
      const [next, keys] = await loader.scan(cursor, 'MATCH', `${base}0:e:user:${u * 41}:*`, 'COUNT', 1000)
      cursor = next
      if (keys.length > 0) deleted += await loader.del(...keys)
    } while (cursor !== '0')
    scanned.push(performance.now() - t0)
    if (deleted !== 10) throw new Error(`SCAN deleted ${deleted}, expected 10`)
  }
  scanned.sort((x, y) => x - y)
  const idx = pct(indexed, 50)
  const scan = pct(scanned, 50)
  console.log(
    `invalidate one user (10 entries among ${ENTRIES}): indexed ${fmt(idx, 3)} ms (median of ${indexed.length}), ` +
      `SCAN MATCH COUNT 1000 + DEL ${fmt(scan, 1)} ms (median of ${scanned.length}), ratio ${fmt(scan / idx, 0)}x`,
  )
  await store.close()
  loader.disconnect()
}

/**
 * What a run over L1 costs the reads it does not cover. B's L1 holds `--entries` entries and
 * 1000 hot ones; 16 readers on B read hot keys for `DURATION_S`, first alone, then while the
 * bus brings B, every 50 ms, what another instance sends for an invalidation of the prefix
 * `none/` (no entry is under it) walked in batches: a quiet message and a message proper,
 * each a run over B's whole L1 in 2 ms slices. (Published here directly: the walk itself, a
 * SCAN over Redis, would run on that other instance.) Redis counts the reads it answers, so
 * the hot keys' hit counts in Redis say how many reads did not come from L1.
 */
async function l1DuringRuns(redisUrl: string) {
  const cold = ENTRIES
  const a = new TieredStore({ redisUrl, namespace: 'runs', sweepIntervalMs: 0 })
  const b = new TieredStore({ redisUrl, namespace: 'runs', sweepIntervalMs: 0 })
  const bus = new Redis(redisUrl)
  await Promise.all([a.connect(), b.connect()])
  const now = Date.now()
  const entry = (key: string, userId: string) => ({
    key, value: '1', etag: 'e', userId, tags: ['t'], createdAt: now, expiresAt: now + 3_600_000, hits: 0, lastAccessAt: now, stale: false, origin: undefined, size: 10,
  })
  const hot = Array.from({ length: 1000 }, (_, i) => `hot/${i}`)
  const coldKeys = Array.from({ length: cold }, (_, i) => `cold/${i}`)
  for (let i = 0; i < coldKeys.length; i += 1000) await Promise.all(coldKeys.slice(i, i + 1000).map((key, j) => a.set(entry(key, `u${(i + j) % 10_000}`))))
  await Promise.all(hot.map((key, i) => a.set(entry(key, `h${i}`))))
  for (let i = 0; i < coldKeys.length; i += 1000) await Promise.all(coldKeys.slice(i, i + 1000).map((key) => b.get(key, Date.now())))
  await Promise.all(hot.map((key) => b.get(key, Date.now())))
  const l1 = (await b.l1Size()).entries
  const redisHits = async () => (await Promise.all(hot.map((key) => a.peek(key, Date.now())))).reduce((sum, e) => sum + (e?.hits ?? 0), 0)
  const phase = async (invalidating: boolean) => {
    let stop = false
    let invalidations = 0
    const invalidator = (async () => {
      while (invalidating && !stop) {
        const walk = ++invalidations
        await bus.publish('{runs}:bus', JSON.stringify({ f: 'bench', qs: { prefixes: ['none/'] }, m: 'delete', i: walk }))
        await bus.publish('{runs}:bus', JSON.stringify({ f: 'bench', s: { prefixes: ['none/'] }, m: 'delete', i: walk }))
        await new Promise((r) => setTimeout(r, 50))
      }
    })()
    const before = await redisHits()
    let reads = 0
    const t0 = performance.now()
    const deadline = t0 + DURATION_S * 1000
    await Promise.all(
      Array.from({ length: 16 }, async (_, r) => {
        for (let i = r; performance.now() < deadline; i += 16) {
          await b.get(hot[i % hot.length]!, Date.now())
          reads++
        }
      }),
    )
    const seconds = (performance.now() - t0) / 1000
    stop = true
    await invalidator
    const fromRedis = (await redisHits()) - before
    return { perSecond: reads / seconds, fromL1: 1 - fromRedis / reads, invalidations }
  }
  const quiet = await phase(false)
  const busy = await phase(true)
  console.log(
    `L1 reads of hot keys during runs over an L1 of ${l1} entries: alone ${fmt(quiet.perSecond, 0)} reads/s (${fmt(100 * quiet.fromL1, 1)}% from L1); ` +
      `with ${busy.invalidations} prefix invalidations from another instance (one per 50 ms) ${fmt(busy.perSecond, 0)} reads/s (${fmt(100 * busy.fromL1, 1)}% from L1): ratio ${fmt(busy.perSecond / quiet.perSecond, 2)}`,
  )
  bus.disconnect()
  await Promise.all([a.close(), b.close()])
}

const redis = new RedisServer(await freePort())
await redis.start()
try {
  console.log(`node ${process.version}, ${new Date().toISOString()}`)
  const only = process.argv.includes('--only-runs')
  if (!only && !process.argv.includes('--skip-http')) await throughput(redis.url)
  if (!only) await coreReads(redis.url)
  if (!only) await propagation(redis.url)
  if (!only) await batches(redis.url)
  if (!only && !process.argv.includes('--skip-scan')) await userVsScan(redis.url)
  if (!process.argv.includes('--skip-runs')) await l1DuringRuns(redis.url)
} finally {
  await redis.stop()
}
