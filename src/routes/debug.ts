import { Type } from '@sinclair/typebox'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import { checkUserId } from '../cache/limits.js'
import { entryMeta } from '../cache/render.js'
import { notFound, truncate } from '../errors.js'
import { InvalidationMode, Json, LimitQuery, Timestamp, authErrors, badRequest, bodyTooLarge, notFoundError } from '../schemas/common.js'
import { KeyParams } from '../schemas/entries.js'

const EntryMeta = Type.Object({
  key: Type.String(),
  userId: Type.Union([Type.String(), Type.Null()]),
  tags: Type.Array(Type.String()),
  sizeBytes: Type.Integer(),
  ageMs: Type.Integer(),
  ttlMs: Type.Integer({ description: 'the TTL it was written with' }),
  ttlRemainingMs: Type.Integer(),
  createdAt: Timestamp,
  expiresAt: Timestamp,
  hits: Type.Integer({ description: 'reads answered from this entry (a stale entry read without allowStale is a miss, not a hit)' }),
  lastAccessAt: Timestamp,
  stale: Type.Boolean(),
  etag: Type.String(),
  origin: Type.Union([Type.String(), Type.Null()]),
})

const SelectorView = Type.Object({
  keys: Type.Optional(Type.Array(Type.String())),
  userIds: Type.Optional(Type.Array(Type.String())),
  tags: Type.Optional(Type.Array(Type.String())),
  prefixes: Type.Optional(Type.Array(Type.String())),
  all: Type.Optional(Type.Literal(true, { description: 'every entry: marked stale on a reconnect of the PostgreSQL listener, or dropped by a clear' })),
})

export const InvalidationRecordView = Type.Object({
  id: Type.String(),
  selector: SelectorView,
  mode: InvalidationMode,
  source: Type.String(),
  invalidated: Type.Integer(),
  durationMs: Type.Number(),
  at: Timestamp,
  actor: Type.Union([Type.String(), Type.Null()]),
  reason: Type.Union([Type.String(), Type.Null()]),
})

const Stats = Type.Object({
  entries: Type.Integer(),
  bytes: Type.Integer(),
  hits: Type.Integer(),
  misses: Type.Integer(),
  hitRatio: Type.Number(),
  sets: Type.Integer(),
  evictions: Type.Integer(),
  invalidations: Type.Object({
    bySelector: Type.Record(Type.String(), Type.Integer()),
    bySource: Type.Record(Type.String(), Type.Integer()),
    failed: Type.Integer(),
    last: Type.Union([InvalidationRecordView, Type.Null()]),
  }),
  leases: Type.Object({ issued: Type.Integer(), rejected: Type.Integer() }),
}, {
  examples: [
    {
      entries: 1200,
      bytes: 3_400_000,
      hits: 9000,
      misses: 1000,
      hitRatio: 0.9,
      sets: 1100,
      evictions: 12,
      invalidations: { bySelector: { user: 40, tag: 7 }, bySource: { api: 30, events: 17 }, failed: 0, last: null },
      leases: { issued: 1000, rejected: 3 },
    },
  ],
})

export default async function debugRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const cache = app.cache
  const admin = { config: { scope: 'admin' as const } }

  app.get(
    '/v1/debug/users/:userId',
    {
      ...admin,
      schema: {
        tags: ['inspection'],
        summary: 'Inspect a user\'s entries',
        description: 'Every entry of the user, from the exact index: sizes, ages, TTLs, hits, staleness.',
        params: Type.Object({ userId: Type.String({ minLength: 1 }) }),
        response: {
          200: Type.Object({
            userId: Type.String(),
            count: Type.Integer(),
            bytes: Type.Integer(),
            entries: Type.Array(EntryMeta),
          }),
          ...badRequest,
          ...authErrors,
        },
      },
    },
    async (request) => {
      const userId = checkUserId(request.params.userId, cache.limits)
      const now = cache.now()
      const entries = (await cache.store.userEntries(userId, now)).map((e) => entryMeta(e, now))
      entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))
      return { userId, count: entries.length, bytes: entries.reduce((n, e) => n + e.sizeBytes, 0), entries }
    },
  )

  app.get(
    '/v1/debug/entries/:key',
    {
      ...admin,
      schema: {
        tags: ['inspection'],
        summary: 'Inspect an entry',
        description: 'The entry\'s metadata and value, stale or not, without counting a hit.',
        params: KeyParams,
        response: {
          200: Type.Object({ ...EntryMeta.properties, value: Json }),
          ...notFoundError,
          ...badRequest,
          ...authErrors,
        },
      },
    },
    async (request) => {
      const entry = await cache.inspect(request.params.key)
      if (entry === undefined) throw notFound(`no entry for "${truncate(request.params.key)}"`)
      return { ...entryMeta(entry, cache.now()), value: JSON.parse(entry.value) }
    },
  )

  app.get(
    '/v1/debug/invalidations',
    {
      ...admin,
      schema: {
        tags: ['inspection'],
        summary: 'Recent invalidations',
        description: 'The most recent invalidations from every source, newest first.',
        querystring: LimitQuery,
        response: { 200: Type.Array(InvalidationRecordView), ...badRequest, ...authErrors },
      },
    },
    async (request) =>
      cache.recentInvalidations(request.query.limit ?? 100).map((r) => ({
        ...r,
        actor: r.actor ?? null,
        reason: r.reason ?? null,
      })),
  )

  app.get(
    '/v1/stats',
    {
      ...admin,
      schema: {
        tags: ['inspection'],
        summary: 'Stats summary',
        description: 'Counts since start or the last reset. The Prometheus counters at /metrics never reset.',
        response: { 200: Stats, ...authErrors },
      },
    },
    async () => {
      const stats = await cache.stats()
      const last = stats.invalidations.last
      return {
        ...stats,
        invalidations: {
          ...stats.invalidations,
          last: last && { ...last, actor: last.actor ?? null, reason: last.reason ?? null },
        },
      }
    },
  )

  app.post(
    '/v1/stats/reset',
    {
      ...admin,
      schema: {
        tags: ['inspection'],
        summary: 'Reset the stats summary',
        description: 'Zeroes the summary of `GET /v1/stats`; never the Prometheus counters.',
        response: { 200: Type.Object({ reset: Type.Boolean() }), ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request) => {
      cache.resetStats(request.apiKey?.name)
      return { reset: true }
    },
  )
}
