import { createServer } from 'node:http'
import { createServer as createNetServer, type AddressInfo, type Socket } from 'node:net'
import t from 'tap'
import { WriteBody } from '../../src/schemas/entries.js'
import { SelectorBody } from '../../src/schemas/invalidations.js'
import { setTimeout as sleep } from 'node:timers/promises'
import {
  BackendUnavailableError,
  CachewardenClient,
  CachewardenError,
  ForbiddenError,
  InvalidRequestError,
  LeaseInvalidatedError,
  NotFoundError,
  TooLargeError,
  UnauthorizedError,
  type Entry,
} from '../../src/client/index.js'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import { KEYS } from '../helpers/build.js'
import { hasRedisServer, startRedis } from '../helpers/redis-server.js'
import { serve } from '../helpers/serve.js'

// The client against a real listening server: the network, keep-alive and the wire format
// are part of what is tested.

t.test('set then get round-trips a typed entry; a miss is undefined', async (t) => {
  const { client } = await serve(t)
  const c = client()
  const written = await c.set('dashboard:42', { widgets: 3 }, { ttlMs: 60_000, userId: '42', tags: ['analytics:42'] })
  t.type(written.etag, 'string')
  t.type(written.expiresAt, 'string')
  const entry: Entry<{ widgets: number }> | undefined = await c.get<{ widgets: number }>('dashboard:42')
  t.equal(entry?.value.widgets, 3)
  t.equal(entry?.userId, '42')
  t.same(entry?.tags, ['analytics:42'])
  t.equal(entry?.etag, written.etag)
  t.equal(await c.get('nope'), undefined)
})

t.test('keys with / : ? # % and spaces survive the URL', async (t) => {
  const { client } = await serve(t)
  const c = client()
  const key = 'a/b:c ?d#e%f/../g'
  await c.set(key, 'odd')
  t.equal((await c.get(key))?.value, 'odd')
  t.equal((await c.delete(key)).invalidated, 1)
  t.equal(await c.get(key), undefined)
})

t.test('lookup gives the miss lease, and not_modified for a current etag', async (t) => {
  const { client } = await serve(t)
  const c = client()
  const miss = await c.lookup('k')
  t.equal(miss.status, 'miss')
  if (miss.status !== 'miss') return
  t.equal(miss.lease.fill, true)
  const second = await c.lookup('k')
  t.equal(second.status === 'miss' && second.lease.fill, false, 'the second miss waits')
  t.ok(second.status === 'miss' && second.lease.retryAfterMs! > 0)

  const { etag } = await c.set('k', 1, { lease: miss.lease })
  t.same(await c.lookup('k', { ifNoneMatch: etag }), { status: 'not_modified', etag })
  t.same(await c.lookup('k', { ifNoneMatch: `W/"${etag}"` }), { status: 'not_modified', etag })
  const changed = await c.lookup('k', { ifNoneMatch: 'something-else' })
  t.equal(changed.status, 'hit')
})

t.test('a voided lease throws LeaseInvalidatedError (409) and writes nothing', async (t) => {
  const { client } = await serve(t)
  const c = client()
  const miss = await c.lookup('k')
  if (miss.status !== 'miss') throw new Error('expected a miss')
  await c.invalidate({ keys: ['k'] })
  const error = await c.set('k', 'old', { lease: miss.lease.lease }).catch((e: unknown) => e)
  t.ok(error instanceof LeaseInvalidatedError)
  t.ok(error instanceof CachewardenError)
  t.equal((error as CachewardenError).code, 'lease_invalidated')
  t.equal((error as CachewardenError).status, 409)
  t.equal(await c.get('k'), undefined)
})

t.test('contract errors arrive as classes carrying code and status', async (t) => {
  const { client } = await serve(t, { limits: { ...DEFAULT_LIMITS, maxValueBytes: 64 } })
  const cases: Array<[string, () => Promise<unknown>, new (...a: never[]) => CachewardenError, string, number]> = [
    ['a wrong key', () => client({ apiKey: 'wrong' }).get('k'), UnauthorizedError, 'unauthorized', 401],
    ['a read-only key writing', () => client({ apiKey: KEYS.read }).set('k', 1), ForbiddenError, 'forbidden', 403],
    ['a bad ttl', () => client().set('k', 1, { ttlMs: -5 }), InvalidRequestError, 'invalid_request', 400],
    ['an empty selector', () => client().invalidate({}), InvalidRequestError, 'invalid_request', 400],
    ['a value over the limit', () => client().set('k', 'x'.repeat(100)), TooLargeError, 'value_too_large', 413],
  ]
  for (const [name, run, Class, code, status] of cases) {
    const error = await run().catch((e: unknown) => e)
    t.ok(error instanceof Class, `${name}: ${(error as Error).name}`)
    t.equal((error as CachewardenError).code, code, name)
    t.equal((error as CachewardenError).status, status, name)
    t.type((error as CachewardenError).message, 'string')
  }
})

t.test('a base URL with a path prefix is kept; a wrong one gives NotFoundError', async (t) => {
  const { client, url } = await serve(t)
  const error = await client({ url: `${url}/nope/` }).get('k').catch((e: unknown) => e)
  t.ok(error instanceof NotFoundError, 'a 404 without a lease is an error, not a miss')
  t.equal((error as CachewardenError).code, 'not_found')
})

t.test('transport failures are undici errors, not contract errors', async (t) => {
  const c = new CachewardenClient({ url: 'http://127.0.0.1:1', apiKey: 'x', timeoutMs: 2000 })
  t.teardown(() => c.close())
  const error = await c.get('k').catch((e: unknown) => e)
  t.ok(error instanceof Error)
  t.notOk(error instanceof CachewardenError)
})

t.test('a reply that is not cachewarden\'s (a proxy\'s page) is unexpected_response, even a 200', async (t) => {
  let reply = { status: 200, type: 'text/html', body: '<html>welcome to the hotel wifi</html>' }
  const proxy = createServer((_req, res) => res.writeHead(reply.status, { 'content-type': reply.type }).end(reply.body))
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => proxy.close(resolve)))
  const c = new CachewardenClient({ url: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`, apiKey: 'x' })
  t.teardown(() => c.close())
  for (const call of [() => c.get('k'), () => c.set('k', 1), () => c.invalidate({ keys: ['k'] }), () => c.batchGet(['k'])]) {
    const error = await call().catch((e: unknown) => e)
    t.ok(error instanceof CachewardenError, 'a 200 HTML page is not taken for a success')
    t.match(error, { code: 'unexpected_response', status: 200, body: reply.body })
  }
  reply = { status: 200, type: 'application/json', body: '{"hello":"world"}' }
  t.match(await c.get('k').catch((e: unknown) => e), { code: 'unexpected_response', message: /not an entry/ }, 'JSON that is not an entry is not one')
  reply = { status: 502, type: 'text/html', body: '<html>Bad Gateway</html>' }
  t.match(await c.get('k').catch((e: unknown) => e), { code: 'unexpected_response', status: 502 })
  // getOrSet: a cache that cannot answer is no reason to fail the caller.
  t.same(await c.getOrSetTraced('k', () => 'from the source'), { value: 'from the source', trace: { outcome: 'unavailable', waits: 0 } })
})

t.test('values JSON cannot carry are a TypeError before anything is sent', async (t) => {
  const { client } = await serve(t)
  const c = client()
  const cycle: Record<string, unknown> = {}
  cycle.self = cycle
  await t.rejects(c.set('k', () => 1), { name: 'TypeError', message: 'the value must be JSON (got function)' })
  await t.rejects(c.set('k', undefined), { name: 'TypeError', message: 'the value must be JSON (got undefined)' })
  await t.rejects(c.set('k', 10n), { name: 'TypeError', message: 'the value must be JSON (got bigint)' })
  await t.rejects(c.set('k', Number.NaN), { name: 'TypeError', message: 'the value must be JSON (got NaN)' }, 'JSON would send null')
  await t.rejects(c.set('k', { n: 10n }), { name: 'TypeError', message: /cannot be sent as JSON \(Do not know how to serialize a BigInt\)/ })
  await t.rejects(c.set('k', cycle), { name: 'TypeError', message: /cannot be sent as JSON \(Converting circular structure/ })
  await t.rejects(c.batchSet([{ key: 'j', value: 1 }, { key: 'k', value: Symbol('s') }]), { name: 'TypeError', message: 'batchSet item 1: the value must be JSON (got symbol)' })
  await t.rejects(c.getOrSet('k', () => 10n), TypeError, 'a loader returning a BigInt')
  t.equal((await c.lookup('k')).status, 'miss', 'nothing was written')
})

t.test('a signal abandons a call: AbortError, not a wait for the timeout', async (t) => {
  // A server that accepts and never answers.
  const accepted: Socket[] = []
  const silent = createNetServer((socket) => void accepted.push(socket))
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of accepted) socket.destroy()
    return new Promise((resolve) => silent.close(resolve))
  })
  const c = new CachewardenClient({ url: `http://127.0.0.1:${(silent.address() as AddressInfo).port}`, apiKey: 'x', timeoutMs: 30_000 })
  t.teardown(() => c.close())
  const started = Date.now()
  const stop = new AbortController()
  setTimeout(() => stop.abort(), 200)
  await t.rejects(c.get('k', { signal: stop.signal }), { name: 'AbortError' })
  t.ok(Date.now() - started < 5_000, `abandoned after ${Date.now() - started} ms`)
  const aborted = AbortSignal.abort()
  await t.rejects(c.set('k', 1, { signal: aborted }), { name: 'AbortError' }, 'an aborted signal sends nothing')

  // getOrSet waiting on another caller's fill: aborted mid-wait, it never loads.
  const { client } = await serve(t, { fillLeaseMs: 60_000 })
  const waiter = client()
  await client().lookup('w') // someone else holds the fill lease
  let loads = 0
  const controller = new AbortController()
  setTimeout(() => controller.abort(), 150)
  await t.rejects(waiter.getOrSet('w', () => ++loads, { maxWaitMs: 10_000, signal: controller.signal }), { name: 'AbortError' })
  t.equal(loads, 0)
  // Aborted with a reason: the wait rejects with that reason, as a request does.
  const reasoned = new AbortController()
  const reason = new Error('the caller gave up')
  setTimeout(() => reasoned.abort(reason), 150)
  await t.rejects(waiter.getOrSet('w', () => ++loads, { maxWaitMs: 10_000, signal: reasoned.signal }), reason)
  await t.rejects(c.get('k', { signal: AbortSignal.abort(reason) }), reason, 'a request rejects with it too')
  t.same(await waiter.getOrSetTraced('h', () => 'v', { signal: new AbortController().signal }), { value: 'v', trace: { outcome: 'filled', waits: 0 } }, 'a signal not aborted changes nothing')

  // The loader is handed the signal: a load that honours it stops with the call, nothing cached.
  const during = new AbortController()
  const handed: Array<AbortSignal | undefined> = []
  const load = waiter.getOrSet('l', ({ signal }) => {
    handed.push(signal)
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve('late'), 10_000)
      signal?.addEventListener('abort', () => {
        clearTimeout(timer)
        reject(signal.reason)
      })
    })
  }, { signal: during.signal })
  setTimeout(() => during.abort(), 100)
  await t.rejects(load, { name: 'AbortError' }, 'the load stopped with the call')
  t.equal(handed[0], during.signal, "the loader got the call's signal")
  t.equal((await waiter.lookup('l')).status, 'miss', 'nothing was written')
  await waiter.getOrSet('n', (context) => {
    t.same(context, { signal: undefined }, 'a call without a signal hands the loader none')
    return 1
  })
})

t.test('the constructor refuses bad options with TypeError', async (t) => {
  t.throws(() => new CachewardenClient({ url: 'ftp://x', apiKey: 'k' }), TypeError)
  t.throws(() => new CachewardenClient({ url: 'http://x', apiKey: '' }), TypeError)
  t.throws(() => new CachewardenClient(undefined as never), TypeError)
})

t.test('delete, invalidate by user and tag, and stale mode', async (t) => {
  const { client } = await serve(t)
  const c = client()
  await c.set('a', 1, { userId: 'u1' })
  await c.set('b', 2, { userId: 'u1', tags: ['t'] })
  await c.set('c', 3, { tags: ['t'] })
  await c.set('d', 4)
  const byUser = await c.invalidate({ userIds: ['u1'], reason: 'test' })
  t.equal(byUser.invalidated, 2)
  t.equal(byUser.mode, 'delete')
  t.type(byUser.id, 'string')
  t.equal((await c.invalidate({ tags: ['t'], mode: 'stale' })).invalidated, 1)
  t.equal(await c.get('c'), undefined, 'a stale entry is a miss by default')
  t.equal((await c.get('c', { allowStale: true }))?.stale, true)
  t.equal((await c.delete('d', { mode: 'stale' })).mode, 'stale')
})

t.test('batchGet and batchSet: leases for the missing, per-item results', async (t) => {
  const { client } = await serve(t)
  const c = client()
  await c.set('a', 'A')
  const got = await c.batchGet<string>(['a', 'b', 'c'])
  t.equal(got.entries.a?.value, 'A')
  t.same(got.missing, ['b', 'c'])
  t.equal(got.leases.b?.fill, true)
  await c.delete('c')
  const results = await c.batchSet([
    { key: 'b', value: 'B', lease: got.leases.b },
    { key: 'c', value: 'C', lease: got.leases.c!.lease },
    { key: 'd', value: 'D', ttlMs: 0 },
  ])
  t.same(results.map((r) => [r.key, r.status, r.error]), [['b', 200, undefined], ['c', 409, 'lease_invalidated'], ['d', 400, 'invalid_request']])
  t.equal((await c.get('b'))?.value, 'B')
  t.equal(await c.get('c'), undefined)
})

t.test('an option a call does not have is a TypeError before anything is sent', async (t) => {
  const { client, app } = await serve(t)
  const c = client()
  await c.set('e1', 1, { userId: 'u', tags: ['t'] })
  const sets = app.cache.totals.sets
  // From JavaScript nothing stops a typo: each would have done something else without a word.
  const typo = <T>(options: object) => options as T
  await t.rejects(c.set('e2', 2, typo({ userid: 'u' })), { name: 'TypeError', message: /set options has no "userid"/ })
  await t.rejects(c.delete('e1', typo({ Mode: 'stale' })), { name: 'TypeError', message: /delete options has no "Mode"/ })
  await t.rejects(c.get('e1', typo({ allowstale: true })), TypeError)
  await t.rejects(c.lookup('e1', typo({ ifnonematch: 'x' })), TypeError)
  await t.rejects(c.batchGet(['e1'], typo({ allowstale: true })), TypeError)
  await t.rejects(c.invalidate({ userIds: ['u'] }, typo({ mode: 'stale' })), TypeError) // the mode goes in the selector
  let loads = 0
  await t.rejects(c.getOrSet('e5', () => ++loads, typo({ ttl: 1000 })), { name: 'TypeError', message: /getOrSet options has no "ttl"/ })
  t.equal(loads, 0, 'the loader did not run')
  t.equal(app.cache.totals.sets, sets, 'nothing was written')
  t.match(await c.get('e1'), { value: 1, userId: 'u', stale: false }, 'nothing was deleted or marked stale')
  // An option set to undefined is not given.
  t.equal((await c.set('e6', 6, typo({ ttlMs: undefined, userid: undefined }))).key, 'e6')

  // batchSet items go as given: the server refuses an unknown field in that item alone.
  const read = Object.values((await c.batchGet(['e1'])).entries) // carries etag, stale…
  const results = await c.batchSet([...read, typo({ key: 'e7', value: 7, userid: 'u' }), { key: 'e8', value: 8, userId: 'u' }])
  t.match(results, [
    { key: 'e1', status: 400, error: 'invalid_request', message: /entries\[0\]\.\w+ is not allowed/ },
    { key: 'e7', status: 400, error: 'invalid_request', message: 'entries[1].userid is not allowed' },
    { key: 'e8', status: 200 },
  ])
})

t.test('batchSet reads fields as properties, never drops a lease, and leaves a bad item to the server', async (t) => {
  const { client } = await serve(t)
  const c = client()
  // A row class with its fields behind getters: a spread or JSON would lose them.
  class Row {
    readonly #user: string
    constructor(readonly key: string, readonly value: unknown, user: string) {
      this.#user = user
    }
    get userId() {
      return this.#user
    }
  }
  t.match(await c.batchSet([new Row('r1', 1, 'u9') as never]), [{ key: 'r1', status: 200 }])
  t.equal((await c.invalidate({ userIds: ['u9'] })).invalidated, 1, 'stored under its user')

  // A lease that is no lease is refused, never dropped (which would write unchecked).
  const miss = await c.lookup('l1')
  await c.delete('l1') // voids that lease
  const results = await c.batchSet([
    { key: 'l1', value: 1, lease: {} as never },
    { key: 'l1', value: 1, lease: 5 as never },
    null as never,
    { key: 'l2', value: 2 },
  ])
  t.match(results, [{ key: 'l1', status: 400 }, { key: 'l1', status: 400 }, { status: 400 }, { key: 'l2', status: 200 }])
  await t.rejects(c.set('l1', 1, { lease: {} as never }), { name: 'InvalidRequestError' })
  // What JSON would drop without a word is a TypeError: a lease (the write would go unchecked),
  // a userId method (stored with no user), a NaN ttlMs (sent as null: the default TTL).
  const token = miss.status === 'miss' ? miss.lease.lease : ''
  await t.rejects(c.set('l1', 1, { lease: (() => token) as never }), { name: 'TypeError', message: 'set options: lease must be JSON (got function)' })
  await t.rejects(c.batchSet([{ key: 'l1', value: 1, lease: (() => token) as never }]), { name: 'TypeError', message: /batchSet item 0: lease/ })
  await t.rejects(c.batchSet([{ key: 'm', value: 1, userId: function () {} as never }]), { name: 'TypeError', message: /batchSet item 0: userId/ })
  await t.rejects(c.set('m', 1, { ttlMs: Number.NaN }), { name: 'TypeError', message: 'set options: ttlMs must be JSON (got NaN)' })
  // A misspelt value is the server's per-item 400, not a TypeError for the batch.
  t.match(await c.batchSet([{ key: 'v1', valeu: 1 } as never, { key: 'v2', value: 2 }]), [{ key: 'v1', status: 400 }, { key: 'v2', status: 200 }])
  t.equal(await c.get('l1'), undefined, 'nothing was written with a voided lease')
  t.equal(miss.status, 'miss')
})

t.test("set takes every field the PUT body has (the client keeps its own list)", async (t) => {
  const { client } = await serve(t)
  const c = client()
  for (const field of Object.keys(WriteBody.properties).filter((f) => f !== 'value')) {
    // null is a valid "not given" for each of today's fields; a new field may refuse it, but
    // with the server's 400, never the client's TypeError.
    await c.set('k', 1, { [field]: null }).catch((error: unknown) => t.notOk(error instanceof TypeError, `${field}: ${error}`))
  }
  t.pass('no field refused by the client')
})

t.test('invalidate refuses a misspelt selector field before sending, and takes every field the selector has', async (t) => {
  const { app, client } = await serve(t)
  const c = client()
  let sent = 0
  app.server.on('request', () => void sent++)
  await t.rejects(c.invalidate({ userid: ['1'] } as never), { name: 'TypeError', message: /selector has no "userid"/ })
  await t.rejects(c.invalidate({ keys: ['a'], Mode: 'stale' } as never), { name: 'TypeError', message: /selector has no "Mode"/ })
  t.equal(sent, 0, 'nothing was sent')
  for (const field of Object.keys(SelectorBody.properties)) {
    await c.invalidate({ keys: ['a'], [field]: null }).catch((error: unknown) => t.notOk(error instanceof TypeError, `${field}: ${error}`))
  }
  t.equal(sent, Object.keys(SelectorBody.properties).length, 'each field was sent')
})

t.test('requests share keep-alive connections from the pool', async (t) => {
  const { app, client } = await serve(t)
  let connections = 0
  app.server.on('connection', () => connections++)
  const c = client({ connections: 2 })
  for (let i = 0; i < 20; i++) await c.get(`k${i}`)
  await Promise.all(Array.from({ length: 20 }, (_, i) => c.get(`p${i}`)))
  t.ok(connections >= 1 && connections <= 2, `40 requests over at most the pool's 2 sockets (${connections})`)
})

t.test('getOrSet', async (t) => {
  t.test('loads once, then hits', async (t) => {
    const { client } = await serve(t)
    const c = client()
    let loads = 0
    const loader = async () => ({ n: ++loads })
    const first = await c.getOrSetTraced('k', loader, { userId: 'u', tags: ['t'], ttlMs: 60_000 })
    t.same(first, { value: { n: 1 }, trace: { outcome: 'filled', waits: 0 } })
    const second = await c.getOrSetTraced('k', loader)
    t.same(second, { value: { n: 1 }, trace: { outcome: 'hit', waits: 0 } })
    const entry = await c.get('k')
    t.equal(entry?.userId, 'u', 'the write options are passed on')
    t.same(entry?.tags, ['t'])
  })

  t.test('concurrent callers on a cold key: one loads, the others wait for it', async (t) => {
    const { client } = await serve(t)
    const callers = Array.from({ length: 10 }, () => client({ connections: 1 }))
    let loads = 0
    const loader = async () => {
      loads++
      await sleep(150)
      return 'value'
    }
    const results = await Promise.all(callers.map((c) => c.getOrSetTraced('cold', loader)))
    t.equal(loads, 1)
    t.ok(results.every((r) => r.value === 'value'))
    const outcomes = results.map((r) => r.trace.outcome).sort()
    t.same(outcomes, ['filled', ...Array(9).fill('waited_hit')])
  })

  t.test('an invalidation during the load: the value is returned but not cached', async (t) => {
    const { app, client } = await serve(t)
    const c = client()
    const other = client()
    const result = await c.getOrSetTraced('k', async () => {
      await other.invalidate({ userIds: ['u1'] })
      return 'read before the change'
    }, { userId: 'u1' })
    t.same(result, { value: 'read before the change', trace: { outcome: 'fill_refused', waits: 0 } })
    // Inspected, not read: a read's miss would take the fill lease itself.
    t.equal(await app.cache.inspect('k'), undefined, 'nothing stale was cached')
    const next = await c.getOrSetTraced('k', async () => 'fresh', { userId: 'u1' })
    t.same(next.trace, { outcome: 'filled', waits: 0 }, 'the refused fill released the fill lease')
    t.equal((await c.get('k'))?.value, 'fresh')
  })

  t.test('an abandoned fill lease: the waiter fills once the server hands it over', async (t) => {
    const { client } = await serve(t, { fillLeaseMs: 300 })
    const c = client()
    const taken = await c.lookup('k')
    t.ok(taken.status === 'miss' && taken.lease.fill, 'someone took the fill lease and never wrote')
    let loads = 0
    const result = await c.getOrSetTraced('k', async () => ++loads)
    t.equal(result.value, 1)
    t.equal(result.trace.outcome, 'filled')
    t.ok(result.trace.waits > 0, `waited ${result.trace.waits} times`)
    t.equal((await c.get('k'))?.value, 1)
  })

  t.test('maxWaitMs bounds the wait: the caller loads itself and still writes with its lease', async (t) => {
    const { client } = await serve(t, { fillLeaseMs: 60_000 })
    const c = client()
    await c.lookup('k')
    let loads = 0
    const result = await c.getOrSetTraced('k', async () => ++loads, { maxWaitMs: 200 })
    t.equal(loads, 1)
    t.equal(result.trace.outcome, 'loaded_after_wait')
    t.equal((await c.get('k'))?.value, 1, 'its lease was still valid, so it was cached')
  })

  t.test('a loader returning undefined gets it back, uncached; null is cached', async (t) => {
    const { app, client } = await serve(t)
    const c = client()
    t.same(await c.getOrSetTraced('k', () => undefined), { value: undefined, trace: { outcome: 'not_cached', waits: 0 } })
    t.equal(await app.cache.inspect('k'), undefined)
    t.same(await c.getOrSetTraced('n', () => null), { value: null, trace: { outcome: 'filled', waits: 0 } })
    t.equal((await c.get('n'))?.value, null)
  })

  t.test('a loader error propagates and caches nothing', async (t) => {
    const { client } = await serve(t)
    const c = client()
    await t.rejects(c.getOrSet('k', async () => { throw new Error('db down') }), { message: 'db down' })
    t.equal(await c.get('k'), undefined)
  })

  t.test('a fill lease that ends with nothing written is given back: the next caller fills at once', async (t) => {
    const { client } = await serve(t, { fillLeaseMs: 60_000 }) // waiting it out would take a minute
    const other = client()
    // Each case on a client of its own, closed after it: close() waits for the lease given
    // back in the background, so the next caller's miss comes after it.
    const cases: Array<[string, (c: CachewardenClient, key: string) => Promise<unknown>]> = [
      ['a loader error', (c, key) => c.getOrSet(key, async () => { throw new Error('db down') }).catch(() => undefined)],
      ['a loader returning undefined', (c, key) => c.getOrSet(key, () => undefined)],
      ['a loader error, with the lease kept from get()', async (c, key) => {
        await c.get(key)
        await c.getOrSet(key, async () => { throw new Error('db down') }).catch(() => undefined)
      }],
      // The write carried the lookup's newer lease, whose refusal ends no fill lease.
      ['a refused write, with the lease kept from get()', async (c, key) => {
        await c.get(key)
        const refused = await c.getOrSetTraced(key, async () => {
          await other.invalidate({ userIds: [`u-${key}`] }) // does not end the fill lease; refuses the write
          return 'old'
        }, { userId: `u-${key}` })
        t.equal(refused.trace.outcome, 'fill_refused')
      }],
    ]
    for (const [i, [name, run]] of cases.entries()) {
      const c = client()
      await run(c, `k${i}`)
      await c.close()
      t.same(await other.getOrSetTraced(`k${i}`, () => 'v'), { value: 'v', trace: { outcome: 'filled', waits: 0 } }, `after ${name}`)
    }
  })

  t.test('with a source that keeps failing, the callers still load one at a time', async (t) => {
    const { client } = await serve(t, { fillLeaseMs: 60_000 })
    const callers = Array.from({ length: 3 }, () => client())
    let inFlight = 0
    let most = 0
    let calls = 0
    const failing = async () => {
      calls++
      most = Math.max(most, ++inFlight)
      await sleep(30)
      inFlight--
      throw new Error('db down')
    }
    const results = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => callers[i % 3]!.getOrSet('down', failing, { maxWaitMs: 30_000 })))
    t.ok(results.every((r) => r.status === 'rejected'), 'every caller gets the error')
    t.equal(calls, 12, 'each caller asked the source once, in turn')
    t.equal(most, 1, 'never two at once')
  })

  t.test('a write the cache cannot store (503) still returns the loaded value', { skip: !hasRedisServer() && process.env.CI !== 'true' }, async (t) => {
    const redis = await startRedis(t)
    const { client } = await serve(t, { redisUrl: redis.url })
    const c = client()
    let loads = 0
    const got = await c.getOrSetTraced('k', async () => {
      loads++
      await redis.stop() // between the miss and the write
      return { fresh: true }
    })
    t.same(got, { value: { fresh: true }, trace: { outcome: 'unavailable', waits: 0 } })
    t.equal(loads, 1)
    // With Redis down before the call, reads are misses (never a 5xx) and writes 503: every
    // caller loads from the source, as it would without a cache, and none fails.
    t.same(await c.getOrSetTraced('k2', () => 2), { value: 2, trace: { outcome: 'unavailable', waits: 0 } })
    // Other clients still see the 503 on a plain write.
    await t.rejects(c.set('k3', 3), BackendUnavailableError)
  })

  t.test('cachewarden down: every caller gets the loaded value (unavailable), none fails', async (t) => {
    const c = new CachewardenClient({ url: 'http://127.0.0.1:1', apiKey: 'x', timeoutMs: 2000 })
    t.teardown(() => c.close())
    let loads = 0
    const results = await Promise.all(Array.from({ length: 3 }, () => c.getOrSetTraced('k', () => ++loads)))
    t.same(results.map((r) => r.trace), Array(3).fill({ outcome: 'unavailable', waits: 0 }))
    t.equal(loads, 3, 'each loaded from the source, as without a cache')
    await t.rejects(c.getOrSet('k', () => { throw new Error('db down') }), { message: 'db down' }, 'loader errors still propagate')
  })

  t.test('a value over the limit (413) is returned, not cached: too_large', async (t) => {
    const { client } = await serve(t)
    const c = client()
    const big = 'x'.repeat(DEFAULT_LIMITS.maxValueBytes + 1)
    const got = await c.getOrSetTraced('big', () => big)
    t.equal(got.value, big)
    t.same(got.trace, { outcome: 'too_large', waits: 0 })
    t.equal((await c.lookup('big')).status, 'miss')
  })

  t.test('a fill lease this client\'s get() or batchGet() took is used by its getOrSet, not waited out', async (t) => {
    const { client } = await serve(t) // FILL_LEASE_MS at its default, 2 s
    const c = client()
    t.equal(await c.get('k'), undefined, 'a miss: the server handed this client the fill lease')
    const started = Date.now()
    const got = await c.getOrSetTraced('k', () => 'loaded')
    t.same(got.trace, { outcome: 'filled', waits: 0 }, `filled at once (${Date.now() - started} ms), with that lease`)
    t.equal((await c.get('k'))?.value, 'loaded')

    const result = await c.batchGet(['b1', 'b2'])
    t.same(result.missing.sort(), ['b1', 'b2'])
    t.same((await c.getOrSetTraced('b2', () => 2)).trace, { outcome: 'filled', waits: 0 }, 'batchGet\'s lease too')

    // Another client's get() holds the lease: this one waits, as the protocol says.
    const other = client()
    await other.get('w')
    const waited = await c.getOrSetTraced('w', () => 'w', { maxWaitMs: 300 })
    t.ok(waited.trace.waits > 0, `waited ${waited.trace.waits} times on another client's lease`)

    // Kept only as long as the server's fill lease lasts: after that another caller may hold it.
    const short = await serve(t, { fillLeaseMs: 300 })
    const mine = short.client({ fillLeaseMs: 300 })
    await mine.get('s')
    await sleep(400)
    await short.client().get('s') // the server hands the fill lease to another caller
    const afterExpiry = await mine.getOrSetTraced('s', () => 's', { maxWaitMs: 100 })
    t.ok(afterExpiry.trace.waits > 0, 'an expired kept lease is not used: it waits on the new holder')
    t.throws(() => new CachewardenClient({ url: 'http://x', apiKey: 'k', fillLeaseMs: -1 }), TypeError)

    // The kept lease lets it fill now; the write carries getOrSet's own, newer lease: its loader
    // runs after an invalidation that came since the get(), and what it loads is kept.
    await c.get('v')
    await other.invalidate({ userIds: ['u-v'] })
    const filled = await c.getOrSetTraced('v', () => 'loaded after', { userId: 'u-v' })
    t.same(filled.trace, { outcome: 'filled', waits: 0 }, 'filled at once, and kept')
    t.equal((await other.get('v'))?.value, 'loaded after')
    // An invalidation while the loader runs still refuses it.
    await c.get('v2')
    const refused = await c.getOrSetTraced('v2', async () => {
      await other.invalidate({ userIds: ['u-v2'] })
      return 'read before the invalidation'
    }, { userId: 'u-v2' })
    t.same(refused.trace, { outcome: 'fill_refused', waits: 0 })
    t.equal((await c.lookup('v2')).status, 'miss', 'nothing was cached')
  })

  t.test('maxWaitMs must be a number of ms; a key that no URL can carry is a TypeError', async (t) => {
    const { client } = await serve(t)
    const c = client()
    for (const maxWaitMs of [Number.NaN, 'abc', -1, null]) {
      await t.rejects(c.getOrSet('k', () => 1, { maxWaitMs: maxWaitMs as number }), { name: 'TypeError', message: /maxWaitMs must be a number/ }, String(maxWaitMs))
    }
    const lone = 'k\ud800'
    for (const call of [() => c.get(lone), () => c.set(lone, 1), () => c.delete(lone), () => c.getOrSet(lone, () => 1), () => c.lookup(lone)]) {
      await t.rejects(call() as Promise<unknown>, { name: 'TypeError', message: /well-formed Unicode/ })
    }
  })

  t.test('close() waits for getOrSet calls in flight, their loads and writes; closing again is the same close', async (t) => {
    const { client } = await serve(t)
    const c = client()
    let release!: () => void
    const loading = new Promise<void>((resolve) => (release = resolve))
    const call = c.getOrSetTraced('slow', async () => {
      await loading
      return 'loaded'
    })
    await sleep(50) // the loader is running
    let closed = false
    const closing = c.close().then(() => (closed = true))
    await sleep(50)
    t.equal(closed, false, 'not closed while the loader runs')
    release()
    t.same(await call, { value: 'loaded', trace: { outcome: 'filled', waits: 0 } })
    await closing
    t.equal(closed, true)
    await c.close() // again: no error
    t.equal((await client().get('slow'))?.value, 'loaded', 'the write landed before the pool closed')
    await t.rejects(c.get('slow'), 'a call after close fails')
  })

  t.test('cache errors other than 409 propagate', async (t) => {
    const { client } = await serve(t)
    const c = client({ apiKey: KEYS.read })
    const error = await c.getOrSet('k', () => 1).catch((e: unknown) => e)
    t.ok(error instanceof ForbiddenError, 'a read-only key cannot fill')
  })
})
