import type { FastifyServerOptions } from 'fastify'

/**
 * The pino options the server logs with. Request logging is off (see app.ts), and the
 * authorization header is redacted wherever a request or its headers get logged, so a
 * bearer secret never reaches a log; clear tokens and cached values are never logged at all.
 * Errors go to the log whole, so the fields in which libraries put what was sent are cut:
 * ioredis' `command` (a write's arguments are the key, value, user and tags) and Node's
 * HTTP parser's `rawPacket` (the request's bytes, bearer secret included).
 */
export function loggerOptions(level: string): Exclude<FastifyServerOptions['logger'], boolean | undefined> {
  return {
    level,
    redact: {
      paths: [
        'req.headers.authorization',
        'headers.authorization',
        'req.headers.cookie',
        'headers.cookie',
        ...['err', 'err.cause', 'err.previousErrors[*]'].flatMap((at) => [`${at}.command`, `${at}.rawPacket`]),
      ],
      censor: '[redacted]',
    },
  }
}

/**
 * Lets one log line per subject through per interval and counts the ones held back, so a
 * failure that repeats on every request (a backend down) logs now and then, not per request.
 */
export class LogThrottle {
  readonly #last = new Map<string, { at: number; held: number }>()
  readonly #intervalMs: number
  readonly #maxSubjects: number

  constructor(intervalMs: number, maxSubjects = 256) {
    this.#intervalMs = intervalMs
    this.#maxSubjects = maxSubjects
  }

  /** undefined to hold this line back; else how many lines of the subject were held back before it. */
  pass(subject: string, now = performance.now()): number | undefined {
    const last = this.#last.get(subject)
    if (last !== undefined && now - last.at < this.#intervalMs) {
      last.held++
      return undefined
    }
    if (last === undefined && this.#last.size >= this.#maxSubjects) this.#last.delete(this.#last.keys().next().value!)
    this.#last.set(subject, { at: now, held: 0 })
    return last?.held ?? 0
  }
}
