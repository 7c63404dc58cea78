import { createHash, timingSafeEqual } from 'node:crypto'
import { Type } from '@sinclair/typebox'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'
import { LatencyHistogram, type LatencyChild } from './latency-histogram.js'
import type { CacheService } from '../cache/cache-service.js'
import { INVALIDATION_MODES, INVALIDATION_SOURCES, SELECTOR_LABEL, selectorLabels, type InvalidationRecord } from '../cache/types.js'
import { CacheError } from '../errors.js'
import { unauthorized } from '../schemas/common.js'
import { METRICS_SECURITY_SCHEME } from './swagger.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** false: the route is not in the request latency histogram (a stream open for an hour). */
    latency?: boolean
  }
  interface FastifyInstance {
    /** This app's Prometheus registry (the process metrics live in a shared one). */
    metrics: {
      registry: Registry
      scrape(): Promise<string>
      /** Observes a reply sent where no hook runs (a URL refused before routing) under `unmatched`. */
      observeUnrouted(request: FastifyRequest, reply: FastifyReply): void
    }
  }
}

export const METRIC_PREFIX = 'cachewarden_'
/** The `route` label of requests that matched no route: a raw URL would be unbounded. */
export const UNMATCHED_ROUTE = 'unmatched'


// A cache hit takes well under a millisecond, so the buckets start far below prom-client's
// default 5 ms.
const HTTP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
const ORIGIN_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

// Process metrics describe the process, not an app: one registry for all the apps of a
// process, created on first use, so tests that build many apps add no observers per app.
let processRegistry: Registry | undefined
function processMetrics(): Registry {
  if (processRegistry === undefined) {
    processRegistry = new Registry()
    collectDefaultMetrics({ register: processRegistry })
  }
  return processRegistry
}

/**
 * Registers every cachewarden metric on `registry`, fed from the core. Counters the core
 * already keeps (its monotonic `totals`) and store sizes are read at scrape time, so the
 * hot path does no metric work; the rest follow the core's events.
 */
export function registerCacheMetrics(registry: Registry, cache: CacheService): void {
  const t = cache.totals
  const name = (n: string) => METRIC_PREFIX + n
  const registers = [registry]

  new Counter({
    name: name('cache_hits_total'),
    help: 'Reads that found a usable entry.',
    registers,
    collect() {
      this.reset()
      this.inc(t.hits)
    },
  })
  new Counter({
    name: name('cache_misses_total'),
    help: 'Reads that found no usable entry (and got a lease).',
    registers,
    collect() {
      this.reset()
      this.inc(t.misses)
    },
  })
  new Counter({
    name: name('cache_sets_total'),
    help: 'Entries written.',
    registers,
    collect() {
      this.reset()
      this.inc(t.sets)
    },
  })
  new Counter({
    name: name('cache_evictions_total'),
    help: 'Entries the store dropped by itself: reason "evict" (LRU, over a bound) or "expire" (TTL).',
    labelNames: ['reason'],
    registers,
    collect() {
      this.reset()
      for (const [reason, n] of Object.entries(t.evictions)) this.inc({ reason }, n)
    },
  })
  new Counter({
    name: name('lease_rejections_total'),
    help: 'Writes refused with lease_invalidated.',
    registers,
    collect() {
      this.reset()
      this.inc(t.leaseRejections)
    },
  })
  new Counter({
    name: name('invalidation_failures_total'),
    help: 'Invalidations that could not be applied, by source.',
    labelNames: ['source'],
    registers,
    collect() {
      this.reset()
      // Every source has a series (at 0 too), so `increase()` sees the first failure.
      for (const source of INVALIDATION_SOURCES) this.inc({ source }, t.invalidationFailures[source] ?? 0)
    },
  })

  // Both size gauges are collected concurrently, so they share one store.size() call (a
  // Redis round trip in cluster mode). If it fails, the gauges keep their last value rather
  // than failing the whole scrape.
  let pendingSize: Promise<{ entries: number; bytes: number } | undefined> | undefined
  const size = () =>
    (pendingSize ??= cache.store
      .size()
      .catch(() => undefined)
      .finally(() => {
        pendingSize = undefined
      }))
  new Gauge({
    name: name('cache_entries'),
    help: 'Entries in the store.',
    registers,
    async collect() {
      const now = await size()
      if (now !== undefined) this.set(now.entries)
    },
  })
  new Gauge({
    name: name('cache_bytes'),
    help: 'Accounted bytes in the store (keys, values, user ids and tags).',
    registers,
    async collect() {
      const now = await size()
      if (now !== undefined) this.set(now.bytes)
    },
  })

  const invalidations = new Counter({
    name: name('invalidations_total'),
    help: 'Invalidations applied, by selector kind (key, user, tag, prefix, all), source and mode. One naming several kinds counts under each.',
    labelNames: ['selector', 'source', 'mode'],
    registers,
  })
  const invalidatedEntries = new Counter({
    name: name('invalidated_entries_total'),
    help: 'Entries deleted or marked stale by invalidations, by selector kind. One naming several kinds counts under each.',
    labelNames: ['selector'],
    registers,
  })
  const lastInvalidation = new Gauge({
    name: name('last_invalidation_timestamp_seconds'),
    help: 'When the last invalidation was applied (Unix seconds); 0 before the first.',
    registers,
  })
  lastInvalidation.set(0)
  // Every series there can be starts at 0 (a bounded set: 5 × 6 × 2), so rate() and
  // increase() see the first invalidation of each kind, and a fresh scrape shows them all.
  for (const selector of [...Object.values(SELECTOR_LABEL), 'all']) {
    invalidatedEntries.inc({ selector }, 0)
    for (const source of INVALIDATION_SOURCES) for (const mode of INVALIDATION_MODES) invalidations.inc({ selector, source, mode }, 0)
  }
  cache.on('invalidation', (record: InvalidationRecord) => {
    const count = (selector: string) => {
      invalidations.inc({ selector, source: record.source, mode: record.mode })
      invalidatedEntries.inc({ selector }, record.invalidated)
    }
    // As /v1/stats counts it: under each kind the selector names, `all` for everything at once.
    for (const label of selectorLabels(record.selector)) count(label)
    lastInvalidation.set(Date.parse(record.at) / 1000)
  })

  const originRequests = new Counter({
    name: name('origin_requests_total'),
    help: 'Calls to origins, by origin name (from the config) and result: success, error or timeout.',
    labelNames: ['origin', 'result'],
    registers,
  })
  const originDuration = new Histogram({
    name: name('origin_request_duration_seconds'),
    help: 'Duration of origin calls, by origin name.',
    labelNames: ['origin'],
    buckets: ORIGIN_BUCKETS,
    registers,
  })
  cache.on('origin_request', ({ origin, result, durationMs }) => {
    originRequests.inc({ origin, result })
    originDuration.observe({ origin }, durationMs / 1000)
  })

  const refreshes = new Counter({
    name: name('refreshes_total'),
    help: 'Background refreshes, forced refreshes and warm loads, by result: success or error.',
    labelNames: ['result'],
    registers,
  })
  refreshes.inc({ result: 'success' }, 0)
  refreshes.inc({ result: 'error' }, 0)
  cache.on('refresh', ({ result }) => refreshes.inc({ result }))

  // 0 also when the feature is off (no REDIS_URL / PG_URL), so the series always exists.
  const bus = new Gauge({ name: name('bus_connected'), help: '1 while the Redis bus is connected (cluster mode), else 0.', registers })
  bus.set(0)
  cache.on('bus_state', ({ connected }) => bus.set(connected ? 1 : 0))
  const listener = new Gauge({
    name: name('pg_listener_connected'),
    help: '1 while the PostgreSQL listener is listening, else 0.',
    registers,
  })
  listener.set(0)
  cache.on('pg_listener_state', ({ connected }) => listener.set(connected ? 1 : 0))
}

const digest = (secret: string) => createHash('sha256').update(secret).digest()

/**
 * Prometheus metrics: the `cachewarden_*` metrics of DESIGN.md section 8 on a per-app
 * registry, prom-client's process metrics and the latency hooks. `metricsRoute` below
 * serves them (bearer `METRICS_TOKEN` when set).
 */
export default fp(
  async function metrics(app: FastifyInstance) {
    const registry = new Registry()
    registerCacheMetrics(registry, app.cache)

    const httpDuration = new LatencyHistogram(
      `${METRIC_PREFIX}http_request_duration_seconds`,
      'HTTP request duration by route pattern (never a raw URL), method and status code.',
      HTTP_BUCKETS,
      registry,
    )
    // The only per-request metric work: one observe when the response is done. Each route
    // gets its own onResponse hook with the route pattern closed over (no route lookup), and
    // each method and status its own child, made once (no label hashing per request).
    // Requests that matched no route are observed by the global hook under `unmatched`.
    // Callback hooks: no promise per request. A route whose config says `latency: false` (the
    // SSE stream: Fastify runs onResponse when a hijacked reply ends, so a stream open for an
    // hour would count as one request of an hour) is not observed, nor is its HEAD.
    const observer = (route: string) => {
      const children = new Map<string, LatencyChild>()
      return (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
        const id = request.method + reply.statusCode
        let child = children.get(id)
        if (child === undefined) {
          child = httpDuration.child({ route, method: request.method, status_code: reply.statusCode })
          children.set(id, child)
        }
        child.observe(reply.elapsedTime / 1000)
        done()
      }
    }
    app.addHook('onRoute', (routeOptions) => {
      if (routeOptions.config?.latency === false) return
      const hook = observer(routeOptions.url)
      const existing = routeOptions.onResponse
      routeOptions.onResponse = existing === undefined ? [hook] : [...(Array.isArray(existing) ? existing : [existing]), hook]
    })
    const unmatched = observer(UNMATCHED_ROUTE)
    app.addHook('onResponse', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
      if (request.is404) unmatched(request, reply, done)
      else done()
    })

    const scrape = async () => (await processMetrics().metrics()) + (await registry.metrics())
    const observeUnrouted = (request: FastifyRequest, reply: FastifyReply) => unmatched(request, reply, () => undefined)
    app.decorate('metrics', { registry, scrape, observeUnrouted })
  },
  { name: 'cachewarden-metrics', dependencies: ['cachewarden-errors'] },
)

/**
 * `GET /metrics`. Apart from the hooks above so that those can go in before the docs plugin
 * (whose own routes then get latency series too) and this route after it (so it is documented).
 */
export async function metricsRoute(app: FastifyInstance) {
  const { registry, scrape } = app.metrics
  const token = app.config.metricsToken === undefined ? undefined : digest(app.config.metricsToken)
  app.get(
    '/metrics',
    {
      schema: {
        tags: ['operations'],
        summary: 'Prometheus metrics',
        description:
          'The `cachewarden_*` metrics (listed in the README, "Metrics and dashboards") and the process metrics, in the Prometheus ' +
          'text format. Open unless `METRICS_TOKEN` is set; then `Authorization: Bearer <METRICS_TOKEN>` is required.',
        // Either none (the default) or the metrics token: Swagger UI's Authorize takes it apart from the API key.
        security: [{}, { [METRICS_SECURITY_SCHEME]: [] }],
        response: {
          200: {
            description: 'Prometheus text exposition format 0.0.4',
            content: { 'text/plain': { schema: Type.String({ example: 'cachewarden_cache_hits_total 42\n' }) } },
          },
          401: unauthorized('`METRICS_TOKEN` is set and the bearer token is missing or wrong (`unauthorized`)'),
        },
      },
    },
    async (request, reply) => {
      if (token !== undefined && !tokenMatches(request.headers.authorization, token)) {
        throw new CacheError('unauthorized', 'this endpoint needs Authorization: Bearer <METRICS_TOKEN>')
      }
      const body = await scrape()
      return reply.type(registry.contentType).send(body)
    },
  )
}

function tokenMatches(header: string | undefined, expected: Buffer): boolean {
  if (header === undefined || header.length > 4096 || header.slice(0, 7).toLowerCase() !== 'bearer ') return false
  return timingSafeEqual(digest(header.slice(7).trim()), expected)
}
