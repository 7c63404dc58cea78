import type { FastifyServerOptions } from 'fastify'

/**
 * The pino options the server logs with. Request logging is off (see app.ts), and the
 * authorization header is redacted wherever a request or its headers get logged, so a
 * bearer secret never reaches a log; clear tokens and cached values are never logged at all.
 */
export function loggerOptions(level: string): Exclude<FastifyServerOptions['logger'], boolean | undefined> {
  return {
    level,
    redact: {
      paths: ['req.headers.authorization', 'headers.authorization', 'req.headers.cookie', 'headers.cookie'],
      censor: '[redacted]',
    },
  }
}
