import { createHash, timingSafeEqual } from 'node:crypto'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { ApiKey, Scope } from '../config.js'
import { CacheError } from '../errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The scope a route needs; routes without one are public (health, metrics, docs). */
    scope?: Scope
  }
  interface FastifyRequest {
    /** The key that authenticated the request. */
    apiKey: ApiKey | undefined
  }
  interface FastifyInstance {
    /** Emitted on every rejected credential (the rate limiter and audit log listen). */
    authFailures: { count: number }
  }
}

const digest = (secret: string) => createHash('sha256').update(secret).digest()

/**
 * Bearer-key authentication and scope checks. Secrets are looked up by their SHA-256, and
 * the digests compared with `timingSafeEqual`, so timing says nothing about a secret.
 */
export default fp(
  async function auth(app: FastifyInstance, opts: { keys: ApiKey[] }) {
    const byDigest = new Map<string, { key: ApiKey; digest: Buffer }>()
    for (const key of opts.keys) {
      const d = digest(key.secret)
      byDigest.set(d.toString('base64'), { key, digest: d })
    }
    app.decorateRequest('apiKey', undefined)
    app.decorate('authFailures', { count: 0 })

    app.addHook('onRequest', async (request: FastifyRequest) => {
      const scope = request.routeOptions.config.scope
      if (scope === undefined) return
      const key = authenticate(request.headers.authorization)
      if (key === undefined) {
        app.authFailures.count++
        throw new CacheError('unauthorized', 'a valid bearer key is required: Authorization: Bearer <secret>')
      }
      request.apiKey = key
      if (!key.scopes.has(scope) && !key.scopes.has('admin')) {
        throw new CacheError('forbidden', `this key lacks the "${scope}" scope`)
      }
    })

    function authenticate(header: string | undefined): ApiKey | undefined {
      if (header === undefined || header.length < 8 || header.length > 4096) return undefined
      if (header.slice(0, 7).toLowerCase() !== 'bearer ') return undefined
      const d = digest(header.slice(7).trim())
      const found = byDigest.get(d.toString('base64'))
      return found && timingSafeEqual(found.digest, d) ? found.key : undefined
    }
  },
  { name: 'cachewarden-auth' },
)
