import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { authErrors, badRequest, bodyTooLarge, leaseConflict, notFoundError, withoutNulls } from '../schemas/common.js'
import { KeyParams, WriteResult } from '../schemas/entries.js'
import { ConsistencyBody, ConsistencyReport, WarmBody, WarmSummary } from '../schemas/origins.js'
import { checkKey } from '../cache/limits.js'
import { JSON_TYPE, renderWrite } from '../cache/render.js'
import { checkWarmSet, warm } from '../origins/warmer.js'
import type { CoreLogger } from '../cache/cache-service.js'
import type { ConsistencyRequest } from '../cache/consistency.js'

/** Forced refresh, warming and consistency checks (DESIGN.md sections 3 and 6). */
export default async function originRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const origins = app.origins

  app.post(
    '/v1/entries/:key/refresh',
    {
      config: { scope: 'write' },
      schema: {
        tags: ['origins'],
        summary: 'Reload an entry from its origin now',
        description:
          'Fetches the key from the origin whose keyPattern matches it and replaces the entry (a refresh already ' +
          'in flight for the key is joined, not repeated). 404 `not_found` when no origin serves the key, or when the ' +
          'origin has no data for it (then the cached entry is removed); 409 `lease_invalidated` when invalidations of ' +
          'the key landed during the load and during its retry (nothing is cached); 503 `backend_unavailable` when the ' +
          'origin fails, and the old entry stays.',
        params: KeyParams,
        response: { 200: WriteResult, ...notFoundError, ...leaseConflict, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      const key = checkKey(request.params.key, app.cache.limits)
      const entry = await origins.refresh(key, request.apiKey?.name)
      return reply.type(JSON_TYPE).send(renderWrite(entry))
    },
  )

  app.post(
    '/v1/warm',
    {
      config: { scope: 'write' },
      schema: {
        tags: ['origins'],
        summary: 'Load keys from their origins',
        description:
          'Loads each key (and, for each userId, the key of every origin whose keyPattern has `{userId}` as its ' +
          'only part) from its origin, 5 at once, cached or not. Replies when all are done; once the server ' +
          'begins to shut down (or the caller goes away) no further key is loaded, and the summary counts what was.',
        body: WarmBody,
        response: { 200: WarmSummary, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      const set = checkWarmSet(origins, withoutNulls(request.body))
      // Shutdown, or a caller gone, stops it: no further key is loaded.
      return warm(origins, set, app.log as CoreLogger, AbortSignal.any([callerGone(request, reply), origins.stopping.signal]))
    },
  )

  app.post(
    '/v1/consistency',
    {
      config: { scope: 'admin' },
      schema: {
        tags: ['inspection'],
        summary: 'Check cached entries against the source of truth',
        description:
          'With `against: "provided"`, compares each of `entries` with the value or etag sent; with ' +
          '`against: "origin"`, fetches `keys`, every key of `userIds` and a `sample` of the cache from their ' +
          'origins. Reports stale and missing keys, and repairs the stale ones if asked (`invalidate` through ' +
          'the one invalidation function, source `consistency`; or `refresh` from the origin). Closing the ' +
          'request abandons the check: no further key is fetched or repaired.',
        body: ConsistencyBody,
        response: { 200: ConsistencyReport, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      const sent = withoutNulls(request.body)
      // `value: null` is a value (the truth may be null); a null etag is no etag.
      const body: ConsistencyRequest = { ...sent, entries: sent.entries?.map(({ etag, ...item }) => (etag == null ? item : { ...item, etag })) }
      // A caller that goes away abandons the check: no further origin fetch, no further repair.
      const gone = callerGone(request, reply)
      const report = await app.consistency.check(body, request.apiKey?.name, gone)
      const abandoned = gone.aborted
      if (abandoned) request.log.info({ checked: report.checked, repaired: report.repaired }, 'consistency check abandoned by its caller')
      // A repair changes the cache on an admin's word: audit it (checks alone change nothing).
      if (body.repair !== undefined && body.repair !== 'none' && (!abandoned || report.repaired > 0)) {
        app.audit.record({
          actor: request.apiKey?.name,
          action: 'consistency_repair',
          reason: null,
          outcome: 'succeeded',
          detail:
            `repair=${body.repair} checked=${report.checked} stale=${report.stale.length} repaired=${report.repaired} ` +
            `errors=${report.errors.length}${abandoned ? ' (abandoned by its caller)' : ''}`,
        })
      }
      return report
    },
  )
}

/** Aborted when the caller goes away before its reply is sent (even before the handler ran). */
function callerGone(request: FastifyRequest, reply: FastifyReply): AbortSignal {
  const gone = new AbortController()
  if (reply.raw.destroyed || request.raw.socket?.destroyed === true) gone.abort()
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) gone.abort()
  })
  return gone.signal
}
