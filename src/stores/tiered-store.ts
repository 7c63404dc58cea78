import { randomBytes } from 'node:crypto'
import { Command, Redis, type RedisOptions } from 'ioredis'
import type { CoreLogger } from '../cache/cache-service.js'
import {
  SELECTOR_KINDS,
  type EvictionListener,
  type EvictionReason,
  type InvalidationMode,
  type InvalidationNote,
  type LeaseStamp,
  type Selector,
  type SetOutcome,
  type StoredEntry,
} from '../cache/types.js'
import { cutReason } from '../cache/limits.js'
import { CacheError, backendUnavailable } from '../errors.js'
import { answerInTime } from '../liveness.js'
import { LogThrottle } from '../logger.js'
import { DEFAULT_MAX_LEASE_PREFIXES, DEFAULT_MAX_LEASE_SCOPES } from '../cache/lease-book.js'
import { DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, MemoryStore } from './memory-store.js'
import { prefixMatcher, sharedStart } from './sorted-keys.js'
import { REDIS_SCRIPTS, type ScriptName } from './redis-scripts.js'
import type { Store } from './store.js'

export const DEFAULT_NAMESPACE = 'cw'
export const DEFAULT_L1_MAX_TTL_MS = 60_000
/** Redis keeps an entry this much longer than its TTL, so a clock a little behind another never reads a hole. */
export const DEFAULT_TTL_MARGIN_MS = 60_000
/** A Redis command that takes longer than this fails (the request gets 503 or a miss) instead of hanging. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 2000
/** How often the bus subscriber checks that Redis still answers. */
export const DEFAULT_BUS_PING_MS = 1000
/** How long `/health/ready` waits for Redis to answer a PING. */
const READY_PING_MS = 1000
/** A Redis connection error is logged at most this often (an outage retries every second). */
const ERROR_LOG_INTERVAL_MS = 30_000
const DEFAULT_SWEEP_INTERVAL_MS = 1000
const SWEEP_BATCH = 1000
const SCAN_COUNT = 1000
/** Keys whose L1 fill must be refused while a read is in flight; past this, all fills are refused once. */
const MAX_DROPPED_KEYS = 10_000
/** Walks whose quiet message came and whose message proper has not (yet); past this, the oldest is forgotten. */
const MAX_QUIET_WALKS = 1000
/** Longest delay setTimeout takes (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1
/** The lease stamp handed out while Redis is unreachable: no store ever accepts it. */
const OFFLINE_STAMP: LeaseStamp = { epoch: 'offline', seq: 0 }
/**
 * The epoch a stamp proposes, taken only if Redis has none (first start, or it lost its data).
 * Fresh each time: reusing one would revive leases from before an earlier data loss.
 */
const proposedEpoch = () => randomBytes(6).toString('base64url')
const TIMED_OUT = 'Command timed out' // ioredis' message when `commandTimeout` runs out

/** An ioredis client that tells its owner when a command timed out (ioredis has no event for it). */
class WatchedRedis extends Redis {
  onTimeout: () => void = () => {}

  override sendCommand(command: Command, stream?: Parameters<Redis['sendCommand']>[1]): unknown {
    command.promise.catch((error: unknown) => {
      if (error instanceof Error && error.message === TIMED_OUT) this.onTimeout()
    })
    return super.sendCommand(command, stream)
  }
}

export interface TieredStoreOptions {
  /** redis:// or rediss:// URL (REDIS_URL). */
  redisUrl: string
  /** Prefix of every Redis key, inside a hash tag: `{cw}:...`. Instances sharing data share it. */
  namespace?: string
  /** The clock; tests pass a fake one. Expiry is decided by it, never by Redis alone. */
  now?: () => number
  /** Most entries (and accounted bytes) Redis keeps; beyond, the entries closest to expiry go. */
  maxEntries?: number
  maxBytes?: number
  /** Bounds of each instance's L1 (default: the same as Redis). */
  l1MaxEntries?: number
  l1MaxBytes?: number
  /** An L1 copy lives at most this long (L1_MAX_TTL_MS): the staleness bound if a bus message is lost. */
  l1MaxTtlMs?: number
  /** How long an L1 run (a user's, tag's or prefix's invalidation) goes before it yields; tests pass 0. */
  l1SliceMs?: number
  /** How much longer than its TTL Redis keeps an entry before dropping it by itself. */
  ttlMarginMs?: number
  /** How often expired entries are swept from Redis, in ms; 0 turns the timer off. */
  sweepIntervalMs?: number
  maxLeaseScopes?: number
  maxLeasePrefixes?: number
  commandTimeoutMs?: number
  /**
   * How often the bus subscriber PINGs Redis, in ms (default 1000; 0: never). One that gets no
   * answer within `commandTimeoutMs` counts as lost: the bus is down until it resubscribes.
   * Without it a frozen Redis, whose sockets stay open, would leave the bus "up".
   */
  busPingMs?: number
  /**
   * Most members of a user or tag invalidated in one script (default 1000); a larger one is
   * walked in batches of about this many, so Redis never stops serving others for long.
   */
  indexBatch?: number
  /** Called when the bus subscriber connects (after the L1 flush) or disconnects. */
  onBusState?: (connected: boolean) => void
  logger?: CoreLogger
}

/** What travels on the bus: selectors and keys, never values. */
interface BusMessage {
  /** The sender's instance id; it applied the change to its own L1 already. */
  f: string
  s?: Selector
  m?: InvalidationMode
  /** A clear (`m` delete) or mark-all-stale (`m` stale): every L1 drops everything. */
  flush?: 1
  /** A write, not an invalidation: other L1s drop their copy of the key. */
  w?: 1
  /**
   * Quiet: the selector of an invalidation walked in batches, for L1 upkeep only, not
   * reported as an invalidation. Sent when the walk starts (and again if it fails), so no
   * instance's L1 outlives what Redis has dropped; the message proper (`s`, same `i`) follows
   * once the walk is done. Not under `s`, so instances of a build before it ignore it.
   * Sent again every third of `l1MaxTtlMs` while the walk goes (a heartbeat), so the gate
   * it puts up does not lift by its timer during a long walk.
   */
  qs?: Selector
  /** The walk's number at its sender: pairs the quiet message with the message proper. */
  i?: number
  /** With `s` or `flush`: the invalidation's reason and actor, for the other instances' logs (older builds ignore them). */
  r?: string
  a?: string
  /** With `qs`: the walk failed, no message proper follows. */
  x?: 1
  /** The quiet flag of one earlier build, which sent the quiet selector under `s`. */
  q?: 1
}

/** Another instance's change, once applied to this L1; `invalidated` counts the L1 copies it touched. */
export type RemoteInvalidation =
  | { selector: Selector; mode: InvalidationMode; write: boolean; flush?: undefined; invalidated: number; note?: InvalidationNote }
  // `mode` is missing in a flush from an instance of an older build.
  | { selector?: undefined; mode?: InvalidationMode; write: false; flush: true; invalidated: number; note?: InvalidationNote }

/** An L1 copy: `expiresAt` is the L1 deadline; `real` is the entry as Redis has it. */
interface L1Entry extends StoredEntry {
  real: StoredEntry
  /** Redis' hit count when the copy was taken: `hits` beyond it are this instance's L1 hits. */
  filledHits: number
}

type ScriptClient = Record<ScriptName, (...args: Array<string | number>) => Promise<unknown>>

/**
 * The cluster-mode store (DESIGN.md section 7): an L1 MemoryStore per instance in front of
 * Redis, which holds the entries, the indexes and the lease sequences, all updated by Lua
 * scripts (redis-scripts.ts). Every change is published on a pub/sub bus so the other
 * instances drop their L1 copies; while the bus is down the L1 is not trusted (reads go to
 * Redis), and when it comes back the L1 is flushed, since messages may have been missed.
 * With Redis down, reads answer from L1 or miss and writes throw `backend_unavailable`.
 */
export class TieredStore implements Store {
  readonly kind = 'tiered'
  get maxBytes(): number {
    return this.#maxBytes
  }
  /** This instance's id on the bus. */
  readonly id = randomBytes(8).toString('base64url')
  readonly #redis: WatchedRedis
  readonly #sub: Redis
  readonly #scripts: ScriptClient
  readonly #l1: MemoryStore
  readonly #base: string
  readonly #channel: string
  readonly #now: () => number
  readonly #maxEntries: number
  readonly #maxBytes: number
  readonly #l1MaxTtlMs: number
  /** How long another instance's walk gates this L1 unheard of; its sender repeats its quiet message every third of it. */
  readonly #gateMs: number
  readonly #ttlMarginMs: number
  readonly #maxLeaseScopes: number
  readonly #maxLeasePrefixes: number
  readonly #indexBatch: number
  readonly #logger: CoreLogger | undefined
  readonly #failureLog = new LogThrottle(ERROR_LOG_INTERVAL_MS)
  readonly #listeners: EvictionListener[] = []
  readonly #busListeners: Array<(connected: boolean) => void> = []
  readonly #remoteListeners: Array<(message: RemoteInvalidation) => void> = []
  /**
   * The last bus message's report: each waits for the one before, so the log, metrics and
   * stream hear another instance's invalidations in the order they came, though their L1 runs
   * (a key's is done at once, a user's or prefix's takes turns) may end in another.
   */
  #reported: Promise<void> = Promise.resolve()
  readonly #timer: NodeJS.Timeout | undefined
  readonly #busPingTimer: NodeJS.Timeout | undefined
  #busPinging = false
  /** How many bus messages have arrived: any since a PING shows the connection alive. */
  #busHeard = 0
  #busUp = false
  #closing = false
  #sweeping = false
  // L1 fills are guarded by generations: a read that started before an L1 invalidation of
  // its key (or of everything) must not put what it read into L1 after that invalidation.
  #gen = 0
  #coarseGen = 0
  readonly #dropped = new Map<string, number>()
  /**
   * Other instances' walks whose quiet message came and whose message proper has not (yet), by
   * sender and walk number: the L1 copies the quiet message dropped, to report with the
   * message proper, and the gate keeping what the walk covers out of L1 meanwhile.
   */
  readonly #walksHeard = new Map<string, HeardWalk>()
  /** The number of this instance's last invalidation (a walk's number on the bus). */
  #lastWalk = 0
  /** The selectors of the runs over this L1 still going (a user's, tag's or prefix's yields between slices). */
  readonly #runs = new Set<Reach>()
  readonly #background = new Set<Promise<unknown>>()
  #fence: Promise<void> | undefined
  /** The PING the changes acknowledged in this turn wait for; sent at the end of the turn. */
  #nextPing: Promise<void> | undefined
  /** The connection was dropped after a command timed out, and has not been ready since. */
  #cut = false

  constructor(options: TieredStoreOptions) {
    this.#now = options.now ?? Date.now
    const namespace = options.namespace ?? DEFAULT_NAMESPACE
    if (/[{}]/.test(namespace)) throw new TypeError('namespace must not contain { or }')
    this.#base = `{${namespace}}:`
    this.#channel = `${this.#base}bus`
    this.#maxEntries = options.maxEntries ?? DEFAULT_MAX_ENTRIES
    this.#maxBytes = options.maxBytes ?? DEFAULT_MAX_BYTES
    this.#l1MaxTtlMs = options.l1MaxTtlMs ?? DEFAULT_L1_MAX_TTL_MS
    this.#gateMs = Math.min(this.#l1MaxTtlMs, MAX_TIMER_MS)
    this.#ttlMarginMs = options.ttlMarginMs ?? DEFAULT_TTL_MARGIN_MS
    this.#maxLeaseScopes = options.maxLeaseScopes ?? DEFAULT_MAX_LEASE_SCOPES
    this.#maxLeasePrefixes = options.maxLeasePrefixes ?? DEFAULT_MAX_LEASE_PREFIXES
    this.#indexBatch = options.indexBatch ?? SCAN_COUNT
    this.#logger = options.logger
    if (options.onBusState) this.#busListeners.push(options.onBusState)
    const sweepIntervalMs = options.sweepIntervalMs ?? DEFAULT_SWEEP_INTERVAL_MS
    this.#l1 = new MemoryStore({
      maxEntries: options.l1MaxEntries ?? this.#maxEntries,
      maxBytes: options.l1MaxBytes ?? this.#maxBytes,
      now: this.#now,
      sweepIntervalMs,
      sliceMs: options.l1SliceMs,
      leases: false, // they live in Redis
      // Every prefix invalidation in the cluster runs over every L1: it costs the keys it
      // matches, not a pass over the whole L1.
      prefixIndex: true,
    })

    const commandTimeoutMs = options.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS
    const common: RedisOptions = {
      lazyConnect: true,
      // Fail fast while disconnected: a request gets its 503 or its miss at once instead of
      // waiting in a queue, and nothing in flight is silently replayed after a reconnect.
      enableOfflineQueue: false,
      autoResendUnfulfilledCommands: false,
      maxRetriesPerRequest: 0,
      commandTimeout: commandTimeoutMs,
      connectTimeout: 2000,
      // A dropped connection whose Redis does not answer the goodbye is cut after this long.
      disconnectTimeout: 200,
      retryStrategy: (times) => Math.min(50 * times, 1000),
    }
    this.#redis = new WatchedRedis(options.redisUrl, common)
    this.#redis.onTimeout = () => this.#onTimeout(commandTimeoutMs)
    // The subscriber subscribes by hand on every `ready`, so the bus counts as up only once
    // the subscription is confirmed.
    this.#sub = new Redis(options.redisUrl, { ...common, autoResubscribe: false, commandTimeout: undefined })
    for (const [name, lua] of Object.entries(REDIS_SCRIPTS)) {
      this.#redis.defineCommand(name, { numberOfKeys: 1, lua })
    }
    this.#scripts = this.#redis as unknown as ScriptClient

    // The state shows in readiness and in failed requests; the cause is logged once in a while.
    const where = redisAddress(options.redisUrl)
    this.#redis.on('error', (error: Error) => {
      const held = this.#closing ? undefined : this.#failureLog.pass('connection')
      if (held !== undefined) this.#logger?.warn({ redis: where, err: error.message, failuresNotLogged: held }, 'Redis connection error: retrying')
    })
    this.#redis.on('ready', () => (this.#cut = false))
    this.#sub.on('error', () => {})
    this.#sub.on('ready', () => {
      this.#sub.subscribe(this.#channel).then(
        () => this.#setBus(true),
        () => this.#sub.disconnect(true),
      )
    })
    this.#sub.on('close', () => this.#setBus(false))
    this.#sub.on('message', (_channel: string, message: string) => {
      this.#busHeard++
      this.#onMessage(message)
    })

    if (sweepIntervalMs > 0) {
      this.#timer = setInterval(() => void this.sweep(), sweepIntervalMs)
      this.#timer.unref()
    }
    const busPingMs = options.busPingMs ?? DEFAULT_BUS_PING_MS
    if (busPingMs > 0) {
      this.#busPingTimer = setInterval(() => void this.#pingBus(commandTimeoutMs), busPingMs)
      this.#busPingTimer.unref()
    }
  }

  /** Connects both Redis clients; waits up to `waitMs` for them, and keeps retrying in the background either way. */
  async connect(waitMs = 3000): Promise<boolean> {
    this.#redis.connect().catch(() => {})
    this.#sub.connect().catch(() => {})
    const deadline = Date.now() + waitMs
    while (!this.ready() && Date.now() < deadline && !this.#closing) await sleep(10)
    return this.ready()
  }

  /** True while the connection to Redis is up and the bus is subscribed. */
  ready(): boolean {
    return this.#redis.status === 'ready' && !this.#cut && this.#busUp
  }

  /**
   * For `/health/ready`: `ready()`, and Redis answers a PING within `timeoutMs`. A frozen
   * Redis (paused, swapping, stuck in a slow script) keeps its sockets open, so the
   * connection state alone would still say ready.
   */
  async healthy(timeoutMs = READY_PING_MS): Promise<boolean> {
    return this.ready() && (await answerInTime(this.#redis.ping(), timeoutMs)) === 'ok'
  }

  /** Adds a listener for bus state changes. */
  onBusState(listener: (connected: boolean) => void): void {
    this.#busListeners.push(listener)
  }

  // No getLocal: an L1 hit waits for the bus fence, so every read goes through `get`.

  async get(key: string, now: number, allowStale = false): Promise<StoredEntry | undefined> {
    if (this.#busUp) {
      await this.#busFence()
      const hit = this.#l1Get(key, now, allowStale)
      if (hit !== undefined) return hit
    }
    const startGen = this.#gen
    let entry: StoredEntry | undefined
    try {
      entry = await this.#l2Get(key, now, true, allowStale)
    } catch {
      // Redis is down: an L1 copy (even one the bus could not vouch for) beats a miss.
      return this.#l1Get(key, now, allowStale)
    }
    if (entry !== undefined && this.#mayFill(entry, startGen)) this.#l1Put(entry, now)
    return entry
  }

  /**
   * What this instance would serve: its L1 copy while the bus vouches for it, else Redis'
   * entry. Either way `hits` count the reads of Redis plus this instance's L1 hits (as
   * `userEntries` does): the copy alone would miss the reads Redis answered since it was taken.
   */
  async peek(key: string, now: number): Promise<StoredEntry | undefined> {
    if (this.#busUp) {
      await this.#busFence()
      const copy = await this.#l1PeekReal(key, now)
      if (copy !== undefined) return this.#withRedisHits(copy, now)
    }
    try {
      const entry = await this.#l2Get(key, now, false)
      return entry === undefined ? undefined : this.#withL1Hits(entry, now)
    } catch (error) {
      // Redis is down: an L1 copy is still what this instance would serve, but without one
      // nobody can say whether the key has an entry, so inspection fails rather than say "none".
      const copy = await this.#l1PeekReal(key, now)
      if (copy !== undefined) return copy
      throw this.#unavailable(error, 'read')
    }
  }

  async set(entry: StoredEntry, lease?: LeaseStamp): Promise<SetOutcome> {
    const now = this.#now()
    const pttl = Math.max(1, entry.expiresAt - now) + this.#ttlMarginMs
    let result: [number, string[]?]
    // With no offline queue, a command made while the connection is not ready is refused before
    // anything is sent: such a write cannot have landed, so the L1 copy stands as before it.
    const sent = this.#redis.status === 'ready'
    try {
      result = (await this.#scripts.cwSet(
        this.#base,
        entry.key,
        entry.value,
        entry.etag,
        entry.userId ?? '',
        entry.tags?.length ? JSON.stringify(entry.tags) : '',
        entry.createdAt,
        entry.expiresAt,
        entry.size,
        entry.origin ?? '',
        entry.hits,
        entry.lastAccessAt,
        entry.stale ? 1 : 0,
        pttl,
        lease?.epoch ?? '',
        lease?.seq ?? 0,
        this.#maxEntries,
        this.#maxBytes,
        this.#channel,
        JSON.stringify({ f: this.id, s: { keys: [entry.key] }, m: 'delete', w: 1 } satisfies BusMessage),
      )) as [number, string[]?]
    } catch (error) {
      // One that was sent may have landed: its copy goes. One never sent leaves the copy, so a
      // stale entry stays served while Redis is down (a load that Redis cannot take falls back on it).
      if (sent) this.#dropKeys([entry.key])
      throw this.#unavailable(error, 'write')
    }
    // Never put the written entry in L1 here: a concurrent write may have landed in Redis
    // after this one. The next read fills L1 from Redis.
    this.#dropKeys([entry.key])
    if (result[0] === 0) return 'lease_invalidated'
    const evicted = result[1] ?? []
    if (evicted.length > 0) {
      this.#dropKeys(evicted)
      this.#report(evicted, 'evict')
    }
    await this.#delivered()
    return 'ok'
  }

  async invalidate(selector: Selector, mode: InvalidationMode, now: number, note?: InvalidationNote): Promise<number> {
    const prefixes = selector.prefixes ?? []
    const walk = ++this.#lastWalk
    const message = this.#message(selector, mode, walk, note)
    const quiet = this.#quietMessage(selector, mode, walk)
    // Whether the other instances still wait for the message (the script sent the quiet one).
    let owed = false
    let gate: Reach | undefined
    let heartbeat: NodeJS.Timeout | undefined
    try {
      const [count, gen, expired, deferred] = (await this.#scripts.cwInvalidate(
        this.#base,
        JSON.stringify(selector),
        mode,
        1,
        this.#maxLeaseScopes,
        this.#maxLeasePrefixes,
        this.#channel,
        prefixes.length > 0 ? quiet : message,
        now,
        this.#indexBatch,
        '',
        quiet,
      )) as [number, string, string[], string[]]
      this.#report(expired, 'expire')
      let total = count
      // With prefixes to scan or sets left to batches, the script sent the quiet message: the
      // other instances drop their copies of what it covers now and, until the message proper
      // comes once the walk is done, put none of its entries in L1 (one may be an entry the
      // walk has yet to reach); their stream clients are told once it is done.
      owed = prefixes.length > 0 || deferred.length > 0
      if (owed) {
        // So does this instance, for the length of the walk.
        gate = new Reach(selector)
        this.#runs.add(gate)
        heartbeat = setInterval(() => void this.#redis.publish(this.#channel, quiet).catch(() => undefined), Math.max(1, Math.floor(this.#gateMs / 3)))
        heartbeat.unref()
        await this.#applyToL1(selector, mode, now)
      }
      // Sets too large for one script: in batches, each applying only what is still in the set.
      for (const set of deferred) {
        await this.#eachMemberBatch(set, async (keys) => void (total += await this.#invalidateKeys(keys, mode, now, set)), gen)
      }
      if (prefixes.length > 0) total += await this.#invalidatePrefixes(gen, prefixes, mode, now)
      // No heartbeat after the message proper: it would put the gates up again.
      clearInterval(heartbeat)
      if (owed) await this.#redis.publish(this.#channel, message)
      await this.#delivered()
      return total
    } catch (error) {
      clearInterval(heartbeat)
      // A walk that failed midway has applied some batches: without a message, the other
      // instances would serve their L1 copies of those entries for up to l1MaxTtlMs. Quiet, as
      // the invalidation failed. Best effort: if Redis is gone, so is their bus, and they drop
      // all of L1 when it is back.
      if (owed) await this.#redis.publish(this.#channel, this.#quietMessage(selector, mode, walk, true)).catch(() => undefined)
      throw this.#unavailable(error, 'invalidation')
    } finally {
      // Applied whether Redis took it or not: a failed invalidation still drops local copies.
      // After a walk, this L1 has held nothing it covers since its start.
      if (gate === undefined) await this.#applyToL1(selector, mode, now)
      else {
        this.#runs.delete(gate)
        this.#refuseFillsInFlight()
      }
    }
  }

  async clear(note?: InvalidationNote): Promise<number> {
    try {
      const [count, oldGen] = (await this.#scripts.cwClear(this.#base, this.#channel, this.#flushMessage('delete', note))) as [
        number,
        string,
      ]
      this.#track(this.#collect(oldGen))
      await this.#delivered()
      return count
    } catch (error) {
      throw this.#unavailable(error, 'clear')
    } finally {
      await this.#flushL1()
    }
  }

  /**
   * Marks every entry stale and voids every lease (the PostgreSQL listener's reconnect
   * policy). Leases are voided first, then the expiry index is walked in batches outside
   * Lua, and every L1 is flushed at the end (the next read fetches the stale-marked entry).
   */
  async markAllStale(note?: InvalidationNote): Promise<number> {
    let count = 0
    try {
      const gen = (await this.#scripts.cwVoidLeases(this.#base)) as string
      await this.#walk(
        // ZSCAN answers member, score, member, score...: the members are the keys.
        async (cursor) => {
          const [next, flat] = await this.#redis.zscan(`${this.#base}${gen}:x`, cursor, 'COUNT', SCAN_COUNT)
          return [next, flat.filter((_, i) => i % 2 === 0)]
        },
        async (keys) => void (count += await this.#invalidateKeys(keys, 'stale', this.#now())),
      )
      await this.#redis.publish(this.#channel, this.#flushMessage('stale', note))
      await this.#delivered()
      return count
    } catch (error) {
      throw this.#unavailable(error, 'mark-all-stale')
    } finally {
      await this.#flushL1()
    }
  }

  async claimFill(key: string, holder: string, ttlMs: number, now: number): Promise<{ stamp: LeaseStamp; left: number }> {
    try {
      const ms = Math.max(1, Math.ceil(ttlMs))
      const [epoch, seq, left] = (await this.#scripts.cwClaimFill(this.#base, key, holder, ms, proposedEpoch(), now)) as [string, number, number]
      if (left >= 0) return { stamp: { epoch, seq }, left }
      // Redis holds a fresh entry the read missed: a fill landed since, or this instance's L1
      // copy is behind (marked stale by an invalidation Redis did not take). Drop the copy, so
      // the read the caller makes in a millisecond goes to Redis and finds the entry.
      this.#dropKeys([key])
      return { stamp: { epoch, seq }, left: 1 }
    } catch {
      // A miss must still answer while Redis is down: it fills, and its lease can never write.
      return { stamp: OFFLINE_STAMP, left: 0 }
    }
  }

  async releaseFill(key: string, holder: string): Promise<void> {
    await this.#call(() => this.#scripts.cwReleaseFill(this.#base, key, holder))
  }

  async putRecord(name: string, value: string, ttlMs: number): Promise<string | undefined> {
    return this.#call(async () => {
      const prior = (await this.#scripts.cwPutRecord(this.#base, name, value, Math.max(1, Math.ceil(ttlMs)))) as string | null
      return prior ?? undefined
    })
  }

  async getRecord(name: string): Promise<string | undefined> {
    return this.#call(async () => (await this.#redis.get(`${this.#base}rec:${name}`)) ?? undefined)
  }

  async swapRecord(name: string, expected: string, value: string | undefined, ttlMs: number): Promise<boolean> {
    return this.#call(async () => {
      const drop = value === undefined ? 1 : 0
      return (await this.#scripts.cwSwapRecord(this.#base, name, expected, drop, value ?? '', Math.max(1, Math.ceil(ttlMs)))) === 1
    })
  }

  async leaseStamp(): Promise<LeaseStamp> {
    try {
      const [epoch, seq] = (await this.#scripts.cwStamp(this.#base, proposedEpoch())) as [string, number]
      return { epoch, seq }
    } catch {
      // A miss must still answer while Redis is down; this lease can never write.
      return OFFLINE_STAMP
    }
  }

  async userEntries(userId: string, now: number): Promise<StoredEntry[]> {
    const out: StoredEntry[] = []
    await this.#call(() =>
      this.#eachMemberBatch(`u:${userId}`, async (keys) => {
        const flat = (await this.#scripts.cwLiveEntries(this.#base, now, userId, ...keys)) as Array<string | string[]>
        for (let i = 0; i < flat.length; i += 2) out.push(this.#withL1Hits(parseEntry(flat[i] as string, flat[i + 1] as string[]), now))
      }),
    )
    return out
  }

  /** An L1 copy's entry with the hits Redis counted on the same version; as it is if Redis cannot say. */
  async #withRedisHits(copy: StoredEntry, now: number): Promise<StoredEntry> {
    const entry = await this.#l2Get(copy.key, now, false).catch(() => undefined)
    if (entry === undefined || !sameVersion(entry, copy)) return copy
    const { hits, lastAccessAt } = this.#withL1Hits(entry, now)
    return { ...copy, hits, lastAccessAt }
  }

  /** Redis' entry with the hits this instance's L1 copy of the same version answered since it was taken. */
  #withL1Hits(entry: StoredEntry, now: number): StoredEntry {
    const copy = this.#l1.peekLocal(entry.key, now) as L1Entry | undefined
    if (copy === undefined || !sameVersion(copy, entry)) return entry
    entry.hits += copy.hits - copy.filledHits
    entry.lastAccessAt = Math.max(entry.lastAccessAt, copy.lastAccessAt)
    return entry
  }

  async userKeys(userId: string): Promise<string[]> {
    return this.#existingMembers(`u:${userId}`)
  }

  async tagKeys(tag: string): Promise<string[]> {
    return this.#existingMembers(`t:${tag}`)
  }

  async #existingMembers(set: string): Promise<string[]> {
    const out: string[] = []
    await this.#call(() => this.#eachMemberBatch(set, async (keys) => void out.push(...((await this.#scripts.cwExisting(this.#base, set, ...keys)) as string[]))))
    return out
  }

  /**
   * Hands an index set (`u:<user>` or `t:<tag>`, in generation `gen`, by default the current
   * one) to `each` in SSCAN batches of about `indexBatch`, each key once: no script reads a
   * whole set, which for a user with 200 000 entries would hold Redis for seconds. Not atomic:
   * `each`'s script must check that a key is still in the set (of the current generation) when
   * it runs, as the key may have moved to another user or been cleared meanwhile.
   */
  async #eachMemberBatch(set: string, each: (keys: string[]) => Promise<void>, gen?: string): Promise<void> {
    const seen = new Set<string>() // SSCAN may return a key twice if the set grows meanwhile
    const index = `${this.#base}${gen ?? (await this.#redis.get(`${this.#base}g`)) ?? '0'}:${set}`
    await this.#walk(
      (cursor) => this.#redis.sscan(index, cursor, 'COUNT', this.#indexBatch),
      async (batch) => {
        const fresh = batch.filter((key) => !seen.has(key) && seen.add(key))
        if (fresh.length > 0) await each(fresh)
      },
    )
  }

  async sampleKeys(limit: number): Promise<string[]> {
    const info = (await this.#call(() => this.#scripts.cwInfo(this.#base, Math.max(0, limit), this.#now()))) as [number, number, string[]]
    return info[2]
  }

  async size(): Promise<{ entries: number; bytes: number }> {
    try {
      const [entries, bytes] = (await this.#scripts.cwInfo(this.#base, 0, 0)) as [number, number]
      return { entries, bytes }
    } catch {
      // Stats and metrics must not fail with Redis: show what this instance holds.
      return this.#l1.size()
    }
  }

  /** What this instance's L1 holds (for tests and the consistency check). */
  async l1Peek(key: string, now: number): Promise<StoredEntry | undefined> {
    const copy = (await this.#l1.peek(key, now)) as L1Entry | undefined
    return copy === undefined ? undefined : { ...copy.real, stale: copy.stale }
  }

  /**
   * Compares this instance's L1 copies of `keys` with Redis (the consistency check's copy
   * check): a copy differs when Redis no longer has the entry, or has another etag or
   * staleness. Keys not in L1 are consistent by definition. Differing copies are not dropped
   * here; the check's repair does that through the invalidation function.
   */
  async compareL1(keys: string[]): Promise<{ differing: string[]; errors: Array<{ key: string; error: string }> }> {
    const differing: string[] = []
    const errors: Array<{ key: string; error: string }> = []
    await this.#busFence() // not a copy a message already here drops
    const now = this.#now()
    for (const key of keys) {
      // A copy a run over L1 is still to reach is being dropped already: not a difference.
      const copy = await this.#l1PeekReal(key, now)
      if (copy === undefined) continue
      try {
        const entry = await this.#l2Get(key, now, false)
        if (entry === undefined || entry.etag !== copy.etag || entry.stale !== copy.stale) differing.push(key)
      } catch {
        errors.push({ key, error: 'Redis is unavailable' })
      }
    }
    return { differing, errors }
  }

  /** Counts of this instance's L1. */
  async l1Size(): Promise<{ entries: number; bytes: number }> {
    return this.#l1.size()
  }

  /** Adds a listener called once another instance's invalidation or clear has been applied to this L1. */
  onRemoteInvalidation(listener: (message: RemoteInvalidation) => void): void {
    this.#remoteListeners.push(listener)
  }

  onEviction(listener: EvictionListener): void {
    this.#listeners.push(listener)
  }

  /** Drops entries whose TTL ran out (by the store's clock) with their memberships. */
  async sweep(): Promise<number> {
    if (this.#sweeping || this.#redis.status !== 'ready') return 0
    this.#sweeping = true
    let dropped = 0
    try {
      for (;;) {
        const keys = (await this.#scripts.cwSweep(this.#base, this.#now(), SWEEP_BATCH)) as string[]
        dropped += keys.length
        this.#report(keys, 'expire')
        if (keys.length < SWEEP_BATCH || this.#closing) break
      }
    } catch {
      // Redis went away mid-sweep; the next sweep picks up where this one stopped.
    } finally {
      this.#sweeping = false
    }
    return dropped
  }

  async close(): Promise<void> {
    this.#closing = true
    if (this.#timer) clearInterval(this.#timer)
    if (this.#busPingTimer) clearInterval(this.#busPingTimer)
    for (const walk of [...this.#walksHeard.keys()]) this.#endWalk(walk)
    await Promise.allSettled(this.#background)
    this.#redis.disconnect()
    this.#sub.disconnect()
    await this.#l1.close()
  }

  async #l2Get(key: string, now: number, countHit: boolean, allowStale = false): Promise<StoredEntry | undefined> {
    const reply = (await this.#scripts.cwGet(this.#base, key, now, countHit ? 1 : 0, allowStale ? 1 : 0)) as string[] | number | null
    if (reply === null) return undefined
    if (typeof reply === 'number') {
      this.#report([key], 'expire')
      return undefined
    }
    return parseEntry(key, reply)
  }

  /** The L1 copy's real entry, brought up to date, without counting a hit; none while a run is to reach it. */
  async #l1PeekReal(key: string, now: number): Promise<StoredEntry | undefined> {
    const copy = (await this.#l1.peek(key, now)) as L1Entry | undefined
    return copy === undefined || this.#inRun(copy) ? undefined : syncReal(copy)
  }

  #l1Get(key: string, now: number, allowStale: boolean): StoredEntry | undefined {
    // A copy a run is to reach is looked at without counting a hit on it: Redis counts this read.
    if (this.#runs.size > 0) {
      const copy = this.#l1.peekLocal(key, now)
      if (copy === undefined || this.#inRun(copy)) return undefined
    }
    const copy = this.#l1.getLocal(key, now, allowStale) as L1Entry | null
    return copy === null ? undefined : syncReal(copy)
  }

  /**
   * Whether a run over L1 still going covers this entry: it is about to be dropped or marked
   * stale here, so neither served nor put in L1 (Redis has the invalidation already). Only
   * the entries a run covers: the rest of L1 serves on.
   */
  #inRun(entry: StoredEntry): boolean {
    if (this.#runs.size === 0) return false
    for (const run of this.#runs) if (run.covers(entry)) return true
    return false
  }

  #l1Put(entry: StoredEntry, now: number): void {
    const copy: L1Entry = { ...entry, expiresAt: Math.min(entry.expiresAt, now + this.#l1MaxTtlMs), real: entry, filledHits: entry.hits }
    this.#l1.setSync(copy)
  }

  /**
   * Resolves once the event loop has read what its sockets already hold. Redis writes a bus
   * message to the subscribers in the same turn as it answers the instance that made the
   * change, so by the time a client told of that change asks another instance, the message is
   * there; but it may be in the same poll batch as the request, and the request may come
   * first. An L1 read waits for this, so it never serves what such a message drops (a cross-
   * instance read right after a 200 saw the old value about once in 200 without it). One
   * setImmediate per turn, shared by every read in it.
   */
  #busFence(): Promise<void> {
    this.#fence ??= new Promise<void>((resolve) =>
      setImmediate(() => {
        this.#fence = undefined
        resolve()
      }),
    )
    return this.#fence
  }

  /**
   * Waits until Redis has written out the bus message the last command published, so a
   * change is acknowledged only once every other instance has the message on its socket
   * (where an L1 read's bus fence takes it in before reading). Redis writes a script's reply
   * and the messages it published in the same turn, but the reply first: on a busy machine
   * a client told of the change could ask another instance before that instance's message
   * was even sent (about once in 200 cross-instance reads right after a 200). A PING's reply
   * comes a turn later, after the message. Best effort: the change itself is applied.
   * Changes whose replies came in together share one PING: it is sent once the microtasks
   * they resume in have run (a batch-set's 32 writes at a time, one PING).
   */
  #delivered(): Promise<void> {
    this.#nextPing ??= new Promise<void>((resolve) =>
      process.nextTick(() => {
        this.#nextPing = undefined
        this.#redis.ping().then(() => resolve(), () => resolve())
      }),
    )
    return this.#nextPing
  }

  #mayFill(entry: StoredEntry, startGen: number): boolean {
    return (
      this.#busUp &&
      this.#coarseGen <= startGen &&
      (this.#dropped.get(entry.key) ?? 0) <= startGen &&
      !this.#inRun(entry)
    )
  }

  #dropKeys(keys: string[]): void {
    const gen = ++this.#gen
    for (const key of keys) this.#dropped.set(key, gen)
    // Upkeep of the L1 copy only: the lease sequences live in Redis, so no scope is stamped.
    this.#l1.deleteKeys(keys)
    if (this.#dropped.size > MAX_DROPPED_KEYS) {
      this.#dropped.clear()
      this.#coarseGen = gen
    }
  }

  /**
   * Invalidates in L1 alone. A user's, tag's or prefix's run yields between slices: until it
   * is done, reads here neither serve nor fill the copies it covers (`#inRun`), so none serves
   * a copy the run has yet to reach.
   */
  async #applyToL1(selector: Selector, mode: InvalidationMode, now: number): Promise<number> {
    if (selector.keys?.length && !selector.userIds?.length && !selector.tags?.length && !selector.prefixes?.length) {
      const gen = ++this.#gen
      for (const key of selector.keys) this.#dropped.set(key, gen)
      return this.#l1.invalidate(selector, mode, now) // keys only: done before it returns
    }
    this.#refuseFillsInFlight()
    const reach = new Reach(selector)
    this.#runs.add(reach)
    try {
      return await this.#l1.invalidate(selector, mode, now)
    } finally {
      this.#runs.delete(reach)
    }
  }

  async #flushL1(): Promise<number> {
    this.#refuseFillsInFlight()
    return this.#l1.clear()
  }

  /** No read in flight now puts what it reads in L1 (it may have read Redis before a change). */
  #refuseFillsInFlight(): void {
    this.#coarseGen = ++this.#gen
    this.#dropped.clear()
  }

  /**
   * A SCAN is a pass over all of Redis' keys whatever it matches, so a selector's prefixes
   * share one: one prefix is matched by Redis; several by the start they share, in Redis,
   * and the rest here (prefixMatcher), rather than one pass over the keyspace each.
   */
  async #invalidatePrefixes(gen: string, prefixes: string[], mode: InvalidationMode, now: number): Promise<number> {
    const entryPrefix = `${this.#base}${gen}:e:`
    const matches = prefixes.length === 1 ? undefined : prefixMatcher(prefixes)
    const pattern = `${globEscape(entryPrefix + (matches === undefined ? prefixes[0]! : sharedStart(prefixes)))}*`
    let count = 0
    await this.#walk(
      (cursor) => this.#redis.scan(cursor, 'MATCH', pattern, 'COUNT', SCAN_COUNT),
      async (found) => {
        let keys = found.map((k) => k.slice(entryPrefix.length))
        if (matches !== undefined) keys = keys.filter(matches)
        if (keys.length > 0) count += await this.#invalidateKeys(keys, mode, now)
      },
    )
    return count
  }

  /**
   * Deletes or marks stale these keys in Redis (indexes kept by the script). With `within` (a
   * set too large for one script, `u:<user>` or `t:<tag>`), only those still in that set: a
   * key rewritten for someone else, or written after a clear, since SSCAN found it is left
   * alone. A key that joins the set meanwhile may or may not be reached: it was written after
   * the invalidation, so either is correct.
   */
  async #invalidateKeys(keys: string[], mode: InvalidationMode, now: number, within = ''): Promise<number> {
    const selector = JSON.stringify({ keys })
    const [n, , expired] = (await this.#scripts.cwInvalidate(this.#base, selector, mode, 0, 0, 0, '', '', now, 0, within)) as [
      number,
      string,
      string[],
    ]
    this.#report(expired, 'expire')
    return n
  }

  /** Follows a SCAN-style cursor to its end, handing each non-empty batch to `each`. */
  async #walk(
    scan: (cursor: string) => Promise<[string, string[]]>,
    each: (batch: string[]) => Promise<void>,
    stop: () => boolean = () => false,
  ): Promise<void> {
    let cursor = '0'
    do {
      const [next, batch] = await scan(cursor)
      cursor = next
      if (batch.length > 0) await each(batch)
    } while (cursor !== '0' && !stop())
  }

  /** Unlinks the data keys of a generation a clear left behind, in batches. */
  async #collect(gen: string): Promise<void> {
    try {
      await this.#walk(
        (cursor) => this.#redis.scan(cursor, 'MATCH', `${globEscape(`${this.#base}${gen}:`)}*`, 'COUNT', SCAN_COUNT),
        async (found) => void (await this.#redis.unlink(...found)),
        () => this.#closing,
      )
    } catch {
      // Whatever is left expires by its own TTL.
    }
  }

  #track(promise: Promise<unknown>): void {
    this.#background.add(promise)
    void promise.finally(() => this.#background.delete(promise))
  }

  #onMessage(raw: string): void {
    let message: BusMessage
    try {
      message = JSON.parse(raw) as BusMessage
    } catch {
      return
    }
    // Anything that can PUBLISH to Redis can send anything: only objects are messages.
    if (this.#closing || message === null || typeof message !== 'object' || message.f === this.id) return
    const mode = message.m === 'stale' ? 'stale' : 'delete'
    const selector = message.flush ? undefined : busSelector(message.qs ?? message.s)
    if (!message.flush && selector === undefined) return
    // A walk in batches: its quiet message (start, or failure) and its message proper share this.
    const walk =
      selector === undefined || message.w
        ? undefined
        : typeof message.i === 'number'
          ? `${message.f}\0${message.i}`
          : `${message.f}\0${mode}\0${JSON.stringify(selector)}` // the previous build's, numberless
    const heard = walk === undefined ? undefined : this.#walksHeard.get(walk)
    let applied: Promise<number>
    const quiet = message.qs !== undefined || message.q === 1
    if (heard !== undefined && quiet && message.x !== 1) {
      // The walk's heartbeat: it is still going, its gate stays up.
      heard.timer.refresh()
      return
    }
    if (heard !== undefined) {
      // The quiet message's run dropped the copies, and none the walk covers was put in L1 since.
      this.#endWalk(walk!)
      applied = heard.dropped
    } else {
      applied = (selector === undefined ? this.#flushL1() : this.#applyToL1(selector, mode, this.#now())).catch((error: unknown) => {
        this.#logger?.error({ err: error }, 'applying a bus message to L1 failed')
        return 0
      })
    }
    if (quiet) {
      // A failed walk's: nothing follows, nothing is reported. A start's (or the heartbeat of a
      // walk whose start this instance missed or whose gate lifted): the gate goes up.
      if (message.x !== 1 && heard === undefined) this.#beginWalk(walk!, selector!, applied)
      return
    }
    if (this.#remoteListeners.length === 0) return
    this.#reported = this.#reported.then(() => applied).then((invalidated) => {
      const remote: RemoteInvalidation =
        selector === undefined
          ? { flush: true, write: false, invalidated, mode: message.m === 'stale' || message.m === 'delete' ? message.m : undefined, note: busNote(message) }
          : { selector, mode, write: message.w === 1, invalidated, note: busNote(message) }
      for (const listener of this.#remoteListeners) {
        try {
          listener(remote)
        } catch (error) {
          this.#logger?.error({ err: error }, 'a bus invalidation listener failed')
        }
      }
    })
  }

  /**
   * Another instance's walk has started: until its message proper (or its failure) comes, this
   * L1 takes in nothing it covers, so that message needs no second run over L1. The walk's
   * sender repeats its quiet message every third of l1MaxTtlMs; a walk not heard of within
   * l1MaxTtlMs (its sender died, or messages were lost while the bus was down) lifts the
   * gate. Its message proper, if it still comes, then runs over L1 as any other; a heartbeat
   * that still comes runs over L1 again and puts the gate back up. Past MAX_QUIET_WALKS gates,
   * the oldest is lifted the same way.
   */
  #beginWalk(walk: string, selector: Selector, dropped: Promise<number>): void {
    if (this.#walksHeard.size >= MAX_QUIET_WALKS) this.#endWalk(this.#walksHeard.keys().next().value!)
    const reach = new Reach(selector)
    const timer = setTimeout(() => this.#endWalk(walk), this.#gateMs)
    timer.unref()
    this.#walksHeard.set(walk, { reach, dropped, timer })
    this.#runs.add(reach)
  }

  #endWalk(walk: string): void {
    const heard = this.#walksHeard.get(walk)
    if (heard === undefined) return
    this.#walksHeard.delete(walk)
    clearTimeout(heard.timer)
    this.#runs.delete(heard.reach)
    // A read that reached Redis before the walk reached its key must not fill L1 now.
    this.#refuseFillsInFlight()
  }

  /** One PING on the subscriber connection (any bus message meanwhile counts as its answer); unanswered in time, the subscriber reconnects. */
  async #pingBus(timeoutMs: number): Promise<void> {
    if (!this.#busUp || this.#busPinging || this.#closing) return
    this.#busPinging = true
    try {
      const answer = await answerInTime(this.#sub.ping(), timeoutMs, () => this.#busHeard)
      if (answer === 'late' && this.#busUp && !this.#closing) {
        this.#logger?.warn({ bus: this.#channel, timeoutMs }, 'Redis did not answer the bus PING in time: resubscribing')
        this.#sub.disconnect(true)
      }
    } finally {
      this.#busPinging = false
    }
  }

  #setBus(up: boolean): void {
    if (up === this.#busUp) return
    // Messages may have been missed while the bus was down: nothing in L1 can be trusted.
    // Walk gates stay up, as a walk heard of may still be going (reads would refill L1 from
    // entries it has yet to reach); one whose message proper was lost ends by its timer.
    if (up) void this.#flushL1()
    this.#busUp = up
    this.#logger?.[up ? 'info' : 'warn']({ bus: this.#channel }, up ? 'cluster bus connected' : 'cluster bus disconnected')
    for (const listener of this.#busListeners) listener(up)
  }

  /** An invalidation's message proper, with why and who (undefined fields are left out). */
  #message(selector: Selector, mode: InvalidationMode, walk: number, note?: InvalidationNote): string {
    return JSON.stringify({ f: this.id, s: selector, m: mode, i: walk, r: note?.reason, a: note?.actor } satisfies BusMessage)
  }

  /** The quiet message of a walk: drop these L1 copies, the message proper follows (or, `failed`, none does). */
  #quietMessage(selector: Selector, mode: InvalidationMode, walk: number, failed = false): string {
    return JSON.stringify({ f: this.id, qs: selector, m: mode, i: walk, ...(failed && { x: 1 as const }) } satisfies BusMessage)
  }

  /** The bus message telling every other instance to drop its whole L1, and why (clear or mark-all-stale). */
  #flushMessage(mode: InvalidationMode, note?: InvalidationNote): string {
    return JSON.stringify({ f: this.id, flush: 1, m: mode, r: note?.reason, a: note?.actor } satisfies BusMessage)
  }

  #report(keys: string[], reason: EvictionReason): void {
    if (this.#listeners.length === 0) return
    for (const key of keys) for (const listener of this.#listeners) listener(stub(key), reason)
  }

  /**
   * A command timed out: Redis is frozen, swapping or stuck in a slow script, with its socket
   * still open. Every other request would wait out its own timeout (a miss two: the read and
   * the lease), so the connection is dropped: with no offline queue, commands then fail at
   * once, and ioredis reconnects, ready again when Redis answers its ready check.
   */
  #onTimeout(timeoutMs: number): void {
    if (this.#closing || this.#redis.status !== 'ready' || this.#cut) return
    // ioredis says 'ready' until the dropped socket has closed, which a frozen Redis delays.
    this.#cut = true
    this.#logger?.warn({ timeoutMs }, 'Redis did not answer in time: reconnecting; requests needing Redis fail at once until it answers')
    this.#redis.disconnect(true)
  }

  async #call<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn()
    } catch (error) {
      throw this.#unavailable(error, 'read')
    }
  }

  /** The request's 503; the cause logged once per interval for each kind of call and message. */
  #unavailable(error: unknown, what: string): CacheError {
    if (error instanceof CacheError) return error
    const held = this.#failureLog.pass(`${what}\n${(error as Error | undefined)?.message}`)
    if (held !== undefined) this.#logger?.warn({ err: error, failuresNotLogged: held }, `Redis ${what} failed`)
    return backendUnavailable('Redis')
  }
}

/**
 * A bus message's selector, rebuilt from its four lists (each, where present, strings only;
 * at least one not empty): anything else in it would reach the log and the stream.
 */
function busSelector(value: unknown): Selector | undefined {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return undefined
  const given = value as Record<string, unknown>
  const selector: Selector = {}
  let names = 0
  for (const kind of SELECTOR_KINDS) {
    const list = given[kind]
    if (list === undefined) continue
    if (!Array.isArray(list) || !list.every((item) => typeof item === 'string')) return undefined
    selector[kind] = list
    names += list.length
  }
  return names > 0 ? selector : undefined
}

interface HeardWalk {
  reach: Reach
  /** The L1 copies its quiet message dropped. */
  dropped: Promise<number>
  timer: NodeJS.Timeout
}

/** What an invalidation reaches, in sets: whether it covers an entry costs a few lookups, whatever its size. */
class Reach {
  readonly #keys: Set<string>
  readonly #userIds: Set<string>
  readonly #tags: Set<string>
  /** Prefixes by length: a key is covered when its first `length` characters are one of them. */
  readonly #prefixes = new Map<number, Set<string>>()

  constructor(selector: Selector) {
    this.#keys = new Set(selector.keys)
    this.#userIds = new Set(selector.userIds)
    this.#tags = new Set(selector.tags)
    for (const prefix of selector.prefixes ?? []) {
      let same = this.#prefixes.get(prefix.length)
      if (same === undefined) this.#prefixes.set(prefix.length, (same = new Set()))
      same.add(prefix)
    }
  }

  covers(entry: StoredEntry): boolean {
    if (this.#keys.has(entry.key)) return true
    if (entry.userId !== undefined && this.#userIds.has(entry.userId)) return true
    if (entry.tags !== undefined && this.#tags.size > 0) for (const tag of entry.tags) if (this.#tags.has(tag)) return true
    for (const [length, prefixes] of this.#prefixes) if (prefixes.has(entry.key.slice(0, length))) return true
    return false
  }
}

/** The same write of a key (every write stamps its own createdAt), whatever its hits and staleness. */
function sameVersion(a: StoredEntry, b: StoredEntry): boolean {
  return a.etag === b.etag && a.createdAt === b.createdAt
}

function syncReal(copy: L1Entry): StoredEntry {
  const real = copy.real
  real.hits = copy.hits
  real.lastAccessAt = copy.lastAccessAt
  real.stale = copy.stale
  return real
}

function parseEntry(key: string, flat: string[]): StoredEntry {
  const f: Record<string, string> = {}
  for (let i = 0; i < flat.length; i += 2) f[flat[i]!] = flat[i + 1]!
  return {
    key,
    value: f.v ?? 'null',
    etag: f.et ?? '',
    userId: f.u,
    tags: f.t ? (JSON.parse(f.t) as string[]) : undefined,
    createdAt: Number(f.c),
    expiresAt: Number(f.x),
    hits: Number(f.h ?? 0),
    lastAccessAt: Number(f.a ?? f.c),
    stale: f.s === '1',
    origin: f.o,
    size: Number(f.z ?? 0),
  }
}

/** Eviction listeners get the key; the rest of the entry is gone with it. */
function stub(key: string): StoredEntry {
  return {
    key,
    value: 'null',
    etag: '',
    userId: undefined,
    tags: undefined,
    createdAt: 0,
    expiresAt: 0,
    hits: 0,
    lastAccessAt: 0,
    stale: false,
    origin: undefined,
    size: 0,
  }
}

const globEscape = (s: string) => s.replace(/[*?[\]\\]/g, '\\$&')

/** Where a Redis URL points, for logs: host and port, never the password. */
function redisAddress(url: string): string {
  try {
    const u = new URL(url)
    return `${u.hostname}:${u.port || '6379'}`
  } catch {
    return 'the configured REDIS_URL'
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref())

/**
 * The reason and actor of a bus message, if it carries them as strings (anything that can
 * PUBLISH can send anything), cut to MAX_REASON_CHARS code points each: a key's name has no
 * length limit, but one longer than a reason is no name.
 */
function busNote(message: BusMessage): InvalidationNote | undefined {
  const reason = typeof message.r === 'string' ? cutReason(message.r) : undefined
  const actor = typeof message.a === 'string' ? cutReason(message.a) : undefined
  return reason === undefined && actor === undefined ? undefined : { reason, actor }
}
