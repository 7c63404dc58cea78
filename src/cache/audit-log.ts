import type { CacheService, CoreLogger } from './cache-service.js'
import { Ring } from './ring.js'
import type { InvalidationRecord } from './types.js'

export const DEFAULT_AUDIT_LOG_SIZE = 1000
/** An invalidation that removes or stales at least this many entries is audited, whatever its selector. */
export const AUDIT_BULK_THRESHOLD = 100

/** Refused attempts recorded per actor and action in each refusal window; past that they are counted. */
export const AUDIT_REFUSALS_PER_WINDOW = 10
/** The shortest refusal window. */
export const AUDIT_REFUSAL_WINDOW_MS = 60_000

export type AuditAction = 'clear_token_issued' | 'clear' | 'stats_reset' | 'invalidation' | 'consistency_repair'
export type AuditOutcome = 'succeeded' | 'refused' | 'failed'

/** One admin or destructive action. Never holds a secret, a token or a cached value. */
export interface AuditRecord {
  actor: string | null
  action: AuditAction
  reason: string | null
  outcome: AuditOutcome
  /** What happened, in words an operator reads: counts and causes, never data. */
  detail: string | null
  at: string
}

export interface AuditLogOptions {
  size?: number
  logger?: CoreLogger
  now?: () => number
  /** The refusal window (CLEAR_RATE_LIMIT_WINDOW_MS); never below AUDIT_REFUSAL_WINDOW_MS. */
  refusalWindowMs?: number
}

type AuditInput = {
  actor: string | null | undefined
  action: AuditAction
  reason: string | null | undefined
  outcome: AuditOutcome
  detail?: string | null
}

/** An actor's refusals at one action in the current window. */
type Refusals = { actor: string; action: AuditAction; since: number; recorded: number; skipped: number; timer?: NodeJS.Timeout }

/**
 * The audit log of admin and destructive actions: a bounded ring read by
 * `GET /v1/debug/audit`, each record also written to the log at `warn`. It listens to the
 * cache service for clears and bulk or prefix invalidations; the admin routes record
 * what only they see (tokens issued, clears refused).
 */
export class AuditLog {
  readonly #ring: Ring<AuditRecord>
  readonly #logger: CoreLogger | undefined
  readonly #now: () => number
  readonly #refusalWindowMs: number
  readonly #refusals = new Map<string, Refusals>()

  constructor(options: AuditLogOptions = {}) {
    this.#ring = new Ring(options.size ?? DEFAULT_AUDIT_LOG_SIZE)
    this.#logger = options.logger
    this.#now = options.now ?? Date.now
    this.#refusalWindowMs = Math.max(options.refusalWindowMs ?? 0, AUDIT_REFUSAL_WINDOW_MS)
  }

  /** Subscribes to the service's destructive events; returns the function that unsubscribes. */
  watch(cache: CacheService): () => void {
    const onInvalidation = (record: InvalidationRecord) => {
      if (record.selector.all && record.source === 'bus') return // audited by the instance that made it
      if (record.selector.all && record.mode === 'delete') {
        // Everything dropped: the emergency clear, or the PostgreSQL listener's clear policy.
        const actor = record.actor ?? `source:${record.source}`
        this.record({ actor, action: 'clear', reason: record.reason, outcome: 'succeeded', detail: `cleared ${record.invalidated} entries` })
        return
      }
      if (!isAuditable(record)) return
      this.record({
        // Another instance's (its key acted there, and that instance audits it under the key's name).
        actor: record.source === 'bus' ? 'source:bus' : record.actor ?? `source:${record.source}`,
        action: 'invalidation',
        reason: record.reason,
        outcome: 'succeeded',
        detail: describeInvalidation(record),
      })
    }
    const onStatsReset = ({ actor }: { actor?: string }) => {
      this.record({ actor, action: 'stats_reset', reason: undefined, outcome: 'succeeded', detail: null })
    }
    cache.on('invalidation', onInvalidation)
    cache.on('stats_reset', onStatsReset)
    return () => {
      cache.off('invalidation', onInvalidation)
      cache.off('stats_reset', onStatsReset)
    }
  }

  /**
   * Adds a record to the ring and writes it to the log at warn. An actor's refused attempts at
   * an action are recorded AUDIT_REFUSALS_PER_WINDOW times per refusal window: a flood of
   * refusals (any key can be refused without end) must not turn the bounded ring over at
   * once. Past that they are counted, and one record says how many when the window ends (at
   * its next refusal, by a timer, or on close). Undefined when the record was only counted.
   */
  record(input: AuditInput): AuditRecord | undefined {
    if (input.outcome === 'refused' && input.actor && !this.#admitRefusal(input.actor, input.action)) return undefined
    return this.#add(input)
  }

  /** Writes out what the open refusal windows counted. */
  close(): void {
    for (const id of [...this.#refusals.keys()]) this.#endWindow(id)
  }

  #admitRefusal(actor: string, action: AuditAction): boolean {
    const id = `${actor}\n${action}`
    const now = this.#now()
    let seen = this.#refusals.get(id)
    if (seen !== undefined && now - seen.since >= this.#refusalWindowMs) {
      this.#endWindow(id)
      seen = undefined
    }
    if (seen === undefined) this.#refusals.set(id, (seen = { actor, action, since: now, recorded: 0, skipped: 0 }))
    if (seen.recorded < AUDIT_REFUSALS_PER_WINDOW) {
      seen.recorded++
      return true
    }
    if (seen.skipped++ === 0) {
      this.#logger?.warn({ actor, action }, 'audit: further refused attempts of this key at this step are counted, not recorded, until the window ends')
      seen.timer = setTimeout(() => this.#endWindow(id), this.#refusalWindowMs)
      seen.timer.unref()
    }
    return false
  }

  /** Ends an actor's refusal window: what it did not record is one record of its own. */
  #endWindow(id: string): void {
    const seen = this.#refusals.get(id)
    if (seen === undefined) return
    clearTimeout(seen.timer)
    this.#refusals.delete(id)
    if (seen.skipped === 0) return
    this.#add({
      actor: seen.actor,
      action: seen.action,
      reason: null,
      outcome: 'refused',
      detail: `${seen.skipped} more refused attempts of this key at this step were not recorded (over ${AUDIT_REFUSALS_PER_WINDOW} in ${this.#refusalWindowMs / 1000} s)`,
    })
  }

  #add(input: AuditInput): AuditRecord {
    const record: AuditRecord = {
      actor: input.actor ?? null,
      action: input.action,
      reason: input.reason ?? null,
      outcome: input.outcome,
      detail: input.detail ?? null,
      at: new Date(this.#now()).toISOString(),
    }
    this.#ring.push(record)
    this.#logger?.warn({ audit: record }, `audit: ${record.action} ${record.outcome}`)
    return record
  }

  /** Up to `limit` records, newest first. */
  recent(limit: number): AuditRecord[] {
    return this.#ring.recent(limit)
  }
}

/** Prefix invalidations, admin ones and bulk ones are destructive enough to audit. */
function isAuditable(record: InvalidationRecord): boolean {
  return (
    (record.selector.prefixes?.length ?? 0) > 0 ||
    record.source === 'admin' ||
    record.invalidated >= AUDIT_BULK_THRESHOLD
  )
}

// Counts only: selectors name keys, users and tags, which are the callers' data.
function describeInvalidation(record: InvalidationRecord): string {
  const lists = (['keys', 'userIds', 'tags', 'prefixes'] as const)
    .filter((kind) => record.selector[kind]?.length)
    .map((kind) => `${record.selector[kind]!.length} ${kind}`)
  const verb = record.mode === 'stale' ? 'marked stale' : 'deleted'
  const by = record.selector.all ? 'of everything' : `by ${lists.join(', ')}`
  return `${record.source} invalidation ${by}: ${record.invalidated} entries ${verb} (${record.id})`
}
