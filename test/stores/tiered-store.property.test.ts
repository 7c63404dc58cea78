import fc from 'fast-check'
import { Redis } from 'ioredis'
import t from 'tap'
import type { LeaseStamp, Selector, SetOutcome, StoredEntry } from '../../src/cache/types.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { TieredStore } from '../../src/stores/tiered-store.js'
import { FakeClock } from '../helpers/build.js'
import { runs, turns } from '../helpers/property.js'
import { requireRedisServer, startRedis } from '../helpers/redis-server.js'
import { entry } from './store-contract.js'

// Two TieredStores on one real Redis, as two instances of a cluster, against a MemoryStore as
// the reference (its own property test checks it against a brute-force recomputation). Each
// step runs on one instance or the other and on the reference: writes (leased or not),
// invalidations by key, user, tag and prefix in both modes (users and tags walked in batches of
// two), clears, mark-all-stale, the clock moving on, and races. After every step:
// - every key reads the same on both instances as on the reference (value, stale flag, etag,
//   user, tags, expiry), with and without allowStale; these reads also fill the L1s, so an
//   instance serving an L1 copy of what the other replaced or invalidated fails it;
// - the index sets in Redis list every live entry under its user and tags, and every member
//   is an entry of that user or tag (no leftover of a delete, an overwrite or a clear);
// - a write answers as the reference does, except that a leased one may also be refused when
//   its lease is older than the floor in Redis (a user or tag walked in batches refuses every
//   older lease, by design); an invalidation counts what the reference counts.
// A race starts a write on one instance and an invalidation covering it on the other a few
// event-loop turns apart (either first), with reads of the key meanwhile: each read sees the
// key as it was, as written, or as invalidated; the outcome is one of the two orders (a
// leased write that lands is invalidated after it), and the reference takes that order.
// Reading on the other instance at once after a change is best effort across hosts (the
// README, "What a reader sees"); here both instances share one process and Redis on loopback,
// where the PING after each change and the read's bus fence make it hold: a miss is a bug.

const INDEX_BATCH = 2
const KEYS = ['a', 'ab', 'abc', 'b:1', 'b:2', 'c/x', 'd', 'é e']
const USERS = ['u1', 'u2', 'u3']
const TAGS = ['t1', 't2', 't3']

const key = fc.constantFrom(...KEYS)
const on = fc.constantFrom(0, 1)
const mode = fc.constantFrom('delete' as const, 'stale' as const)
const write = {
  on,
  key,
  user: fc.option(fc.constantFrom(...USERS), { nil: undefined }),
  tags: fc.option(fc.uniqueArray(fc.constantFrom(...TAGS), { minLength: 1, maxLength: 2 }), { nil: undefined }),
  ttl: fc.integer({ min: 1, max: 8000 }),
}
const selector: fc.Arbitrary<Selector> = fc.oneof(
  fc.record({ keys: fc.uniqueArray(key, { minLength: 1, maxLength: 3 }) }),
  fc.record({ userIds: fc.uniqueArray(fc.constantFrom(...USERS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ tags: fc.uniqueArray(fc.constantFrom(...TAGS), { minLength: 1, maxLength: 2 }) }),
  fc.record({ prefixes: fc.uniqueArray(fc.constantFrom('a', 'ab', 'b:', 'c', 'é'), { minLength: 1, maxLength: 2 }) }),
  fc.constant<Selector>({ userIds: ['u1'], tags: ['t2'], keys: ['d'] }),
)

const op = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('set' as const), ...write }), weight: 5 },
  { arbitrary: fc.record({ op: fc.constant('lease' as const), on }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('setLeased' as const), lease: fc.nat(), ...write }), weight: 3 },
  { arbitrary: fc.record({ op: fc.constant('invalidate' as const), on, selector, mode }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constant('advance' as const), ms: fc.integer({ min: 1, max: 3000 }) }), weight: 2 },
  fc.record({ op: fc.constant('clear' as const), on }),
  fc.record({ op: fc.constant('markAllStale' as const), on }),
  {
    arbitrary: fc.record({
      op: fc.constant('race' as const),
      ...write,
      leased: fc.boolean(),
      lease: fc.nat(),
      cover: fc.nat(),
      mode,
      writeAfter: fc.integer({ min: -3, max: 3 }),
      // Reads of the key meanwhile, each on an instance (n % 2) after its own number of turns.
      readers: fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 3 }),
    }),
    weight: 4,
  },
)

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  // Reads what the scripts left in Redis, beside the stores.
  const raw = new Redis(redis.url)
  t.teardown(() => raw.quit())
  const redisFloor = async (namespace: string) => Number((await raw.get(`{${namespace}}:floor`)) ?? 0)
  let run = 0

  t.test('two instances answer every read as one reference store does, after any sequence on either', async (t) => {
    const options = runs(50)
    let steps = 0
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 40 }), async (ops) => {
        const clock = new FakeClock()
        const reference = new MemoryStore({ now: clock.now, sweepIntervalMs: 0 })
        const namespace = `p${run++}`
        // indexBatch 2: a user or tag with three entries is walked in batches, with its quiet message and gate.
        // Timeouts long enough for a loaded machine, and no bus PING (a late one would take the bus down).
        const open = () =>
          new TieredStore({ redisUrl: redis.url, namespace, now: clock.now, sweepIntervalMs: 0, l1SliceMs: 0, indexBatch: INDEX_BATCH, commandTimeoutMs: 10_000, busPingMs: 0 })
        const instances = [open(), open()]
        // Reads Redis' entry with peek, which never fills its L1: what a race left, whatever the L1s hold.
        const observer = open()
        try {
          for (const store of [...instances, observer]) if (!(await store.connect(10_000))) throw new Error('a TieredStore did not connect')
          // Leases issued on each side at the same step (none until a lease step: a leased write then writes without).
          const leases: Array<[LeaseStamp, LeaseStamp]> = []
          let version = 0
          /** A write's fields: a value no earlier write had, so an old value read back shows. */
          const fieldsOf = (o: { key: string; user?: string | undefined; tags?: string[] | undefined; ttl: number }) => ({
            value: JSON.stringify(`v${version++}`),
            userId: o.user,
            tags: o.tags,
            expiresAt: clock.now() + o.ttl,
          })
          for (const [i, o] of ops.entries()) {
            const at = `step ${i} ${JSON.stringify(o)} of ${JSON.stringify(ops)}`
            switch (o.op) {
              case 'set':
              case 'setLeased': {
                const fields = fieldsOf(o)
                const lease = o.op === 'setLeased' ? leases[o.lease % leases.length] : undefined
                const want = await reference.set(entry(clock, o.key, fields), lease?.[0])
                const got = await instances[o.on]!.set(entry(clock, o.key, fields), lease?.[1])
                // A user or tag walked in batches raises the floor: every lease issued before it is
                // refused (a key no batch has reached yet may be the one written, whatever the write
                // names). The instance may refuse more than the reference, and only such a lease.
                const excused = want === 'ok' && got === 'lease_invalidated' && lease![1].seq < (await redisFloor(namespace))
                if (got !== want && !excused) throw new Error(`write answered ${got}, the reference ${want}, at ${at}`)
                // The reference took it: so does the instance, for the steps after this one.
                if (excused && (await instances[o.on]!.set(entry(clock, o.key, fields))) !== 'ok') throw new Error(`an unleased write was refused at ${at}`)
                break
              }
              case 'race': {
                // A write on one instance against an invalidation covering it on the other, and reads
                // of the key on both meanwhile (L1 fills racing the two). Whatever the interleaving,
                // the outcome must be one of the two orders, and the reference is given that order.
                const fields = fieldsOf(o)
                const lease = o.leased ? leases[o.lease % leases.length] : undefined
                const held = await reference.get(o.key, clock.now())
                const before = [JSON.stringify(answer(held)), JSON.stringify(answer(held && { ...held, stale: true }))]
                const covering: Selector[] = [
                  { keys: [o.key] },
                  ...(o.user === undefined ? [] : [{ userIds: [o.user] }]),
                  ...(o.tags ?? []).map((tag) => ({ tags: [tag] })),
                  ...[...o.key].map((_, n) => ({ prefixes: [o.key.slice(0, n + 1)] })),
                ]
                const selector = covering[o.cover % covering.length]!
                // The write starts `writeAfter` turns of the event loop after the invalidation (before it, if negative).
                const [got, count, ...read] = await Promise.all([
                  turns(o.writeAfter).then(() => instances[o.on]!.set(entry(clock, o.key, fields), lease?.[1])),
                  turns(-o.writeAfter).then(() => instances[1 - o.on]!.invalidate(selector, o.mode, clock.now())),
                  // Taken as it resolves, as a route renders it: the entry object is the store's, which a
                  // stale mark landing later changes in place.
                  ...o.readers.map((after, n) => turns(after).then(async () => JSON.stringify(answer(await instances[n % 2]!.get(o.key, clock.now()))))),
                ])
                // A read meanwhile sees the key as it was or as written, either invalidated or not (gone,
                // or marked stale: a store's read returns a stale entry, and the service makes it a miss).
                const newValue = JSON.stringify(answer(entry(clock, o.key, fields)))
                const newStale = JSON.stringify(answer({ ...entry(clock, o.key, fields), stale: true }))
                for (const seen of read as Array<string | undefined>) {
                  if (![...before, newValue, newStale, undefined].includes(seen)) throw new Error(`a read during the race saw ${seen}, at ${at}`)
                }
                let writeFirst: boolean
                if (got === 'lease_invalidated') writeFirst = false
                else if (lease !== undefined) writeFirst = true // had the invalidation come first, the lease would be void
                else {
                  // What Redis holds tells: the new value fresh (invalidated first), or gone or stale (written first).
                  const left = JSON.stringify(answer(await observer.peek(o.key, clock.now())))
                  const afterWrite = o.mode === 'delete' ? undefined : newStale
                  if (left === newValue) writeFirst = false
                  else if (left === afterWrite) writeFirst = true
                  else throw new Error(`the race left ${left}, the outcome of neither order, at ${at}`)
                }
                let want: SetOutcome
                let wantCount: number
                if (writeFirst) {
                  want = await reference.set(entry(clock, o.key, fields), lease?.[0])
                  wantCount = await reference.invalidate(selector, o.mode, clock.now())
                } else {
                  wantCount = await reference.invalidate(selector, o.mode, clock.now())
                  want = await reference.set(entry(clock, o.key, fields), lease?.[0])
                }
                if (got !== want) throw new Error(`the racing write answered ${got}, the reference ${want} (write ${writeFirst ? 'first' : 'second'}), at ${at}`)
                if (count !== wantCount) throw new Error(`the racing invalidation counted ${count}, the reference ${wantCount}, at ${at}`)
                break
              }
              case 'lease':
                leases.push([await reference.leaseStamp(), await instances[o.on]!.leaseStamp()])
                break
              case 'invalidate': {
                const want = await reference.invalidate(o.selector, o.mode, clock.now())
                const got = await instances[o.on]!.invalidate(o.selector, o.mode, clock.now())
                if (got !== want) throw new Error(`invalidation counted ${got}, the reference ${want}, at ${at}`)
                break
              }
              case 'advance':
                clock.advance(o.ms)
                break
              case 'clear':
                await reference.clear()
                await instances[o.on]!.clear()
                break
              case 'markAllStale':
                await reference.markAllStale()
                await instances[o.on]!.markAllStale()
                break
            }
            await compare(reference, instances, clock.now(), at, raw, namespace)
            steps++
          }
        } finally {
          await Promise.allSettled([...instances, observer, reference].map((store) => store.close()))
        }
      }),
      options,
    )
    t.pass(`the property held for ${options.numRuns} random sequences (${steps} steps), each read on both instances after every step`)
  })
}

/** What a read answered, as compared: the value, its flags and metadata (hits and access times differ by design). */
const answer = (e: StoredEntry | undefined) => (e === undefined ? undefined : [e.value, e.stale, e.etag, e.userId, e.tags, e.expiresAt, e.createdAt, e.size])

/** Every key read on both instances, with and without allowStale, and the Redis indexes, against the reference. */
async function compare(reference: MemoryStore, instances: TieredStore[], now: number, at: string, raw: Redis, namespace: string): Promise<void> {
  const live: StoredEntry[] = []
  for (const key of KEYS) {
    for (const allowStale of [true, false]) {
      const found = await reference.get(key, now, allowStale)
      if (allowStale && found !== undefined) live.push(found)
      const want = JSON.stringify(answer(found))
      for (const [n, store] of instances.entries()) {
        const got = JSON.stringify(answer(await store.get(key, now, allowStale)))
        if (got !== want) throw new Error(`instance ${n} read ${key} (allowStale ${allowStale}) as ${got}, the reference as ${want}, after ${at}`)
      }
    }
  }
  // The index sets as the scripts left them: every live entry is a member of its user's and its
  // tags' sets, and every member is an entry of that user or tag (one past its expiry included,
  // until something drops it), never a leftover of a delete, an overwrite or a clear.
  const pre = `{${namespace}}:${(await raw.get(`{${namespace}}:g`)) ?? '0'}:`
  type Owner = { userId?: string | undefined; tags?: string[] | undefined }
  for (const [set, names, has] of [
    ['u', USERS, (e: Owner, name: string) => e.userId === name],
    ['t', TAGS, (e: Owner, name: string) => e.tags?.includes(name) === true],
  ] as const) {
    for (const name of names) {
      const members = new Set(await raw.smembers(`${pre}${set}:${name}`))
      for (const key of members) {
        const [userId, tags] = await raw.hmget(`${pre}e:${key}`, 'u', 't')
        const owner = { userId: userId ?? undefined, tags: tags === null ? undefined : (JSON.parse(tags) as string[]) }
        if (!has(owner, name)) throw new Error(`${set}:${name} lists ${key}, whose entry is ${JSON.stringify([userId, tags])}, after ${at}`)
      }
      for (const e of live) if (has(e, name) && !members.has(e.key)) throw new Error(`${set}:${name} misses ${e.key} after ${at}`)
    }
  }
}
