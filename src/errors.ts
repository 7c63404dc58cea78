// The error catalog: every error a client can see, with its stable code and status.
// The codes are part of the contract (DESIGN.md section 3); never rename one.

export const ERROR_CODES = {
  invalid_request: 400,
  unauthorized: 401,
  forbidden: 403,
  clear_token_invalid: 403,
  not_found: 404,
  lease_invalidated: 409,
  value_too_large: 413,
  payload_too_large: 413,
  rate_limited: 429,
  backend_unavailable: 503,
  internal_error: 500,
} as const

export type ErrorCode = keyof typeof ERROR_CODES

/** An error with a contract code; the HTTP layer turns it into `{error, message, ...extra}`. */
export class CacheError extends Error {
  readonly code: ErrorCode
  readonly statusCode: number
  readonly extra: Record<string, unknown> | undefined

  constructor(code: ErrorCode, message: string, extra?: Record<string, unknown>) {
    super(message)
    this.name = 'CacheError'
    this.code = code
    this.statusCode = ERROR_CODES[code]
    this.extra = extra
  }
}

export const invalidRequest = (message: string) => new CacheError('invalid_request', message)
export const notFound = (message: string, extra?: Record<string, unknown>) =>
  new CacheError('not_found', message, extra)
export const leaseInvalidated = (key: string) =>
  new CacheError(
    'lease_invalidated',
    `the lease for "${truncate(key)}" was voided by an invalidation accepted after it was issued; read again`,
  )
export const valueTooLarge = (message: string) => new CacheError('value_too_large', message)
/** The 429 every rate limit answers (route limits, the global limit, blocked addresses). */
export const rateLimited = (retryAfter: string) => new CacheError('rate_limited', `too many requests; retry in ${retryAfter}`)
export const backendUnavailable = (what: string) =>
  new CacheError('backend_unavailable', `${what} is unavailable; try again`)

/** Shortens user-supplied text before it goes into a message. */
export function truncate(text: string, max = 80): string {
  return text.length > max ? `${text.slice(0, max)}…` : text
}
