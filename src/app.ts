import type { IncomingMessage, ServerResponse } from 'node:http'
import { isUtf8 } from 'node:buffer'
import { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { Ajv } from 'ajv'
import addFormats from 'ajv-formats'
import { Type } from '@sinclair/typebox'
import Fastify, { LogController, errorCodes, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import { AuditLog } from './cache/audit-log.js'
import { CacheService, type CoreLogger } from './cache/cache-service.js'
import { beforeGraceEnds, defaultConfig, type Config } from './config.js'
import { invalidRequest, truncate } from './errors.js'
import { badRequest, bodyTooLarge } from './schemas/common.js'
import auth from './plugins/auth.js'
import errors, { Drains, bodyMayCome, drainRest, isDiscarding, rawReply, sendRaw } from './plugins/errors.js'
import health from './plugins/health.js'
import metrics, { metricsRoute } from './plugins/metrics.js'
import swaggerDocs from './plugins/swagger.js'
import origins from './plugins/origins.js'
import rateLimits from './plugins/rate-limits.js'
import adminRoutes from './routes/admin.js'
import debugRoutes from './routes/debug.js'
import entryRoutes from './routes/entries.js'
import eventRoutes from './routes/events.js'
import invalidationRoutes from './routes/invalidations.js'
import streamRoutes from './routes/stream.js'
import { PostgresListener } from './sources/postgres-listener.js'

import originRoutes from './routes/origins.js'
import { MemoryStore } from './stores/memory-store.js'
import type { Store } from './stores/store.js'
import { TieredStore } from './stores/tiered-store.js'

declare module 'fastify' {
  interface FastifyInstance {
    cache: CacheService
    config: Config
    audit: AuditLog
  }
}

export interface BuildOptions {
  /** Fastify's logger option; off by default (server.ts passes pino options). */
  logger?: FastifyServerOptions['logger']
  /** A store to use instead of the one the config selects (tests). */
  store?: Store
  /** The clock (tests pass a fake one). */
  now?: () => number
  /** Lease checks on writes; off only to prove the race test can fail. */
  leasesEnabled?: boolean
  /** The metrics plugin and /metrics; off only for the benchmark's baseline. */
  metrics?: boolean
}

// Bodies are validated strictly (a string is not a number); query strings and params
// arrive as text, so they are coerced.
function validatorCompiler() {
  const strict = new Ajv({ allErrors: false, coerceTypes: false, useDefaults: true, removeAdditional: false, strict: false })
  const coercing = new Ajv({ allErrors: false, coerceTypes: true, useDefaults: true, removeAdditional: false, strict: false })
  addFormats.default(strict)
  addFormats.default(coercing)
  return ({ schema, httpPart }: { schema: object; httpPart?: string }) =>
    (httpPart === 'body' ? strict : coercing).compile(schema)
}

// The router refuses an over-long path parameter before it picks a route: name the
// parameter from the path, as the route's own check would have.
function overlongParam(url: string, limits: Config['limits']): string {
  const [field, maxBytes] = /^\/v1\/(?:debug\/)?users\//.test(url)
    ? ['userId', limits.maxUserIdBytes]
    : url.startsWith('/v1/tags/')
      ? ['tag', limits.maxTagBytes]
      : ['key', limits.maxKeyBytes]
  return `${field} is longer than ${maxBytes} bytes`
}

/** Builds the cachewarden Fastify app (no `listen`): plugins, then routes. */
export async function buildApp(partial: Partial<Config> = {}, options: BuildOptions = {}): Promise<FastifyInstance> {
  const config: Config = { ...defaultConfig(), ...partial }
  // The request bodies read only to be thrown away, after a refusal (the errors plugin,
  // frameworkErrors) or before Fastify routes the request (the front door).
  const drains = new Drains()
  const app = Fastify({
    logger: options.logger ?? false,
    bodyLimit: config.bodyLimitBytes,
    // Room for any key, user id or tag %-encoded whole: longer is refused before routing.
    routerOptions: { maxParamLength: Math.max(config.limits.maxKeyBytes, config.limits.maxUserIdBytes, config.limits.maxTagBytes) * 3 + 64 },
    // Per-request log lines would cost more than a cache hit; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
    // Fastify's 10 s for a plugin to start was seen running out on a loaded 2-core machine
    // (@fastify/swagger-ui reading its static files); a plugin that truly hangs still fails.
    pluginTimeout: 60_000,
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    // Requests that arrive while the server drains get a 503 from frontDoor() below instead:
    // Fastify's own has a body outside the contract ({"error":"Service Unavailable",…}).
    return503OnClosing: false,
    // Fastify turns Node's request timeout off: a client could then hold a connection forever
    // by stalling its upload (or, after a 401, have its endless body read). The headers
    // timeout must not exceed it (Node would take the larger as the request timeout), and
    // Node checks connections at the interval, so a short timeout is enforced on time too.
    requestTimeout: config.requestTimeoutMs,
    http: {
      // Checked below instead, to answer with the contract's body rather than Node's empty 400.
      requireHostHeader: false,
      headersTimeout: Math.min(60_000, config.requestTimeoutMs),
      connectionsCheckingInterval: Math.min(30_000, Math.max(100, Math.floor(config.requestTimeoutMs / 4))),
    },
    // Bad percent-encoding and over-long path parameters get the contract's 400, not Fastify's own body.
    // No hook runs for them, so they are counted here (route `unmatched`; no timing: handled at once).
    frameworkErrors: (error, request, reply) => {
      const message =
        error.code === 'FST_ERR_MAX_PARAM_LENGTH' ? overlongParam(request.url, config.limits) : 'the URL is not valid (bad percent-encoding)'
      const server = request.server as FastifyInstance
      drainRest(request.raw, reply as FastifyReply, drains)
      ;(reply as FastifyReply).code(400).send({ error: 'invalid_request', message })
      if (server.hasDecorator('metrics')) server.metrics.observeUnrouted(request as FastifyRequest, reply as FastifyReply)
    },
    clientErrorHandler: clientError,
  })
  frontDoor(app, drains)
  app.setValidatorCompiler(validatorCompiler())
  // Some clients send `content-type: application/json` on every request, bodiless DELETEs
  // included. An empty JSON body is no body: routes without one go ahead, and routes that
  // need one refuse it through their schema (400 invalid_request either way).
  // Only JSON. Fastify's own text/plain parser would hand a JSON text to the schema as a
  // string ("body must be object"): a text/plain body is refused like any other type, except
  // an empty one (what `fetch` sends for `body: ''`), which is no body, as for JSON below.
  app.removeContentTypeParser('text/plain')
  app.addContentTypeParser('text/plain', { parseAs: 'string' }, (request, body, done) => {
    if (body.length === 0) done(null, undefined)
    else done(new errorCodes.FST_ERR_CTP_INVALID_MEDIA_TYPE(request.headers['content-type']), undefined)
  })
  // Bodies are read as sent: a compressed one (`Content-Encoding: gzip`) is refused whatever its
  // bytes, rather than parsed when they happen to be plain JSON and called "not JSON" otherwise.
  // Read as bytes: a body that is not UTF-8 is refused, where decoding it as a string would
  // turn each bad byte into U+FFFD, and two different keys or user ids into the same one.
  const parseJson = app.getDefaultJsonParser('error', 'error')
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
    const encoding = request.headers['content-encoding']
    if (body.length === 0) done(null, undefined)
    else if (encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
      done(invalidRequest(`the body must be sent uncompressed (Content-Encoding ${truncate(encoding, 32)} is not supported)`), undefined)
    } else if (!isUtf8(body as Buffer)) done(invalidRequest('the body is not valid UTF-8'), undefined)
    else parseJson(request, (body as Buffer).toString('utf8'), done)
  })

  const now = options.now ?? Date.now
  const bounds = { maxEntries: config.maxEntries, maxBytes: config.maxBytes, now }
  const store =
    options.store ??
    (config.redisUrl
      ? new TieredStore({ ...bounds, redisUrl: config.redisUrl, l1MaxTtlMs: config.l1MaxTtlMs, logger: app.log as CoreLogger })
      : new MemoryStore(bounds))
  const cache = new CacheService({
    store,
    limits: config.limits,
    now,
    logger: app.log as CoreLogger,
    fillLeaseMs: config.fillLeaseMs,
    invalidationLogSize: config.invalidationLogSize,
    leasesEnabled: options.leasesEnabled,
  })
  app.decorate('config', config)
  app.decorate('cache', cache)
  const audit = new AuditLog({
    size: config.security.auditLogSize,
    logger: app.log as CoreLogger,
    now,
    refusalWindowMs: config.security.clearRateLimitWindowMs,
  })
  const unwatch = audit.watch(cache)
  app.decorate('audit', audit)
  app.addHook('onClose', async () => {
    unwatch()
    audit.close()
    await cache.close()
  })

  await app.register(errors, { drains })
  await app.register(rateLimits, { security: config.security })
  await app.register(auth, {
    keys: config.apiKeys,
    failureLimit: { max: config.security.authFailureLimitMax, windowMs: config.security.authFailureWindowMs },
  })
  // The metrics hooks go first, so every route gets its latency series (the docs' too);
  // swagger collects routes as they are added, so it goes before every route (/metrics too).
  if (options.metrics !== false) await app.register(metrics)
  await app.register(swaggerDocs)
  if (options.metrics !== false) await app.register(metricsRoute)
  await app.register(health)
  await app.register(origins)
  if (store instanceof TieredStore) {
    store.onBusState((connected) => {
      cache.emit('bus_state', { connected })
      // Whatever other instances sent while the bus was down never arrived here.
      if (connected) cache.emit('resync', { reason: 'the cluster bus was down, so invalidations may have been missed' })
    })
    // Another instance's invalidation, already applied here: into the log, metrics and stream.
    // Its clear or mark-all-stale is one of everything. A flush from an older build names
    // neither: the stream's clients resync.
    store.onRemoteInvalidation((r) => {
      if (!r.flush) {
        if (!r.write) cache.recordBusInvalidation(r.selector, r.mode, r.invalidated, r.note)
      } else if (r.mode !== undefined) cache.recordBusInvalidation({ all: true }, r.mode, r.invalidated, r.note)
      else cache.emit('resync', { reason: 'the cache was cleared or marked stale on another instance' })
    })
    app.readinessChecks.push({ name: 'redis', ready: () => store.healthy() })
    app.consistency.copyChecks.push({ name: 'l1-vs-redis', compare: (keys) => store.compareL1(keys) })
    // Connect once every plugin is registered, so the first bus_state reaches all listeners.
    app.addHook('onReady', async () => void (await store.connect()))
  }
  // Every /v1 query string refuses what it does not have, as bodies do: `?Mode=stale` must not
  // delete what was to be marked stale, `POST /v1/invalidations?mode=stale` (its mode is in the
  // body) must not quietly delete, nor `PUT …?ttlMs=5` keep the default TTL. Routes that take
  // no query parameter get an empty schema. (Not the stream: EventSource polyfills add
  // parameters of their own.)
  // Likewise a route that takes no body refuses one with fields, rather than ignore it:
  // `DELETE /v1/entries/k` with `{"mode": "stale"}` would delete.
  app.addHook('onRoute', (route) => {
    if (!route.url.startsWith('/v1/') || route.url === '/v1/invalidations/stream') return
    route.schema ??= {}
    route.schema.querystring = { ...(route.schema.querystring ?? Type.Object({})), additionalProperties: false }
    // What this hook can answer is in the route's OpenAPI responses too.
    const response = (route.schema.response ??= {}) as Record<string, unknown>
    response['400'] ??= badRequest[400]
    // Fastify never reads a GET's or HEAD's body: their routes (the entry read among them) get no hook.
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    if (route.schema.body === undefined && methods.some((m) => m !== 'GET' && m !== 'HEAD')) {
      const hooks = route.preValidation === undefined ? [] : Array.isArray(route.preValidation) ? route.preValidation : [route.preValidation]
      route.preValidation = [...hooks, refuseBody]
      // Read before it is refused, a body can be over the body limit.
      response['413'] ??= bodyTooLarge[413]
    }
  })
  await app.register(entryRoutes)
  await app.register(invalidationRoutes)
  await app.register(debugRoutes)
  await app.register(eventRoutes)

  if (config.pgUrl !== undefined) {
    const listener = new PostgresListener({
      url: config.pgUrl,
      channel: config.pgChannel,
      cache,
      logger: app.log as CoreLogger,
      reconnectPolicy: config.pgReconnectPolicy,
      policyOnFirstConnect: config.pgReconnectPolicyOnStart,
    })
    app.readinessChecks.push({ name: 'postgres', ready: () => listener.listening })
    // Started once the app is ready (not while plugins load); /health/ready is 503 until it listens.
    app.addHook('onReady', async () => listener.start())
    app.addHook('onClose', () => listener.close())
  }

  await app.register(originRoutes)

  await app.register(adminRoutes)
  await app.register(streamRoutes)
  return app
}

/** The preValidation of a route without a body schema: a body with anything in it is 400. */
function refuseBody(request: FastifyRequest, _reply: FastifyReply, done: (error?: Error) => void): void {
  const body = request.body
  if (body === undefined) return done()
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return done(invalidRequest(`${request.method} ${request.routeOptions.url} takes no body`))
  const [field] = Object.keys(body)
  if (field === undefined) return done()
  const hint = request.method === 'DELETE' ? ' (a DELETE takes its options in the query string)' : ''
  done(invalidRequest(`body.${field} is not allowed${hint}`))
}

const SHUTTING_DOWN = { error: 'backend_unavailable', message: 'this instance is shutting down; retry on another' }
const NEWEST = Symbol('the newest reply on a connection')
const LINGERING = Symbol('closing once the body has come')
type Tracked = Socket & { [NEWEST]?: ServerResponse; [LINGERING]?: true; _httpMessage?: ServerResponse | null }

/**
 * What Node calls to close a connection once its last reply is written (the reply said
 * `Connection: close`). Node's own ends it and destroys it at once; with the request's body
 * still coming (a refused upload, a 503 to one during shutdown) that resets the connection
 * under the reply, and the client, still writing, sees EPIPE or ECONNRESET instead of it.
 * So when the rest of the body is being read and thrown away (Drains: at most 64 MiB, for
 * at most 5 s; in shutdown, 1 s without a byte), this one ends its side and closes once the
 * body has come: a lingering close. A request the client pipelines behind that body is never
 * run (the front door drops it): its reply could not be sent.
 */
function closeAfterBody(this: Tracked): void {
  if (this[LINGERING]) return
  const newest = this[NEWEST]
  // (A newest reply not finished was queued behind the last one Node sends: never sent.)
  if (newest === undefined || !newest.writableFinished || newest.req.complete || !isDiscarding(newest.req)) {
    return Socket.prototype.destroySoon.call(this)
  }
  const req = newest.req
  this[LINGERING] = true
  if (this.writable) this.end()
  let waiting = 2
  const done = () => --waiting === 0 && this.destroy()
  if (this.writableFinished) done()
  else this.once('finish', done)
  req.once('end', done)
}

/**
 * Answers given before Fastify routes a request, with the contract's body, from listeners
 * put in front of Fastify's own (each closes the connection, once a body sent anyway has
 * come):
 * - once the server is shutting down (preClose: in-flight requests finish; a request that
 *   still arrives on an open connection, pipelined or kept alive, is refused), 503
 *   `backend_unavailable`, so the client retries elsewhere;
 * - HTTP/1.1 without a Host header (RFC 9112 3.2; Node's own check answers an empty 400),
 *   400 `invalid_request`;
 * - an Expect other than 100-continue (Node's own answer is an empty 417), 417.
 * It also keeps each connection's newest reply, for the shutdown and for closeAfterBody,
 * and has the body of a GET or HEAD (which Fastify never reads) thrown away once answered.
 */
function frontDoor(app: FastifyInstance, drains: Drains): void {
  const [fastifyHandler] = app.server.listeners('request') as ((req: IncomingMessage, res: ServerResponse) => void)[]
  // Without it, requests would go unchecked: Node's own Host check is off (requireHostHeader).
  if (fastifyHandler === undefined) throw new Error('Fastify attached no request listener to its server')
  let closing = false
  // Shutting down, every open connection closes after the last reply it owes, sent whole:
  // that reply says `Connection: close` (a client that read `keep-alive` would send its next
  // request on a connection about to close, and learn nothing of what became of it). One
  // whose last reply was begun with `keep-alive` is closed once that reply is written.
  // So each connection is tracked (once, as it opens), and with it its newest reply.
  const sockets = new Set<Tracked>()
  app.server.on('connection', (socket: Tracked) => {
    sockets.add(socket)
    socket.destroySoon = closeAfterBody
    socket.once('close', () => sockets.delete(socket))
  })
  // The server's close drops idle connections with Node's closeIdleConnections, which also
  // drops one whose last reply is still draining to a slow reader (ended, not yet written),
  // cutting it. This one drops only a connection that owes nothing: no reply in progress (one
  // only half-received is dropped too; it was never applied, so the client can retry it).
  app.server.closeIdleConnections = () => {
    for (const socket of sockets) {
      const last = socket[NEWEST]
      if (!socket._httpMessage && !socket[LINGERING] && (last === undefined || last.writableFinished)) socket.destroy()
    }
  }
  let cut: NodeJS.Timeout | undefined
  let sweep: NodeJS.Timeout | undefined
  app.addHook('preClose', (done) => {
    closing = true
    const grace = app.config.shutdownGraceMs
    const cutAfter = beforeGraceEnds(grace)
    // No body read to be thrown away is read past the cut (below), and from now on each
    // waits a second at most for its next byte.
    drains.hurry(cutAfter)
    // A request whose body has still not arrived a second before the grace ends (a stalled
    // upload, an `Expect: 100-continue` that never sent it) was never applied: its connection
    // is cut then, so the shutdown ends cleanly rather than be killed at the grace.
    cut = setTimeout(() => {
      for (const socket of sockets) {
        const last = socket[NEWEST]
        if (last !== undefined && !last.req.complete && !last.headersSent) socket.destroy()
      }
    }, cutAfter)
    // A reply a client still has not read whole (a slow reader, or one that stopped), just
    // before the grace ends: cut then rather than by the exit at the grace (exit 1), leaving
    // what follows the server's close (stores, origins, listeners) a quarter second.
    sweep = setTimeout(() => {
      for (const socket of sockets) {
        const last = socket[NEWEST]
        if (socket[LINGERING] || (last !== undefined && last.writableEnded && !last.writableFinished)) socket.destroy()
      }
    }, grace - 250)
    cut.unref()
    sweep.unref()
    for (const socket of sockets) {
      const last = socket[NEWEST]
      if (last === undefined) continue // idle: the server's close drops it
      if (last.writableFinished) {
        // Answered, and idle unless the body of a refused upload is still coming: closed
        // once it has come (closeAfterBody).
        if (isDiscarding(last.req)) socket.destroySoon()
        continue
      }
      if (!last.headersSent) last.shouldKeepAlive = false // Node ends the connection after it…
      // …unless the reply says keep-alive itself, or was begun already: then it is ended here
      // once written whole (destroySoon, as Node ends one that says close; not a half-close
      // a peer could hold open), unless a reply queued behind it (a 503) has the connection.
      last.once('finish', () => socket._httpMessage || socket.destroySoon())
    }
    done()
  })
  app.addHook('onClose', (_app, done) => {
    clearTimeout(cut)
    clearTimeout(sweep)
    done()
  })
  /**
   * Answers `req` in the front door (with 503 once shutting down): the connection closes
   * after the reply, once a body sent anyway has come. Pipelined behind a reply not yet
   * begun during shutdown, that one keeps the connection open for this 503. (Behind one
   * already begun with `Connection: close` the request goes unanswered and unapplied, and
   * the client retries it, as RFC 9112 9.3.2 has it.) Nothing is answered on a lingering
   * connection: pipelined behind a body read only to be thrown away, on a connection
   * closing once it has come, the request is not run (its reply could not be sent).
   */
  const answer = (req: IncomingMessage, res: ServerResponse, status: number, payload: { error: string; message: string }): void => {
    const socket = req.socket as Tracked
    if (socket[LINGERING]) return void req.resume()
    if (closing) {
      const ahead = socket[NEWEST]
      if (ahead !== undefined && !ahead.headersSent) ahead.shouldKeepAlive = true
      ;[status, payload] = [503, SHUTTING_DOWN]
    }
    socket[NEWEST] = res
    drains.discard(req, res)
    sendRaw(res, status, payload)
  }
  // An Expect other than 100-continue: Node would answer an empty 417.
  app.server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => {
    const expect = truncate(req.headers.expect ?? '', 32)
    answer(req, res, 417, { error: 'invalid_request', message: `Expect: ${expect} is not supported (only 100-continue)` })
  })
  app.server.removeListener('request', fastifyHandler)
  app.server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    const socket = req.socket as Tracked
    if (closing || socket[LINGERING]) return answer(req, res, 503, SHUTTING_DOWN)
    socket[NEWEST] = res
    // Fastify never reads the body of a GET or HEAD.
    if ((req.method === 'GET' || req.method === 'HEAD') && bodyMayCome(req)) drains.afterReply(req, res)
    if (req.headers.host !== undefined || req.httpVersionMinor === 0) return fastifyHandler(req, res)
    answer(req, res, 400, { error: 'invalid_request', message: 'an HTTP/1.1 request needs a Host header' })
  })
}

/**
 * What Node's HTTP parser refuses before Fastify sees a request (a URL or headers over
 * 16 KiB, malformed framing, a request that never finished) still gets the contract's
 * `{error, message}`: 400 `invalid_request`, or 408 for a timeout. The connection then closes.
 *
 * Bytes that arrive behind a valid request on the same connection (pipelined) are parsed
 * while that request is still being answered. Its reply comes first, then the 400: writing
 * the 400 at once would answer the valid request (already applied) with it and cut its real
 * reply off. A reply still being written (an invalidation stream) is never interleaved
 * with one: the connection is just closed.
 */
const refusing = new WeakSet<Duplex>()

function clientError(this: FastifyInstance, error: Error & { code?: string }, socket: Duplex): void {
  // The parser stays in its error state: later bytes on the connection land here again.
  if (error.code === 'ECONNRESET' || socket.destroyed || refusing.has(socket)) return
  refusing.add(socket)
  const [status, message] =
    error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? [408, 'the request did not arrive in time']
    : error.code === 'HPE_HEADER_OVERFLOW' ? [400, 'the URL and headers are larger than the server accepts (16 KiB; keys: 512 bytes)']
    : [400, 'the request is not valid HTTP']
  // Never the error itself: Node's parser errors carry the raw bytes read (`rawPacket`),
  // bearer secret and body included.
  this.log.debug({ code: error.code, reason: error.message }, 'client error')
  const refuse = () => {
    if (socket.destroyed) return
    // The request that failed (its body broke off or timed out) was answered already, refused
    // before its body came: no second reply to it; the connection closes once that one is out.
    const answered = (socket as Tracked)[NEWEST]
    if (answered !== undefined && answered.headersSent && !answered.req.complete) {
      if (answered.writableFinished) return void socket.destroy(error)
      return void answered.once('finish', () => socket.destroy(error))
    }
    // Node's slot for the reply in progress on this socket (the next pipelined one once it ends).
    const inFlight = (socket as Duplex & { _httpMessage?: ServerResponse | null })._httpMessage
    // A reply to a request received whole, not to the request that failed (whose body stalled
    // or broke off): that one is what the 400 or 408 answers.
    if (inFlight && !inFlight.writableFinished && inFlight.req.complete) {
      // Still being written (a stream): closed. Written whole and draining to a slow reader: waited for.
      if (inFlight.headersSent && !inFlight.writableEnded) return void socket.destroy(error)
      // Node moves on to the next pipelined reply in its own 'finish' listener, added first.
      inFlight.once('finish', () => setImmediate(refuse))
      inFlight.once('close', () => setImmediate(refuse))
      return
    }
    if (socket.writable) socket.write(rawReply(status, { error: 'invalid_request', message }))
    socket.destroy(error)
  }
  refuse()
}
