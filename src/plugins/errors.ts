import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { CacheError, truncate } from '../errors.js'

/**
 * The most of a refused body read and thrown away so that its refusal reaches the client,
 * for how long in all, and, from shutdown on, for how long without a byte of it.
 */
const DRAIN_MAX_BYTES = 64 * 1024 * 1024
const DRAIN_MAX_MS = 5000
const DRAIN_IDLE_MS = 1000

/** Requests with `Expect: 100-continue` (as Node reads it: checkContinue), and those of them sent their 100 (asked for their body). */
const awaiting100 = new WeakSet<IncomingMessage>()
const continued = new WeakSet<IncomingMessage>()

/**
 * Whether a request's body may still come: it has one (by its framing; `complete` is not
 * set yet while the headers are being handled), not all of it came, and it was not waiting
 * for a `100 Continue` never sent (another Expect, or any on HTTP/1.0, waits for nothing).
 */
export function bodyMayCome(req: IncomingMessage): boolean {
  const { headers } = req
  if (req.complete || (headers['transfer-encoding'] === undefined && !(Number(headers['content-length']) > 0))) return false
  return !awaiting100.has(req) || continued.has(req)
}

/**
 * Turns every error into the contract's `{error, message}` shape. Validation and parse
 * errors become 400 `invalid_request`; anything unexpected is a 500 `internal_error`,
 * logged with its stack and never sent.
 */
export default fp(
  async function errors(app: FastifyInstance, { drains }: { drains: Drains }) {
    // `Expect: 100-continue` (curl's way with large bodies): Node answers 100 at once unless
    // told otherwise, and the client uploads a body the route may then refuse. Here 100 goes
    // out when the body parser starts reading, which it does only for a body within the
    // route's limit; a body over it gets its 413 before any byte of it is sent.
    app.server.on('checkContinue', (req: IncomingMessage, res) => {
      awaiting100.add(req)
      req.once('resume', () => {
        if (res.headersSent) return
        continued.add(req)
        res.writeContinue()
      })
      app.server.emit('request', req, res)
    })

    // Node answers CONNECT itself, with no body at all: it gets the contract's shape, and
    // the connection closes. (An Expect other than 100-continue: see the front door.)
    app.server.on('connect', (req: IncomingMessage, socket: Socket) => {
      socket.on('error', () => {})
      // Node gives up such a socket (no timeouts, half-open allowed): it is closed here once
      // the reply is out, or it would stay open for as long as the client kept its side open.
      socket.end(rawReply(404, { error: 'not_found', message: `no route CONNECT ${truncate(req.url ?? '', 64)}` }), () => socket.destroy())
      socket.setTimeout(5000, () => socket.destroy())
    })

    app.setErrorHandler((error: FastifyError | CacheError, request, reply) => {
      // Refused before its body was read (401, 403, 429 from the auth hook, a 413, a body
      // that is not JSON): Node would read and discard the rest of it for as long as it
      // came, up to REQUEST_TIMEOUT_MS.
      drainRest(request.raw, reply, drains)
      if (error instanceof CacheError) {
        // RFC 9110: a 401 says which scheme would do (RFC 6750 for bearer tokens).
        if (error.statusCode === 401) reply.header('www-authenticate', 'Bearer realm="cachewarden"')
        return reply.code(error.statusCode).send({ error: error.code, message: error.message, ...error.extra })
      }
      if ((error as FastifyError).validation) {
        return reply.code(400).send({ error: 'invalid_request', message: validationMessage(error as FastifyError) })
      }
      const status = (error as FastifyError).statusCode ?? 500
      if (status === 413 || error.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
        return reply.code(413).send({ error: 'payload_too_large', message: 'the request body is larger than the body limit' })
      }
      if (status === 429) {
        return reply.code(429).send({ error: 'rate_limited', message: error.message || 'too many requests; slow down' })
      }
      // A plugin's own refusals (ours are CacheErrors). The docs' static files answer a path that
      // climbs out of their folder with a 403; a file not there goes to the not-found handler, so
      // a 404 here is some other plugin's, and is one all the same.
      if (status === 403) {
        const docs = request.url.startsWith('/docs/')
        return reply.code(403).send({ error: 'forbidden', message: docs ? 'the path leaves the folder the docs are served from' : clientMessage(error as FastifyError) })
      }
      if (status === 404) return reply.code(404).send(noRoute(request))
      if (status >= 400 && status < 500) {
        // JSON syntax, prototype poisoning, unsupported media type, bad URL encoding…
        return reply.code(400).send({ error: 'invalid_request', message: clientMessage(error as FastifyError) })
      }
      request.log.error({ err: error }, 'internal error')
      return reply.code(500).send({ error: 'internal_error', message: 'an internal error occurred; it has been logged' })
    })

    app.setNotFoundHandler((request, reply) => {
      reply.code(404).send(noRoute(request))
    })
  },
  { name: 'cachewarden-errors' },
)

/**
 * An error reply (a 413, a 401/403/429 before the body was read, a 400 for a bad URL or a
 * body that is not JSON) may be sent while the client is still sending its body. Closing
 * the connection then (Fastify asks to, for a 413) makes the kernel reset it under the
 * reply, and the client sees EPIPE or ECONNRESET instead of it. So the rest of the body is
 * read and thrown away (Drains), and the connection stays open, or, if it is to close,
 * closes once the body has come. A client waiting for `100 Continue` sent nothing (Node
 * closes that connection cleanly).
 */
export function drainRest(raw: IncomingMessage, reply: FastifyReply, drains: Drains): void {
  if (!bodyMayCome(raw)) return
  if (!drains.discard(raw, reply.raw)) reply.header('connection', 'close')
  // Kept open, unless it is to close anyway (the client asked, the server is shutting down):
  // said so over Fastify's `close`, as Node says it (removing the header would leave none,
  // and an HTTP/1.0 client would take that as a close).
  else if (reply.raw.shouldKeepAlive && reply.hasHeader('connection')) {
    reply.header('connection', 'keep-alive')
    const timeout = reply.server.server.keepAliveTimeout
    if (timeout > 0) reply.header('keep-alive', `timeout=${Math.floor(timeout / 1000)}`)
  }
}

const discarding = new WeakSet<IncomingMessage>()

/** Whether a request's body is being read to be thrown away (after a refusal). */
export const isDiscarding = (req: IncomingMessage): boolean => discarding.has(req)

/**
 * The request bodies an app reads only to throw away, so that a refusal reaches a client
 * still uploading: up to DRAIN_MAX_BYTES, for at most DRAIN_MAX_MS; a larger body, or an
 * upload that stalls, is cut off with its connection. From shutdown on (hurry), each is
 * also cut after DRAIN_IDLE_MS without a byte, so that a body which does not come holds
 * the shutdown a second, and none runs past the time given (a drain that would start after
 * it is cut at once); not before, as a client that reads its reply only once it has sent
 * everything (a blocking one) may pause longer mid-upload.
 */
export class Drains {
  /** From shutdown on: when every drain must be over (Date.now() time). */
  #until: number | undefined
  /** Each running drain's switch to the shutdown limits. */
  readonly #running = new Set<() => void>()

  /**
   * Reads the rest of `raw`'s body and throws it away. The reading starts when `res`, its
   * reply, has its turn on the connection: before then, behind a reply still being sent,
   * the body is left unread (paused: TCP holds the client back) and no limit runs, which
   * would cut that earlier reply. False, reading nothing, for a body that says it is larger
   * than the limit: its connection should close after the reply.
   */
  discard(raw: IncomingMessage, res: ServerResponse): boolean {
    if (!bodyMayCome(raw) || discarding.has(raw)) return true
    if (Number(raw.headers['content-length']) > DRAIN_MAX_BYTES) return false
    discarding.add(raw)
    if (res.socket !== null) this.#read(raw)
    else {
      raw.pause() // (Fastify leaves a body it refused flowing)
      res.once('socket', () => this.#read(raw))
    }
    return true
  }

  /**
   * For a request whose route never reads its body (a GET or HEAD sent with one): the body
   * is thrown away once the reply is complete, as after a refusal (Node would read it
   * without limit, or reset the connection under the reply if it is to close). A body that
   * says it is larger than the limit closes the connection after the reply.
   */
  afterReply(req: IncomingMessage, res: ServerResponse): void {
    if (Number(req.headers['content-length']) > DRAIN_MAX_BYTES) res.shouldKeepAlive = false
    else res.once('prefinish', () => this.discard(req, res))
  }

  /** Shutting down: every drain, running or to come, is cut after DRAIN_IDLE_MS without a byte, and at `untilMs` from now. */
  hurry(untilMs: number): void {
    this.#until = Date.now() + untilMs
    for (const hurry of this.#running) hurry()
  }

  #read(raw: IncomingMessage): void {
    const cut = () => raw.destroy()
    const endAt = Date.now() + DRAIN_MAX_MS
    const timer = (ms: number) => setTimeout(cut, Math.max(0, ms)).unref()
    let deadline = timer(DRAIN_MAX_MS)
    let idle: NodeJS.Timeout | undefined
    const hurry = () => {
      idle ??= timer(DRAIN_IDLE_MS)
      clearTimeout(deadline)
      deadline = timer(Math.min(endAt, this.#until!) - Date.now())
    }
    let left = DRAIN_MAX_BYTES
    const count = (chunk: Buffer) => {
      left -= chunk.length
      if (left < 0) raw.destroy()
      else idle?.refresh()
    }
    const socket = raw.socket
    const stop = () => {
      clearTimeout(deadline)
      clearTimeout(idle)
      this.#running.delete(hurry)
      raw.removeListener('data', count)
      socket.removeListener('close', stop)
    }
    raw.on('data', count)
    raw.once('end', stop)
    raw.once('close', stop)
    // Once its reply is written, Node no longer closes a request with its connection.
    socket.once('close', stop)
    this.#running.add(hurry)
    if (this.#until !== undefined) hurry()
    raw.resume()
  }
}

function validationMessage(error: FastifyError): string {
  const first = error.validation?.[0]
  if (!first) return error.message
  const where = error.validationContext ?? 'request'
  const path = first.instancePath ? `${where}${first.instancePath.replaceAll('/', '.')}` : where
  const missing = (first.params as { missingProperty?: string }).missingProperty
  if (missing) return `${path}.${missing} is required`
  const extra = (first.params as { additionalProperty?: string }).additionalProperty
  if (extra) return `${path}.${extra} is not allowed`
  if (first.keyword === 'const') {
    // A union of literals fails once per literal: name them all.
    const allowed = error.validation!.filter((e) => e.keyword === 'const' && e.instancePath === first.instancePath)
    return `${path} must be one of ${allowed.map((e) => JSON.stringify((e.params as { allowedValue: unknown }).allowedValue)).join(', ')}`
  }
  return `${path} ${first.message ?? 'is invalid'}`
}

/** The 404 of a path nothing serves; the path, cut short, without its query. */
function noRoute(request: FastifyRequest): { error: 'not_found'; message: string } {
  return { error: 'not_found', message: `no route ${request.method} ${truncate(request.url.split('?')[0]!, 200)}` }
}

function clientMessage(error: FastifyError): string {
  switch (error.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return 'the body must be application/json'
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      // Prototype poisoning lands here too: the JSON parser refuses both the same way.
      return 'the body is not valid JSON, or has a forbidden "__proto__" or "constructor.prototype" key'
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return 'the body is not valid JSON'
    default:
      // Fastify's own client-error messages say nothing secret; cap their length anyway.
      return (error.message || 'bad request').slice(0, 200)
  }
}

/** A whole HTTP/1.1 reply with the contract's body, for a socket no response object owns; it says the connection closes. */
export function rawReply(status: number, payload: { error: string; message: string }): string {
  const body = JSON.stringify(payload)
  return (
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json; charset=utf-8\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`
  )
}

/** A reply with the contract's body, written straight to Node's response (for what Fastify never sees); the connection closes. */
export function sendRaw(res: ServerResponse, status: number, payload: { error: string; message: string }): void {
  const body = JSON.stringify(payload)
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  })
  res.end(body)
}
