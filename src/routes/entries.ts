import { Type } from '@sinclair/typebox'
import type { FastifyInstance, FastifyReply } from 'fastify'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import { JSON_TYPE, iso, renderBatch, renderEntry, renderWrite } from '../cache/render.js'
import { readable, type ReadResult, type WriteInput } from '../cache/cache-service.js'
import { truncate } from '../errors.js'
import { bareEtag, checkKey, listBodyBytes } from '../cache/limits.js'
import { InvalidationResult, MissBody, ModeQuery, authErrors, badRequest, bodyTooLarge, leaseConflict, tooLarge } from '../schemas/common.js'
import {
  BatchGetBody,
  BatchGetResult,
  BatchSetBody,
  BatchSetResult,
  Entry,
  KeyParams,
  ReadQuery,
  WriteBody,
  WriteResult,
} from '../schemas/entries.js'

/** `If-None-Match` matches when it lists the entry's etag (quoted, weak or bare) or `*`. */
function etagMatches(header: string, etag: string): boolean {
  if (header === `"${etag}"` || header === '*') return true
  return header.split(',').some((tag) => {
    const t = bareEtag(tag)
    return t === etag || t === '*'
  })
}

/** The reply to a read: the entry with its ETag (or 304), or the 404 miss with its lease (a HEAD takes none). */
function sendRead(reply: FastifyReply, key: string, result: ReadResult | { entry?: undefined; lease?: undefined }, ifNoneMatch: string | undefined): void {
  const entry = result.entry
  if (entry === undefined) {
    reply.code(404).send({ error: 'not_found', message: `no entry for "${truncate(key)}"`, ...result.lease })
    return
  }
  reply.header('etag', `"${entry.etag}"`)
  // The etag covers the value only: a 304 for a stale-marked entry (read with allowStale) would
  // tell a caller who holds it from before the invalidation that its fresh copy is current.
  if (ifNoneMatch !== undefined && !entry.stale && etagMatches(ifNoneMatch, entry.etag)) reply.code(304).send()
  else reply.type(JSON_TYPE).send(renderEntry(entry, reply.server.cache.now()))
}

export default async function entryRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const cache = app.cache

  app.get(
    '/v1/entries/:key',
    {
      // The HEAD route Fastify adds goes into the OpenAPI document too (same schema; no body).
      config: {
        scope: 'read',
        swagger: { exposeHeadRoute: true },
        documented: {
          headers: {
            type: 'object',
            properties: { 'if-none-match': { type: 'string', description: 'An etag the caller holds (quoted, weak or bare; a list; or `*`): 304 if it matches' } },
          },
          responseHeaders: {
            200: { etag: { type: 'string', description: 'The quoted etag of the value' } },
            304: { etag: { type: 'string', description: 'The quoted etag of the value' } },
          },
        },
      },
      schema: {
        tags: ['entries'],
        summary: 'Read an entry',
        description:
          'Returns the entry with an `ETag`; 304 when `If-None-Match` matches (never for a stale-marked entry: its body says `stale: true`). A miss is 404 `not_found` ' +
          'carrying a `lease`: send it back with the PUT that fills the key, and the write is refused ' +
          'if an invalidation touched the key meanwhile. Only one miss at a time gets `fill: true`; the ' +
          'others get `fill: false` and `retryAfterMs`. With `?load=true`, a miss on a key an origin serves is ' +
          'filled from it (one origin call however many callers wait); if the origin fails, a stale-marked entry of the key is ' +
          'served (`stale: true`), else 503 `backend_unavailable`. ' +
          '`HEAD` tells whether the key is cached now, with the headers a GET hit carries, and has no side effect: ' +
          'no lease, no hit or miss counted, no origin call (`load` is ignored); 503 `backend_unavailable` when the store cannot be asked.',
        params: KeyParams,
        querystring: ReadQuery,
        response: { 200: Entry, 304: { type: 'null', description: 'Not modified' }, 404: MissBody, ...badRequest, ...authErrors },
      },
    },
    // Not an async handler: a hit the store answers from memory is sent in this same tick.
    (request, reply) => {
      const { key } = request.params
      const allowStale = request.query.allowStale === true
      // HEAD (Fastify answers it with this handler) looks without touching anything: no hit or
      // miss counted, no lease (its caller would never see a fill lease it took), no origin call.
      // Like any inspection it is 503 when the store cannot be asked (a GET miss would still answer).
      if (request.method === 'HEAD') {
        return cache.inspect(key).then((entry) => {
          sendRead(reply, key, readable(entry, allowStale) ? { entry } : {}, request.headers['if-none-match'])
          return reply
        })
      }
      // ?load=true fills a miss from the key's origin (src/origins): single flight, under the lease.
      const result = request.query.load === true ? app.origins.readThrough(key, allowStale) : cache.read(key, allowStale)
      if (result instanceof Promise) {
        return result.then((r) => {
          sendRead(reply, key, r, request.headers['if-none-match'])
          return reply // Fastify's "already sent" signal: it waits for the reply, never sends again
        })
      }
      sendRead(reply, key, result, request.headers['if-none-match'])
    },
  )

  app.put(
    '/v1/entries/:key',
    {
      config: { scope: 'write' },
      schema: {
        tags: ['entries'],
        summary: 'Write an entry',
        description:
          'Stores `value` under the key for `ttlMs` (default 300000), indexed by `userId` and `tags`. ' +
          'With the `lease` from a miss, the write is refused with 409 `lease_invalidated` if an ' +
          'invalidation covering the key was accepted after the lease was issued. Without a lease it always writes.',
        params: KeyParams,
        body: WriteBody,
        response: {
          200: WriteResult,
          ...leaseConflict,
          ...badRequest,
          ...tooLarge,
          ...authErrors,
        },
      },
    },
    async (request, reply) => {
      const entry = await cache.write(request.params.key, request.body as WriteInput)
      return reply.type(JSON_TYPE).send(renderWrite(entry))
    },
  )

  app.post(
    '/v1/entries/:key/release',
    {
      config: { scope: 'write' },
      schema: {
        tags: ['entries'],
        summary: 'Give a lease back (a fill that will not come)',
        description:
          'A caller handed the fill lease (`fill: true`) whose load failed sends it back, so that the next miss ' +
          'gets the fill lease at once instead of every waiter waiting for it to run out. Any other lease of the ' +
          'key changes nothing. 204 either way; 400 `invalid_request` for a token that is not a lease of this key; ' +
          '503 `backend_unavailable` when Redis cannot be reached (nothing was given back: the claim runs out by itself).',
        params: KeyParams,
        body: Type.Object(
          { lease: Type.String({ description: 'the lease from the miss' }) },
          { additionalProperties: false, examples: [{ lease: 'kq3Xb1.4f.3b2a1c.h7Yx' }] },
        ),
        response: { 204: { type: 'null', description: 'Given back (or it was not the fill lease)' }, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      await cache.giveUpFill(request.params.key, request.body.lease)
      return reply.code(204).send()
    },
  )

  app.delete(
    '/v1/entries/:key',
    {
      config: { scope: 'invalidate' },
      schema: {
        tags: ['entries'],
        summary: 'Invalidate one entry',
        description: 'Deletes the entry (or marks it stale with `?mode=stale`) and voids outstanding leases on the key.',
        params: KeyParams,
        querystring: ModeQuery,
        response: { 200: InvalidationResult, ...badRequest, ...authErrors },
      },
    },
    async (request) =>
      cache.invalidate(
        { keys: [checkKey(request.params.key, cache.limits)] }, // named `key` if bad, not keys[0]
        { mode: request.query.mode, source: 'api', actor: request.apiKey?.name },
      ),
  )

  app.post(
    '/v1/entries/batch-get',
    {
      config: { scope: 'read' },
      bodyLimit: Math.max(app.config.bodyLimitBytes, listBodyBytes(cache.limits, ['keys'])),
      schema: {
        tags: ['entries'],
        summary: 'Read many entries',
        description: 'Up to 1000 keys. Each missing key is listed in `missing` and gets a lease in `leases`.',
        querystring: Type.Object({ allowStale: Type.Optional(Type.Boolean()) }),
        body: BatchGetBody,
        response: { 200: BatchGetResult, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      const { entries, leases } = await cache.readMany(request.body.keys, request.query.allowStale === true)
      return reply.type(JSON_TYPE).send(renderBatch(entries, leases, cache.now()))
    },
  )

  app.post(
    '/v1/entries/batch-set',
    {
      config: { scope: 'write' },
      bodyLimit: app.config.batchBodyLimitBytes,
      schema: {
        tags: ['entries'],
        summary: 'Write many entries',
        description:
          'Up to 1000 entries, each the PUT body plus `key`. Each is validated and written on its own: ' +
          'one bad entry gets its own status and error and does not sink the others.',
        body: BatchSetBody,
        response: { 200: BatchSetResult, ...badRequest, ...tooLarge, ...authErrors },
      },
    },
    async (request) => {
      const outcomes = await cache.writeMany(request.body.entries)
      return {
        results: outcomes.map((o) =>
          o.error === undefined
            ? { key: o.key, status: 200, etag: o.entry.etag, expiresAt: iso(o.entry.expiresAt) }
            : { key: o.key, status: o.error.statusCode, error: o.error.code, message: o.error.message },
        ),
      }
    },
  )
}
