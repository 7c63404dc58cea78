import type { ErrorCode } from '../errors.js'

/** A code from the contract's error table, or `unexpected_response` for a reply that is not one of ours (a proxy's 502 page…). */
export type ClientErrorCode = ErrorCode | 'unexpected_response'

/** Every error reply from cachewarden: `code` is the contract's error code, `status` the HTTP status. */
export class CachewardenError extends Error {
  readonly code: ClientErrorCode
  readonly status: number
  /** The parsed reply body, for fields beyond `error` and `message`. */
  readonly body: unknown

  constructor(code: ClientErrorCode, status: number, message: string, body?: unknown) {
    super(message)
    this.name = new.target.name
    this.code = code
    this.status = status
    this.body = body
  }
}

/** 400 `invalid_request`: a schema or limit violation; the message names the field. */
export class InvalidRequestError extends CachewardenError {}
/** 401 `unauthorized`: no or unknown API key. */
export class UnauthorizedError extends CachewardenError {}
/** 403 `forbidden` (the key lacks the scope) or `clear_token_invalid`. */
export class ForbiddenError extends CachewardenError {}
/** 404 `not_found` that is not an entry miss (an entry miss is not an error: see `get`). */
export class NotFoundError extends CachewardenError {}
/** 409 `lease_invalidated`: an invalidation touched the key after the lease was issued. */
export class LeaseInvalidatedError extends CachewardenError {}
/** 413 `value_too_large` or `payload_too_large`. */
export class TooLargeError extends CachewardenError {}
/** 429 `rate_limited`. */
export class RateLimitedError extends CachewardenError {}
/** 503 `backend_unavailable`: Redis or PostgreSQL is needed and unreachable; try again. */
export class BackendUnavailableError extends CachewardenError {}
/** 500 `internal_error`: a bug in cachewarden (it was logged there). */
export class InternalServerError extends CachewardenError {}

const BY_CODE: Record<ErrorCode, typeof CachewardenError> = {
  invalid_request: InvalidRequestError,
  unauthorized: UnauthorizedError,
  forbidden: ForbiddenError,
  clear_token_invalid: ForbiddenError,
  not_found: NotFoundError,
  lease_invalidated: LeaseInvalidatedError,
  value_too_large: TooLargeError,
  payload_too_large: TooLargeError,
  rate_limited: RateLimitedError,
  backend_unavailable: BackendUnavailableError,
  internal_error: InternalServerError,
}

/** The error for a non-2xx reply: the class of its contract code, or the base class for anything else. */
export function errorFromReply(status: number, body: unknown): CachewardenError {
  const b = body !== null && typeof body === 'object' ? (body as { error?: unknown; message?: unknown }) : {}
  const message = typeof b.message === 'string' ? b.message : `cachewarden replied ${status}`
  if (typeof b.error === 'string' && Object.hasOwn(BY_CODE, b.error)) {
    const Class = BY_CODE[b.error as ErrorCode]
    return new Class(b.error as ErrorCode, status, message, body)
  }
  return new CachewardenError('unexpected_response', status, message, body)
}
