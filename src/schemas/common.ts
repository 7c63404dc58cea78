import { Type, type TSchema } from '@sinclair/typebox'

/**
 * An optional field that may also be sent as `null`, which counts as absent: clients often send
 * a field they have no value for as null. Routes drop such fields (`withoutNulls`) before use.
 */
export const orNull = <T extends TSchema>(schema: T) => Type.Optional(Type.Union([schema, Type.Null()]))

/** A shallow copy of `body` without the fields sent as `null` (see `orNull`). */
export function withoutNulls<T extends object>(body: T): { [K in keyof T]: Exclude<T[K], null> } {
  const out: Record<string, unknown> = {}
  for (const [field, value] of Object.entries(body)) if (value !== null) out[field] = value
  return out as { [K in keyof T]: Exclude<T[K], null> }
}

// Limits here are the contract's outer bounds; the configurable limits are checked in the
// core (src/cache/limits.ts), which names the field in its message.

export const ErrorBody = Type.Object(
  {
    error: Type.String({ description: 'stable error code', examples: ['invalid_request'] }),
    message: Type.String({ description: 'human-readable explanation' }),
  },
  { additionalProperties: true },
)

/** A miss: `not_found` with the lease the caller fills under (DESIGN.md section 4). */
export const MissBody = Type.Object(
  {
    error: Type.Literal('not_found'),
    message: Type.String(),
    lease: Type.Optional(Type.String({ description: 'lease token to send back with the PUT that fills this key' })),
    fill: Type.Optional(Type.Boolean({ description: 'true: you are the one caller expected to fill this key' })),
    retryAfterMs: Type.Optional(Type.Integer({ description: 'with fill:false, when to read again' })),
  },
)

const err = (description: string): TSchema => Type.Object(ErrorBody.properties, { additionalProperties: true, description })

/** A 401 names the scheme that would do (RFC 9110), documented as the header it is. */
export const unauthorized = (description: string): TSchema =>
  Type.Object(ErrorBody.properties, {
    additionalProperties: true,
    description,
    headers: { 'WWW-Authenticate': { type: 'string', description: 'always `Bearer realm="cachewarden"`' } },
  })

/** The error responses every authenticated route can give. */
export const authErrors = {
  401: unauthorized('No or unknown bearer key (`unauthorized`)'),
  403: err('The key lacks the route\'s scope (`forbidden`)'),
  429: Type.Object(ErrorBody.properties, {
    additionalProperties: true,
    description: 'Too many requests (`rate_limited`); a limited route also sends `x-ratelimit-limit`, `-remaining` and `-reset`',
    headers: { 'Retry-After': { type: 'integer', description: 'seconds until a request may succeed' } },
  }),
  500: err('A bug (`internal_error`); logged, never detailed'),
  503: err('A backend the request needs is unreachable (`backend_unavailable`)'),
}

export const badRequest = { 400: err('Schema or limit violation (`invalid_request`); the message names the field') }
export const tooLarge = { 413: err('`value_too_large` or `payload_too_large`') }
export const bodyTooLarge = { 413: err('The body is over the body limit (`payload_too_large`)') }
export const notFoundError = { 404: err('No such entry or route (`not_found`)') }
export const leaseConflict = {
  409: err('The lease was voided by an invalidation, or issued for another key (`lease_invalidated`)'),
}

export const Json = Type.Unknown({ description: 'any JSON value' })

export const InvalidationMode = Type.Union([Type.Literal('delete'), Type.Literal('stale')], {
  description: '`delete` removes entries; `stale` keeps them, marked stale, for `?allowStale` readers',
})

export const InvalidationResult = Type.Object(
  {
    id: Type.String(),
    invalidated: Type.Integer({ description: 'entries deleted or newly marked stale' }),
    mode: InvalidationMode,
    durationMs: Type.Number(),
  },
  { examples: [{ id: '3b0f4c3e-8a51-4a43-9d0e-2f1c1d6f9a10', invalidated: 3, mode: 'delete', durationMs: 0.042 }] },
)

export const Timestamp = Type.String({ format: 'date-time' })

// Query strings refuse a parameter they do not have: one hook in app.ts makes every /v1 one strict.
export const ModeQuery = Type.Object({ mode: Type.Optional(InvalidationMode) })

export const LimitQuery = Type.Object({
  limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
})
