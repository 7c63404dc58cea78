import type { CacheService, CoreLogger } from './cache-service.js'
import { Ring } from './ring.js'
import type { InvalidationRecord } from './types.js'

export const DEFAULT_AUDIT_LOG_SIZE = 1000
/** An invalidation that removes or stales at least this many entries is audited, whatever its selector. */
export const AUDIT_BULK_THRESHOLD = 100

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
}

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

  constructor(options: AuditLogOptions = {}) {
    this.#ring = new Ring(options.size ?? DEFAULT_AUDIT_LOG_SIZE)
    this.#logger = options.logger
    this.#now = options.now ?? Date.now
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
        actor: record.actor ?? `source:${record.source}`,
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

  /** Adds a record to the ring and writes it to the log at warn. */
  record(input: {
    actor: string | null | undefined
    action: AuditAction
    reason: string | null | undefined
    outcome: AuditOutcome
    detail?: string | null
  }): AuditRecord {
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
