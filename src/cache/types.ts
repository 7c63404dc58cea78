// Types shared by the core, the stores and the HTTP layer. No Fastify here.

/** One cache entry as a store keeps it. `value` is the serialized JSON, written out as is. */
export interface StoredEntry {
  key: string
  /** Serialized JSON of the value. */
  value: string
  /** Content hash of `value` (unquoted). */
  etag: string
  userId: string | undefined
  tags: string[] | undefined
  createdAt: number
  expiresAt: number
  hits: number
  lastAccessAt: number
  stale: boolean
  origin: string | undefined
  /** Accounted bytes: key + value + user + tags, UTF-8. */
  size: number
}

export const INVALIDATION_MODES = ['delete', 'stale'] as const
export type InvalidationMode = (typeof INVALIDATION_MODES)[number]

export interface Selector {
  keys?: string[]
  userIds?: string[]
  tags?: string[]
  prefixes?: string[]
  /**
   * Every entry. Never accepted from a client (checkSelector keeps only the four lists); set
   * only by CacheService.markAllStale, so logs and streams can say what it covered.
   */
  all?: true
}

export const SELECTOR_KINDS = ['keys', 'userIds', 'tags', 'prefixes'] as const

/** A selector as a caller sends it, before checkSelector: a list may be null (absent) or empty. */
export type SelectorInput = { [K in (typeof SELECTOR_KINDS)[number]]?: string[] | null }
export type SelectorKind = (typeof SELECTOR_KINDS)[number]
/** Metric label for each selector kind (bounded, never the selector's values). */
export const SELECTOR_LABEL: Record<SelectorKind, string> = {
  keys: 'key',
  userIds: 'user',
  tags: 'tag',
  prefixes: 'prefix',
}

/** Where an invalidation came from. */
export const INVALIDATION_SOURCES = ['api', 'events', 'postgres', 'bus', 'admin', 'consistency'] as const
export type InvalidationSource = (typeof INVALIDATION_SOURCES)[number]

/** The selector labels of stats and metrics a selector counts under: one per kind it names, and `all`. */
export function selectorLabels(selector: Selector): string[] {
  const labels: string[] = []
  for (const kind of SELECTOR_KINDS) if (selector[kind]?.length) labels.push(SELECTOR_LABEL[kind])
  if (selector.all) labels.push('all')
  return labels
}

/** A lease as a store checks it: the store's epoch and the invalidation sequence when issued. */
export interface LeaseStamp {
  epoch: string
  seq: number
}

export type SetOutcome = 'ok' | 'lease_invalidated'

export type EvictionReason = 'evict' | 'expire'

/** What the store reports when it drops an entry by itself. */
export type EvictionListener = (entry: StoredEntry, reason: EvictionReason) => void

export interface InvalidationRecord {
  id: string
  selector: Selector
  mode: InvalidationMode
  source: InvalidationSource
  invalidated: number
  durationMs: number
  at: string
  actor: string | undefined
  reason: string | undefined
}

/** Why an invalidation was made and who asked: what other instances log of it (cluster mode). */
export type InvalidationNote = Partial<Pick<InvalidationRecord, 'reason' | 'actor'>>

export interface InvalidationResult {
  id: string
  invalidated: number
  mode: InvalidationMode
  durationMs: number
}
