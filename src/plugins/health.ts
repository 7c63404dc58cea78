import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

export interface ReadinessCheck {
  name: string
  /** Resolves true when the dependency is usable; never throws. */
  ready: () => boolean | Promise<boolean>
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Dependencies `/health/ready` waits on (Redis, the PostgreSQL listener…). */
    readinessChecks: ReadinessCheck[]
  }
}

const Check = Type.Object(
  { status: Type.String(), checks: Type.Record(Type.String(), Type.Boolean()) },
  { examples: [{ status: 'ready', checks: { redis: true, postgres: true } }] },
)

/** `/health/live` (the process answers) and `/health/ready` (every configured backend is usable). */
export default fp(
  async function health(app: FastifyInstance) {
    app.decorate('readinessChecks', [] as ReadinessCheck[])

    app.get(
      '/health/live',
      {
        schema: {
          tags: ['operations'],
          summary: 'Liveness',
          description: 'Always 200 while the process answers HTTP; no key needed.',
          response: { 200: Type.Object({ status: Type.Literal('ok') }) },
        },
      },
      async () => ({ status: 'ok' as const }),
    )

    app.get(
      '/health/ready',
      {
        schema: {
          tags: ['operations'],
          summary: 'Readiness',
          description: '503 while a configured Redis or PostgreSQL listener is unreachable.',
          response: { 200: Check, 503: Check },
        },
      },
      async (_request, reply) => {
        const checks: Record<string, boolean> = {}
        await Promise.all(
          app.readinessChecks.map(async (check) => {
            checks[check.name] = await Promise.resolve(check.ready()).catch(() => false)
          }),
        )
        const ok = Object.values(checks).every(Boolean)
        return reply.code(ok ? 200 : 503).send({ status: ok ? 'ready' : 'unavailable', checks })
      },
    )
  },
  { name: 'cachewarden-health' },
)
