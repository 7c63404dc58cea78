import { Type } from '@sinclair/typebox'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { AUDIT_BULK_THRESHOLD, type AuditLog } from '../cache/audit-log.js'
import { MAX_REASON_CHARS, cutReason } from '../cache/limits.js'
import { CLEAR_TOKEN_TTL_MS, ClearTokens, type RedeemResult } from '../cache/clear-tokens.js'
import { sharedRecords } from '../stores/store.js'
import { CacheError, invalidRequest, truncate } from '../errors.js'
import { LimitQuery, Timestamp, authErrors, badRequest, bodyTooLarge } from '../schemas/common.js'

const TOKEN_VALID = `${CLEAR_TOKEN_TTL_MS / 1000} s`

type AuditEntry = Parameters<AuditLog['record']>[0]

const REFUSALS = {
  missing: 'no token was sent',
  unknown: 'the token is not one cachewarden issued, or it was already used',
  expired: 'the token has expired',
  foreign: 'the token was issued to another key',
} as const

const clearTokenInvalid = {
  403: Type.Object(
    { error: Type.String(), message: Type.String() },
    { description: 'The key lacks the `admin` scope (`forbidden`), or the clear token is missing, wrong, expired, used or another key\'s (`clear_token_invalid`)' },
  ),
}

export const AuditRecordView = Type.Object({
  actor: Type.Union([Type.String(), Type.Null()], { description: 'the API key name, or `source:<name>` for non-API sources' }),
  action: Type.String({ description: '`clear_token_issued`, `clear`, `stats_reset`, `invalidation` or `consistency_repair`' }),
  reason: Type.Union([Type.String(), Type.Null()]),
  outcome: Type.String({ description: '`succeeded`, `refused` or `failed`' }),
  detail: Type.Union([Type.String(), Type.Null()], { description: 'counts and causes; never data, secrets or tokens' }),
  at: Timestamp,
})

/** The two-step emergency clear and the audit log (DESIGN.md section 3). */
export default async function adminRoutes(fastify: FastifyInstance) {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  const { cache, audit } = app
  const tokens = new ClearTokens({ now: cache.now, records: sharedRecords(cache.store) })
  const { clearRateLimitMax, clearRateLimitWindowMs } = app.config.security
  // Every attempt at a wipe is audited, refused or not. The handlers record what they decide;
  // the route's onSend records any other refusal (a bad body, a key without the admin scope,
  // a body over the limit) from the reply it sends, once. Not one without a valid key: it has
  // no actor, and anyone could flood the bounded log with them. (A key's refusals are
  // throttled by the audit log itself: a 403 for a missing scope is not rate-limited.)
  const recorded = new WeakSet<FastifyRequest>()
  const record = (request: FastifyRequest, entry: AuditEntry) => {
    recorded.add(request)
    audit.record(entry)
  }
  const auditRefusal = (action: 'clear_token_issued' | 'clear') =>
    (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (error: null, payload: unknown) => void) => {
      if (reply.statusCode >= 400 && !recorded.has(request) && request.apiKey !== undefined) {
        const body = request.body as { reason?: unknown } | undefined
        const reason = action === 'clear_token_issued' && typeof body?.reason === 'string' ? cutReason(body.reason) : null
        let sent: { error?: string; message?: string } = {}
        try {
          sent = JSON.parse(String(payload)) as typeof sent
        } catch {
          // not the contract's error body: the status says enough
        }
        const detail = `${reply.statusCode} ${sent.error ?? 'error'}${sent.message === undefined ? '' : `: ${truncate(sent.message, 200)}`}`
        record(request, { actor: request.apiKey.name, action, reason, outcome: reply.statusCode < 500 ? 'refused' : 'failed', detail })
      }
      done(null, payload)
    }
  // Per key (auth ran before this hook); every 429 is audited by the route's onSend, as any
  // refusal (someone is hammering a wipe): `429 rate_limited: …`.
  const limited = () =>
    clearRateLimitMax > 0
      ? {
          // keyGenerator (per key) and the 429 body come from the plugin's settings.
          rateLimit: { max: clearRateLimitMax, timeWindow: clearRateLimitWindowMs },
        }
      : { rateLimit: false as const }

  app.post(
    '/v1/admin/clear-token',
    {
      onSend: auditRefusal('clear_token_issued'),
      config: { scope: 'admin', ...limited() },
      schema: {
        tags: ['admin'],
        summary: 'Emergency clear, step 1: get a token',
        description:
          `Issues a random, single-use token, valid for ${TOKEN_VALID} and bound to the calling key, for ` +
          '`POST /v1/admin/clear`. The reason goes to the audit log. Rate-limited per key.',
        body: Type.Object(
          { reason: Type.String({ minLength: 1, maxLength: MAX_REASON_CHARS, description: 'why the cache must be wiped, for the audit log; not blank' }) },
          { examples: [{ reason: 'corrupted entries after the 14:02 deploy' }] },
        ),
        response: {
          200: Type.Object({
            token: Type.String({ description: `send it to POST /v1/admin/clear within ${TOKEN_VALID}; never logged` }),
            expiresAt: Timestamp,
          }),
          ...badRequest,
          ...bodyTooLarge,
          ...authErrors,
        },
      },
    },
    async (request) => {
      const actor = request.apiKey!.name
      // A blank reason would leave the audit log's record of the wipe saying nothing.
      if (!/\S/.test(request.body.reason)) throw invalidRequest('reason must not be blank')
      let issued: { token: string; expiresAt: number }
      try {
        issued = await tokens.issue(actor, request.body.reason)
      } catch (error) {
        // Cluster mode with Redis down: a token no other instance could see is not handed out.
        record(request, { actor, action: 'clear_token_issued', reason: request.body.reason, outcome: 'failed', detail: 'the store is unavailable' })
        throw error
      }
      const { token, expiresAt } = issued
      record(request, { actor, action: 'clear_token_issued', reason: request.body.reason, outcome: 'succeeded', detail: `valid ${TOKEN_VALID}` })
      return { token, expiresAt: new Date(expiresAt).toISOString() }
    },
  )

  app.post(
    '/v1/admin/clear',
    {
      onSend: auditRefusal('clear'),
      config: { scope: 'admin', ...limited() },
      // No body at all is a missing token too: the contract's 403, not a schema 400.
      preValidation: async (request) => {
        if (request.body === undefined || request.body === null) request.body = {}
      },
      schema: {
        tags: ['admin'],
        summary: 'Emergency clear, step 2: wipe everything',
        description:
          'Drops every entry and voids every outstanding lease, given a token from ' +
          `\`POST /v1/admin/clear-token\` issued to the same key in the last ${TOKEN_VALID}. A missing, wrong, ` +
          'expired, reused or another key\'s token is 403 `clear_token_invalid` and clears nothing. ' +
          'Rate-limited per key; audited either way.',
        // Not required in the schema, so a missing token is the contract's 403, not a 400.
        body: Type.Object({ token: Type.Optional(Type.Unknown({ description: 'the token from step 1' })) }),
        response: {
          200: Type.Object({ cleared: Type.Integer({ description: 'entries dropped' }) }),
          ...badRequest,
          ...bodyTooLarge,
          ...authErrors,
          ...clearTokenInvalid,
        },
      },
    },
    async (request) => {
      const actor = request.apiKey!.name
      let result: RedeemResult
      try {
        result = await tokens.redeem(request.body.token, actor)
      } catch (error) {
        // Cluster mode with Redis down: the token could not be checked (nor, most likely, spent).
        // The clear failed for the store, as if it had been tried: counted where alerts look.
        cache.countFailure('admin')
        record(request, { actor, action: 'clear', reason: null, outcome: 'failed', detail: 'the token could not be checked (the store is unavailable); nothing was cleared' })
        throw error
      }
      if (!result.ok) {
        record(request, { actor, action: 'clear', reason: result.reason, outcome: 'refused', detail: REFUSALS[result.why] })
        throw new CacheError('clear_token_invalid', `emergency clear refused: ${REFUSALS[result.why]}; nothing was cleared`)
      }
      // The clear's invalidation record is audited (action `clear`, with the count) by the audit log.
      try {
        return { cleared: await cache.clear(actor, result.reason) }
      } catch (error) {
        // The token stays spent: a command that timed out may still run in Redis, and a token
        // given back could then clear a second time. The operator asks for a new one.
        record(request, { actor, action: 'clear', reason: result.reason, outcome: 'failed', detail: 'the store did not confirm the clear (it may still happen); the token is spent' })
        throw error
      }
    },
  )

  app.get(
    '/v1/debug/audit',
    {
      config: { scope: 'admin' },
      schema: {
        tags: ['inspection'],
        summary: 'Recent admin and destructive actions',
        description:
          'The audit log, newest first: clear tokens issued, clears done or refused, stats resets, and ' +
          `invalidations by prefix, from the admin source, or of at least ${AUDIT_BULK_THRESHOLD} entries. Each is also logged at warn.`,
        querystring: LimitQuery,
        response: { 200: Type.Array(AuditRecordView), ...badRequest, ...authErrors },
      },
    },
    async (request) => audit.recent(request.query.limit ?? 100),
  )
}
