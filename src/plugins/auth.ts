import { hash } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { LRUCache } from 'lru-cache'
import type { ApiKey, Scope } from '../config.js'
import { CacheError, rateLimited } from '../errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The scope a route needs; routes without one are public (health, metrics, docs). */
    scope?: Scope
  }
  interface FastifyRequest {
    /** The key that authenticated the request. */
    apiKey: ApiKey | undefined
  }
}

const digest = (secret: string) => hash('sha256', secret, 'base64')

/** Most Authorization headers remembered as valid (clients send the same few over and over). */
const MAX_KNOWN_HEADERS = 256

/** Most client IPs whose failures are counted at once (a flood of spoofed sources cannot grow it). */
const MAX_TRACKED_IPS = 10_000

/** Most (address, key) pairs remembered as having authenticated, least recently proven dropped first. */
const MAX_PROVEN = 10_000

export interface AuthOptions {
  keys: ApiKey[]
  /** After `max` wrong credentials from one IP within `windowMs`, that IP gets 429 for the rest of the window; max 0 is off. */
  failureLimit?: { max: number; windowMs: number }
}

/**
 * Bearer-key authentication and scope checks. A new header's secret is looked up by its
 * SHA-256, so timing says nothing about how close a guess came; a header that already
 * authenticated is then remembered as is (only valid secrets ever are).
 */
export default fp(
  async function auth(app: FastifyInstance, opts: AuthOptions) {
    const byDigest = new Map<string, ApiKey>()
    for (const key of opts.keys) byDigest.set(digest(key.secret), key)
    app.decorateRequest('apiKey', undefined)

    // Failed authentications per client IP, in a window that starts with the first failure.
    // An IP with `max` of them gets 429 until its window ends, right secret or wrong, so a
    // guesser cannot tell them apart once blocked; except for a key that already authenticated
    // from that very address (`proven`), so that a service behind the same NAT as the guesser,
    // or a client whose neighbour sends junk, keeps working. A guesser learns nothing from that:
    // a key proven from its address is one it has already used.
    const limit = opts.failureLimit !== undefined && opts.failureLimit.max > 0 ? opts.failureLimit : undefined
    const failures = limit && new LRUCache<string, { count: number }>({ max: MAX_TRACKED_IPS, ttl: limit.windowMs })
    const proven = limit && new LRUCache<string, true>({ max: MAX_PROVEN })
    const keyIds = new Map(opts.keys.map((key, i) => [key, i])) // names need not be unique
    const provenKey = (ip: string, key: ApiKey) => `${ip} ${keyIds.get(key)}`

    // Each route with a scope gets its own onRequest hook, first in its list, with the scope
    // closed over: no per-request route lookup. A callback hook, not an async one: the common
    // case (a valid key) needs no promise.
    app.addHook('onRoute', (routeOptions) => {
      const scope = routeOptions.config?.scope
      if (scope === undefined) return
      const hook = checker(scope)
      const existing = routeOptions.onRequest
      routeOptions.onRequest = existing === undefined ? [hook] : [hook, ...(Array.isArray(existing) ? existing : [existing])]
    })

    function checker(scope: Scope) {
      return (request: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void) => {
        // A request without credentials guesses nothing: it gets its 401, blocked address or not.
        const blocked =
          failures !== undefined &&
          failures.size > 0 &&
          request.headers.authorization !== undefined &&
          (failures.get(request.ip)?.count ?? 0) >= limit!.max &&
          !isProven(request)
        if (blocked) {
          const retryAfterS = Math.max(1, Math.ceil(failures.getRemainingTTL(request.ip) / 1000))
          reply.header('retry-after', retryAfterS)
          return done(rateLimited(`${retryAfterS} seconds (too many failed authentications from this address)`))
        }
        const key = authenticate(request)
        if (key === undefined) {
          // Only a credential that was tried and wrong counts: a request with none guesses nothing.
          if (failures !== undefined && request.headers.authorization !== undefined) countFailure(failures, limit!.max, request)
          return done(new CacheError('unauthorized', 'a valid bearer key is required: Authorization: Bearer <secret>'))
        }
        request.apiKey = key
        if (!key.scopes.has(scope) && !key.scopes.has('admin')) {
          return done(new CacheError('forbidden', `this key lacks the "${scope}" scope`))
        }
        done()
      }
    }

    // Headers that authenticated, so a client's next request skips the digest, with the last
    // address each was proven from (so that a steady client costs no write to `proven`). Only
    // a header that carried a valid secret gets in (a guess never does), and keys are fixed
    // for the life of the process, so an entry never goes stale; cleared when full.
    const known = new Map<string, { key: ApiKey; lastIp: string }>()

    function authenticate(request: FastifyRequest): ApiKey | undefined {
      const header = request.headers.authorization
      if (header === undefined) return undefined
      let seen = known.get(header)
      if (seen === undefined) {
        const key = lookUp(header)
        if (key === undefined) return undefined
        if (known.size >= MAX_KNOWN_HEADERS) known.clear()
        seen = { key, lastIp: '' }
        known.set(header, seen)
      }
      if (proven !== undefined && seen.lastIp !== request.ip) {
        seen.lastIp = request.ip
        proven.set(provenKey(request.ip, seen.key), true)
      }
      return seen.key
    }

    /** The key a header's secret belongs to, if any. */
    function lookUp(header: string): ApiKey | undefined {
      if (header.length < 8 || header.length > 4096) return undefined
      if (header.slice(0, 7).toLowerCase() !== 'bearer ') return undefined
      // Looked up by digest: a guess's SHA-256 shares nothing with a secret's, so the lookup's
      // timing says nothing about how close a guess came.
      return byDigest.get(digest(header.slice(7).trim()))
    }

    /** Whether the request's key already authenticated from the request's address (remembers nothing). */
    function isProven(request: FastifyRequest): boolean {
      const header = request.headers.authorization
      if (header === undefined) return false
      const key = known.get(header)?.key ?? lookUp(header)
      return key !== undefined && proven!.has(provenKey(request.ip, key))
    }
  },
  { name: 'cachewarden-auth' },
)

/** Counts a failed authentication against the client's IP; the `max`-th blocks it (logged once). */
function countFailure(failures: LRUCache<string, { count: number }>, max: number, request: FastifyRequest): void {
  const seen = failures.get(request.ip)
  // Counted in place: the window (the TTL) runs from the first failure, not the latest.
  const count = seen === undefined ? 1 : ++seen.count
  if (seen === undefined) failures.set(request.ip, { count })
  if (count === max) {
    request.log.warn({ ip: request.ip, failures: max, blockedMs: failures.getRemainingTTL(request.ip) }, 'too many failed authentications; address blocked')
  }
}
