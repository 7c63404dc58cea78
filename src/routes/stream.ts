import type { OutgoingHttpHeaders, ServerResponse } from 'node:http'
import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import type { InvalidationRecord } from '../cache/types.js'
import { authErrors } from '../schemas/common.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The open `GET /v1/invalidations/stream` connections. */
    invalidationStream: { clients(): number }
  }
}

/** Tells EventSource clients how long to wait before reconnecting. */
const RETRY_MS = 3000
const STREAM_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache, no-transform',
  // Tells nginx-style proxies not to buffer the stream.
  'x-accel-buffering': 'no',
}

const EXAMPLE =
  'id: 3b0f4c3e-8a51-4a43-9d0e-2f1c1d6f9a10\nevent: invalidation\n' +
  'data: {"id":"3b0f4c3e-8a51-4a43-9d0e-2f1c1d6f9a10","selector":{"userIds":["42"]},"mode":"delete",' +
  '"source":"api","invalidated":3,"durationMs":0.12,"at":"2026-11-22T10:00:00.000Z"}\n\n'

/** A `reset` event: the client must drop or revalidate every copy it kept. */
const resetFrame = (reason: string) => `event: reset\ndata: ${JSON.stringify({ reason })}\n\n`
const RESET_UNKNOWN_ID = resetFrame('events since Last-Event-ID are no longer available; drop or revalidate kept copies')
const resyncFrame = (reason: string) => resetFrame(`${reason}; drop or revalidate every kept copy`)

/** The SSE frame of one invalidation; built once and written to every client. */
export function invalidationFrame(record: InvalidationRecord): string {
  // Not the actor or reason: any `read` key may listen, and those are for admins (debug invalidations).
  const { id, selector, mode, source, invalidated, durationMs, at } = record
  return `id: ${id}\nevent: invalidation\ndata: ${JSON.stringify({ id, selector, mode, source, invalidated, durationMs, at })}\n\n`
}

/**
 * `GET /v1/invalidations/stream`: one Server-Sent Event per invalidation, from the core's
 * `invalidation` event, plus heartbeat comments. A client that reads too slowly to keep
 * its unsent bytes under `streamMaxBufferBytes` is disconnected rather than buffered
 * without bound; streams are ended before the server closes so shutdown is not held up.
 */
export default fp(
  async function streamRoutes(app: FastifyInstance) {
    const { streamHeartbeatMs, streamMaxBufferBytes } = app.config
    const clients = new Set<ServerResponse>()
    let heartbeat: NodeJS.Timeout | undefined

    const remove = (res: ServerResponse) => {
      clients.delete(res)
      if (clients.size === 0 && heartbeat !== undefined) {
        clearInterval(heartbeat)
        heartbeat = undefined
      }
    }
    const send = (res: ServerResponse, chunk: string) => {
      if (res.destroyed || res.writableEnded) return remove(res)
      if (res.writableLength > streamMaxBufferBytes) {
        app.log.warn({ bufferedBytes: res.writableLength }, 'invalidation stream client too slow; disconnected')
        remove(res)
        res.destroy()
        return
      }
      res.write(chunk)
    }
    const broadcast = (chunk: string) => {
      for (const res of clients) send(res, chunk)
    }

    // A reset (after a clear's invalidation event, or a resync, which is in no log): remember
    // the newest record at the time of the last one (null: the log was empty) and the reset
    // it sent, so a replay can tell it was missed and send that reset instead.
    let newestAtLastReset: string | null | undefined
    let lastReset = RESET_UNKNOWN_ID

    // A reconnecting client names the last event it saw: replay what followed it from the
    // invalidation log, or, when the log no longer holds it or a clear followed it, reset.
    const catchUp = (lastId: string): string => {
      const recent = app.cache.recentInvalidations(app.config.invalidationLogSize)
      const seen = recent.findIndex((record) => record.id === lastId)
      if (seen === -1) return RESET_UNKNOWN_ID
      if (newestAtLastReset !== undefined && newestAtLastReset !== null) {
        const resetAfter = recent.findIndex((record) => record.id === newestAtLastReset)
        if (resetAfter !== -1 && resetAfter <= seen) return lastReset
      }
      return recent.slice(0, seen).reverse().map(invalidationFrame).join('')
    }

    const onInvalidation = (record: InvalidationRecord) => {
      if (clients.size > 0) broadcast(invalidationFrame(record))
      // A clear, here or on another instance: every kept copy goes, whatever the client made of the event.
      if (record.selector.all && record.mode === 'delete') {
        reset(resetFrame(`the cache was cleared${record.source === 'bus' ? ' on another instance' : ''}; drop every kept copy`))
      }
    }
    const reset = (frame: string) => {
      newestAtLastReset = app.cache.recentInvalidations(1)[0]?.id ?? null
      lastReset = frame
      if (clients.size > 0) broadcast(frame)
    }
    const onResync = ({ reason }: { reason: string }) => reset(resyncFrame(reason))
    app.cache.on('invalidation', onInvalidation)
    app.cache.on('resync', onResync)
    app.decorate('invalidationStream', { clients: () => clients.size })

    // preClose runs before the server stops accepting and waits for open requests: an
    // open stream would otherwise hold shutdown until the grace period ran out.
    app.addHook('preClose', async () => {
      for (const res of clients) res.end()
      clients.clear()
      if (heartbeat !== undefined) clearInterval(heartbeat)
      heartbeat = undefined
    })
    app.addHook('onClose', async () => {
      app.cache.off('invalidation', onInvalidation)
      app.cache.off('resync', onResync)
    })

    app.get(
      '/v1/invalidations/stream',
      {
        // HEAD answers what a GET would start with (status and headers, so a probe learns the
        // route and its key work) and ends, where a GET stays open.
        // Not in the latency histogram: a stream's "latency" is how long it stayed open.
        config: { scope: 'read', swagger: { exposeHeadRoute: true }, latency: false },
        schema: {
          tags: ['streams'],
          summary: 'Stream invalidations (Server-Sent Events)',
          description:
            'A `text/event-stream`: one `invalidation` event per invalidation from any source, its data ' +
            '`{id, selector, mode, source, invalidated, durationMs, at}` (as in the debug invalidation log, without the actor and reason), and a heartbeat comment every ' +
            '`STREAM_HEARTBEAT_MS` (default 15 s). A reconnect with `Last-Event-ID` first replays the ' +
            'invalidations that followed it from the invalidation log; if the log no longer holds that id, ' +
            'a `reset` event says to drop or revalidate kept copies. An emergency clear is an `invalidation` event of everything (`selector: {all: true}`) followed by a `reset`. ' +
            'A client that reads too slowly is disconnected. ' +
            'Browsers: `EventSource` cannot send the bearer header; read it with `fetch` and a stream reader.',
          headers: Type.Object({
            'last-event-id': Type.Optional(Type.String({ description: 'the id of the last `invalidation` event received, to resume after it' })),
          }),
          response: {
            200: {
              description: 'The event stream, endless (a HEAD gets its headers only)',
              content: { 'text/event-stream': { schema: Type.String({ example: EXAMPLE }) } },
            },
            ...authErrors,
          },
        },
      },
      async (request, reply) => {
        reply.hijack()
        const res = reply.raw
        // With the headers hooks set on the reply (rate-limit headers), which a hijack leaves behind.
        res.writeHead(200, { ...(reply.getHeaders() as OutgoingHttpHeaders), ...STREAM_HEADERS })
        // Written by Node, not Fastify: its HEAD route would add `content-length: 0`, which a
        // GET (chunked, endless) never says.
        if (request.method === 'HEAD') return void res.end()
        request.raw.socket.setNoDelay(true)
        res.write(`retry: ${RETRY_MS}\n: connected\n\n`)
        const lastId = request.headers['last-event-id']
        if (typeof lastId === 'string' && lastId !== '') res.write(catchUp(lastId))
        clients.add(res)
        res.on('close', () => remove(res))
        if (res.destroyed) remove(res) // gone before we listened for it
        if (heartbeat === undefined) {
          heartbeat = setInterval(() => broadcast(': heartbeat\n\n'), streamHeartbeatMs)
          heartbeat.unref()
        }
      },
    )
  },
  { name: 'cachewarden-stream', dependencies: ['cachewarden-auth'] },
)
