// The PostgreSQL invalidation source (DESIGN.md section 5). No Fastify here: src/app.ts
// starts it, adds its readiness check and closes it with the app.
import pg from 'pg'
import type { CacheService, CoreLogger } from '../cache/cache-service.js'
import { checkName, checkSelector, cutReason, maxNameBytes, type Limits } from '../cache/limits.js'
import { SELECTOR_KINDS, type InvalidationMode, type Selector } from '../cache/types.js'
import { PG_CHANNEL, type PgReconnectPolicy } from '../config.js'
import { CacheError, truncate } from '../errors.js'
import { answerInTime } from '../liveness.js'

export const DEFAULT_PG_APPLICATION_NAME = 'cachewarden-listener'
export const DEFAULT_MIN_BACKOFF_MS = 100
export const DEFAULT_MAX_BACKOFF_MS = 30_000
/** A connect (or LISTEN) that hangs this long counts as failed and is retried. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000
/** How often a listening connection is asked a `SELECT 1`, and how long it has to answer. */
export const DEFAULT_HEALTH_CHECK_MS = 5000
/** Notifications kept for another try while the store cannot apply them; beyond, the policy covers them. */
export const DEFAULT_MAX_OWED = 1000
/** The longest wait between tries of a notification the store could not apply. */
export const MAX_OWED_RETRY_MS = 5000

const PAYLOAD_KEYS = new Set<string>([...SELECTOR_KINDS, 'mode', 'reason'])

export interface PostgresListenerOptions {
  /** PG_URL. An `application_name` in it overrides `applicationName`. */
  url: string
  /** PG_CHANNEL, a plain identifier (config.ts checks it). */
  channel: string
  cache: CacheService
  logger?: CoreLogger
  /** What a reconnect does for the notifications it may have missed; default `stale-all`. */
  reconnectPolicy?: PgReconnectPolicy
  /** Apply the policy on a first connect that succeeds at the first attempt too; default false. */
  policyOnFirstConnect?: boolean
  /** Shown in `pg_stat_activity`; default `cachewarden-listener`. */
  applicationName?: string
  /** Backoff between connection attempts: doubles from min up to max, with jitter. */
  minBackoffMs?: number
  maxBackoffMs?: number
  connectTimeoutMs?: number
  /**
   * Every this many ms a listening connection must answer a `SELECT 1` within as long again,
   * or it counts as lost (reconnect, then the policy); 0: never asked. TCP keepalive alone
   * notices a cut connection only after the system's two hours, and a stalled peer never.
   */
  healthCheckMs?: number
  /**
   * How many notifications the store failed to apply (Redis down) are kept to be applied
   * again; once more fail, they are dropped and the reconnect policy covers them instead.
   */
  maxOwed?: number
}

/** A notification's invalidation, as parsed, with its payload for the logs. */
type Notification = Exclude<ReturnType<typeof parsePayload>, string> & { payload: string; tried?: true }

/**
 * LISTENs on a channel and turns each notification (a JSON selector) into a call to
 * `CacheService.invalidate` with source `postgres`. A malformed payload is logged and
 * counted, never thrown. On a lost connection it reconnects with bounded exponential
 * backoff; since NOTIFY is not queued for a listener that is gone, each reconnect applies
 * the reconnect policy *after* LISTEN succeeds and *before* `listening` turns true again,
 * so nothing changed in between can be served as fresh.
 *
 * A notification the store cannot apply (Redis down in cluster mode) is not dropped: it is
 * owed, and applied again, in order, with backoff and at once when the bus reconnects; its
 * failure is counted once. `behind` is true until nothing is owed. Past `maxOwed` of them,
 * the reconnect policy is applied in their place.
 */
export class PostgresListener {
  readonly #o: Required<Omit<PostgresListenerOptions, 'logger'>> & { logger: CoreLogger | undefined }
  #client: pg.Client | undefined
  #listening = false
  #closed = false
  #triedBefore = false
  /** The reconnect policy failed (counted) and has not been applied since. */
  #policyFailed = false
  #attempt = 0
  #timer: NodeJS.Timeout | undefined
  // Notifications are applied one at a time, in the order PostgreSQL committed them.
  #queue: Promise<void> = Promise.resolve()
  #connecting: Promise<void> | undefined
  // Clients already given up on, so a late 'error' or 'end' from one schedules nothing.
  readonly #dead = new WeakSet<pg.Client>()
  // Notifications the store failed to apply, oldest first; `#overflow` once more were lost.
  #owed: Notification[] = []
  #overflow = false
  #owedAttempt = 0
  #owedTimer: NodeJS.Timeout | undefined
  #healthTimer: NodeJS.Timeout | undefined
  #checking = false
  /** Notifications heard so far: any since a health check was sent shows the connection alive. */
  #heard = 0
  readonly #onBusState = ({ connected }: { connected: boolean }): void => {
    if (!connected) return
    // Redis answers again: a reconnect policy it could not apply is tried now, not after what
    // is left of a connection backoff that may have grown to 30 s.
    if (this.#policyFailed) {
      this.#attempt = 0
      if (this.#timer !== undefined && this.#connecting === undefined) {
        clearTimeout(this.#timer)
        this.#timer = undefined
        this.start()
      }
    }
    if (!this.behind) return
    // Redis answers again: from the shortest backoff, in case the command connection is not back yet.
    this.#owedAttempt = 0
    this.#retryOwed(true)
  }

  constructor(options: PostgresListenerOptions) {
    this.#o = {
      reconnectPolicy: 'stale-all',
      policyOnFirstConnect: false,
      applicationName: DEFAULT_PG_APPLICATION_NAME,
      minBackoffMs: DEFAULT_MIN_BACKOFF_MS,
      maxBackoffMs: DEFAULT_MAX_BACKOFF_MS,
      connectTimeoutMs: DEFAULT_CONNECT_TIMEOUT_MS,
      maxOwed: DEFAULT_MAX_OWED,
      healthCheckMs: DEFAULT_HEALTH_CHECK_MS,
      ...options,
      logger: options.logger,
    }
    const { channel, logger } = this.#o
    if (!PG_CHANNEL.test(channel)) throw new TypeError(`channel must be a plain SQL identifier, got "${channel}"`)
    // LISTEN here quotes the channel, and the trigger's pg_notify keeps its case; a hand-written
    // NOTIFY does not: PostgreSQL folds an unquoted name to lowercase, and nothing would arrive.
    if (channel !== channel.toLowerCase()) {
      logger?.warn(
        { channel },
        `PG_CHANNEL has capitals: a hand-written NOTIFY must quote it (NOTIFY "${channel}", …) or use pg_notify('${channel}', …); unquoted, PostgreSQL sends it to "${channel.toLowerCase()}"`,
      )
    }
  }

  /** True while LISTEN is active and the last reconnect's policy has been applied. */
  get listening(): boolean {
    return this.#listening
  }

  /** True while notifications the store failed to apply wait to be applied again. */
  get behind(): boolean {
    return this.#owed.length > 0 || this.#overflow
  }

  /** Starts connecting in the background; failures are retried, never thrown. */
  start(): void {
    if (this.#closed || this.#connecting !== undefined || this.#client !== undefined) return
    if (!this.#o.cache.listeners('bus_state').includes(this.#onBusState)) this.#o.cache.on('bus_state', this.#onBusState)
    if (this.#healthTimer === undefined && this.#o.healthCheckMs > 0) {
      this.#healthTimer = setInterval(() => void this.#checkHealth(), this.#o.healthCheckMs)
      this.#healthTimer.unref()
    }
    this.#connecting = this.#connect().finally(() => {
      this.#connecting = undefined
    })
  }

  /** Stops listening and retrying; resolves once the connection is closed. */
  async close(): Promise<void> {
    this.#closed = true
    if (this.#timer) clearTimeout(this.#timer)
    this.#timer = undefined
    if (this.#owedTimer) clearTimeout(this.#owedTimer)
    this.#owedTimer = undefined
    if (this.#healthTimer) clearInterval(this.#healthTimer)
    this.#healthTimer = undefined
    this.#o.cache.off('bus_state', this.#onBusState)
    const client = this.#client
    this.#client = undefined
    this.#setListening(false)
    if (client) {
      this.#dead.add(client)
      await client.end().catch(() => {})
    }
    await this.#connecting
    await this.#queue
  }

  async #connect(): Promise<void> {
    const o = this.#o
    const client = new pg.Client({
      connectionString: o.url,
      application_name: o.applicationName,
      connectionTimeoutMillis: o.connectTimeoutMs,
      // Without it a silently dropped connection (a cut network) would never be noticed.
      keepAlive: true,
    })
    // An 'error' event without a listener would crash the process.
    client.on('error', (error) => this.#lost(client, error))
    client.on('end', () => this.#lost(client, undefined))
    client.on('notification', (message) => {
      this.#heard++
      if (message.channel !== o.channel) return
      const payload = message.payload ?? ''
      this.#queue = this.#queue.then(() => this.#handle(payload))
    })
    // Kept before connecting, so close() can end a connect that hangs.
    this.#client = client
    // Not the first attempt: either we listened before, or we could not listen from the start
    // while entries were being cached. Either way, notifications may have been missed.
    const reconnect = this.#triedBefore
    this.#triedBefore = true
    let applying = false
    try {
      await client.connect()
      // connectionTimeoutMillis covers the connect only: a LISTEN never answered (a network
      // stalled just then) would hold this attempt, and so every retry, forever.
      const listen = client.query(`LISTEN "${o.channel}"`)
      if ((await answerInTime(listen, o.connectTimeoutMs)) === 'late') throw new Error(`no answer to LISTEN in ${o.connectTimeoutMs} ms`)
      await listen
      if (this.#closed || this.#client !== client) return
      if (reconnect || o.policyOnFirstConnect) {
        // Not applied (the store is down): the connection is given up and the policy tried
        // again on the next one, counted as a failed invalidation once, not at every try.
        applying = true
        try {
          await this.#applyPolicy(
            reconnect ? 'postgres listener reconnected: notifications may have been missed' : 'postgres listener started: entries may predate it',
            this.#policyFailed,
          )
          this.#policyFailed = false
          this.#overflow = false // what overflowed is covered too: not applied a second time
        } catch (error) {
          this.#policyFailed = true
          throw error
        }
      }
      if (this.#client !== client || this.#closed) return // lost while applying the policy
      this.#attempt = 0
      this.#setListening(true)
      o.logger?.info({ channel: o.channel, reconnect }, 'postgres listener listening')
    } catch (error) {
      if (this.#closed) return
      o.logger?.warn(
        { err: error, channel: o.channel, attempt: this.#attempt + 1 },
        applying ? 'postgres listener could not apply its reconnect policy: reconnecting to try again' : 'postgres listener could not connect',
      )
      this.#lost(client, error as Error)
    }
  }

  /** Asks the listening connection a `SELECT 1` (a notification meanwhile counts as its answer); unanswered in time, it counts as lost. */
  async #checkHealth(): Promise<void> {
    const client = this.#client
    if (!this.#listening || client === undefined || this.#checking || this.#closed) return
    this.#checking = true
    const timeoutMs = this.#o.healthCheckMs
    try {
      // A failed query means the connection is going: its 'error' or 'end' reports the loss.
      if ((await answerInTime(client.query('SELECT 1'), timeoutMs, () => this.#heard)) !== 'late' || this.#client !== client) return
      this.#o.logger?.warn({ channel: this.#o.channel, timeoutMs }, 'postgres listener connection did not answer in time: reconnecting')
      this.#lost(client, new Error(`no answer to SELECT 1 in ${timeoutMs} ms`))
    } finally {
      this.#checking = false
    }
  }

  #lost(client: pg.Client, error: Error | undefined): void {
    if (this.#dead.has(client)) return
    this.#dead.add(client)
    const wasListening = this.#listening
    this.#client = undefined
    this.#setListening(false)
    client.end().catch(() => {})
    if (this.#closed || this.#timer !== undefined) return
    if (wasListening) this.#o.logger?.warn({ err: error, channel: this.#o.channel }, 'postgres listener lost its connection')
    const delay = backoffMs(this.#attempt++, this.#o.minBackoffMs, this.#o.maxBackoffMs)
    this.#timer = setTimeout(() => {
      this.#timer = undefined
      // A connect still under way (lost while it applied the policy) ends without retrying:
      // the retry is this one, once it has ended.
      if (this.#connecting === undefined) this.start()
      else void this.#connecting.then(() => this.start())
    }, delay)
    this.#timer.unref()
  }

  /** Applies the reconnect policy; `repeat`: a failure of this was already counted. */
  async #applyPolicy(reason: string, repeat = false): Promise<void> {
    const policy = this.#o.reconnectPolicy
    if (policy === 'none') return
    if (policy === 'clear') {
      const cleared = await this.#o.cache.clear('postgres-listener', reason, 'postgres', repeat)
      this.#o.logger?.warn({ policy, cleared }, reason)
    } else {
      const result = await this.#o.cache.markAllStale({ source: 'postgres', actor: 'postgres-listener', reason, repeat })
      this.#o.logger?.warn({ policy, invalidated: result.invalidated }, reason)
    }
  }

  async #handle(payload: string): Promise<void> {
    const parsed = parsePayload(payload)
    if (typeof parsed === 'string') {
      this.#malformed(payload, parsed)
      return
    }
    // A row can hold a user id no entry can carry (too long, a control character): the rest
    // of its selector (the row's other user, its tags) must still be applied.
    const { selector, left } = withoutUnstorable(parsed.selector, this.#o.cache.limits)
    if (left.length > 0) {
      this.#o.logger?.warn(
        { channel: this.#o.channel, payload: truncate(payload, 200), left: left.map((name) => truncate(name, 40)) },
        'a postgres notification names what no entry can carry: left out',
      )
      // Nothing left is a no-op (no entry could match it), unless what is left is malformed.
      const empty = (list: unknown) => list === undefined || (Array.isArray(list) && list.length === 0)
      if (SELECTOR_KINDS.every((kind) => empty(selector[kind]))) return
      parsed.selector = selector
    }
    // The database's word is not held to the API's batch limit: a longer list (a trigger with
    // many tag templates) is applied in slices, each an invalidation of its own. What is
    // malformed is refused whole first, so no slice of it is applied.
    const limits = this.#o.cache.limits
    let checked: Selector
    try {
      checked = checkSelector(parsed.selector, { ...limits, maxBatch: Number.MAX_SAFE_INTEGER })
    } catch (error) {
      this.#malformed(payload, (error as Error).message)
      return
    }
    for (const selector of slices(checked, limits.maxBatch)) {
      if (!this.#owe({ ...parsed, selector, payload })) return
      if (this.#owed.length === 1) await this.#applyOwed()
    }
  }

  /** Queues a notification to be applied; false when too many are owed (the policy covers them). */
  #owe(notification: Notification): boolean {
    if (this.#overflow) {
      this.#dropped(1) // the policy, still to be applied, covers it
      return false
    }
    if (this.#owed.length > 0 && this.#owed.length >= this.#o.maxOwed) {
      this.#overflow = true
      this.#dropped(this.#owed.filter((n) => n.tried === undefined).length + 1)
      this.#owed = []
      this.#o.logger?.error(
        { channel: this.#o.channel, maxOwed: this.#o.maxOwed, policy: this.#o.reconnectPolicy },
        'too many postgres notifications could not be applied; the reconnect policy will cover them',
      )
      return false
    }
    this.#owed.push(notification)
    return true
  }

  /** Owed notifications given up on: with the policy `none` nothing covers them, so they count as failed. */
  #dropped(untried: number): void {
    if (this.#o.reconnectPolicy !== 'none') return
    for (let i = 0; i < untried; i++) this.#o.cache.countFailure('postgres')
  }

  /**
   * Applies what is owed, oldest first, until the store fails again (then a retry is
   * scheduled) or nothing is left. Runs on the notification queue, so one at a time.
   */
  async #applyOwed(): Promise<void> {
    const o = this.#o
    if (this.#closed) return
    if (this.#overflow) {
      try {
        // A failure of it is not counted again: the first owed notification's failure was.
        await this.#applyPolicy('postgres notifications could not be applied while the store was unavailable', true)
        this.#overflow = false
      } catch {
        this.#retryOwed()
        return
      }
    }
    const replay = this.#owedAttempt > 0
    while (this.#owed.length > 0 && !this.#closed) {
      const next = this.#owed[0]!
      try {
        const options = { mode: next.mode, source: 'postgres', actor: 'postgres-listener', reason: next.reason, repeat: next.tried } as const
        await o.cache.invalidate(next.selector, options)
      } catch (error) {
        // A store failure was already counted and logged by invalidate; a selector it refused was not.
        if (error instanceof CacheError && error.code === 'invalid_request') {
          this.#malformed(next.payload, error.message)
        } else {
          // Its failure is counted and logged once, however often it is tried again.
          if (next.tried === undefined) {
            next.tried = true
            o.logger?.warn({ channel: o.channel, owed: this.#owed.length }, 'a postgres notification could not be applied; it will be applied again')
          }
          this.#retryOwed()
          return
        }
      }
      this.#owed.shift()
    }
    if (replay) o.logger?.info({ channel: o.channel, attempts: this.#owedAttempt }, 'owed postgres notifications applied')
    this.#owedAttempt = 0
  }

  /** Tries what is owed again after a backoff (or at once), on the notification queue. */
  #retryOwed(now = false): void {
    if (this.#closed) return
    if (this.#owedTimer) clearTimeout(this.#owedTimer)
    const delay = now ? 0 : backoffMs(this.#owedAttempt++, this.#o.minBackoffMs, Math.min(MAX_OWED_RETRY_MS, this.#o.maxBackoffMs))
    this.#owedTimer = setTimeout(() => {
      this.#owedTimer = undefined
      this.#queue = this.#queue.then(() => (this.behind ? this.#applyOwed() : undefined))
    }, delay)
    this.#owedTimer.unref()
  }

  #malformed(payload: string, problem: string): void {
    this.#o.cache.countFailure('postgres')
    this.#o.logger?.warn({ channel: this.#o.channel, payload: truncate(payload, 200), problem }, 'malformed postgres notification')
  }

  #setListening(listening: boolean): void {
    if (this.#listening === listening) return
    this.#listening = listening
    this.#o.cache.emit('pg_listener_state', { connected: listening })
  }
}

/**
 * The wait before try `attempt` (0 first): from `minMs`, doubling up to `maxMs`, with ±20%
 * jitter, so many instances do not retry in step after a database or Redis restart.
 */
function backoffMs(attempt: number, minMs: number, maxMs: number): number {
  return Math.round(Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30)) * (0.8 + Math.random() * 0.4))
}

/** Parses a notification payload into a selector, or returns what is wrong with it. */
export function parsePayload(payload: string): { selector: Selector; mode?: InvalidationMode; reason?: string } | string {
  let value: unknown
  try {
    value = JSON.parse(payload)
  } catch {
    return 'the payload is not JSON'
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return 'the payload must be a JSON object'
  const body: Record<string, unknown> = {}
  for (const [key, field] of Object.entries(value)) {
    if (!PAYLOAD_KEYS.has(key)) return `${key} is not a selector field (use ${[...PAYLOAD_KEYS].join(', ')})`
    // null is absent, as in POST /v1/invalidations (json_build_object sends a NULL column as null).
    if (field !== null) body[key] = field
  }
  if (body.mode !== undefined && body.mode !== 'delete' && body.mode !== 'stale') return 'mode must be "delete" or "stale"'
  if (body.reason !== undefined && typeof body.reason !== 'string') return 'reason must be a string'
  // A reason too long for the API is cut to its limit, not a reason to drop the invalidation.
  const reason = body.reason === undefined ? undefined : cutReason(body.reason)
  const selector: Selector = {}
  for (const kind of SELECTOR_KINDS) {
    if (body[kind] !== undefined) selector[kind] = body[kind] as string[]
  }
  // The lists' contents are checked in #handle (checkSelector, which names the field).
  return { selector, mode: body.mode as InvalidationMode | undefined, reason }
}

/** A checked selector in slices whose lists hold at most `max` names each (itself when they all do). */
export function slices(selector: Selector, max: number): Selector[] {
  const out: Selector[] = [{}]
  for (const kind of SELECTOR_KINDS) {
    const list = selector[kind]
    if (list === undefined) continue
    for (let i = 0; i * max < list.length; i++) (out[i] ??= {})[kind] = list.slice(i * max, (i + 1) * max)
  }
  return out
}

/**
 * The selector without the names no entry can carry (keys, user ids and tags a write would
 * refuse: too long, control characters, broken Unicode; prefixes no storable key can start
 * with), and those names. What is not a string, or empty, stays, for `checkSelector` to
 * refuse the notification as malformed.
 */
export function withoutUnstorable(selector: Selector, limits: Limits): { selector: Selector; left: string[] } {
  const out: Selector = {}
  const left: string[] = []
  for (const kind of SELECTOR_KINDS) {
    const list = selector[kind] as unknown
    if (!Array.isArray(list)) {
      if (list !== undefined) out[kind] = list as string[]
      continue
    }
    out[kind] = list.filter((name: unknown) => {
      // An empty name is a sender's mistake, not a row's value (the trigger sends none):
      // checkSelector refuses it, and the notification with it, as malformed.
      if (typeof name !== 'string' || name === '') return true
      try {
        checkName(kind, name, maxNameBytes(limits, kind))
        return true
      } catch {
        left.push(name)
        return false
      }
    })
  }
  return { selector: out, left }
}
