import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { FakeClock, build, call, get, put } from '../helpers/build.js'

// Leases through the HTTP layer (DESIGN.md section 4): a miss hands out a lease, a PUT with
// it is refused (409, nothing written) when an invalidation touching the key came after.

const url = (key: string) => `/v1/entries/${encodeURIComponent(key)}`

async function miss(app: FastifyInstance, key: string) {
  const res = await get(app, key)
  if (res.statusCode !== 404) throw new Error(`expected a miss on ${key}, got ${res.statusCode} ${res.body}`)
  return res.json() as { error: string; lease: string; fill: boolean; retryAfterMs?: number }
}

const putWith = (app: FastifyInstance, key: string, body: Record<string, unknown>) =>
  call(app, { method: 'PUT', url: url(key), payload: body })

t.test('a miss is a 404 not_found carrying a lease token', async (t) => {
  const app = await build(t)
  const body = await miss(app, 'dashboard:42')
  t.equal(body.error, 'not_found')
  t.match(body.lease, /^[A-Za-z0-9_-]+\.[0-9a-z]+\.[A-Za-z0-9_-]{11}\.[A-Za-z0-9_-]{12}$/)
  t.equal(body.fill, true)
})

t.test('a PUT with a lease no invalidation touched writes', async (t) => {
  const app = await build(t)
  const { lease } = await miss(app, 'k')
  const res = await putWith(app, 'k', { value: { v: 1 }, userId: 'u1', tags: ['t1'], lease })
  t.equal(res.statusCode, 200)
  t.same((await get(app, 'k')).json().value, { v: 1 })
})

t.test('the lease may be sent back as the miss body object', async (t) => {
  const app = await build(t)
  const missed = await miss(app, 'k')
  t.equal((await putWith(app, 'k', { value: 1, lease: missed })).statusCode, 200)
  const again = await miss(app, 'k2')
  t.equal((await putWith(app, 'k2', { value: 1, lease: { token: again.lease } })).statusCode, 200)
})

t.test('a PUT without a lease always writes, even right after an invalidation', async (t) => {
  const app = await build(t)
  await miss(app, 'k')
  await call(app, { method: 'DELETE', url: url('k') })
  t.equal((await putWith(app, 'k', { value: 2 })).statusCode, 200)
  t.equal((await get(app, 'k')).json().value, 2)
})

const voiders: Array<[string, (app: FastifyInstance) => Promise<unknown>]> = [
  ['DELETE /v1/entries/:key', (app) => call(app, { method: 'DELETE', url: url('user:1:dash') })],
  ['POST /v1/invalidations by key', (app) => call(app, { method: 'POST', url: '/v1/invalidations', payload: { keys: ['user:1:dash'] } })],
  ['DELETE /v1/users/:userId/entries', (app) => call(app, { method: 'DELETE', url: '/v1/users/u1/entries' })],
  ['POST /v1/invalidations by user', (app) => call(app, { method: 'POST', url: '/v1/invalidations', payload: { userIds: ['u1'] } })],
  ['DELETE /v1/tags/:tag/entries', (app) => call(app, { method: 'DELETE', url: '/v1/tags/analytics%3A1/entries' })],
  ['POST /v1/invalidations by tag', (app) => call(app, { method: 'POST', url: '/v1/invalidations', payload: { tags: ['analytics:1'] } })],
  ['POST /v1/invalidations by prefix', (app) => call(app, { method: 'POST', url: '/v1/invalidations', payload: { prefixes: ['user:1:'] } })],
  ['a stale-mode invalidation', (app) => call(app, { method: 'DELETE', url: '/v1/users/u1/entries?mode=stale' })],
  ['a clear', (app) => app.cache.clear('test', 'lease test')],
]

for (const [name, voidIt] of voiders) {
  t.test(`${name} voids an outstanding lease: 409 lease_invalidated and nothing written`, async (t) => {
    const app = await build(t)
    const { lease } = await miss(app, 'user:1:dash')
    const voided = (await voidIt(app)) as { statusCode?: number } | number
    if (typeof voided === 'object') t.equal(voided.statusCode, 200, 'the invalidation was accepted')
    const res = await putWith(app, 'user:1:dash', { value: 'old', userId: 'u1', tags: ['analytics:1'], lease })
    t.equal(res.statusCode, 409)
    t.equal(res.json().error, 'lease_invalidated')
    t.type(res.json().message, 'string')
    t.equal((await get(app, 'user:1:dash')).statusCode, 404, 'nothing was written')
    const stats = await app.cache.stats()
    t.equal(stats.leases.rejected, 1)

    const fresh = await miss(app, 'user:1:dash')
    const ok = await putWith(app, 'user:1:dash', { value: 'new', userId: 'u1', tags: ['analytics:1'], lease: fresh.lease })
    t.equal(ok.statusCode, 200, 'a lease issued after the invalidation writes')
  })
}

t.test('an invalidation of other scopes leaves the lease valid', async (t) => {
  const app = await build(t)
  const { lease } = await miss(app, 'user:1:dash')
  const res = await call(app, {
    method: 'POST',
    url: '/v1/invalidations',
    payload: { keys: ['user:2:dash'], userIds: ['u2'], tags: ['analytics:2'], prefixes: ['user:2:'] },
  })
  t.equal(res.statusCode, 200)
  const write = await putWith(app, 'user:1:dash', { value: 1, userId: 'u1', tags: ['analytics:1'], lease })
  t.equal(write.statusCode, 200)
})

t.test('a user or tag invalidation voids only writes that carry that user or tag', async (t) => {
  const app = await build(t)
  const { lease } = await miss(app, 'k')
  await call(app, { method: 'DELETE', url: '/v1/users/u1/entries' })
  // The lease check looks at the entry being written: this one belongs to another user.
  t.equal((await putWith(app, 'k', { value: 1, userId: 'u2', lease })).statusCode, 200)
})

t.test('a lease issued for another key is refused with 409', async (t) => {
  const app = await build(t)
  const { lease } = await miss(app, 'a')
  const res = await putWith(app, 'b', { value: 1, lease })
  t.equal(res.statusCode, 409)
  t.equal(res.json().error, 'lease_invalidated')
  t.equal((await get(app, 'b')).statusCode, 404)
})

t.test('a malformed lease is a 400 invalid_request, never a 5xx', async (t) => {
  const app = await build(t)
  for (const lease of ['garbage', '', 'a.b', 'x.y.z.w', { other: 1 }, {}, 7, true, []]) {
    const res = await putWith(app, 'k', { value: 1, lease })
    t.equal(res.statusCode, 400, `lease ${JSON.stringify(lease)}`)
    t.equal(res.json().error, 'invalid_request')
  }
  t.equal((await get(app, 'k')).statusCode, 404)
})

t.test('a lease from another process (another epoch) or a forged sequence is refused', async (t) => {
  const app = await build(t)
  const other = await build(t)
  const { lease } = await miss(other, 'k')
  t.equal((await putWith(app, 'k', { value: 1, lease })).statusCode, 409)
  const [epoch, , hash] = (await miss(app, 'k')).lease.split('.')
  t.equal((await putWith(app, 'k', { value: 1, lease: `${epoch}.zzz.${hash}` })).statusCode, 409)
})

t.test('a user or tag invalidation that reached the key voids its lease, even if the write names neither', async (t) => {
  const app = await build(t)
  for (const [by, body, invalidate] of [
    ['tag', { tags: ['report:9'] }, '/v1/tags/report%3A9/entries'],
    ['user', { userId: 'u9' }, '/v1/users/u9/entries'],
  ] as const) {
    const key = `fk:${by}`
    await putWith(app, key, { value: 1, ...body })
    await call(app, { method: 'DELETE', url: `${invalidate}?mode=stale` })
    const { lease } = await miss(app, key) // the stale entry is a miss: a filler gets a lease
    t.equal((await call(app, { method: 'DELETE', url: invalidate })).json().invalidated, 1, `the ${by} invalidation deleted it`)
    const res = await putWith(app, key, { value: 'read before the invalidation', lease })
    t.equal(res.statusCode, 409, `${by}: the invalidation touched the key after the lease`)
    t.equal(res.json().error, 'lease_invalidated')
  }
})

t.test('forgotten lease bookkeeping refuses rather than risk a stale write', async (t) => {
  const store = new MemoryStore({ maxLeaseScopes: 2, maxLeasePrefixes: 1, sweepIntervalMs: 0 })
  const app = await build(t, {}, { store })
  const old = await miss(app, 'a')
  const oldPrefix = await miss(app, 'p:1')
  // Three key scopes stamped in a map of two: the first (`x`) is forgotten, raising the floor.
  for (const key of ['x', 'y', 'z']) await call(app, { method: 'DELETE', url: url(key) })
  const res = await putWith(app, 'a', { value: 1, lease: old.lease })
  t.equal(res.statusCode, 409, '`a` was never invalidated, but we can no longer prove it')
  t.equal(res.json().error, 'lease_invalidated')

  const fresh = await miss(app, 'a')
  t.equal((await putWith(app, 'a', { value: 1, lease: fresh.lease })).statusCode, 200, 'a lease newer than the floor writes')

  // Two prefixes in a list of one: the first is forgotten.
  const before = await miss(app, 'p:2')
  await call(app, { method: 'POST', url: '/v1/invalidations', payload: { prefixes: ['q:'] } })
  await call(app, { method: 'POST', url: '/v1/invalidations', payload: { prefixes: ['r:'] } })
  t.equal((await putWith(app, 'p:2', { value: 1, lease: before.lease })).statusCode, 409)
  t.equal((await putWith(app, 'p:1', { value: 1, lease: oldPrefix.lease })).statusCode, 409)
})

t.test('batch-get hands out a lease for every missing key', async (t) => {
  const app = await build(t)
  await put(app, 'hit', { value: 1 })
  const res = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['hit', 'm1', 'm2', 'm1'] } })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.same(Object.keys(body.entries), ['hit'])
  t.same(body.missing, ['m1', 'm2'])
  t.same(Object.keys(body.leases).sort(), ['m1', 'm2'])
  t.equal(body.leases.m1.fill, true)
  t.type(body.leases.m1.lease, 'string')
})

t.test('batch-set with leases: one voided item fails alone with 409, the others write', async (t) => {
  const app = await build(t)
  const got = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['a', 'b', 'c'] } })
  const leases = got.json().leases
  await call(app, { method: 'DELETE', url: url('b') })
  const res = await call(app, {
    method: 'POST',
    url: '/v1/entries/batch-set',
    payload: {
      entries: [
        { key: 'a', value: 'A', lease: leases.a.lease },
        { key: 'b', value: 'B', lease: leases.b.lease },
        { key: 'c', value: 'C', lease: leases.c },
      ],
    },
  })
  t.equal(res.statusCode, 200)
  const results = res.json().results
  t.same(results.map((r: { key: string; status: number }) => [r.key, r.status]), [['a', 200], ['b', 409], ['c', 200]])
  t.equal(results[1].error, 'lease_invalidated')
  t.equal((await get(app, 'a')).json().value, 'A')
  t.equal((await get(app, 'b')).statusCode, 404, 'the voided item wrote nothing')
  t.equal((await get(app, 'c')).json().value, 'C')
})

t.test('a batch-get miss gives fill:false while another caller holds the fill lease', async (t) => {
  const app = await build(t)
  await miss(app, 'k')
  const res = await call(app, { method: 'POST', url: '/v1/entries/batch-get', payload: { keys: ['k'] } })
  t.equal(res.json().leases.k.fill, false)
  t.ok(res.json().leases.k.retryAfterMs > 0)
})

t.test('herd control', async (t) => {
  t.test('the first miss gets fill:true, the misses after it fill:false with retryAfterMs', async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    const first = await miss(app, 'k')
    t.equal(first.fill, true)
    t.notOk('retryAfterMs' in first)
    const rest = await Promise.all(Array.from({ length: 5 }, () => miss(app, 'k')))
    for (const r of rest) {
      t.equal(r.fill, false)
      t.ok(r.retryAfterMs! >= 1 && r.retryAfterMs! <= 2000, `retryAfterMs ${r.retryAfterMs}`)
      t.type(r.lease, 'string', 'a waiter still gets a lease it may write with')
    }
    t.equal((await miss(app, 'other')).fill, true, 'herd control is per key')
  })

  t.test('retryAfterMs never points past the end of the fill lease', async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    await miss(app, 'k')
    clock.advance(1995)
    t.equal((await miss(app, 'k')).retryAfterMs, 5)
  })

  t.test("the filler's write releases the fill lease", async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    const first = await miss(app, 'k')
    t.equal((await miss(app, 'k')).fill, false)
    t.equal((await putWith(app, 'k', { value: 1, lease: first.lease, ttlMs: 1000 })).statusCode, 200)
    // The entry expires while the fill lease (2000 ms) would still run: only the write's
    // release lets the next miss fill. (An invalidation would release it by itself.)
    clock.advance(1000)
    t.equal((await miss(app, 'k')).fill, true, 'the next miss fills at once')
  })

  t.test('the fill lease expires after fillLeaseMs', async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    await miss(app, 'k')
    clock.advance(1999)
    t.equal((await miss(app, 'k')).fill, false)
    clock.advance(1)
    const after = await miss(app, 'k')
    t.equal(after.fill, true, 'the filler never wrote: someone else may fill now')
    clock.advance(1)
    t.equal((await miss(app, 'k')).fill, false, 'and holds it in turn')
  })

  t.test('a refused fill releases the fill lease, so waiters need not wait it out', async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    const filler = await miss(app, 'k')
    const waiter = await miss(app, 'k')
    t.equal(waiter.fill, false)
    await call(app, { method: 'DELETE', url: '/v1/users/u1/entries' })
    t.equal((await miss(app, 'k')).fill, false, 'a user invalidation does not know the key')
    t.equal((await putWith(app, 'k', { value: 'old', userId: 'u1', lease: filler.lease })).statusCode, 409)
    t.equal((await miss(app, 'k')).fill, true)
  })

  t.test("a waiter's refused write does not release another caller's fill lease", async (t) => {
    const clock = new FakeClock()
    const app = await build(t, { fillLeaseMs: 2000 }, { now: clock.now })
    const waiter = await miss(app, 'k') // fill:true, becomes the old fill
    await call(app, { method: 'DELETE', url: url('k') })
    const filler = await miss(app, 'k')
    t.equal(filler.fill, true, 'an invalidation of the key releases its fill lease')
    t.equal((await putWith(app, 'k', { value: 'old', lease: waiter.lease })).statusCode, 409)
    t.equal((await miss(app, 'k')).fill, false, 'the current filler still holds it')
  })

  t.test("a waiter's lease, issued under the same stamp as the filler's, cannot end the fill lease", async (t) => {
    const app = await build(t, { fillLeaseMs: 2000 })
    const filler = await miss(app, 'k')
    const waiter = await miss(app, 'k')
    t.equal(filler.fill, true)
    t.equal(waiter.fill, false)
    t.not(waiter.lease, filler.lease, 'every lease names its own holder')
    await call(app, { method: 'DELETE', url: '/v1/tags/t1/entries' })
    t.equal((await putWith(app, 'k', { value: 'old', tags: ['t1'], lease: waiter.lease })).statusCode, 409)
    t.equal((await miss(app, 'k')).fill, false, 'the filler still holds the fill lease')
    t.equal((await putWith(app, 'k', { value: 'new', lease: filler.lease })).statusCode, 200, 'and its write (no t1) lands')
  })

  t.test('a filler that gives its lease back (POST .../release) lets the next miss fill at once; no other lease can', async (t) => {
    const app = await build(t, { fillLeaseMs: 60_000 })
    const release = (key: string, body: unknown, keyName: 'write' | 'read' | 'admin' = 'write') =>
      call(app, { method: 'POST', url: `${url(key)}/release`, payload: body as object, key: keyName })
    const filler = await miss(app, 'k')
    const waiter = await miss(app, 'k')
    t.equal(waiter.fill, false)
    const byWaiter = await release('k', { lease: waiter.lease })
    t.equal(byWaiter.statusCode, 204)
    t.equal((await miss(app, 'k')).fill, false, "a waiter's lease does not end the fill")
    t.equal((await release('k', { lease: filler.lease }, 'read')).statusCode, 403, 'it takes the write scope')
    const byFiller = await release('k', { lease: filler.lease })
    t.equal(byFiller.statusCode, 204)
    t.equal(byFiller.body, '')
    t.equal((await miss(app, 'k')).fill, true, 'the next miss fills at once')
    t.equal((await release('k', { lease: filler.lease })).statusCode, 204)
    t.equal((await miss(app, 'k')).fill, false, "giving the old lease back again does not end the new filler's")
    // A token that is not a lease of this key is refused.
    const other = await miss(app, 'other')
    for (const [body, message] of [
      [{ lease: other.lease }, /another key/],
      [{ lease: 'nope' }, /lease/],
      [{}, /lease/],
      [{ lease: filler.lease, extra: 1 }, /extra/],
    ] as const) {
      const res = await release('k', body)
      t.equal(res.statusCode, 400, JSON.stringify(body))
      t.equal(res.json().error, 'invalid_request')
      t.match(res.json().message, message)
    }
  })

  t.test('a clear releases every fill lease', async (t) => {
    const clock = new FakeClock()
    const app = await build(t, {}, { now: clock.now })
    await miss(app, 'k')
    await app.cache.clear()
    t.equal((await miss(app, 'k')).fill, true)
  })
})

t.test('leasesEnabled:false writes even with a voided lease (the switch the race test uses)', async (t) => {
  const app = await build(t, {}, { leasesEnabled: false })
  const { lease } = await miss(app, 'k')
  await call(app, { method: 'DELETE', url: url('k') })
  t.equal((await putWith(app, 'k', { value: 'stale', lease })).statusCode, 200)
})
