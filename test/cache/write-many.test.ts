// CacheService.writeMany (batch-set): up to 32 keys written at once, each key's items in order.
// The store is a real MemoryStore whose `set` is slowed by a tick (so writes overlap, as Redis
// round trips do) and, in the second test, fails for one key as an unreachable Redis would.
import t from 'tap'
import { CacheService } from '../../src/cache/cache-service.js'
import type { StoredEntry } from '../../src/cache/types.js'
import { backendUnavailable } from '../../src/errors.js'
import { MemoryStore } from '../../src/stores/memory-store.js'

const tick = () => new Promise((resolve) => setImmediate(resolve))

function slowStore(failKey?: string) {
  const store = new MemoryStore({ sweepIntervalMs: 0 })
  const set = store.set.bind(store)
  const log = { started: [] as string[], inFlight: 0, most: 0 }
  store.set = async (entry: StoredEntry, lease) => {
    log.started.push(`${entry.key}=${entry.value}`)
    log.most = Math.max(log.most, ++log.inFlight)
    await tick()
    log.inFlight--
    if (entry.key === failKey) throw backendUnavailable('the store')
    return set(entry, lease)
  }
  return { store, log }
}

t.test('writes up to 32 keys at once; the items of one key one after another, in order', async (t) => {
  const { store, log } = slowStore()
  const cache = new CacheService({ store })
  t.teardown(() => cache.close())
  const items = Array.from({ length: 120 }, (_, i) => ({ key: `k${i % 40}`, value: i }))
  items.splice(7, 0, { key: 'k3', value: -1, ttlMs: 0 } as never) // refused alone, in its place
  const outcomes = await cache.writeMany(items)
  t.same(outcomes.map((o) => o.key), items.map((i) => i.key), 'one outcome per item, in order')
  t.equal(outcomes[7]!.error?.code, 'invalid_request')
  t.equal(log.most, 32, 'up to 32 writes in flight')
  for (let k = 0; k < 40; k++) {
    const written = log.started.filter((s) => s.startsWith(`k${k}=`)).map((s) => Number(s.split('=')[1]))
    t.same(written, [k, k + 40, k + 80], `k${k} written in the order sent`)
    t.equal((await cache.read(`k${k}`)).entry?.value, String(k + 80), `k${k}: the last write stands`)
  }
})

t.test('a store failure rejects the batch, and no write starts after it', async (t) => {
  const { store, log } = slowStore('k40')
  const cache = new CacheService({ store })
  t.teardown(() => cache.close())
  // 40 keys, 20 items each, one after another per key: k40 fails on its first item.
  const items = Array.from({ length: 800 }, (_, i) => ({ key: `k${i % 40}`, value: i }))
  items.push(...Array.from({ length: 20 }, (_, i) => ({ key: 'k40', value: i })))
  items.unshift({ key: 'k40', value: -1 })
  await t.rejects(cache.writeMany(items), { code: 'backend_unavailable' })
  for (let i = 0; i < 50; i++) await tick()
  t.ok(log.started.length <= 2 * 32, `stopped: ${log.started.length} of ${items.length} writes started`)
})
