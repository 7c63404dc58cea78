import rateLimit from '@fastify/rate-limit'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { SecurityConfig } from '../config.js'
import { rateLimited } from '../errors.js'

/**
 * Per key. Every limited route needs a key and auth answers a request without a valid one
 * (401) before these hooks run, so the client IP is only a fallback.
 */
const keyOrIp = (request: FastifyRequest) =>
  request.apiKey !== undefined ? `key:${request.apiKey.name}` : `ip:${request.ip}`

/**
 * Registers @fastify/rate-limit. Routes opt in with `config.rateLimit` (the emergency clear
 * does); `RATE_LIMIT_MAX` > 0 also limits every authenticated route per key, which is off
 * by default so the entry hot paths pay nothing. The route hooks run after auth's, so they
 * see `request.apiKey`. (Failed authentications are counted by the auth plugin itself.)
 */
export default fp(
  async function rateLimits(app: FastifyInstance, opts: { security: SecurityConfig }) {
    const { rateLimitMax, rateLimitWindowMs } = opts.security
    await app.register(rateLimit, {
      global: rateLimitMax > 0,
      max: Math.max(1, rateLimitMax),
      timeWindow: rateLimitWindowMs,
      keyGenerator: keyOrIp,
      // Health, metrics and docs stay open to probes and scrapers.
      allowList: (request) => request.routeOptions.config.scope === undefined,
      errorResponseBuilder: (_request, context) => rateLimited(context.after),
    })
  },
  { name: 'cachewarden-rate-limits' },
)
