import { createHash, timingSafeEqual } from 'node:crypto'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { LRUCache } from 'lru-cache'
import type { ApiKey, Scope } from '../config.js'
import { CacheError } from '../errors.js'
import { rateLimited } from './rate-limits.js'

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

/** Most client IPs remembered as blocked at once (a flood of spoofed sources cannot grow it). */
const MAX_BLOCKED_IPS = 10_000

export interface AuthOptions {
  keys: ApiKey[]
  /** After `max` 401s from one IP within `windowMs`, that IP gets 429 for the rest of the window; max 0 is off. */
  failureLimit?: { max: number; windowMs: number }
}

/**
 * Bearer-key authentication and scope checks. Secrets are looked up by their SHA-256, and
 * the digests compared with `timingSafeEqual`, so timing says nothing about a secret.
 */
export default fp(
  async function auth(app: FastifyInstance, opts: AuthOptions) {
    const byDigest = new Map<string, { key: ApiKey; digest: Buffer }>()
    for (const key of opts.keys) {
      const d = digest(key.secret)
      byDigest.set(d.toString('base64'), { key, digest: d })
    }
    app.decorateRequest('apiKey', undefined)
    app.decorate('authFailures', { count: 0 })

    const limit = opts.failureLimit
    // Failures are counted by @fastify/rate-limit; an IP that used up its window is remembered
    // here until the window ends, and refused before its key is even looked at, so a guesser
    // cannot tell a right secret from a wrong one once blocked.
    const countFailure =
      limit && limit.max > 0
        ? app.createRateLimit({ max: limit.max, timeWindow: limit.windowMs, keyGenerator: (r) => r.ip })
        : undefined
    const blocked = new LRUCache<string, true>({ max: MAX_BLOCKED_IPS, ttl: limit?.windowMs || 1 })

    app.addHook('onRequest', async (request: FastifyRequest, reply) => {
      const scope = request.routeOptions.config.scope
      if (scope === undefined) return
      if (countFailure !== undefined && blocked.has(request.ip)) {
        const retryAfterS = Math.max(1, Math.ceil(blocked.getRemainingTTL(request.ip) / 1000))
        reply.header('retry-after', retryAfterS)
        throw rateLimited(`${retryAfterS} seconds (too many failed authentications from this address)`)
      }
      const key = authenticate(request.headers.authorization)
      if (key === undefined) {
        app.authFailures.count++
        if (countFailure !== undefined) {
          const state = await countFailure(request)
          if (!state.isAllowed && state.remaining === 0 && !blocked.has(request.ip)) {
            blocked.set(request.ip, true, { ttl: Math.max(1, state.ttl) })
            request.log.warn({ ip: request.ip, failures: limit!.max, blockedMs: state.ttl }, 'too many failed authentications; address blocked')
          }
        }
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
