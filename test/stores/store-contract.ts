// The store contract: every Store implementation runs this same suite
// (memory-store.test.ts, and the Redis-backed store in cluster mode).
import type { Test } from 'tap'
import type { Selector, StoredEntry } from '../../src/cache/types.js'
import type { Store } from '../../src/stores/store.js'
import { FakeClock } from '../helpers/build.js'

export interface ContractClock {
  now: () => number
  advance(ms: number): void
}

/** Makes a fresh, empty store on the given clock; the suite closes it. */
export type StoreFactory = (clock: ContractClock) => Promise<Store>

export function entry(clock: ContractClock, key: string, fields: Partial<StoredEntry> = {}): StoredEntry {
  const now = clock.now()
  const value = fields.value ?? JSON.stringify({ key })
  return {
    key,
    value,
    etag: `etag-${value.length}`,
    userId: undefined,
    tags: undefined,
    createdAt: now,
    expiresAt: now + 60_000,
    hits: 0,
    lastAccessAt: now,
    stale: false,
    origin: undefined,
    size: key.length + value.length,
    ...fields,
  }
}


export function storeContract(t: Test, name: string, factory: StoreFactory): void {
  t.test(`${name} store contract`, async (t) => {
    const open = async (t: Test) => {
      const clock = new FakeClock()
      const store = await factory(clock)
      t.teardown(() => store.close())
      return { store, clock }
    }

    t.test('a set entry reads back with its value, user and tags', async (t) => {
      const { store, clock } = await open(t)
      t.equal(await store.set(entry(clock, 'a', { userId: 'u1', tags: ['x', 'y'] })), 'ok')
      const got = await store.get('a', clock.now())
      t.equal(got?.value, JSON.stringify({ key: 'a' }))
      t.equal(got?.userId, 'u1')
      t.same(got?.tags, ['x', 'y'])
      t.equal(await store.get('missing', clock.now()), undefined)
    })

    t.test('get counts hits and peek does not', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a'))
      await store.get('a', clock.now())
      await store.get('a', clock.now())
      await store.peek('a', clock.now())
      t.equal((await store.peek('a', clock.now()))?.hits, 2)
    })

    t.test('a stale entry counts a hit only when read with allowStale', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      await store.get('a', clock.now())
      await store.invalidate({ userIds: ['u1'] }, 'stale', clock.now())
      const missed = await store.get('a', clock.now())
      t.equal(missed?.stale, true, 'the stale entry is returned; the caller answers a miss')
      t.equal((await store.peek('a', clock.now()))?.hits, 1, 'a read answered as a miss is no hit')
      await store.get('a', clock.now(), true)
      t.equal((await store.peek('a', clock.now()))?.hits, 2, 'a stale read served with allowStale is')
    })

    t.test('keys with separators, spaces and non-ASCII are distinct keys', async (t) => {
      const { store, clock } = await open(t)
      const keys = ['a:b/c', 'a:b', 'with space', 'ключ', '鍵/🔑', 'a*', 'a?b']
      for (const key of keys) await store.set(entry(clock, key, { value: JSON.stringify(key) }))
      for (const key of keys) t.equal((await store.get(key, clock.now()))?.value, JSON.stringify(key), key)
    })

    t.test('an expired entry is never returned', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { expiresAt: clock.now() + 1000 }))
      clock.advance(999)
      t.ok(await store.get('a', clock.now()))
      clock.advance(1)
      t.equal(await store.get('a', clock.now()), undefined)
      t.equal(await store.peek('a', clock.now()), undefined)
    })

    t.test('a sample holds live keys only, not one past its expiry the sweep has not reached', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'short', { expiresAt: clock.now() + 1000 }))
      await store.set(entry(clock, 'long', { expiresAt: clock.now() + 60_000 }))
      t.same((await store.sampleKeys(10)).sort(), ['long', 'short'])
      clock.advance(1000)
      t.same(await store.sampleKeys(10), ['long'])
      t.same(await store.sampleKeys(1), ['long'])
    })

    t.test('overwriting moves the key between user and tag indexes', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1', tags: ['x'] }))
      await store.set(entry(clock, 'a', { userId: 'u2', tags: ['y'] }))
      t.same(await store.userKeys('u1'), [])
      t.same(await store.userKeys('u2'), ['a'])
      t.same(await store.tagKeys('x'), [])
      t.same(await store.tagKeys('y'), ['a'])
    })

    t.test('invalidating a user removes exactly that user\'s entries', async (t) => {
      const { store, clock } = await open(t)
      for (let i = 0; i < 5; i++) await store.set(entry(clock, `u1:${i}`, { userId: 'u1' }))
      for (let i = 0; i < 5; i++) await store.set(entry(clock, `u2:${i}`, { userId: 'u2' }))
      await store.set(entry(clock, 'shared'))
      t.equal(await store.invalidate({ userIds: ['u1'] }, 'delete', clock.now()), 5)
      for (let i = 0; i < 5; i++) t.equal(await store.get(`u1:${i}`, clock.now()), undefined)
      for (let i = 0; i < 5; i++) t.ok(await store.get(`u2:${i}`, clock.now()))
      t.ok(await store.get('shared', clock.now()))
      t.same(await store.userKeys('u1'), [])
      t.equal((await store.size()).entries, 6)
    })

    t.test('invalidating by tag, key and prefix', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'p:1', { tags: ['t1'] }))
      await store.set(entry(clock, 'p:2', { tags: ['t2'] }))
      await store.set(entry(clock, 'q:1', { tags: ['t1', 't2'] }))
      await store.set(entry(clock, 'r:1'))
      t.equal(await store.invalidate({ tags: ['t1'] }, 'delete', clock.now()), 2)
      t.same((await store.tagKeys('t2')).sort(), ['p:2'])
      t.equal(await store.invalidate({ prefixes: ['p:'] }, 'delete', clock.now()), 1)
      t.equal(await store.invalidate({ keys: ['r:1', 'nope'] }, 'delete', clock.now()), 1)
      t.equal((await store.size()).entries, 0)
    })

    t.test('several prefixes at once invalidate exactly the keys under any of them', async (t) => {
      const { store, clock } = await open(t)
      // Glob characters, prefixes under others, and two emoji sharing their first UTF-16 unit.
      const keys = ['p*:1', 'p*:2', 'p?:1', 'pa:1', 'pab', 'q:1', '😀a', '😁b', '😁c', 'other']
      for (const key of keys) await store.set(entry(clock, key))
      t.equal(await store.invalidate({ prefixes: ['p*:', 'p?', 'pa', 'pab', '😀', '😁b'] }, 'delete', clock.now()), 7)
      const left = []
      for (const key of keys) if (await store.get(key, clock.now())) left.push(key)
      t.same(left, ['q:1', '😁c', 'other'])
      t.equal(await store.invalidate({ prefixes: ['😁c', '😀z'] }, 'delete', clock.now()), 1, 'prefixes sharing half a character')
      t.equal(await store.invalidate({ prefixes: ['q:', 'q:1', 'o'] }, 'stale', clock.now()), 2)
      t.equal((await store.get('q:1', clock.now()))?.stale, true)
    })

    t.test('stale mode keeps entries, marked stale, and counts each once', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      await store.set(entry(clock, 'b', { userId: 'u1' }))
      t.equal(await store.invalidate({ userIds: ['u1'] }, 'stale', clock.now()), 2)
      t.equal(await store.invalidate({ userIds: ['u1'] }, 'stale', clock.now()), 0)
      t.equal((await store.get('a', clock.now()))?.stale, true)
      t.equal((await store.size()).entries, 2)
      // A write replaces the stale entry with a fresh one.
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      t.equal((await store.get('a', clock.now()))?.stale, false)
    })

    t.test('sizes are the sum of entry sizes', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { size: 100 }))
      await store.set(entry(clock, 'b', { size: 50 }))
      await store.set(entry(clock, 'a', { size: 10 }))
      t.same(await store.size(), { entries: 2, bytes: 60 })
    })

    t.test('userEntries lists a user\'s live entries', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      await store.set(entry(clock, 'b', { userId: 'u1', expiresAt: clock.now() + 10 }))
      clock.advance(20)
      t.same((await store.userEntries('u1', clock.now())).map((e) => e.key), ['a'])
    })

    t.test('userEntries reports the hits and last access that peek does', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      for (let i = 0; i < 3; i++) {
        clock.advance(10)
        await store.get('a', clock.now())
      }
      const [listed] = await store.userEntries('u1', clock.now())
      const peeked = await store.peek('a', clock.now())
      t.equal(listed?.hits, 3)
      t.equal(peeked?.hits, 3)
      t.equal(listed?.lastAccessAt, clock.now())
      t.equal(peeked?.lastAccessAt, clock.now())
    })

    t.test('clear drops everything', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1' }))
      await store.set(entry(clock, 'b', { tags: ['t'] }))
      t.equal(await store.clear(), 2)
      t.same(await store.size(), { entries: 0, bytes: 0 })
      t.same(await store.userKeys('u1'), [])
      t.same(await store.tagKeys('t'), [])
    })

    t.test('a lease with no invalidation since writes', async (t) => {
      const { store, clock } = await open(t)
      const lease = await store.leaseStamp()
      t.equal(await store.set(entry(clock, 'a', { userId: 'u1' }), lease), 'ok')
    })

    const scopes: Array<[string, Selector, Partial<StoredEntry>]> = [
      ['key', { keys: ['a'] }, {}],
      ['user', { userIds: ['u1'] }, { userId: 'u1' }],
      ['tag', { tags: ['t1'] }, { tags: ['t0', 't1'] }],
      ['prefix', { prefixes: ['a'] }, {}],
    ]
    for (const [scope, selector, fields] of scopes) {
      t.test(`an invalidation by ${scope} voids an older lease on it`, async (t) => {
        const { store, clock } = await open(t)
        const lease = await store.leaseStamp()
        await store.invalidate(selector, 'delete', clock.now())
        t.equal(await store.set(entry(clock, 'a', fields), lease), 'lease_invalidated')
        t.equal(await store.get('a', clock.now()), undefined, 'nothing was written')
        const fresh = await store.leaseStamp()
        t.equal(await store.set(entry(clock, 'a', fields), fresh), 'ok', 'a newer lease writes')
      })
    }

    const reachers: Array<[string, Selector]> = [['user', { userIds: ['u1'] }], ['tag', { tags: ['t1'] }]]
    for (const [scope, selector] of reachers) {
      for (const mode of ['delete', 'stale'] as const) {
        t.test(`an invalidation by ${scope} (${mode}) voids a lease on a key it reached, whatever the write names`, async (t) => {
          const { store, clock } = await open(t)
          await store.set(entry(clock, 'a', { userId: 'u1', tags: ['t1'] }))
          await store.invalidate({ keys: ['a'] }, 'stale', clock.now()) // a reader's miss gets a lease now
          const lease = await store.leaseStamp()
          await store.invalidate(selector, mode, clock.now())
          t.equal(await store.set(entry(clock, 'a', { userId: 'u2' }), lease), 'lease_invalidated', 'another user, no tags')
          t.equal(await store.set(entry(clock, 'a'), lease), 'lease_invalidated', 'no user, no tags')
          t.equal(await store.set(entry(clock, 'b'), lease), 'ok', 'a key it did not reach still writes')
        })
      }
    }

    t.test('an invalidation of another scope leaves a lease valid', async (t) => {
      const { store, clock } = await open(t)
      const lease = await store.leaseStamp()
      await store.invalidate({ keys: ['b'], userIds: ['u2'], tags: ['t9'], prefixes: ['b'] }, 'delete', clock.now())
      t.equal(await store.set(entry(clock, 'a', { userId: 'u1', tags: ['t1'] }), lease), 'ok')
    })

    t.test('a clear voids every older lease', async (t) => {
      const { store, clock } = await open(t)
      const lease = await store.leaseStamp()
      await store.clear()
      t.equal(await store.set(entry(clock, 'a'), lease), 'lease_invalidated')
    })

    t.test('a lease from another store epoch or from the future is refused', async (t) => {
      const { store, clock } = await open(t)
      const lease = await store.leaseStamp()
      t.equal(await store.set(entry(clock, 'a'), { ...lease, epoch: 'someone-else' }), 'lease_invalidated')
      t.equal(await store.set(entry(clock, 'a'), { ...lease, seq: lease.seq + 1000 }), 'lease_invalidated')
    })

    t.test('an LRU eviction or expiry keeps the indexes in step', async (t) => {
      const { store, clock } = await open(t)
      await store.set(entry(clock, 'a', { userId: 'u1', tags: ['t'], expiresAt: clock.now() + 5 }))
      clock.advance(10)
      t.equal(await store.get('a', clock.now()), undefined)
      t.same(await store.userKeys('u1'), [])
      t.same(await store.tagKeys('t'), [])
    })

    t.test('an invalidation counts no entry that expired before the sweep reached it, and drops it as expired', async (t) => {
      const { store, clock } = await open(t)
      const expired: string[] = []
      store.onEviction((e, reason) => reason === 'expire' && expired.push(e.key))
      for (const mode of ['delete', 'stale'] as const) {
        const soon = { expiresAt: clock.now() + 1000 }
        await store.set(entry(clock, `${mode}:k`, soon))
        await store.set(entry(clock, `${mode}:u`, { ...soon, userId: `${mode}-u` }))
        await store.set(entry(clock, `${mode}:t`, { ...soon, tags: [`${mode}-t`] }))
        await store.set(entry(clock, `${mode}:p:1`, soon))
        await store.set(entry(clock, `${mode}:u:live`, { userId: `${mode}-u` }))
        clock.advance(1000)
        t.equal(await store.invalidate({ keys: [`${mode}:k`] }, mode, clock.now()), 0, `${mode} by key`)
        t.equal(await store.invalidate({ userIds: [`${mode}-u`] }, mode, clock.now()), 1, `${mode} by user: the live entry only`)
        t.equal(await store.invalidate({ tags: [`${mode}-t`] }, mode, clock.now()), 0, `${mode} by tag`)
        t.equal(await store.invalidate({ prefixes: [`${mode}:p`] }, mode, clock.now()), 0, `${mode} by prefix`)
        t.same(await store.tagKeys(`${mode}-t`), [], 'its memberships went with it')
      }
      t.same(expired.sort(), ['delete:k', 'delete:p:1', 'delete:t', 'delete:u', 'stale:k', 'stale:p:1', 'stale:t', 'stale:u'])
      t.equal((await store.size()).entries, 1, 'only the live entry marked stale is left')
    })
  })
}
