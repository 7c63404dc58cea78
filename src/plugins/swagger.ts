import { readFileSync } from 'node:fs'
import { STATUS_CODES } from 'node:http'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import type { FastifyContextConfig, FastifyInstance, FastifySchema } from 'fastify'
import fp from 'fastify-plugin'

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * What the OpenAPI document shows of a route's headers without Fastify validating them on
     * every request: request headers (a JSON schema of an object), and response headers by status.
     */
    documented?: { headers?: object; responseHeaders?: Record<number, Record<string, { type: string; description: string }>> }
  }
}

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string; description: string }

/** The security scheme authenticated routes name in the OpenAPI document. */
export const SECURITY_SCHEME = 'bearerAuth'
/** The scheme `/metrics` names: its own bearer token, `METRICS_TOKEN`, not an API key. */
export const METRICS_SECURITY_SCHEME = 'metricsToken'

const TAGS = [
  { name: 'entries', description: 'Read and write cache entries (scopes `read` and `write`)' },
  { name: 'invalidation', description: 'Invalidate by key, user, tag or prefix (scope `invalidate`)' },
  { name: 'streams', description: 'Server-Sent Events (scope `read`)' },
  { name: 'inspection', description: 'Debug views and stats (scope `admin`)' },
  { name: 'operations', description: 'Health, metrics and docs (no key needed)' },
]

/** A HEAD route (exposed from its GET) documented as what it is: the GET's statuses, no bodies. */
function headersOnly(schema: FastifySchema): FastifySchema {
  const responses = (schema.response ?? {}) as Record<string, { description?: string; headers?: unknown }>
  return {
    ...schema,
    summary: `${(schema as { summary?: string }).summary ?? 'HEAD'} (headers only)`,
    response: Object.fromEntries(
      Object.entries(responses).map(([status, r]) => [
        status,
        { type: 'null', description: r.description ?? STATUS_CODES[status] ?? status, ...(r.headers === undefined ? {} : { headers: r.headers }) },
      ]),
    ),
  }
}

/**
 * A route's schema as the document shows it: each response with a description (its status's
 * name where the schema gives none, rather than "Default Response") and the headers its route
 * documents. New objects throughout: the route's own schemas serialize its replies.
 */
function described(schema: FastifySchema, documented: FastifyContextConfig['documented']): FastifySchema {
  const responses = (schema.response ?? {}) as Record<string, { description?: string; headers?: unknown }>
  return {
    ...schema,
    ...(documented?.headers === undefined ? {} : { headers: documented.headers }),
    response: Object.fromEntries(
      Object.entries(responses).map(([status, r]) => {
        const headers = documented?.responseHeaders?.[Number(status)]
        return [status, { ...r, description: r.description ?? STATUS_CODES[status] ?? status, ...(headers === undefined ? {} : { headers }) }]
      }),
    ),
  }
}

/**
 * The OpenAPI document (from the route schemas) and Swagger UI at `/docs`, with a bearer
 * security scheme so the Authorize button works. Register before the routes: it collects
 * them as they are added.
 */
export default fp(
  async function swaggerDocs(app: FastifyInstance) {
    await app.register(swagger, {
      openapi: {
        openapi: '3.0.3',
        info: {
          title: 'cachewarden',
          version: pkg.version,
          description: `${pkg.description} Authenticate with \`Authorization: Bearer <secret>\`.`,
        },
        tags: TAGS,
        components: {
          securitySchemes: {
            [SECURITY_SCHEME]: { type: 'http', scheme: 'bearer', description: 'An API key secret (CACHEWARDEN_API_KEYS)' },
            [METRICS_SECURITY_SCHEME]: { type: 'http', scheme: 'bearer', description: 'METRICS_TOKEN, for /metrics only, when it is set' },
          },
        },
      },
      // Routes that need a key say so, so Swagger UI sends the key it was authorized with.
      transform: ({ schema, url, route }) => {
        if (schema === undefined) return { schema, url }
        const full = described(schema, route.config?.documented)
        const documented = route.method === 'HEAD' ? headersOnly(full) : full
        if (route.config?.scope === undefined) return { schema: documented, url }
        return { schema: { ...documented, security: [{ [SECURITY_SCHEME]: [] }] }, url }
      },
    })
    await app.register(swaggerUi, {
      routePrefix: '/docs',
      uiConfig: { docExpansion: 'list', deepLinking: true, displayRequestDuration: true, tryItOutEnabled: false },
    })
  },
  { name: 'cachewarden-swagger' },
)
