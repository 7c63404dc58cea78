import { request as httpRequest, type IncomingMessage } from 'node:http'
import { connect } from 'node:net'
import { once } from 'node:events'
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { KEYS, build, call } from '../helpers/build.js'

const STREAM = '/v1/invalidations/stream'

async function listen(app: FastifyInstance): Promise<number> {
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  return address.port
}

/** Opens the stream on a real socket and collects what arrives. */
async function openStream(port: number, key: keyof typeof KEYS = 'read', headers: Record<string, string> = {}) {
  const req = httpRequest({ host: '127.0.0.1', port, path: STREAM, headers: { authorization: `Bearer ${KEYS[key]}`, ...headers } })
  req.end()
  const [res] = (await once(req, 'response')) as [IncomingMessage]
  res.setEncoding('utf8')
  let text = ''
  const waiters: Array<() => void> = []
  res.on('data', (chunk: string) => {
    text += chunk
    for (const w of waiters.splice(0)) w()
  })
  return {
    req,
    res,
    text: () => text,
    /** Resolves once the received text satisfies `test`. */
    async until(test: (text: string) => boolean, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs
      while (!test(text)) {
        if (Date.now() > deadline) throw new Error(`timed out; received so far: ${text.slice(0, 500)}`)
        await new Promise<void>((resolve) => {
          waiters.push(resolve)
          setTimeout(resolve, 200).unref()
        })
      }
    },
  }
}

/** Parses the `invalidation` events out of an SSE text. */
function events(text: string) {
  return text
    .split('\n\n')
    .slice(0, -1) // the last piece is an incomplete block (or empty)
    .filter((block) => block.includes('event: invalidation'))
    .map((block) => {
      const data = block.split('\n').find((line) => line.startsWith('data: '))
      const id = block.split('\n').find((line) => line.startsWith('id: '))
      return { id: id?.slice(4), data: JSON.parse(data!.slice(6)) }
    })
}

async function waitFor(what: string, test: () => boolean, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs
  while (!test()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
}

t.test('an invalidation made on the API arrives on the stream over a real socket', async (t) => {
  const app = await build(t)
  const port = await listen(app)
  const stream = await openStream(port)
  t.equal(stream.res.statusCode, 200)
  t.match(stream.res.headers['content-type'], /^text\/event-stream/)
  t.equal(stream.res.headers['cache-control'], 'no-cache, no-transform')
  await waitFor('the client to register', () => app.invalidationStream.clients() === 1)

  await call(app, { method: 'PUT', url: '/v1/entries/a', payload: { value: 1, userId: 'u-1' } })
  await call(app, { method: 'PUT', url: '/v1/entries/b', payload: { value: 2, userId: 'u-1' } })
  const res = await call(app, { method: 'DELETE', url: '/v1/users/u-1/entries?mode=stale', key: 'invalidate' })
  t.equal(res.statusCode, 200)
  const result = res.json()

  await stream.until((text) => events(text).length >= 1)
  const [event] = events(stream.text())
  t.equal(event!.id, result.id, 'the SSE id is the invalidation id')
  t.same(event!.data, {
    id: result.id,
    selector: { userIds: ['u-1'] },
    mode: 'stale',
    source: 'api',
    invalidated: 2,
    durationMs: event!.data.durationMs,
    at: event!.data.at,
  })
  t.equal(event!.data.durationMs, result.durationMs, 'durationMs as the reply had it')
  t.ok(!Number.isNaN(Date.parse(event!.data.at)), 'at is a timestamp')

  // A second invalidation of another kind is a second event, in order.
  const second = (await call(app, { method: 'POST', url: '/v1/invalidations', payload: { prefixes: ['a'] }, key: 'invalidate' })).json()
  await stream.until((text) => events(text).length >= 2)
  t.same(events(stream.text()).map((e) => e.id), [result.id, second.id])
  stream.req.destroy()
})

t.test('a stream outlives the request timeout: it limits receiving a request, not answering it', async (t) => {
  const app = await build(t, { requestTimeoutMs: 1000 })
  const port = await listen(app)
  const stream = await openStream(port)
  await waitFor('the client to register', () => app.invalidationStream.clients() === 1)
  await new Promise((resolve) => setTimeout(resolve, 2500)) // past the timeout and Node's check interval
  const result = (await call(app, { method: 'DELETE', url: '/v1/entries/late', key: 'invalidate' })).json()
  await stream.until((text) => events(text).length >= 1)
  t.equal(events(stream.text())[0]!.id, result.id, 'the event arrives on the stream opened 2.5 s earlier')
  stream.req.destroy()
})

t.test('the stream needs a key with the read scope', async (t) => {
  const app = await build(t)
  const none = await call(app, { method: 'GET', url: STREAM, key: null })
  t.equal(none.statusCode, 401)
  t.equal(none.json().error, 'unauthorized')
  const writer = await call(app, { method: 'GET', url: STREAM, key: 'write' })
  t.equal(writer.statusCode, 403)
  t.equal(writer.json().error, 'forbidden')
  t.equal(app.invalidationStream.clients(), 0)
})

t.test('HEAD of the stream answers the headers a GET starts with, and ends', async (t) => {
  const app = await build(t)
  const head = await call(app, { method: 'HEAD', url: STREAM, key: 'read' })
  t.equal(head.statusCode, 200)
  t.match(head.headers['content-type'], /^text\/event-stream/)
  t.equal(head.body, '')
  t.equal(app.invalidationStream.clients(), 0, 'no client is kept')
  t.equal((await call(app, { method: 'HEAD', url: STREAM, key: null })).statusCode, 401)
  t.equal((await call(app, { method: 'HEAD', url: STREAM, key: 'write' })).statusCode, 403)
  // Over a real socket it ends at once, where a GET stays open.
  const port = await listen(app)
  const res = await fetch(`http://127.0.0.1:${port}${STREAM}`, { method: 'HEAD', headers: { authorization: `Bearer ${KEYS.read}` }, signal: AbortSignal.timeout(5000) })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-length'), null, 'no content-length: a GET has none')
  t.equal(res.headers.get('cache-control'), 'no-cache, no-transform')
  t.equal(await res.text(), '')
})

t.test('a client that goes away is removed from the stream', async (t) => {
  const app = await build(t)
  const port = await listen(app)
  const listeners = app.cache.listenerCount('invalidation')
  const stays = await openStream(port)
  const leaves = await openStream(port)
  await waitFor('both clients to register', () => app.invalidationStream.clients() === 2)
  leaves.req.destroy()
  await waitFor('the gone client to be removed', () => app.invalidationStream.clients() === 1)
  t.equal(app.invalidationStream.clients(), 1)
  t.equal(app.cache.listenerCount('invalidation'), listeners, 'one listener for all clients, not one per client')

  // Broadcasting after the removal reaches the client that stayed and nothing breaks.
  await call(app, { method: 'DELETE', url: '/v1/entries/x', key: 'invalidate' })
  await stays.until((text) => events(text).length === 1)
  stays.req.destroy()
  await waitFor('the last client to be removed', () => app.invalidationStream.clients() === 0)
  t.pass('both clients cleaned up')
})

t.test('a client that stops reading is disconnected once its buffer passes the bound', async (t) => {
  const app = await build(t, { streamMaxBufferBytes: 1024 })
  const port = await listen(app)
  const reader = await openStream(port)

  // A raw socket that sends the request and then never reads a byte.
  const slow = connect(port, '127.0.0.1')
  await once(slow, 'connect')
  slow.write(`GET ${STREAM} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${KEYS.read}\r\n\r\n`)
  slow.pause()
  let slowClosed = false
  slow.on('close', () => (slowClosed = true))
  slow.on('error', () => {})
  await waitFor('both clients to register', () => app.invalidationStream.clients() === 2)

  // Each event carries a large selector, so the kernel's socket buffers fill after a few.
  const keys = Array.from({ length: 1000 }, (_, i) => `${'k'.repeat(400)}-${i}`)
  let sent = 0
  const statuses = new Set<number>()
  while (app.invalidationStream.clients() === 2 && sent < 200) {
    const res = await call(app, { method: 'POST', url: '/v1/invalidations', payload: { keys }, key: 'invalidate' })
    statuses.add(res.statusCode)
    sent++
    // Let the reader drain, so only the paused socket backs up.
    await reader.until((text) => events(text).length >= sent)
  }
  t.same([...statuses], [200], 'invalidations kept succeeding')
  t.equal(app.invalidationStream.clients(), 1, `the slow client was dropped after ${sent} events`)
  // Reading what the kernel already holds, the slow client then sees the connection end.
  slow.resume()
  await waitFor('the slow socket to be closed', () => slowClosed)
  t.ok(slowClosed)
  t.equal(events(reader.text()).length, sent, 'the reading client got every event')
  slow.destroy()
  reader.req.destroy()
})

t.test('heartbeats are comment lines at the configured interval', async (t) => {
  const app = await build(t, { streamHeartbeatMs: 100 })
  const port = await listen(app)
  const stream = await openStream(port)
  await stream.until((text) => (text.match(/^: heartbeat$/gm) ?? []).length >= 2)
  t.match(stream.text(), /^retry: \d+$/m, 'tells EventSource how long to wait before reconnecting')
  t.equal(events(stream.text()).length, 0, 'no invalidation, no event')
  stream.req.destroy()
})

t.test('closing the app ends open streams instead of waiting on them', async (t) => {
  const app = await build(t)
  const port = await listen(app)
  const stream = await openStream(port)
  await waitFor('the client to register', () => app.invalidationStream.clients() === 1)
  const ended = once(stream.res, 'end')
  const started = Date.now()
  await app.close()
  await ended
  t.equal(app.invalidationStream.clients(), 0)
  t.ok(Date.now() - started < 10_000, 'close did not wait for a grace period')
})

t.test('a stream, ended or probed with HEAD, is not in the request latency histogram (its time is how long it stayed open)', async (t) => {
  const app = await build(t)
  const port = await listen(app)
  t.equal((await call(app, { method: 'HEAD', url: STREAM, key: 'read' })).statusCode, 200)
  t.equal((await call(app, { method: 'GET', url: '/v1/entries/x', key: 'read' })).statusCode, 404)
  const stream = await openStream(port)
  await waitFor('the client to register', () => app.invalidationStream.clients() === 1)
  await new Promise((resolve) => setTimeout(resolve, 50))
  const ended = once(stream.res, 'end')
  await app.close() // ends the stream: Fastify runs onResponse for a hijacked reply when it ends
  await ended
  const scraped = await app.metrics.registry.metrics()
  t.match(scraped, /cachewarden_http_request_duration_seconds_count\{/, 'requests are observed')
  t.notMatch(scraped, /route="\/v1\/invalidations\/stream"/, 'the stream is not')
})

t.test('the stream settings come from the environment and bad values stop the start', async (t) => {
  const { loadConfig, ConfigError } = await import('../../src/config.js')
  const config = loadConfig({ STREAM_HEARTBEAT_MS: '2000', STREAM_MAX_BUFFER_BYTES: '65536' })
  t.equal(config.streamHeartbeatMs, 2000)
  t.equal(config.streamMaxBufferBytes, 65536)
  t.equal(loadConfig({}).streamHeartbeatMs, 15_000, 'default heartbeat')
  t.throws(() => loadConfig({ STREAM_HEARTBEAT_MS: '10' }), ConfigError)
  t.throws(() => loadConfig({ STREAM_MAX_BUFFER_BYTES: 'lots' }), /STREAM_MAX_BUFFER_BYTES/)
})

t.test('a reconnect with Last-Event-ID replays what followed it, or says to resync', async (t) => {
  const app = await build(t, { invalidationLogSize: 3 })
  const port = await listen(app)
  const invalidate = async (key: string) =>
    (await call(app, { method: 'DELETE', url: `/v1/entries/${key}`, key: 'invalidate' })).json().id as string
  const a = await invalidate('a')
  const b = await invalidate('b')
  const c = await invalidate('c')

  const resumed = await openStream(port, 'read', { 'last-event-id': a })
  await untilEvents(resumed, 2)
  t.same(events(resumed.text()).map((e) => e.id), [b, c], 'the missed events, oldest first')
  t.same(events(resumed.text()).map((e) => e.data.selector.keys[0]), ['b', 'c'])
  const d = await invalidate('d')
  await untilEvents(resumed, 3)
  t.same(events(resumed.text()).map((e) => e.id), [b, c, d], 'then the live ones')

  const current = await openStream(port, 'read', { 'last-event-id': d })
  const e = await invalidate('e')
  await untilEvents(current, 1)
  t.same(events(current.text()).map((x) => x.id), [e], 'nothing replayed when it missed nothing')

  // The log holds 3: a has fallen out of it.
  const tooOld = await openStream(port, 'read', { 'last-event-id': a })
  await tooOld.until((text) => text.includes('event: reset'))
  t.equal(events(tooOld.text()).length, 0, 'no partial replay')
  t.match(tooOld.text(), /event: reset\ndata: \{"reason":"[^"]+"\}\n\n/)
  for (const s of [resumed, current, tooOld]) s.req.destroy()
})

async function untilEvents(stream: Awaited<ReturnType<typeof openStream>>, n: number) {
  await stream.until((text) => events(text).length >= n)
}

t.test('an emergency clear is an invalidation event of everything, then a reset, live and on a later reconnect', async (t) => {
  const app = await build(t)
  const port = await listen(app)
  const before = (await call(app, { method: 'DELETE', url: '/v1/entries/a', key: 'invalidate' })).json().id as string
  const live = await openStream(port)
  await waitFor('the client to register', () => app.invalidationStream.clients() === 1)

  const token = await call(app, { method: 'POST', url: '/v1/admin/clear-token', payload: { reason: 'test' } })
  t.equal(token.statusCode, 200)
  const cleared = await call(app, { method: 'POST', url: '/v1/admin/clear', payload: { token: token.json().token } })
  t.equal(cleared.statusCode, 200)
  await live.until((text) => text.includes('event: reset'))
  t.match(live.text(), /event: reset\ndata: \{"reason":"the cache was cleared[^"]*"\}\n\n/)
  // For clients that only listen to `invalidation` events: the clear is one, of everything.
  t.match(events(live.text()), [{ data: { selector: { all: true }, mode: 'delete', source: 'admin' } }])
  t.ok(live.text().indexOf('event: invalidation') < live.text().indexOf('event: reset'), 'the event, then the reset')

  // A client that last saw an event from before the clear missed it: reset, not a replay.
  const missed = await openStream(port, 'read', { 'last-event-id': before })
  await missed.until((text) => text.includes('event: reset'))
  t.match(missed.text(), /the cache was cleared/)
  t.equal(events(missed.text()).length, 0)

  // One that saw an event from after the clear gets a plain replay.
  const after = (await call(app, { method: 'DELETE', url: '/v1/entries/b', key: 'invalidate' })).json().id as string
  const later = (await call(app, { method: 'DELETE', url: '/v1/entries/c', key: 'invalidate' })).json().id as string
  const fine = await openStream(port, 'read', { 'last-event-id': after })
  await untilEvents(fine, 1)
  t.same(events(fine.text()).map((e) => e.id), [later])
  t.notMatch(fine.text(), /event: reset/)
  for (const s of [live, missed, fine]) s.req.destroy()
})
