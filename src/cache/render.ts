import type { IssuedLease } from './cache-service.js'
import type { StoredEntry } from './types.js'

// Entries are stored serialized, so replies are assembled as strings around the stored
// bytes: a read never parses or re-serializes a value.

const iso = (ms: number) => new Date(ms).toISOString()

/** The body of `GET /v1/entries/:key`. */
export function renderEntry(e: StoredEntry, now: number): string {
  return (
    `{"key":${JSON.stringify(e.key)},"value":${e.value},` +
    `"userId":${e.userId === undefined ? 'null' : JSON.stringify(e.userId)},` +
    `"tags":${e.tags === undefined ? '[]' : JSON.stringify(e.tags)},` +
    `"etag":"${e.etag}","expiresAt":"${iso(e.expiresAt)}",` +
    `"ttlRemainingMs":${Math.max(0, e.expiresAt - now)},"stale":${e.stale}}`
  )
}

/** The body of `POST /v1/entries/batch-get`. */
export function renderBatch(entries: Map<string, StoredEntry>, leases: Map<string, IssuedLease>, now: number): string {
  const parts: string[] = []
  for (const [key, entry] of entries) parts.push(`${JSON.stringify(key)}:${renderEntry(entry, now)}`)
  return (
    `{"entries":{${parts.join(',')}},"missing":${JSON.stringify([...leases.keys()])},` +
    `"leases":${JSON.stringify(Object.fromEntries(leases))}}`
  )
}

/** Entry metadata for the debug routes (sizes, ages, hits), without the value. */
export function entryMeta(e: StoredEntry, now: number) {
  return {
    key: e.key,
    userId: e.userId ?? null,
    tags: e.tags ?? [],
    sizeBytes: e.size,
    ageMs: Math.max(0, now - e.createdAt),
    ttlRemainingMs: Math.max(0, e.expiresAt - now),
    createdAt: iso(e.createdAt),
    expiresAt: iso(e.expiresAt),
    hits: e.hits,
    lastAccessAt: iso(e.lastAccessAt),
    stale: e.stale,
    etag: e.etag,
    origin: e.origin ?? null,
  }
}
