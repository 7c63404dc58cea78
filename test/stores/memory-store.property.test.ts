import fc from 'fast-check'
import t from 'tap'
import type { StoredEntry } from '../../src/cache/types.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { runs } from '../helpers/property.js'
import { entry } from './store-contract.js'

// After any sequence of set / overwrite (same or other user and tags, or too large to keep) /
// delete / expire / evict / invalidate, the user and tag indexes equal a brute-force
// recomputation from the entries, and the accounted bytes equal the sum of the entries' sizes.
// A store with the prefix index runs every step beside one without: same answers, same
// entries, and its ordered keys are exactly its entries' keys.

const key = fc.constantFrom('a', 'b', 'c', 'ab', 'abc', 'b:1', 'b:2', 'c/x', 'd', 'e')
const user = fc.option(fc.constantFrom('u1', 'u2', 'u3'), { nil: undefined })
const tags = fc.option(fc.uniqueArray(fc.constantFrom('t1', 't2', 't3', 't4'), { maxLength: 3 }), { nil: undefined })
const mode = fc.constantFrom('delete' as const, 'stale' as const)

const op = fc.oneof(
  fc.record({ op: fc.constant('set' as const), key, user, tags, ttl: fc.integer({ min: 1, max: 5000 }), size: fc.oneof({ arbitrary: fc.integer({ min: 1, max: 400 }), weight: 9 }, { arbitrary: fc.constant(1600), weight: 1 }) }),
  fc.record({ op: fc.constant('get' as const), key }),
  fc.record({ op: fc.constant('advance' as const), ms: fc.integer({ min: 1, max: 3000 }) }),
  fc.record({ op: fc.constant('sweep' as const) }),
  fc.record({ op: fc.constant('invalidateKeys' as const), keys: fc.array(key, { maxLength: 3 }), mode }),
  fc.record({ op: fc.constant('invalidateUser' as const), user: fc.constantFrom('u1', 'u2', 'u3'), mode }),
  fc.record({ op: fc.constant('invalidateTag' as const), tag: fc.constantFrom('t1', 't2', 't3', 't4'), mode }),
  fc.record({ op: fc.constant('invalidatePrefix' as const), prefix: fc.constantFrom('a', 'b:', 'c', 'ab'), mode }),
  fc.record({ op: fc.constant('clear' as const) }),
)

function recompute(entries: StoredEntry[]) {
  const users = new Map<string, Set<string>>()
  const tagIndex = new Map<string, Set<string>>()
  for (const e of entries) {
    if (e.userId !== undefined) (users.get(e.userId) ?? users.set(e.userId, new Set()).get(e.userId)!).add(e.key)
    for (const tag of e.tags ?? []) (tagIndex.get(tag) ?? tagIndex.set(tag, new Set()).get(tag)!).add(e.key)
  }
  return { users, tags: tagIndex }
}

const plain = (index: Map<string, Set<string>>) =>
  Object.fromEntries([...index].map(([name, keys]) => [name, [...keys].sort()]).sort(([a], [b]) => (a! < b! ? -1 : 1)))

type Op = typeof op extends fc.Arbitrary<infer T> ? T : never

/** Applies one step to a store; what it answers (an invalidation's count), for comparison. */
async function step(store: MemoryStore, o: Op, now: () => number): Promise<number | undefined> {
  switch (o.op) {
    case 'set':
      await store.set(entry({ now, advance() {} }, o.key, { userId: o.user, tags: o.tags?.length ? o.tags : undefined, expiresAt: now() + o.ttl, size: o.size }))
      return undefined
    case 'get':
      return (await store.get(o.key, now()))?.hits
    case 'advance':
      return undefined
    case 'sweep':
      return store.sweep()
    case 'invalidateKeys':
      return o.keys.length ? store.invalidate({ keys: o.keys }, o.mode, now()) : undefined
    case 'invalidateUser':
      return store.invalidate({ userIds: [o.user] }, o.mode, now())
    case 'invalidateTag':
      return store.invalidate({ tags: [o.tag] }, o.mode, now())
    case 'invalidatePrefix':
      return store.invalidate({ prefixes: [o.prefix] }, o.mode, now())
    case 'clear':
      return store.clear()
  }
}

/** The indexes, buckets and bytes of one store against a recomputation from its entries. */
function check(store: MemoryStore, o: Op, maxEntries: number): void {
  const snap = store.snapshot()
  const expected = recompute(snap.entries)
  if (JSON.stringify(plain(snap.users)) !== JSON.stringify(plain(expected.users))) throw new Error(`user index drifted after ${JSON.stringify(o)}`)
  if (JSON.stringify(plain(snap.tags)) !== JSON.stringify(plain(expected.tags))) throw new Error(`tag index drifted after ${JSON.stringify(o)}`)
  // Every entry sits in the expiry bucket of its second, and in no other.
  for (const e of snap.entries) {
    const holders = [...snap.buckets].filter(([, keys]) => keys.has(e.key)).map(([id]) => id)
    if (holders.length !== 1 || holders[0] !== Math.floor(e.expiresAt / 1000)) throw new Error(`${e.key} is in buckets ${holders} after ${JSON.stringify(o)}`)
  }
  const bytes = snap.entries.reduce((n, e) => n + e.size, 0)
  if (snap.bytes !== bytes) throw new Error(`bytes ${snap.bytes} != sum of sizes ${bytes}`)
  if (snap.entries.length > maxEntries || snap.bytes > 1500) throw new Error('bounds exceeded')
}

t.test('indexes and byte accounting match a brute-force recomputation after any sequence', async (t) => {
  const options = runs(400)
  await fc.assert(
    fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 60 }), fc.integer({ min: 2, max: 8 }), async (ops, maxEntries) => {
      const clock = { ms: Date.UTC(2026, 0, 1) }
      const now = () => clock.ms
      // Small bounds so LRU eviction by count and by bytes both happen.
      const plainStore = new MemoryStore({ maxEntries, maxBytes: 1500, now, sweepIntervalMs: 0 })
      const indexed = new MemoryStore({ maxEntries, maxBytes: 1500, now, sweepIntervalMs: 0, prefixIndex: true })
      for (const o of ops) {
        if (o.op === 'advance') clock.ms += o.ms
        const answers = [await step(plainStore, o, now), await step(indexed, o, now)]
        if (answers[0] !== answers[1]) throw new Error(`the stores answered ${answers} to ${JSON.stringify(o)}`)
        for (const store of [plainStore, indexed]) check(store, o, maxEntries)
        const [a, b] = [plainStore.snapshot(), indexed.snapshot()]
        const state = (snap: typeof a) => JSON.stringify(snap.entries.map((e) => [e.key, e.stale]).sort())
        if (state(a) !== state(b)) throw new Error(`the stores differ after ${JSON.stringify(o)}: ${state(a)} / ${state(b)}`)
        if (a.sorted !== undefined) throw new Error('a store without the prefix index keeps one')
        if (JSON.stringify(b.sorted) !== JSON.stringify(b.entries.map((e) => e.key).sort())) throw new Error(`the ordered keys drifted after ${JSON.stringify(o)}`)
      }
      for (const store of [plainStore, indexed]) {
        // After a sweep, nothing expired is held.
        await store.sweep()
        if (store.snapshot().entries.some((e) => e.expiresAt <= now())) throw new Error('an expired entry survived the sweep')
        await store.close()
      }
    }),
    options,
  )
  t.pass(`the property held for ${options.numRuns} random sequences, with and without the prefix index`)
})
