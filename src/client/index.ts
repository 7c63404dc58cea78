import { setTimeout as sleep } from 'node:timers/promises'
import { LRUCache } from 'lru-cache'
import { Pool } from 'undici'
import { CachewardenError, LeaseInvalidatedError, TooLargeError, errorFromReply } from './errors.js'
import type {
  BatchGetResult,
  BatchSetItem,
  BatchSetItemResult,
  Entry,
  InvalidationMode,
  InvalidationResult,
  Lease,
  LookupResult,
  MissReply,
  Selector,
  WriteOptions,
  WriteResult,
} from './types.js'

export * from './errors.js'
export type * from './types.js'

/** Keep-alive connections per client (undici Pool). */
export const DEFAULT_CONNECTIONS = 16
/** Idle keep-alive sockets are closed after this long. */
export const DEFAULT_KEEP_ALIVE_MS = 30_000
/** Per request: time for the headers, and again for the body. */
export const DEFAULT_TIMEOUT_MS = 10_000
/** getOrSet: how long to wait on another caller's fill; the server's FILL_LEASE_MS (2 s) plus a margin. */
export const DEFAULT_MAX_WAIT_MS = 2_500
/** getOrSet: the poll interval when the server sends no retryAfterMs. */
const DEFAULT_POLL_MS = 50
/** The server's default FILL_LEASE_MS: how long a fill lease is the fill lease. */
export const DEFAULT_FILL_LEASE_MS = 2_000
/** Most fill leases kept at once, oldest dropped first. */
const MAX_HELD_FILL_LEASES = 10_000
/** Transport failures that mean "the cache cannot be reached now" (undici's and the OS's codes). */
const UNREACHABLE = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN',
  'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_SOCKET',
])

export interface ClientOptions {
  /** Base URL of the service, e.g. `http://cachewarden:8080` (a path prefix is kept). */
  url: string
  /** The bearer secret; needs scope `read` to read, `write` to write, `invalidate` to invalidate. */
  apiKey: string
  /** Keep-alive connections in the pool (default 16). */
  connections?: number
  /** Idle keep-alive timeout in ms (default 30000). */
  keepAliveTimeoutMs?: number
  /** Per-request timeout in ms for the headers and for the body (default 10000). */
  timeoutMs?: number
  /**
   * The server's FILL_LEASE_MS (default 2000): how long a fill lease that `get` or `batchGet`
   * was handed is kept for this client's own `getOrSet` of the key. Longer than the server's,
   * another caller may be filling too (a second load, never a stale write).
   */
  fillLeaseMs?: number
}

/** Every method takes a `signal`: aborting it abandons the call, which rejects with the signal's reason (an `AbortError` by default). */
export interface CallOptions {
  signal?: AbortSignal
}

export interface GetOptions extends CallOptions {
  /** Return an entry marked stale (`stale: true`) instead of treating it as a miss. */
  allowStale?: boolean
}

export interface LookupOptions extends GetOptions {
  /** An etag the caller holds (as the entry or the ETag header gives it): `not_modified` when still current. */
  ifNoneMatch?: string
}

export interface GetOrSetOptions extends Omit<WriteOptions, 'lease'>, CallOptions {
  /**
   * How long to wait, polling, while another caller holds the fill lease before loading the
   * value itself (default 2500 ms, just past the server's default FILL_LEASE_MS). Normally the
   * server hands this caller the fill lease once the other fill lands or expires, well before.
   */
  maxWaitMs?: number
}

/**
 * Refuses an option the call does not have, before anything is sent: from JavaScript a
 * misspelt `userid` would store the entry outside its user's invalidations, and a misspelt
 * `Mode: 'stale'` would delete. (The server refuses unknown fields too; this says it first,
 * and for options that never reach it as a field.)
 */
function checkOptions(options: object, allowed: ReadonlySet<string>, what: string): void {
  if (options === null || typeof options !== 'object') throw new TypeError(`${what} must be an object`)
  for (const [name, value] of Object.entries(options)) {
    // An option set to undefined is not given (and JSON would drop it).
    if (value !== undefined && !allowed.has(name)) throw new TypeError(`${what} has no "${name}" (it takes ${[...allowed].join(', ')})`)
  }
}

/** The fields of a write besides `value`: the PUT body's (a test holds them to its schema). */
const WRITE_FIELDS = ['ttlMs', 'userId', 'tags', 'lease']
/** The fields of a selector (`POST /v1/invalidations`' body; a test holds them to its schema). */
const SELECTOR_FIELDS = new Set(['keys', 'userIds', 'tags', 'prefixes', 'mode', 'reason'])
const OPTIONS = {
  get: new Set(['allowStale', 'signal']),
  lookup: new Set(['allowStale', 'ifNoneMatch', 'signal']),
  set: new Set([...WRITE_FIELDS, 'signal']),
  delete: new Set(['mode', 'signal']),
  call: new Set(['signal']),
  // getOrSet writes with the lease of its own miss.
  getOrSet: new Set([...WRITE_FIELDS.filter((field) => field !== 'lease'), 'maxWaitMs', 'signal']),
}

/** What JSON.stringify drops without a word (in an object) or turns into null (NaN, ±Infinity); a BigInt it throws on. */
const notJson = (value: unknown) =>
  typeof value === 'function' || typeof value === 'symbol' || typeof value === 'bigint' || (typeof value === 'number' && !Number.isFinite(value))

/**
 * The write fields of `from`, read as properties (a getter on a class counts, as it would
 * not in a spread or in JSON), the lease as its token.
 */
function writeFields(from: object, what: string): Record<string, unknown> {
  const fields: Record<string, unknown> = {}
  for (const field of WRITE_FIELDS) {
    const value = (from as Record<string, unknown>)[field]
    if (value === undefined) continue
    // Dropped, a lease would let the write go unchecked; a NaN ttlMs sent as null, the default TTL.
    if (notJson(value)) throw new TypeError(`${what}: ${field} must be JSON (got ${described(value)})`)
    fields[field] = field === 'lease' ? leaseToken(value) : value
  }
  return fields
}

/** A `Lease` object as its token; anything else as given, for the server to refuse if bad (never dropped, which would skip the lease check). */
const leaseToken = (lease: unknown) =>
  lease !== null && typeof lease === 'object' && typeof (lease as { lease?: unknown }).lease === 'string' ? (lease as Lease).lease : lease

/**
 * Loads the value on a miss. It is handed the call's `signal` (undefined when the call has
 * none), to pass on to its own fetch or query: aborting the call then stops the load too.
 */
export type Loader<T> = (context: { signal: AbortSignal | undefined }) => Promise<T> | T

/** What happened inside one getOrSet call (for metrics and tests). */
export interface GetOrSetTrace {
  /**
   * `unavailable`: loaded, but the cache could not be read or could not store the value
   * (unreachable, a timeout, a 502/503/504: Redis down in cluster mode, an instance shutting
   * down). `too_large`: loaded, but over the server's value limit (413), so not cached.
   */
  outcome: 'hit' | 'filled' | 'fill_refused' | 'waited_hit' | 'loaded_after_wait' | 'not_cached' | 'unavailable' | 'too_large'
  /** Misses that came back `fill: false`, i.e. how often this call waited. */
  waits: number
}

/**
 * The typed Node client for cachewarden: one keep-alive connection pool, one method per
 * route, contract errors as classes (`CachewardenError` and its subclasses, with `code` and
 * `status`), and `getOrSet`, which handles leases and herd control for its caller.
 * Transport failures (connection refused, timeouts) are undici's own errors.
 */
export class CachewardenClient {
  readonly #pool: Pool
  readonly #base: string
  readonly #auth: string
  readonly #timeoutMs: number
  /** Fill leases `get` and `batchGet` were handed on a miss, kept for this client's own `getOrSet` of the key for `fillLeaseMs`. */
  readonly #heldFills: LRUCache<string, string>
  /** The getOrSet calls in flight, and the fill leases being given back: close() waits for both. */
  readonly #filling = new Set<Promise<unknown>>()
  readonly #givingBack = new Set<Promise<unknown>>()
  #closed: Promise<void> | undefined

  constructor(options: ClientOptions) {
    if (typeof options?.url !== 'string') throw new TypeError('options.url must be the base URL of cachewarden')
    if (typeof options.apiKey !== 'string' || options.apiKey === '') throw new TypeError('options.apiKey must be a non-empty string')
    if (options.fillLeaseMs !== undefined && !(Number.isFinite(options.fillLeaseMs) && options.fillLeaseMs >= 1)) {
      throw new TypeError('options.fillLeaseMs must be a number of ms, 1 or more')
    }
    const url = new URL(options.url)
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new TypeError('options.url must be http: or https:')
    this.#base = url.pathname.replace(/\/+$/, '')
    this.#auth = `Bearer ${options.apiKey}`
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS
    this.#heldFills = new LRUCache({ max: MAX_HELD_FILL_LEASES, ttl: options.fillLeaseMs ?? DEFAULT_FILL_LEASE_MS })
    this.#pool = new Pool(url.origin, {
      connections: options.connections ?? DEFAULT_CONNECTIONS,
      keepAliveTimeout: options.keepAliveTimeoutMs ?? DEFAULT_KEEP_ALIVE_MS,
    })
  }

  /**
   * Reads an entry; `undefined` on a miss (use `lookup` to get the miss's lease). A miss may
   * hand this caller the key's fill lease: it is kept for a `getOrSet` of the key from this
   * client, which then fills at once instead of waiting the lease out.
   */
  async get<T = unknown>(key: string, options: GetOptions = {}): Promise<Entry<T> | undefined> {
    checkOptions(options, OPTIONS.get, 'get options')
    const sent = performance.now() // the lease was issued after this (the clock lru-cache's TTLs use)
    const found = await this.lookup<T>(key, options)
    if (found.status === 'miss') this.#holdFill(key, found.lease, sent)
    return found.status === 'hit' ? found.entry : undefined
  }

  /** Reads an entry: a hit, a miss with its lease, or `not_modified` for a matching `ifNoneMatch`. */
  async lookup<T = unknown>(key: string, options: LookupOptions = {}): Promise<LookupResult<T>> {
    checkOptions(options, OPTIONS.lookup, 'lookup options')
    const headers: Record<string, string> = {}
    if (options.ifNoneMatch !== undefined) headers['if-none-match'] = quote(options.ifNoneMatch)
    const query = options.allowStale ? '?allowStale=true' : ''
    const { status, body, etag } = await this.#request('GET', `/v1/entries/${keyPath(key)}${query}`, undefined, options.signal, headers)
    if (status === 200) {
      if (body === null || typeof body !== 'object' || !('value' in body)) throw unexpected(status, body, 'not an entry')
      return { status: 'hit', entry: body as Entry<T> }
    }
    if (status === 304) return { status: 'not_modified', etag: unquote(etag ?? options.ifNoneMatch!) }
    const miss = body as Partial<MissReply> | undefined
    if (status === 404 && miss?.error === 'not_found' && typeof miss.lease === 'string') {
      const lease: Lease = { lease: miss.lease, fill: miss.fill === true }
      if (miss.retryAfterMs !== undefined) lease.retryAfterMs = miss.retryAfterMs
      return { status: 'miss', lease }
    }
    throw errorFromReply(status, body)
  }

  /** Writes an entry. With a `lease` from a miss, throws `LeaseInvalidatedError` (409) if an invalidation voided it. */
  async set(key: string, value: unknown, options: WriteOptions & CallOptions = {}): Promise<WriteResult> {
    checkOptions(options, OPTIONS.set, 'set options')
    assertJsonValue(value)
    return this.#expect<WriteResult>('PUT', `/v1/entries/${keyPath(key)}`, { value, ...writeFields(options, 'set options') }, options.signal)
  }

  /** Invalidates one key (deletes it, or marks it stale with `mode: 'stale'`), voiding its leases. */
  async delete(key: string, options: { mode?: InvalidationMode } & CallOptions = {}): Promise<InvalidationResult> {
    checkOptions(options, OPTIONS.delete, 'delete options')
    const query = options.mode ? `?mode=${options.mode}` : ''
    return this.#expect<InvalidationResult>('DELETE', `/v1/entries/${keyPath(key)}${query}`, undefined, options.signal)
  }

  /** Invalidates by keys, userIds, tags and prefixes at once (`POST /v1/invalidations`). */
  async invalidate(selector: Selector, options: CallOptions = {}): Promise<InvalidationResult> {
    checkOptions(selector, SELECTOR_FIELDS, 'selector')
    checkOptions(options, OPTIONS.call, 'invalidate options')
    return this.#expect<InvalidationResult>('POST', '/v1/invalidations', selector, options.signal)
  }

  /** Reads up to 1000 keys; each missing key is in `missing` and has a lease in `leases`. */
  async batchGet<T = unknown>(keys: string[], options: GetOptions = {}): Promise<BatchGetResult<T>> {
    checkOptions(options, OPTIONS.get, 'batchGet options')
    const query = options.allowStale ? '?allowStale=true' : ''
    const sent = performance.now()
    const result = await this.#expect<BatchGetResult<T>>('POST', `/v1/entries/batch-get${query}`, { keys }, options.signal)
    for (const [key, lease] of Object.entries(result.leases ?? {})) this.#holdFill(key, lease, sent)
    return result
  }

  /**
   * Writes up to 1000 entries; each result has its own status, so one bad item does not throw.
   * A value or write field JSON would drop (a function, a symbol; a NaN ttlMs) is a TypeError for the call.
   */
  async batchSet(items: BatchSetItem[], options: CallOptions = {}): Promise<BatchSetItemResult[]> {
    checkOptions(options, OPTIONS.call, 'batchSet options')
    // Items go as given (their other fields too, and a non-object as is): the server refuses a
    // bad item in that item's result (400) and writes the others. Their key, value and write
    // fields are read as properties, the lease as its token.
    const entries = items.map((item: unknown, i) => {
      if (item === null || typeof item !== 'object') return item
      const { key, value } = item as BatchSetItem
      // A missing value is the server's per-item 400; one JSON would drop is a mistake in code.
      if (value !== undefined) assertJsonValue(value, `batchSet item ${i}: `)
      return { ...item, key, value, ...writeFields(item, `batchSet item ${i}`) }
    })
    const { results } = await this.#expect<{ results: BatchSetItemResult[] }>('POST', '/v1/entries/batch-set', { entries }, options.signal)
    return results
  }

  /**
   * Returns the cached value of `key`, or loads it with `loader` and caches it, safely:
   * - a hit returns the cached value;
   * - a miss with `fill: true` runs the loader and writes with the miss's lease;
   * - a miss with `fill: false` (another caller is loading) waits `retryAfterMs` and reads
   *   again, until it hits, is handed the fill lease (the other fill landed or expired), or
   *   `maxWaitMs` passes, when it loads the value itself and writes with its latest lease;
   * - when the write is refused with 409 `lease_invalidated` (an invalidation landed while
   *   loading), the loaded value is returned to the caller but not cached. It is what the
   *   source held when this call began, so the caller gets a consistent answer, and no
   *   second load is spent on a key that is being changed; the next caller fills afresh.
   * The value must be JSON. A loader that returns `undefined` gets it back uncached (return
   * `null` to cache an absence instead); one that returns something JSON cannot hold (a
   * function, a BigInt, a cycle) gets a TypeError.
   * When the cache cannot be reached or answers 502/503/504, the loader's value is returned
   * uncached (`unavailable`); over the value limit (413), likewise (`too_large`).
   * Loader errors propagate; so do other cache errors. Whenever the fill lease it held ends
   * with nothing written (the loader failed or returned `undefined`, the write was refused or
   * too large), it is given back, so that the next caller fills at once.
   * The loader is handed the call's `signal`, to stop its own work when the call is aborted.
   */
  async getOrSet<T>(key: string, loader: Loader<T>, options: GetOrSetOptions = {}): Promise<T> {
    return (await this.getOrSetTraced(key, loader, options)).value
  }

  /** `getOrSet`, also telling what happened (hit, filled, refused, waited). */
  getOrSetTraced<T>(key: string, loader: Loader<T>, options: GetOrSetOptions = {}): Promise<{ value: T; trace: GetOrSetTrace }> {
    // close() waits for it: its loader's value is the caller's, and its write should land.
    return track(this.#filling, this.#getOrSet(key, loader, options))
  }

  async #getOrSet<T>(key: string, loader: Loader<T>, options: GetOrSetOptions): Promise<{ value: T; trace: GetOrSetTrace }> {
    checkOptions(options, OPTIONS.getOrSet, 'getOrSet options')
    const { maxWaitMs = DEFAULT_MAX_WAIT_MS, signal, ...write } = options
    if (typeof maxWaitMs !== 'number' || !(maxWaitMs >= 0)) throw new TypeError(`getOrSet options: maxWaitMs must be a number of ms, 0 or more (got ${described(maxWaitMs)})`)
    let waits = 0
    let deadline: number | undefined
    for (;;) {
      let found: LookupResult<T>
      try {
        found = await this.lookup<T>(key, { signal })
      } catch (error) {
        // The cache cannot answer: the source can. Nothing is written (there is no lease).
        if (!unavailable(error)) throw error
        return { value: await loader({ signal }), trace: { outcome: 'unavailable', waits } }
      }
      if (found.status === 'hit') {
        this.#heldFills.delete(key)
        return { value: found.entry.value, trace: { outcome: waits > 0 ? 'waited_hit' : 'hit', waits } }
      }
      if (found.status !== 'miss') throw new CachewardenError('unexpected_response', 304, 'unexpected 304 without If-None-Match')
      let { lease } = found
      // This client's own get() took the fill lease a moment ago: fill now, not wait it out.
      // The write still carries this lookup's lease: the loader runs after it was issued, and an
      // invalidation between the get() and now must not refuse a value loaded after it.
      const held = lease.fill ? undefined : this.#heldFills.get(key)
      if (held !== undefined) lease = { ...lease, fill: true }
      deadline ??= Date.now() + maxWaitMs
      if (lease.fill || Date.now() >= deadline) {
        this.#heldFills.delete(key)
        // The fill lease this call holds goes back unless it ends otherwise, so that the next
        // caller fills at once rather than every waiter waiting for it to run out.
        let fillLease = held ?? (lease.fill ? lease.lease : undefined)
        try {
          const value = await loader({ signal })
          // undefined is not JSON: nothing to cache (return null to cache an absence).
          if (value === undefined) return { value, trace: { outcome: 'not_cached', waits } }
          try {
            await this.set(key, value, { ...write, lease: lease.lease, signal })
          } catch (error) {
            if (error instanceof LeaseInvalidatedError) {
              // The refused write ended the fill lease, unless it carried this lookup's newer
              // lease (the fill lease kept from get()), whose refusal ends nothing.
              if (held === undefined) fillLease = undefined
              return { value, trace: { outcome: 'fill_refused', waits } }
            }
            // The value is loaded: a cache that cannot keep it is no reason to fail the caller.
            // Nothing to give back: the write may have landed.
            if (unavailable(error)) {
              fillLease = undefined
              return { value, trace: { outcome: 'unavailable', waits } }
            }
            if (error instanceof TooLargeError) return { value, trace: { outcome: 'too_large', waits } }
            throw error
          }
          fillLease = undefined // written: the write ended it
          return { value, trace: { outcome: lease.fill ? 'filled' : 'loaded_after_wait', waits } }
        } finally {
          if (fillLease !== undefined) this.#giveBack(key, fillLease)
        }
      }
      waits++
      // timers/promises rejects with its own AbortError: the call rejects with the signal's reason, as a request does.
      await sleep(Math.max(1, Math.min(lease.retryAfterMs ?? DEFAULT_POLL_MS, deadline - Date.now())), undefined, { signal }).catch((error: unknown) => {
        throw signal?.aborted ? signal.reason : error
      })
    }
  }

  /**
   * Gives a fill lease back (`POST /v1/entries/:key/release`) without holding the caller up;
   * close() waits for it. Best effort: at worst the lease runs out on the server.
   */
  #giveBack(key: string, lease: string): void {
    track(this.#givingBack, this.#request('POST', `/v1/entries/${keyPath(key)}/release`, { lease }).catch(() => undefined))
  }

  #holdFill(key: string, lease: Lease, issuedAfter: number): void {
    if (lease.fill) this.#heldFills.set(key, lease.lease, { start: issuedAfter })
  }

  /**
   * Waits for the `getOrSet` calls in flight when it is called (their loaders, and the writes
   * of what they load: a loader that never settles holds it up, so give loaders a timeout or
   * use the call's `signal`), then closes the connection pool, which waits for the other
   * requests in flight. Calls made after it began fail with undici's ClientDestroyedError once
   * the pool is closed. Closing again returns the same promise.
   */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      await Promise.allSettled([...this.#filling])
      await Promise.allSettled([...this.#givingBack]) // what those calls gave back on their way out
      await this.#pool.close()
    })()
    return this.#closed
  }

  async #expect<T>(method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, payload?: unknown, signal?: AbortSignal): Promise<T> {
    const { status, body } = await this.#request(method, path, payload, signal)
    if (status >= 200 && status < 300) return body as T
    throw errorFromReply(status, body)
  }

  async #request(
    method: 'GET' | 'PUT' | 'POST' | 'DELETE',
    path: string,
    payload?: unknown,
    signal?: AbortSignal,
    extraHeaders: Record<string, string> = {},
  ): Promise<{ status: number; body: unknown; etag: string | undefined }> {
    const headers: Record<string, string> = { authorization: this.#auth, accept: 'application/json', ...extraHeaders }
    let json: string | undefined
    if (payload !== undefined) {
      headers['content-type'] = 'application/json'
      try {
        json = JSON.stringify(payload)
      } catch (error) {
        throw new TypeError(`${method} ${path}: the body cannot be sent as JSON (${(error as Error).message})`, { cause: error })
      }
    }
    const res = await this.#pool.request({
      method,
      path: this.#base + path,
      headers,
      body: json,
      signal,
      headersTimeout: this.#timeoutMs,
      bodyTimeout: this.#timeoutMs,
    })
    const text = await res.body.text()
    let body: unknown
    let parsed = false
    if (text !== '') {
      try {
        body = JSON.parse(text)
        parsed = true
      } catch {
        body = text
      }
    }
    // A success that is not ours (a proxy's or a captive portal's page) is not taken for one.
    const type = res.headers['content-type']
    if (res.statusCode >= 200 && res.statusCode < 300 && (!parsed || typeof type !== 'string' || !type.startsWith('application/json'))) {
      throw unexpected(res.statusCode, body, 'not a JSON reply')
    }
    const etag = res.headers.etag
    return { status: res.statusCode, body, etag: typeof etag === 'string' ? etag : undefined }
  }
}

const unexpected = (status: number, body: unknown, what: string) =>
  new CachewardenError('unexpected_response', status, `cachewarden replied ${status} with ${what}`, body)

/** Whether a failed request means the cache cannot be used right now (rather than a mistake to report). */
function unavailable(error: unknown): boolean {
  if (error instanceof CachewardenError) return error.status === 502 || error.status === 503 || error.status === 504
  const code = (error as { code?: unknown } | null)?.code
  return typeof code === 'string' && UNREACHABLE.has(code)
}

/**
 * A value JSON.stringify would drop from the body, leaving the server to say "value is
 * required". (One it cannot serialize at all, a BigInt or a cycle, is a TypeError when the
 * body is built.)
 */
function assertJsonValue(value: unknown, where = ''): void {
  if (value === undefined || notJson(value)) throw new TypeError(`${where}the value must be JSON (got ${described(value)})`)
}

/** Adds `work` to `set` until it settles; returns it. */
function track<T>(set: Set<Promise<unknown>>, work: Promise<T>): Promise<T> {
  set.add(work)
  const done = () => set.delete(work)
  void work.then(done, done)
  return work
}

/** A key as a path segment; one that is not well-formed Unicode (a lone surrogate) cannot be sent. */
function keyPath(key: string): string {
  if (typeof key !== 'string') throw new TypeError(`the key must be a string (got ${typeof key})`)
  if (!key.isWellFormed()) throw new TypeError('the key must be well-formed Unicode (it has a lone surrogate, which no URL can carry)')
  return encodeURIComponent(key)
}

const described = (value: unknown) => (typeof value === 'number' ? String(value) : typeof value)

const quote = (etag: string) => (etag === '*' || etag.startsWith('"') || etag.startsWith('W/') ? etag : `"${etag}"`)
const unquote = (etag: string) => etag.replace(/^W\//, '').replace(/^"(.*)"$/, '$1')
