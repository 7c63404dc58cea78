import { Type } from '@sinclair/typebox'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import { InvalidationResult, authErrors, badRequest, bodyTooLarge, orNull } from '../schemas/common.js'
import { EventProcessor, EventRules } from '../sources/events.js'

export const EventBody = Type.Object(
  {
    id: orNull(
      Type.String({ minLength: 1, maxLength: 256, description: 'the event\'s id; a repeat within 10 minutes is applied once (null: no id)' }),
    ),
    type: Type.String({ minLength: 1, maxLength: 256, description: 'the event type the rules match, e.g. `persona.updated`' }),
    data: Type.Record(Type.String(), Type.Unknown(), {
      description: 'the event\'s payload; rule templates such as `{{data.userId}}` read from it',
    }),
  },
  {
    // Events from a bus often carry more (time, source…): extra fields are allowed and ignored.
    additionalProperties: true,
    examples: [{ id: 'evt-7f3a', type: 'persona.updated', data: { userId: '42' } }],
  },
)

export const EventResult = Type.Object({
  matched: Type.Integer({ description: 'how many configured rules matched the event type' }),
  invalidations: Type.Array(InvalidationResult, { description: 'one invalidation per matched rule, in rule order' }),
})

export default async function eventRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const cache = app.cache
  // Throws ConfigError('CONFIG_FILE', …) naming the bad rule, so a bad rules file stops the start.
  const processor = new EventProcessor(cache, new EventRules(app.config.configFile.rules, cache.limits))

  app.post(
    '/v1/events',
    {
      config: { scope: 'invalidate' },
      schema: {
        tags: ['invalidation'],
        summary: 'Apply a domain event',
        description:
          'Runs every rule of CONFIG_FILE `rules` whose `event` is the event\'s `type`: each fills its ' +
          'templates (`{{data.userId}}`, `{{data.a.b}}`) from `data` and invalidates the result (source ' +
          '`events`). Every rule is filled before anything is invalidated: a missing, empty or non-scalar ' +
          'field is 400 `invalid_request` naming it, and nothing is invalidated. A type with no rule is ' +
          '200 with `matched: 0`. An event with an `id` already applied in the last 10 minutes is not ' +
          'applied again: the first reply is returned, with the header `Idempotent-Replayed: true`.',
        body: EventBody,
        response: { 200: EventResult, ...badRequest, ...bodyTooLarge, ...authErrors },
      },
    },
    async (request, reply) => {
      const { id, type, data } = request.body
      const outcome = await processor.apply({ id: id ?? undefined, type, data }, request.apiKey?.name)
      if (outcome.replayed) reply.header('idempotent-replayed', 'true')
      return outcome.response
    },
  )
}
