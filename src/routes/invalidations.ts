import { Type } from '@sinclair/typebox'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import { InvalidationResult, ModeQuery, authErrors, badRequest, bodyTooLarge } from '../schemas/common.js'
import { SelectorBody } from '../schemas/invalidations.js'
import { checkName, checkUserId, listBodyBytes } from '../cache/limits.js'
import { SELECTOR_KINDS } from '../cache/types.js'

export { SelectorBody }

export default async function invalidationRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const cache = app.cache
  const common = { config: { scope: 'invalidate' as const } }

  app.post(
    '/v1/invalidations',
    {
      ...common,
      bodyLimit: Math.max(app.config.bodyLimitBytes, listBodyBytes(cache.limits, SELECTOR_KINDS)),
      schema: {
        tags: ['invalidation'],
        summary: 'Invalidate by selector',
        description:
          'Deletes (or marks stale) every entry matching any of the lists: keys, userIds, tags, prefixes ' +
          '(at least one, each at most 1000). Outstanding leases on every named scope are voided, so a slow ' +
          'fill that read before this cannot write its old value after it.',
        body: SelectorBody,
        response: { 200: InvalidationResult, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request) => {
      const { mode, reason, ...selector } = request.body
      return cache.invalidate(selector, { mode: mode ?? undefined, reason: reason ?? undefined, source: 'api', actor: request.apiKey?.name })
    },
  )

  app.delete(
    '/v1/users/:userId/entries',
    {
      ...common,
      schema: {
        tags: ['invalidation'],
        summary: 'Invalidate a user\'s entries',
        description: 'Shorthand for `POST /v1/invalidations {userIds:[userId]}`. Costs O(that user\'s entries).',
        params: Type.Object({ userId: Type.String({ minLength: 1 }) }),
        querystring: ModeQuery,
        response: { 200: InvalidationResult, ...badRequest, ...authErrors },
      },
    },
    async (request) =>
      cache.invalidate(
        // Checked here first so a bad one is named as the path parameter it is.
        { userIds: [checkUserId(request.params.userId, cache.limits)] },
        { mode: request.query.mode, source: 'api', actor: request.apiKey?.name },
      ),
  )

  app.delete(
    '/v1/tags/:tag/entries',
    {
      ...common,
      schema: {
        tags: ['invalidation'],
        summary: 'Invalidate a tag\'s entries',
        description: 'Shorthand for `POST /v1/invalidations {tags:[tag]}`.',
        params: Type.Object({ tag: Type.String({ minLength: 1 }) }),
        querystring: ModeQuery,
        response: { 200: InvalidationResult, ...badRequest, ...authErrors },
      },
    },
    async (request) =>
      cache.invalidate(
        { tags: [checkName('tag', request.params.tag, cache.limits.maxTagBytes)] },
        { mode: request.query.mode, source: 'api', actor: request.apiKey?.name },
      ),
  )
}
