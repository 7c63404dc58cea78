import type { FastifyError, FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { CacheError } from '../errors.js'

/**
 * Turns every error into the contract's `{error, message}` shape. Validation and parse
 * errors become 400 `invalid_request`; anything unexpected is a 500 `internal_error`,
 * logged with its stack and never sent.
 */
export default fp(
  async function errors(app: FastifyInstance) {
    app.setErrorHandler((error: FastifyError | CacheError, request, reply) => {
      if (error instanceof CacheError) {
        return reply.code(error.statusCode).send({ error: error.code, message: error.message, ...error.extra })
      }
      if ((error as FastifyError).validation) {
        return reply.code(400).send({ error: 'invalid_request', message: validationMessage(error as FastifyError) })
      }
      const status = (error as FastifyError).statusCode ?? 500
      if (status === 413 || error.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
        return reply.code(413).send({ error: 'payload_too_large', message: 'the request body is larger than the body limit' })
      }
      if (status === 429) {
        return reply.code(429).send({ error: 'rate_limited', message: error.message || 'too many requests; slow down' })
      }
      if (status >= 400 && status < 500) {
        // JSON syntax, prototype poisoning, unsupported media type, bad URL encoding…
        return reply.code(400).send({ error: 'invalid_request', message: clientMessage(error as FastifyError) })
      }
      request.log.error({ err: error }, 'internal error')
      return reply.code(500).send({ error: 'internal_error', message: 'an internal error occurred; it has been logged' })
    })

    app.setNotFoundHandler((request, reply) => {
      reply.code(404).send({ error: 'not_found', message: `no route ${request.method} ${request.url.split('?')[0]}` })
    })
  },
  { name: 'cachewarden-errors' },
)

function validationMessage(error: FastifyError): string {
  const first = error.validation?.[0]
  if (!first) return error.message
  const where = error.validationContext ?? 'request'
  const path = first.instancePath ? `${where}${first.instancePath.replaceAll('/', '.')}` : where
  const missing = (first.params as { missingProperty?: string }).missingProperty
  if (missing) return `${path}.${missing} is required`
  const extra = (first.params as { additionalProperty?: string }).additionalProperty
  if (extra) return `${path}.${extra} is not allowed`
  return `${path} ${first.message ?? 'is invalid'}`
}

function clientMessage(error: FastifyError): string {
  switch (error.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return 'the body must be application/json'
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      // Prototype poisoning lands here too: the JSON parser refuses both the same way.
      return 'the body is not valid JSON, or has a forbidden "__proto__" or "constructor.prototype" key'
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return 'the body is not valid JSON'
    default:
      // Fastify's own client-error messages say nothing secret; cap their length anyway.
      return (error.message || 'bad request').slice(0, 200)
  }
}
