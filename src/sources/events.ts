// Domain events -> invalidations (DESIGN.md section 5). No Fastify here: the route in
// src/routes/events.ts only validates the body's shape and calls `EventProcessor.apply`.
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import type { CacheService } from '../cache/cache-service.js'
import { checkSelector, type Limits } from '../cache/limits.js'
import { SELECTOR_KINDS, type InvalidationMode, type InvalidationResult, type Selector, type SelectorKind } from '../cache/types.js'
import { WriteOrderedMap } from '../cache/write-ordered-map.js'
import { ConfigError } from '../config.js'
import { CacheError, invalidRequest, truncate } from '../errors.js'

/** How long an event id is remembered (DESIGN.md: "a repeated id within 10 min is applied once"). */
export const EVENT_ID_WINDOW_MS = 10 * 60 * 1000
/** Most event ids remembered at once; past it the oldest is forgotten first. */
export const DEFAULT_MAX_REMEMBERED_EVENTS = 10_000
/**
 * The shared record of an event being applied (cluster mode) is `pending:<owner>`. Its owner
 * renews it every third of PENDING_TTL_MS while it applies the event, so only an instance
 * that died (or lost Redis) mid-way frees the id, after PENDING_TTL_MS. Replies are JSON,
 * so never start with this.
 */
const PENDING = 'pending'
const PENDING_TTL_MS = 10_000
/** How often a repeat delivery checks whether another instance finished applying the event. */
const PENDING_POLL_MS = 25

/** The shared-store record of an event id. */
const recordName = (id: string) => `event:${id}`

/**
 * Asks `look` for an event id's record until it is not another instance's pending claim:
 * undefined when there is none, else the reply it holds.
 */
async function settled(look: () => Promise<string | undefined>): Promise<EventResponse | undefined> {
  for (;;) {
    const record = await look()
    if (record === undefined) return undefined
    if (!record.startsWith(PENDING)) return JSON.parse(record) as EventResponse
    await sleep(PENDING_POLL_MS)
  }
}

const RULE_KEYS = new Set(['event', 'invalidate', 'mode', 'description'])
// `{{data.userId}}`, `{{ data.user.id }}`: a path into the event's `data`, one field per segment.
const PLACEHOLDER = /\{\{\s*data((?:\.[A-Za-z0-9_$-]+)+)\s*\}\}/g
const ANY_BRACES = /\{\{|\}\}/

/** One piece of a compiled template: literal text or a path into `data`. */
type Part = string | { path: string[] }

interface CompiledRule {
  /** Its position in the config file, for messages and the invalidation log. */
  index: number
  event: string
  mode: InvalidationMode
  templates: Partial<Record<SelectorKind, Part[][]>>
}

/** An event as `POST /v1/events` accepts it. */
export interface DomainEvent {
  id?: string
  type: string
  data: Record<string, unknown>
}

/** The reply to an event; a repeat of an `id` gets the first reply again. */
export interface EventResponse {
  matched: number
  invalidations: InvalidationResult[]
}

export interface EventOutcome {
  response: EventResponse
  /** True when this event id was seen within the window and nothing was applied again. */
  replayed: boolean
}

/**
 * Validates the `rules` section of CONFIG_FILE and compiles its templates. Throws a
 * ConfigError('CONFIG_FILE', …) naming the bad rule and field, e.g. `rules[2].invalidate.userIds[0]`.
 */
export function compileRules(raw: unknown, limits: Limits): CompiledRule[] {
  if (raw === undefined) return []
  const fail = (path: string, message: string): never => {
    throw new ConfigError('CONFIG_FILE', `${path}: ${message}`)
  }
  if (!Array.isArray(raw)) fail('rules', 'must be an array of rules')
  return (raw as unknown[]).map((rule, index) => {
    const at = `rules[${index}]`
    if (rule === null || typeof rule !== 'object' || Array.isArray(rule)) return fail(at, 'must be an object')
    const r = rule as Record<string, unknown>
    for (const key of Object.keys(r)) {
      if (!RULE_KEYS.has(key)) fail(`${at}.${key}`, `is not a rule field (use ${[...RULE_KEYS].join(', ')})`)
    }
    if (typeof r.event !== 'string' || r.event.trim() === '') fail(`${at}.event`, 'must be a non-empty event type')
    const mode = r.mode ?? 'delete'
    if (mode !== 'delete' && mode !== 'stale') fail(`${at}.mode`, 'must be "delete" or "stale"')
    const inv = r.invalidate
    if (inv === null || typeof inv !== 'object' || Array.isArray(inv)) {
      return fail(`${at}.invalidate`, 'must be an object with keys, userIds, tags or prefixes')
    }
    for (const key of Object.keys(inv)) {
      if (!(SELECTOR_KINDS as readonly string[]).includes(key)) {
        fail(`${at}.invalidate.${key}`, `is not a selector list (use ${SELECTOR_KINDS.join(', ')})`)
      }
    }
    const templates: CompiledRule['templates'] = {}
    let any = false
    for (const kind of SELECTOR_KINDS) {
      const list = (inv as Record<string, unknown>)[kind]
      if (list === undefined) continue
      if (!Array.isArray(list)) fail(`${at}.invalidate.${kind}`, 'must be an array of strings')
      if ((list as unknown[]).length > limits.maxBatch) fail(`${at}.invalidate.${kind}`, `has more than ${limits.maxBatch} items`)
      templates[kind] = (list as unknown[]).map((item, i) => compileTemplate(item, `${at}.invalidate.${kind}[${i}]`, fail))
      if ((list as unknown[]).length > 0) any = true
    }
    if (!any) fail(`${at}.invalidate`, 'needs at least one non-empty list of keys, userIds, tags or prefixes')
    // A rule whose names are all literal must pass the selector limits now, not on the first event.
    const literal = Object.values(templates).every((list) => list.every((parts) => parts.every((p) => typeof p === 'string')))
    if (literal) {
      try {
        checkSelector(Object.fromEntries(Object.entries(templates).map(([k, l]) => [k, l.map((p) => p.join(''))])), limits)
      } catch (error) {
        fail(`${at}.invalidate`, (error as Error).message)
      }
    }
    return { index, event: (r.event as string).trim(), mode: mode as InvalidationMode, templates }
  })
}

function compileTemplate(item: unknown, at: string, fail: (path: string, message: string) => never): Part[] {
  if (typeof item !== 'string' || item === '') return fail(at, 'must be a non-empty string')
  const parts: Part[] = []
  let last = 0
  for (const match of item.matchAll(PLACEHOLDER)) {
    const text = item.slice(last, match.index)
    if (ANY_BRACES.test(text)) fail(at, `"${truncate(item)}" has a malformed placeholder (use {{data.field}} or {{data.a.b}})`)
    if (text !== '') parts.push(text)
    parts.push({ path: match[1]!.slice(1).split('.') })
    last = match.index + match[0].length
  }
  const tail = item.slice(last)
  if (ANY_BRACES.test(tail)) fail(at, `"${truncate(item)}" has a malformed placeholder (use {{data.field}} or {{data.a.b}})`)
  if (tail !== '') parts.push(tail)
  return parts
}

/** The configured rules, indexed by event type. */
export class EventRules {
  readonly #byEvent = new Map<string, CompiledRule[]>()
  readonly size: number

  constructor(raw: unknown, limits: Limits) {
    const rules = compileRules(raw, limits)
    this.size = rules.length
    for (const rule of rules) {
      const list = this.#byEvent.get(rule.event)
      if (list) list.push(rule)
      else this.#byEvent.set(rule.event, [rule])
    }
  }

  /**
   * The selectors an event resolves to, one per matching rule, each validated. Throws
   * `invalid_request` naming the field when a template cannot be filled, so a bad event
   * invalidates nothing at all.
   */
  resolve(event: DomainEvent, limits: Limits): Array<{ rule: CompiledRule; selector: Selector }> {
    const rules = this.#byEvent.get(event.type) ?? []
    return rules.map((rule) => {
      const selector: Selector = {}
      for (const kind of SELECTOR_KINDS) {
        const list = rule.templates[kind]
        if (list === undefined) continue
        selector[kind] = list.map((parts, i) => fill(parts, event.data, `rules[${rule.index}].invalidate.${kind}[${i}]`))
      }
      try {
        return { rule, selector: checkSelector(selector, limits) }
      } catch (error) {
        if (error instanceof CacheError) {
          throw invalidRequest(`rules[${rule.index}].invalidate.${error.message} (once filled from the event)`)
        }
        throw error
      }
    })
  }
}

function fill(parts: Part[], data: Record<string, unknown>, at: string): string {
  let out = ''
  for (const part of parts) {
    if (typeof part === 'string') {
      out += part
      continue
    }
    const field = `data.${part.path.join('.')}`
    let value: unknown = data
    for (const segment of part.path) {
      value = value !== null && typeof value === 'object' && Object.hasOwn(value, segment)
        ? (value as Record<string, unknown>)[segment]
        : undefined
    }
    if (value === undefined || value === null) throw invalidRequest(`${field} is missing (needed by ${at})`)
    if (typeof value === 'object') throw invalidRequest(`${field} must be a string, number or boolean (needed by ${at})`)
    // JSON.parse reads 1e400 as Infinity: no id, and "Infinity" would be one.
    if (typeof value === 'number' && !Number.isFinite(value)) throw invalidRequest(`${field} is out of range (needed by ${at})`)
    const text = String(value)
    // An empty value would widen the selector: `user:{{data.id}}` as a prefix would match every user.
    if (text === '') throw invalidRequest(`${field} is empty (needed by ${at})`)
    out += text
  }
  return out
}

export interface EventProcessorOptions {
  /** How long an event id is remembered; default 10 minutes. */
  windowMs?: number
  /** Most event ids remembered; default 10000 (the oldest is forgotten first). */
  maxRemembered?: number
  /** Cluster mode: how long a claim on an id being applied outlives an instance that died; default 10 s. */
  pendingTtlMs?: number
}

/**
 * Applies events: resolves every matching rule first (a bad event invalidates nothing),
 * then runs each selector through `CacheService.invalidate` with source `events`. An event
 * with an `id` seen within the window is not applied again: its first reply is returned.
 */
export class EventProcessor {
  readonly #cache: CacheService
  readonly #rules: EventRules
  readonly #windowMs: number
  readonly #max: number
  readonly #pendingTtlMs: number
  // Insertion-ordered, so the oldest id is the first to forget. Holds the in-flight promise
  // too, so two concurrent deliveries of one event apply it once.
  /** Ids applied within the window, oldest first. */
  readonly #seen = new WriteOrderedMap<string, { at: number; outcome: Promise<EventOutcome> }>()

  constructor(cache: CacheService, rules: EventRules, options: EventProcessorOptions = {}) {
    this.#cache = cache
    this.#rules = rules
    this.#windowMs = options.windowMs ?? EVENT_ID_WINDOW_MS
    this.#max = options.maxRemembered ?? DEFAULT_MAX_REMEMBERED_EVENTS
    this.#pendingTtlMs = options.pendingTtlMs ?? PENDING_TTL_MS
  }

  /** Applies one event (or replays the reply to an id seen within the window). */
  async apply(event: DomainEvent, actor?: string): Promise<EventOutcome> {
    const now = this.#cache.now()
    if (event.id !== undefined) {
      this.#forgetExpired(now)
      const seen = this.#seen.get(event.id)
      if (seen !== undefined) return { response: (await seen.outcome).response, replayed: true }
    }
    if (event.id === undefined) return { response: await this.#run(event, actor, this.#rules.resolve(event, this.#cache.limits)), replayed: false }
    const id = event.id
    let resolved: ReturnType<EventRules['resolve']>
    try {
      resolved = this.#rules.resolve(event, this.#cache.limits)
    } catch (error) {
      // A repeat is a repeat whatever its data: an id applied on another instance replays its
      // reply. Not remembered here, so a valid delivery of the id meanwhile goes its own way.
      const reply = await this.#recordedReply(id)
      if (reply !== undefined) return { response: reply, replayed: true }
      throw error
    }
    const outcome = this.#applyOnce(event, id, resolved, actor)
    const record = { at: now, outcome }
    this.#seen.set(id, record)
    while (this.#seen.size > this.#max) this.#seen.shift()
    // A failed event is forgotten, so its sender can retry it.
    outcome.catch(() => {
      if (this.#seen.get(id) === record) this.#seen.delete(id)
    })
    return outcome
  }

  /**
   * The reply recorded in the shared store (cluster mode) for an id applied within the window,
   * waiting while an instance applies it; undefined if there is none, or the store cannot be asked.
   */
  async #recordedReply(id: string): Promise<EventResponse | undefined> {
    const getRecord = this.#cache.store.getRecord?.bind(this.#cache.store)
    if (getRecord === undefined) return undefined
    return settled(() => getRecord(recordName(id))).catch(() => undefined)
  }

  /**
   * Applies an event with an id once across every instance sharing the store (cluster mode):
   * a record in the store claims the id while it is applied (renewed by its owner) and then
   * holds the reply for the window, so another instance's delivery of the same id waits and
   * replays it. The owner renews, fulfils or drops only its own claim: if its claim ran out
   * (it lost Redis for longer than the claim) and another instance took the id over, it
   * leaves that claim alone. Without shared records (the embedded store) the in-process map
   * is the whole story. An event no rule matches is answered without asking the store.
   */
  async #applyOnce(event: DomainEvent, id: string, resolved: ReturnType<EventRules['resolve']>, actor: string | undefined): Promise<EventOutcome> {
    const store = this.#cache.store
    const name = recordName(id)
    if (store.putRecord === undefined || store.swapRecord === undefined || resolved.length === 0) {
      return { response: await this.#run(event, actor, resolved), replayed: false }
    }
    const put = store.putRecord.bind(store)
    const swap = store.swapRecord.bind(store)
    const claim = `${PENDING}:${randomUUID()}`
    try {
      // Claimed (undefined), or the reply of the instance that applied the id.
      const prior = await settled(() => put(name, claim, this.#pendingTtlMs))
      if (prior !== undefined) return { response: prior, replayed: true }
    } catch (error) {
      // The store could not be asked whether the id was applied, so its invalidations were not
      // attempted: a failed invalidation all the same (counted, and a 503 for the sender to retry).
      this.#cache.countFailure('events')
      throw error
    }
    const renew = setInterval(() => {
      swap(name, claim, claim, this.#pendingTtlMs).catch(() => false)
    }, this.#pendingTtlMs / 3)
    let response: EventResponse
    try {
      response = await this.#run(event, actor, resolved)
    } catch (error) {
      clearInterval(renew)
      await swap(name, claim, undefined, 0).catch(() => false)
      throw error
    }
    clearInterval(renew)
    // Applied: a failure to record the reply only means a repeat elsewhere is applied again.
    await swap(name, claim, JSON.stringify(response), this.#windowMs).catch(() => false)
    return { response, replayed: false }
  }

  /** How many event ids are remembered (for tests and bounds checks). */
  get remembered(): number {
    return this.#seen.size
  }

  async #run(event: DomainEvent, actor: string | undefined, resolved: ReturnType<EventRules['resolve']>): Promise<EventResponse> {
    const invalidations: InvalidationResult[] = []
    for (const { rule, selector } of resolved) {
      const reason = `event ${truncate(event.type, 100)}${event.id === undefined ? '' : ` ${truncate(event.id, 100)}`} (rules[${rule.index}])`
      invalidations.push(await this.#cache.invalidate(selector, { mode: rule.mode, source: 'events', actor, reason }))
    }
    return { matched: resolved.length, invalidations }
  }

  #forgetExpired(now: number): void {
    this.#seen.shiftWhile(({ at }) => now - at >= this.#windowMs)
  }
}
