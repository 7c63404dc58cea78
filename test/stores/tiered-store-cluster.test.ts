// Cluster mode end to end: three app instances, each with its own L1, on one real redis-server.
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import t, { type Test } from 'tap'
import { CacheError } from '../../src/errors.js'
import { EventProcessor, EventRules } from '../../src/sources/events.js'
import type { TieredStore } from '../../src/stores/tiered-store.js'
import { KEYS, build, call, get, put } from '../helpers/build.js'
import { OriginServer, dashboardOrigin } from '../helpers/origin-server.js'
import { requireRedisServer, startRedis, waitUntil } from '../helpers/redis-server.js'

const l1 = (app: FastifyInstance) => app.cache.store as TieredStore

/** GETs until the instance holds the key in its L1 (a bus message in flight can refuse one fill). */
const fillL1 = (app: FastifyInstance, key: string) =>
  waitUntil(async () => {
    await get(app, key)
    return (await l1(app).l1Peek(key, app.cache.now())) !== undefined
  })

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

if (requireRedisServer(t)) {
  const redis = await startRedis(t)
  const a = await build(t, { redisUrl: redis.url })
  const b = await build(t, { redisUrl: redis.url })
  const c = await build(t, { redisUrl: redis.url })
  const apps = [a, b, c]

  t.test('every instance runs the tiered store and is ready', async (t) => {
    for (const app of apps) {
      t.equal(app.cache.store.kind, 'tiered')
      const ready = await app.inject({ url: '/health/ready' })
      t.equal(ready.statusCode, 200)
      t.same(ready.json().checks, { redis: true })
    }
  })

  t.test('a set on one instance is read on the others', async (t) => {
    await put(a, 'profile:1', { value: { name: 'Ada' }, userId: 'u1', tags: ['profiles'] })
    for (const app of [b, c]) {
      const res = await get(app, 'profile:1')
      t.equal(res.statusCode, 200)
      t.same(res.json().value, { name: 'Ada' })
      t.equal(res.json().userId, 'u1')
    }
  })

  t.test('an overwrite on one instance replaces the copies other instances hold in L1', async (t) => {
    await put(a, 'page:1', { value: 1 })
    t.ok(await fillL1(b, 'page:1'))
    await put(c, 'page:1', { value: 2 })
    t.ok(await waitUntil(async () => (await get(b, 'page:1')).json().value === 2), 'b reads the new value')
  })

  t.test('an invalidation on one instance is a miss on the others once the bus delivered it', async (t) => {
    for (let i = 0; i < 3; i++) await put(a, `dash:u7:${i}`, { value: i, userId: 'u7' })
    await put(a, 'dash:u8:0', { value: 0, userId: 'u8' })
    for (const app of [b, c]) {
      for (let i = 0; i < 3; i++) t.ok(await fillL1(app, `dash:u7:${i}`))
      t.ok(await fillL1(app, 'dash:u8:0'))
    }
    const res = await call(a, { method: 'DELETE', url: '/v1/users/u7/entries', key: 'invalidate' })
    t.equal(res.statusCode, 200)
    t.equal(res.json().invalidated, 3)
    for (const app of [b, c]) {
      const gone = await waitUntil(async () => {
        for (let i = 0; i < 3; i++) if ((await get(app, `dash:u7:${i}`)).statusCode !== 404) return false
        return true
      })
      t.ok(gone, 'every entry of the user is a miss')
      t.equal((await get(app, 'dash:u8:0')).statusCode, 200, 'another user is untouched')
      // The other instances log it (and count it, and stream it) with source `bus`.
      const log = (await call(app, { url: '/v1/debug/invalidations?limit=20' })).json() as Array<{
        selector: { userIds?: string[] }
        source: string
        invalidated: number
      }>
      const seen = log.find((r) => r.selector.userIds?.[0] === 'u7')
      t.equal(seen?.source, 'bus')
      t.equal(seen?.invalidated, 3, 'the three L1 copies it dropped')
    }
    const own = (await call(a, { url: '/v1/debug/invalidations?limit=20' })).json() as Array<{ source: string }>
    t.notOk(own.some((r) => r.source === 'bus'), 'the sender does not log its own change twice')
  })

  t.test("the other instances log an invalidation with its reason and actor, under their own id", async (t) => {
    await put(a, 'why:1', { value: 1 })
    await put(a, 'why:2', { value: 2 })
    // One the script announces, and a prefix walked in batches, whose message comes at the end.
    const cases = [
      { selector: { keys: ['why:1'] }, reason: 'price changed', actor: 'invalidator' as const },
      { selector: { prefixes: ['why:'] }, reason: 'schema v2 ✓', actor: 'admin' as const },
      { selector: { keys: ['why:3'] }, reason: null, actor: 'invalidator' as const }, // the shorthand: no reason
    ]
    const replies = []
    for (const { selector, reason, actor } of cases) {
      const key = actor === 'invalidator' ? 'invalidate' : 'admin'
      replies.push(reason === null
        ? await call(a, { method: 'DELETE', url: `/v1/entries/${selector.keys![0]}`, key })
        : await call(a, { method: 'POST', url: '/v1/invalidations', key, payload: { ...selector, reason } }))
    }
    for (const res of replies) t.equal(res.statusCode, 200)
    type Logged = { id: string; selector: object; source: string; reason: string | null; actor: string | null }
    const logged = (log: Logged[], selector: object) => log.find((r) => JSON.stringify(r.selector) === JSON.stringify(selector))
    for (const app of [b, c]) {
      let log: Logged[] = []
      t.ok(
        await waitUntil(async () => {
          log = (await call(app, { url: '/v1/debug/invalidations?limit=50' })).json() as Logged[]
          return cases.every(({ selector }) => logged(log, selector) !== undefined)
        }),
        'all three reached the log',
      )
      for (const [i, { selector, reason, actor }] of cases.entries()) {
        const record = logged(log, selector)!
        t.match(record, { source: 'bus', reason, actor }, JSON.stringify(selector))
        t.not(record.id, replies[i]!.json().id, "this instance's own id")
      }
      // A prefix invalidation is audited everywhere: under the key's name where it was made.
      const audit = (await call(app, { url: '/v1/debug/audit?limit=50' })).json() as Array<{ actor: string; action: string; reason: string | null }>
      t.match(audit.find((r) => r.action === 'invalidation' && r.reason === 'schema v2 ✓'), { actor: 'source:bus' })
    }
    const audit = (await call(a, { url: '/v1/debug/audit?limit=50' })).json() as Array<{ actor: string; action: string; reason: string | null }>
    t.match(audit.find((r) => r.action === 'invalidation' && r.reason === 'schema v2 ✓'), { actor: 'admin' })
  })

  t.test('a lease from one instance is voided by an invalidation on another', async (t) => {
    const miss = await get(a, 'report:9')
    t.equal(miss.statusCode, 404)
    const lease = miss.json().lease as string
    t.ok(lease)
    const inv = await call(b, { method: 'POST', url: '/v1/invalidations', payload: { tags: ['reports'], keys: ['report:9'] } })
    t.equal(inv.statusCode, 200)
    const late = await call(c, { method: 'PUT', url: '/v1/entries/report:9', payload: { value: 'old', lease } })
    t.equal(late.statusCode, 409)
    t.equal(late.json().error, 'lease_invalidated')
    const late2 = await call(a, { method: 'PUT', url: '/v1/entries/report:9', payload: { value: 'old', lease } })
    t.equal(late2.statusCode, 409)
    t.equal((await get(b, 'report:9')).statusCode, 404, 'nothing was written')
  })

  t.test('batch-set writes many keys at once, each key in the order given, every outcome in its place', async (t) => {
    const miss = await get(a, 'batch:leased')
    const lease = miss.json().lease as string
    await call(b, { method: 'DELETE', url: '/v1/entries/batch:leased' })
    const entries: Record<string, unknown>[] = []
    for (let i = 0; i < 200; i++) entries.push({ key: `batch:${i}`, value: i, userId: `bu${i % 7}` })
    // One key written five times among the others: the last good write stands.
    for (let v = 0; v < 5; v++) entries.splice(v * 40, 0, { key: 'batch:dup', value: `v${v}`, ttlMs: v === 4 ? 0 : 60_000 })
    entries.push({ key: 'batch:leased', value: 'old', lease }, { value: 'no key' })
    const res = await call(a, { method: 'POST', url: '/v1/entries/batch-set', payload: { entries } })
    t.equal(res.statusCode, 200)
    const results = res.json().results as { key: string; status: number; error?: string }[]
    t.equal(results.length, entries.length)
    t.same(
      results.map((r) => r.key),
      entries.map((e) => e.key ?? ''),
      'one outcome per entry, in the order sent',
    )
    const dups = results.filter((r) => r.key === 'batch:dup').map((r) => r.status)
    t.same(dups, [200, 200, 200, 200, 400], 'the fifth write of batch:dup is refused alone (ttlMs 0)')
    t.match(results.at(-2), { key: 'batch:leased', status: 409, error: 'lease_invalidated' })
    t.match(results.at(-1), { key: '', status: 400, error: 'invalid_request' })
    t.equal((await get(c, 'batch:dup')).json().value, 'v3', 'the last good write of the key stands')
    t.equal((await get(c, 'batch:leased')).statusCode, 404, 'the voided lease wrote nothing')
    const user = await call(b, { method: 'GET', url: '/v1/debug/users/bu3' })
    t.equal(user.json().count, Array.from({ length: 200 }, (_, i) => i).filter((i) => i % 7 === 3).length, 'indexed in Redis')
  })

  t.test('herd control spans the instances: one fill lease per key across the cluster', async (t) => {
    const first = await get(a, 'herd:1')
    t.equal(first.statusCode, 404)
    t.equal(first.json().fill, true, 'the first miss anywhere fills')
    for (const app of [b, c, a]) {
      const other = (await get(app, 'herd:1')).json()
      t.equal(other.fill, false, 'a miss on any instance waits for it')
      t.ok(other.retryAfterMs >= 1 && other.retryAfterMs <= 100)
    }
    const filled = await call(b, { method: 'PUT', url: '/v1/entries/herd%3A1', payload: { value: 1, lease: first.json().lease } })
    t.equal(filled.statusCode, 200, 'the filler\'s lease writes from another instance')
    await call(c, { method: 'DELETE', url: '/v1/entries/herd%3A1', key: 'invalidate' })
    t.ok(await waitUntil(async () => (await l1(b).l1Peek('herd:1', b.cache.now())) === undefined), 'the bus dropped b\'s copy')
    const next = await get(b, 'herd:1')
    t.equal(next.json().fill, true, 'after the write and an invalidation, the next miss fills again')
  })

  t.test('a miss whose key is filled between its read and its claim waits a millisecond: no second fill lease', async (t) => {
    const first = (await get(a, 'herd:crossed')).json()
    t.equal(first.fill, true)
    // c's next miss reads Redis (nothing there), then the filler's write lands on b, then c claims.
    const store = l1(c)
    const claimFill = store.claimFill.bind(store)
    store.claimFill = async (...args) => {
      store.claimFill = claimFill
      t.equal((await call(b, { method: 'PUT', url: '/v1/entries/herd%3Acrossed', payload: { value: 3, lease: first.lease } })).statusCode, 200)
      return claimFill(...args)
    }
    t.teardown(() => void (store.claimFill = claimFill))
    const crossed = await get(c, 'herd:crossed')
    t.equal(crossed.statusCode, 404, 'the read missed')
    t.match(crossed.json(), { fill: false, retryAfterMs: 1 }, 'not a fill lease: the fill has landed, read again')
    t.equal((await get(c, 'herd:crossed')).json().value, 3, 'and reading again finds it')
  })

  t.test('a miss on an L1 copy behind Redis (marked stale there, fresh in Redis) is not stuck: the claim drops the copy', async (t) => {
    await put(a, 'behind:1', { value: 'fresh' })
    t.ok(await fillL1(c, 'behind:1'))
    // A stale-mode message Redis never applied: what a stale invalidation that failed leaves in L1.
    const publisher = new Redis(redis.url)
    t.teardown(() => publisher.disconnect())
    await publisher.publish('{cw}:bus', JSON.stringify({ f: 'elsewhere', s: { keys: ['behind:1'] }, m: 'stale' }))
    t.ok(await waitUntil(async () => (await l1(c).l1Peek('behind:1', c.cache.now()))?.stale === true), "c's copy is marked stale")
    const miss = await get(c, 'behind:1')
    t.equal(miss.statusCode, 404, 'the stale copy is a miss')
    t.match(miss.json(), { fill: false, retryAfterMs: 1 }, 'Redis holds a fresh entry: nothing to fill')
    const again = await get(c, 'behind:1')
    t.equal(again.statusCode, 200, 'and the next read finds it in Redis, not the copy again')
    t.equal(again.json().value, 'fresh')
  })

  t.test("a waiter's refused write on another instance does not end the filler's claim", async (t) => {
    const filler = (await get(a, 'herd:2')).json()
    const waiter = (await get(b, 'herd:2')).json()
    t.equal(filler.fill, true)
    t.equal(waiter.fill, false)
    t.not(waiter.lease, filler.lease, 'same stamp, different holder')
    await call(c, { method: 'DELETE', url: '/v1/tags/t-herd/entries', key: 'invalidate' })
    const refused = await call(b, { method: 'PUT', url: '/v1/entries/herd%3A2', payload: { value: 'old', tags: ['t-herd'], lease: waiter.lease } })
    t.equal(refused.statusCode, 409)
    t.equal((await get(c, 'herd:2')).json().fill, false, 'a third instance still waits for the filler')
    const filled = await call(a, { method: 'PUT', url: '/v1/entries/herd%3A2', payload: { value: 'new', lease: filler.lease } })
    t.equal(filled.statusCode, 200)
  })

  t.test('a fill lease given back on any instance lets the next miss anywhere fill; a waiter\'s cannot', async (t) => {
    const release = (app: FastifyInstance, lease: string) =>
      call(app, { method: 'POST', url: '/v1/entries/herd%3A3/release', payload: { lease }, key: 'readwrite' })
    const filler = (await get(a, 'herd:3')).json()
    const waiter = (await get(b, 'herd:3')).json()
    t.equal(filler.fill, true)
    t.equal(waiter.fill, false)
    t.equal((await release(c, waiter.lease)).statusCode, 204)
    t.equal((await get(c, 'herd:3')).json().fill, false, "a waiter's lease given back ends nothing")
    t.equal((await release(b, filler.lease)).statusCode, 204)
    t.equal((await get(c, 'herd:3')).json().fill, true, "the filler's, given back on another instance, ends the claim in Redis")
  })

  t.test('a lease from one instance writes on another when nothing invalidated the key', async (t) => {
    const miss = await get(a, 'report:10')
    await call(b, { method: 'DELETE', url: '/v1/entries/unrelated', key: 'invalidate' })
    const res = await call(c, { method: 'PUT', url: '/v1/entries/report:10', payload: { value: 'fresh', lease: miss.json().lease } })
    t.equal(res.statusCode, 200)
  })

  t.test('racing a leased fill on one instance against an invalidation on another never leaves the old value', async (t) => {
    let refused = 0
    let landedFirst = 0
    for (let round = 0; round < 40; round++) {
      const key = `race:${round}`
      const lease = (await get(a, key)).json().lease as string
      // Fire both at once; which lands first in Redis is up to the race.
      // A random head start for one side or the other mixes both orders over the rounds.
      const lead = Math.random() * 4 - 2
      const [write, inv] = await Promise.all([
        sleep(Math.max(0, -lead)).then(() => call(a, { method: 'PUT', url: `/v1/entries/${key}`, payload: { value: 'old', lease } })),
        sleep(Math.max(0, lead)).then(() => call(b, { method: 'DELETE', url: `/v1/entries/${key}`, key: 'invalidate' })),
      ])
      t.equal(inv.statusCode, 200)
      if (write.statusCode === 409) refused++
      else {
        t.equal(write.statusCode, 200)
        landedFirst++
      }
      // Whatever the order, the invalidation wins: the old value is nowhere once the bus delivered.
      for (const app of apps) t.ok(await waitUntil(async () => (await get(app, key)).statusCode === 404), `${key} is gone`)
    }
    t.equal(refused + landedFirst, 40)
    t.comment(`lease refused ${refused} times, write landed before the invalidation ${landedFirst} times`)
  })

  t.test('?load=true misses on several instances make one origin call between them (single flight across the cluster)', async (t) => {
    const origin = await OriginServer.start(t)
    origin.values.set('/users/77/dashboard', { widgets: 7 })
    origin.delayMs = 300
    const configFile = { origins: [dashboardOrigin(origin)] }
    const [x, y] = await Promise.all([0, 1].map(() => build(t, { redisUrl: redis.url, configFile })))
    const replies = await Promise.all(Array.from({ length: 20 }, (_, i) => get(i % 2 === 0 ? x : y, 'dashboard:77', '?load=true')))
    t.same(new Set(replies.map((r) => r.statusCode)), new Set([200]))
    t.same(new Set(replies.map((r) => JSON.stringify(r.json().value))), new Set(['{"widgets":7}']))
    t.equal(origin.calls, 1, 'one origin call for twenty callers on two instances')
    t.same((await x.inject({ url: '/v1/stats', headers: { authorization: `Bearer ${KEYS.admin}` } })).json().misses, 10, 'a wait counts no extra misses')

    // A key the origin has no data for: every caller gets the plain miss; each instance asks
    // at most once (nothing marks "no data" for the others, which an invalidation could outdate).
    const misses = await Promise.all(Array.from({ length: 10 }, (_, i) => get(i % 2 === 0 ? x : y, 'dashboard:none', '?load=true')))
    t.same(new Set(misses.map((r) => r.statusCode)), new Set([404]))
    for (const r of misses) t.type(r.json().lease, 'string')
    t.ok(origin.calls >= 2 && origin.calls <= 3, `one origin call per instance at most (${origin.calls - 1})`)

    // A load that fails: its callers get 503, and the other instance's waiters load once more
    // (the claim is gone, not left as "no data").
    origin.values.set('/users/78/dashboard', 'at last')
    origin.failNext = 1
    const before = origin.calls
    const tried = await Promise.all(Array.from({ length: 10 }, (_, i) => get(i % 2 === 0 ? x : y, 'dashboard:78', '?load=true')))
    t.same(new Set(tried.map((r) => r.statusCode)), new Set([200, 503]), 'the failed load answers 503, the retry 200')
    t.equal(origin.calls - before, 2)
    const byInstance = [0, 1].map((side) => new Set(tried.filter((_, i) => i % 2 === side).map((r) => r.statusCode)).size)
    t.same(byInstance, [1, 1], 'all callers on one instance share one outcome')
  })

  t.test('a hot key past its refresh-ahead point is refreshed by one instance, not by every instance that serves it', async (t) => {
    const origin = await OriginServer.start(t)
    origin.values.set('/users/90/dashboard', 'v1')
    const configFile = { origins: [dashboardOrigin(origin, { ttlMs: 1000, refreshAhead: 0.5 })] }
    const [x, y, z] = await Promise.all([0, 1, 2].map(() => build(t, { redisUrl: redis.url, configFile })))
    t.equal((await get(x, 'dashboard:90', '?load=true')).json().value, 'v1')
    origin.values.set('/users/90/dashboard', 'v2')
    origin.delayMs = 200 // the refreshes overlap
    await new Promise((resolve) => setTimeout(resolve, 600))
    const before = origin.calls
    await Promise.all([x, y, z].map((app) => get(app, 'dashboard:90')))
    await Promise.all([x, y, z].map((app) => app.origins.refresher.drain()))
    t.equal(origin.calls - before, 1, 'one refresh between three instances')
    t.ok(await waitUntil(async () => (await get(z, 'dashboard:90')).json().value === 'v2'), 'and every instance reads its value')
  })

  t.test('an emergency clear token from one instance is redeemed on another, exactly once, and every instance is emptied', async (t) => {
    await put(a, 'keep:1', { value: 1 })
    t.ok(await fillL1(c, 'keep:1'))
    const issued = await call(a, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'test' } })
    t.equal(issued.statusCode, 200)
    const { token } = issued.json()
    // Behind a load balancer the two steps may reach different instances; here two redeems race.
    const redeemed = await Promise.all([b, c].map((app) => call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token } })))
    t.same(redeemed.map((r) => r.statusCode).sort(), [200, 403], 'exactly one redeem clears')
    t.equal(redeemed.find((r) => r.statusCode === 403)!.json().error, 'clear_token_invalid')
    t.ok(await waitUntil(async () => (await get(c, 'keep:1')).statusCode === 404))
    const again = await call(a, { method: 'POST', url: '/v1/admin/clear', payload: { token } })
    t.equal(again.statusCode, 403, 'spent on every instance, the issuing one too')
  })

  // The SSE stream of instance b, over a real socket.
  let bPort: number | undefined
  const openStream = async (t: Test) => {
    if (bPort === undefined) {
      await b.listen({ host: '127.0.0.1', port: 0 })
      bPort = (b.server.address() as AddressInfo).port
    }
    const clientsBefore = b.invalidationStream.clients()
    const abort = new AbortController()
    const res = await fetch(`http://127.0.0.1:${bPort}/v1/invalidations/stream`, { headers: { authorization: `Bearer ${KEYS.read}` }, signal: abort.signal })
    let text = ''
    const decoder = new TextDecoder()
    void (async () => {
      try {
        for await (const chunk of res.body!) text += decoder.decode(chunk as Uint8Array, { stream: true })
      } catch {
        // aborted at teardown
      }
    })()
    t.teardown(() => abort.abort())
    await waitUntil(() => b.invalidationStream.clients() > clientsBefore)
    return { text: () => text }
  }

  t.test('a clear on one instance is an invalidation of everything and a reset on the other instances\' streams', async (t) => {
    const stream = await openStream(t)
    await a.cache.clear('test', 'cluster stream test')
    t.ok(await waitUntil(() => stream.text().includes('event: reset')), 'b\'s stream client was told')
    t.match(stream.text(), /the cache was cleared on another instance/)
    t.match(stream.text(), /event: invalidation\ndata: \{[^\n]*"selector":\{"all":true\},"mode":"delete","source":"bus"/)
    const [record] = (await call(b, { url: '/v1/debug/invalidations?limit=1' })).json()
    t.match(record, { selector: { all: true }, mode: 'delete', source: 'bus', actor: 'test', reason: 'cluster stream test' }, 'in b\'s invalidation log, why and who')
    // Marking everything stale travels the same way, as mode stale.
    await a.cache.markAllStale({ source: 'postgres', reason: 'cluster test', actor: 'postgres-listener' })
    t.ok(await waitUntil(async () => (await call(b, { url: '/v1/debug/invalidations?limit=1' })).json()[0]?.mode === 'stale'))
    t.match((await call(b, { url: '/v1/debug/invalidations?limit=1' })).json()[0], { source: 'bus', reason: 'cluster test', actor: 'postgres-listener' })
  })

  t.test('a bus outage is a reset on the stream once the bus is back (invalidations may have been missed)', async (t) => {
    const stream = await openStream(t)
    const admin = new Redis(redis.url)
    t.teardown(() => admin.disconnect())
    await admin.client('KILL', 'TYPE', 'pubsub')
    t.ok(await waitUntil(() => stream.text().includes('event: reset')), 'b\'s stream client was told')
    t.match(stream.text(), /the cluster bus was down/)
    t.ok(await waitUntil(async () => (await b.inject({ url: '/health/ready' })).statusCode === 200), 'and b is ready again')
  })

  t.test('an event id is applied once across the cluster, however many instances it reaches', async (t) => {
    const rules = [{ event: 'persona.updated', invalidate: { userIds: ['{{data.userId}}'] } }]
    const [x, y, z] = await Promise.all([0, 1, 2].map(() => build(t, { redisUrl: redis.url, configFile: { rules } })))
    const event = { id: 'evt-cluster-1', type: 'persona.updated', data: { userId: 'p1' } }
    const send = (app: FastifyInstance) => call(app, { method: 'POST', url: '/v1/events', payload: event, key: 'invalidate' })
    await put(x, 'p1:dash', { value: 1, userId: 'p1' })
    // Delivered to three instances at once: one applies it, the others wait and replay its reply.
    const replies = await Promise.all([send(x), send(y), send(z)])
    for (const r of replies) t.equal(r.statusCode, 200)
    t.equal(replies.filter((r) => r.headers['idempotent-replayed'] === 'true').length, 2, 'two of the three are replays')
    const ids = new Set(replies.map((r) => r.json().invalidations[0].id))
    t.equal(ids.size, 1, 'all three carry the one invalidation that was applied')
    t.equal(replies.find((r) => r.headers['idempotent-replayed'] !== 'true')!.json().invalidations[0].invalidated, 1)

    // Later, a repeat on an instance that never saw it is a replay too, and applies nothing.
    await put(y, 'p1:dash', { value: 2, userId: 'p1' })
    const w = await build(t, { redisUrl: redis.url, configFile: { rules } })
    const again = await send(w)
    t.equal(again.headers['idempotent-replayed'], 'true')
    t.same(again.json(), replies[0]!.json())
    t.equal((await get(x, 'p1:dash')).json().value, 2, 'the entry written since was not invalidated again')

    // A new id is applied.
    const fresh = await call(z, { method: 'POST', url: '/v1/events', payload: { ...event, id: 'evt-cluster-2' }, key: 'invalidate' })
    t.equal(fresh.headers['idempotent-replayed'], undefined)
    t.equal(fresh.json().invalidations[0].invalidated, 1)

    // A repeat whose data cannot fill the rule's templates is still a repeat, on an instance
    // that never saw the id as on the one that applied it (as in memory mode): a replay, not a 400.
    const bad = { ...event, data: {} }
    const v = await build(t, { redisUrl: redis.url, configFile: { rules } })
    for (const app of [v, x]) {
      const repeat = await call(app, { method: 'POST', url: '/v1/events', payload: bad, key: 'invalidate' })
      t.equal(repeat.statusCode, 200)
      t.equal(repeat.headers['idempotent-replayed'], 'true')
      t.same(repeat.json(), replies[0]!.json())
    }
    // A new id with such data is refused, and leaves no record (a corrected retry applies).
    const refused = await call(v, { method: 'POST', url: '/v1/events', payload: { ...bad, id: 'evt-cluster-3' }, key: 'invalidate' })
    t.equal(refused.statusCode, 400)
    t.match(refused.json(), { error: 'invalid_request', message: /data\.userId/ })
    const corrected = await call(v, { method: 'POST', url: '/v1/events', payload: { ...event, id: 'evt-cluster-3' }, key: 'invalidate' })
    t.equal(corrected.statusCode, 200)
    t.equal(corrected.headers['idempotent-replayed'], undefined)
  })

  t.test('a repeat with bad data waits for the id another instance applies: a replay if it is applied, else 400, and a valid delivery meanwhile goes its own way', async (t) => {
    const [x, y] = await Promise.all([0, 1].map(() => build(t, { redisUrl: redis.url })))
    const rules = new EventRules([{ event: 'slow.done', invalidate: { userIds: ['{{data.u}}'] } }], x.cache.limits)
    const onX = new EventProcessor(x.cache, rules, { pendingTtlMs: 600 })
    const onY = new EventProcessor(y.cache, rules, { pendingTtlMs: 600 })
    const invalidateX = x.cache.invalidate.bind(x.cache)
    t.teardown(() => void (x.cache.invalidate = invalidateX))
    for (const fails of [false, true]) {
      // x's invalidation is held until the test lets it go, then succeeds or fails.
      let release!: () => void
      const gate = new Promise<void>((resolve) => (release = resolve))
      x.cache.invalidate = async (...args) => {
        await gate
        if (fails) throw new CacheError('backend_unavailable', 'Redis is unavailable (test)')
        return invalidateX(...args)
      }
      const id = `evt-bad-repeat-${fails ? 'failed' : 'applied'}`
      const first = onX.apply({ id, type: 'slow.done', data: { u: 'b1' } })
      first.catch(() => undefined)
      await sleep(100)
      const bad = onY.apply({ id, type: 'slow.done', data: {} })
      bad.catch(() => undefined)
      const valid = onY.apply({ id, type: 'slow.done', data: { u: 'b1' } })
      await sleep(100)
      release()
      if (fails) {
        await t.rejects(first, { code: 'backend_unavailable' })
        await t.rejects(bad, { code: 'invalid_request' }, 'the bad repeat of an id that was not applied is 400')
        t.equal((await valid).replayed, false, 'the valid delivery on the same instance applied the id itself, not held to that 400')
      } else {
        const [one, two, three] = await Promise.all([first, bad, valid])
        t.same([one.replayed, two.replayed, three.replayed], [false, true, true])
        t.same(two.response, one.response, 'the bad repeat waited, and replays the reply')
      }
    }
  })

  t.test('an event applied for longer than its claim time is still applied once: its owner renews the claim', async (t) => {
    const [x, y] = await Promise.all([0, 1].map(() => build(t, { redisUrl: redis.url })))
    const rules = new EventRules([{ event: 'slow.done', invalidate: { userIds: ['{{data.u}}'] } }], x.cache.limits)
    // A 600 ms claim, renewed every 200: x may stall up to 400 ms (a loaded machine) and keep it.
    const onX = new EventProcessor(x.cache, rules, { pendingTtlMs: 600 })
    const onY = new EventProcessor(y.cache, rules, { pendingTtlMs: 600 })
    // x's invalidation is held until the test lets it go: an apply as slow as we like.
    let release!: () => void
    const gate = new Promise<void>((resolve) => (release = resolve))
    const invalidateX = x.cache.invalidate.bind(x.cache)
    x.cache.invalidate = async (...args) => {
      await gate
      return invalidateX(...args)
    }
    let appliedOnY = 0
    const invalidateY = y.cache.invalidate.bind(y.cache)
    y.cache.invalidate = async (...args) => {
      appliedOnY++
      return invalidateY(...args)
    }
    const event = { id: 'evt-slow-1', type: 'slow.done', data: { u: 's1' } }
    const first = onX.apply(event)
    await sleep(50)
    let secondDone = false
    const second = onY.apply(event).finally(() => (secondDone = true))
    await sleep(1800) // three claim times: without renewal y would have taken the id over
    t.equal(secondDone, false, 'the second delivery still waits for the first')
    release()
    const [one, two] = await Promise.all([first, second])
    t.same([one.replayed, two.replayed], [false, true])
    t.same(two.response, one.response, 'and replays its reply')
    t.equal(appliedOnY, 0, 'y applied nothing')
  })

  t.test('stats show the entries Redis holds, on every instance', async (t) => {
    await put(a, 'count:1', { value: 1 })
    const entries = await Promise.all(apps.map(async (app) => (await call(app, { url: '/v1/stats' })).json().entries))
    t.ok(entries[0] >= 1)
    t.same(new Set(entries).size, 1, 'every instance reports the same count')
  })

  t.test('the consistency check finds an L1 copy that differs from Redis and repairs it', async (t) => {
    const raw = new Redis(redis.url)
    t.teardown(() => raw.disconnect())
    await put(a, 'drift:1', { value: 'v1' })
    await put(a, 'drift:2', { value: 'v1' })
    t.ok(await fillL1(b, 'drift:1'))
    t.ok(await fillL1(b, 'drift:2'))
    // Change Redis behind the bus's back, as a lost message would leave it.
    const gen = (await raw.get('{cw}:g')) ?? '0'
    await raw.hset(`{cw}:${gen}:e:drift:1`, 'v', '"v2"', 'et', 'changed-behind-the-bus')
    const res = await call(b, {
      method: 'POST',
      url: '/v1/consistency',
      payload: { against: 'provided', entries: [{ key: 'drift:1', value: 'v1' }, { key: 'drift:2', value: 'v1' }], repair: 'invalidate' },
    })
    t.equal(res.statusCode, 200)
    t.same(res.json().stale, ['drift:1'], 'the L1 copy agrees with the caller but not with Redis')
    t.equal(res.json().consistent, 1)
    t.equal(res.json().repaired, 1)
    for (const app of apps) t.ok(await waitUntil(async () => (await get(app, 'drift:1')).statusCode === 404), 'repaired everywhere')
    t.equal((await get(b, 'drift:2')).statusCode, 200)

    // Gone from Redis behind the bus's back: only b's L1 copy is left to repair.
    await raw.del(`{cw}:${gen}:e:drift:2`)
    const gone = await call(b, {
      method: 'POST',
      url: '/v1/consistency',
      payload: { against: 'provided', entries: [{ key: 'drift:2', value: 'v1' }], repair: 'invalidate' },
    })
    t.same(gone.json().stale, ['drift:2'], 'an L1 copy of an entry Redis no longer has is stale')
    t.equal(gone.json().repaired, 1, 'dropping that copy is a repair, though Redis deleted nothing')
    t.equal(await l1(b).l1Peek('drift:2', b.cache.now()), undefined, 'the copy is gone')
  })
}
