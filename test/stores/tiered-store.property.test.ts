import fc from 'fast-check'
import t from 'tap'
import type { LeaseStamp, Selector, SetOutcome } from '../../src/cache/types.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { TieredStore } from '../../src/stores/tiered-store.js'
import { FakeClock } from '../helpers/build.js'
import { runs } from '../helpers/property.js'
import { requireRedisServer, startRedis } from '../helpers/redis-server.js'
import { entry } from './store-contract.js'

// Two TieredStores on one real Redis, as two instances of a cluster, against a MemoryStore as
// the reference (its own property test checks it against a brute-force recomputation). Every
// step runs on one instance or the other and on the reference; then every key is read on both
// instances, with and without allowStale, which also fills their L1s. After any sequence of
// writes (leased or not), reads, invalidations by key, user, tag and prefix (walked in batches
// of two), clears, mark-all-stale and the clock moving on, both instances answer every read as
// the reference does (an instance that served an L1 copy of what another replaced or
// invalidated would not), a leased write is refused exactly when the reference refuses it
// (or, after a user or tag walked in batches, also when the reference takes it: such a walk
// refuses every older lease, by design), an invalidation counts what the reference counts,
// and the Redis indexes hold every live entry under its user and tags and no live entry
// elsewhere. A race step starts a write on one instance and an invalidation covering it on
// the other a few event-loop turns apart (either first), with reads of the key on both
// meanwhile: the outcome must be one of the two orders (a leased write that lands must be
// invalidated after it), and the reference takes that order.

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
    arbitrary: fc.record({ op: fc.constant('race' as const), ...write, leased: fc.boolean(), lease: fc.nat(), cover: fc.nat(), mode, readers: fc.boolean(), writeAfter: fc.integer({ min: -3, max: 3 }) }),
    weight: 4,
  },
)

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
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
        const open = () => new TieredStore({ redisUrl: redis.url, namespace, now: clock.now, sweepIntervalMs: 0, l1SliceMs: 0, indexBatch: INDEX_BATCH })
        const instances = [open(), open()]
        // Reads Redis' entry with peek, which never fills its L1: what a race left, whatever the L1s hold.
        const observer = open()
        try {
          for (const store of [...instances, observer]) if (!(await store.connect(10_000))) throw new Error('a TieredStore did not connect')
          // A lease issued on each side at the same step, and whether a walk in batches came after it.
          const leases: Array<{ stamps: [LeaseStamp, LeaseStamp]; walked: boolean }> = []
          const written = new Written()
          let version = 0
          /** A write's fields: a value no earlier write had, so an old value read back shows. */
          const fieldsOf = (o: { key: string; user?: string | undefined; tags?: string[] | undefined; ttl: number }) => {
            written.add(o.key, o.user, o.tags)
            return { value: JSON.stringify(`v${version++}`), userId: o.user, tags: o.tags, expiresAt: clock.now() + o.ttl }
          }
          for (const [i, o] of ops.entries()) {
            const at = `step ${i} ${JSON.stringify(o)} of ${JSON.stringify(ops)}`
            switch (o.op) {
              case 'set':
              case 'setLeased': {
                const fields = fieldsOf(o)
                const lease = o.op === 'setLeased' ? leases[o.lease % leases.length] : undefined
                const want = await reference.set(entry(clock, o.key, fields), lease?.stamps[0])
                const got = await instances[o.on]!.set(entry(clock, o.key, fields), lease?.stamps[1])
                // A walk in batches refuses every older lease (a key no batch has reached yet may be
                // the one written, whatever the write names): the instance errs towards refusing.
                const excused = lease?.walked === true && want === 'ok' && got === 'lease_invalidated'
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
                const covering: Selector[] = [
                  { keys: [o.key] },
                  ...(o.user === undefined ? [] : [{ userIds: [o.user] }]),
                  ...(o.tags ?? []).map((tag) => ({ tags: [tag] })),
                  ...[...o.key].map((_, n) => ({ prefixes: [o.key.slice(0, n + 1)] })),
                ]
                const selector = covering[o.cover % covering.length]!
                if (written.walks(selector)) for (const older of leases) older.walked = true
                // The write starts `writeAfter` turns of the event loop after the invalidation (before it, if negative).
                const [got, count] = await Promise.all([
                  turns(o.writeAfter).then(() => instances[o.on]!.set(entry(clock, o.key, fields), lease?.stamps[1])),
                  turns(-o.writeAfter).then(() => instances[1 - o.on]!.invalidate(selector, o.mode, clock.now())),
                  ...(o.readers ? instances.map((store) => store.get(o.key, clock.now())) : []),
                ])
                let writeFirst: boolean
                if (got === 'lease_invalidated') writeFirst = false
                else if (lease !== undefined) writeFirst = true // had the invalidation come first, the lease would be void
                else {
                  // What Redis holds tells: the new value fresh (invalidated first), or gone or stale (written first).
                  const left = JSON.stringify(answer(await observer.peek(o.key, clock.now())))
                  const afterWrite = JSON.stringify(o.mode === 'delete' ? undefined : answer({ value: fields.value, stale: true }))
                  if (left === JSON.stringify(answer({ value: fields.value, stale: false }))) writeFirst = false
                  else if (left === afterWrite) writeFirst = true
                  else throw new Error(`the race left ${left}, the outcome of neither order, at ${at}`)
                }
                let want: SetOutcome
                let wantCount: number
                if (writeFirst) {
                  want = await reference.set(entry(clock, o.key, fields), lease?.stamps[0])
                  wantCount = await reference.invalidate(selector, o.mode, clock.now())
                } else {
                  wantCount = await reference.invalidate(selector, o.mode, clock.now())
                  want = await reference.set(entry(clock, o.key, fields), lease?.stamps[0])
                }
                if (got !== want) throw new Error(`the racing write answered ${got}, the reference ${want} (write ${writeFirst ? 'first' : 'second'}), at ${at}`)
                if (count !== wantCount) throw new Error(`the racing invalidation counted ${count}, the reference ${wantCount}, at ${at}`)
                break
              }
              case 'lease':
                leases.push({ stamps: [await reference.leaseStamp(), await instances[o.on]!.leaseStamp()], walked: false })
                break
              case 'invalidate': {
                if (written.walks(o.selector)) for (const lease of leases) lease.walked = true
                const want = await reference.invalidate(o.selector, o.mode, clock.now())
                const got = await instances[o.on]!.invalidate(o.selector, o.mode, clock.now())
                if (got !== want) throw new Error(`invalidation counted ${got}, the reference ${want}, at ${at}`)
                break
              }
              case 'advance':
                clock.advance(o.ms)
                break
              case 'clear':
                written.clear()
                await reference.clear()
                await instances[o.on]!.clear()
                break
              case 'markAllStale':
                await reference.markAllStale()
                await instances[o.on]!.markAllStale()
                break
            }
            await compare(reference, instances, clock.now(), at)
            steps++
          }
        } finally {
          await Promise.all([...instances, observer].map((store) => store.close()))
          await reference.close()
        }
      }),
      options,
    )
    t.pass(`the property held for ${options.numRuns} random sequences (${steps} steps), each read on both instances after every step`)
  })
}

/** The keys ever written under each user and tag since the last clear. */
class Written {
  readonly #keys = new Map<string, Set<string>>()

  add(key: string, user: string | undefined, tags: string[] | undefined): void {
    for (const name of [...(user === undefined ? [] : [`u:${user}`]), ...(tags ?? []).map((tag) => `t:${tag}`)]) {
      ;(this.#keys.get(name) ?? this.#keys.set(name, new Set()).get(name)!).add(key)
    }
  }

  /** Whether an invalidation of this selector may walk a user or tag in batches (more members than a batch). */
  walks(selector: Selector): boolean {
    const names = [...(selector.userIds ?? []).map((user) => `u:${user}`), ...(selector.tags ?? []).map((tag) => `t:${tag}`)]
    return names.some((name) => (this.#keys.get(name)?.size ?? 0) > INDEX_BATCH)
  }

  clear(): void {
    this.#keys.clear()
  }
}

/** Waits `n` turns of the event loop (none if n <= 0), each letting I/O in. */
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve))
}

type Answer = [value: string, stale: boolean] | undefined
const answer = (e: { value: string; stale: boolean } | undefined): Answer => (e === undefined ? undefined : [e.value, e.stale])

/** Every key read on both instances, with and without allowStale, and the indexes, against the reference. */
async function compare(reference: MemoryStore, instances: TieredStore[], now: number, at: string): Promise<void> {
  const live = new Map<string, { userId?: string | undefined; tags?: string[] | undefined }>()
  for (const key of KEYS) {
    for (const allowStale of [true, false]) {
      const found = await reference.get(key, now, allowStale)
      if (allowStale && found !== undefined) live.set(key, found)
      const want = JSON.stringify(answer(found))
      for (const [n, store] of instances.entries()) {
        const got = JSON.stringify(answer(await store.get(key, now, allowStale)))
        if (got !== want) throw new Error(`instance ${n} read ${key} (allowStale ${allowStale}) as ${got}, the reference as ${want}, after ${at}`)
      }
    }
  }
  // Redis may still list an expired entry the sweep has not reached; every live entry is
  // listed under its user and tags, and under no other.
  const store = instances[0]!
  for (const [names, members, has] of [
    [USERS, (name: string) => store.userKeys(name), (e: { userId?: string | undefined }, name: string) => e.userId === name],
    [TAGS, (name: string) => store.tagKeys(name), (e: { tags?: string[] | undefined }, name: string) => e.tags?.includes(name) === true],
  ] as const) {
    for (const name of names) {
      const listed = new Set(await members(name))
      for (const [key, e] of live) {
        if (listed.has(key) !== has(e, name)) throw new Error(`${name}'s index ${listed.has(key) ? 'lists' : 'misses'} ${key} after ${at}`)
      }
    }
  }
}
