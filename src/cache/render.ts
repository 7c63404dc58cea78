import type { IssuedLease } from './cache-service.js'
import type { StoredEntry } from './types.js'

// Entries are stored serialized, so replies are assembled as strings around the stored
// bytes: a read never parses or re-serializes a value.

/** The content type of the replies rendered here. */
export const JSON_TYPE = 'application/json; charset=utf-8'

const DAY_MS = 86_400_000
/** Beyond 9999-12-31, toISOString switches to a six-digit year. */
const MAX_ISO_MS = 253_402_300_800_000
/** `YYYY-MM-DDT` by day number; a reply's expiry days are few, so this stays small. */
const datePrefixes = new Map<number, string>()
const pad2 = (n: number) => (n < 10 ? '0' : '') + n
const pad3 = (n: number) => (n < 10 ? '00' : n < 100 ? '0' : '') + n

/**
 * `new Date(ms).toISOString()`, faster: the date part is computed once per day and the time
 * of day by arithmetic (every read renders an expiry time, and a Date costs more than the
 * rest of the reply).
 */
export function iso(ms: number): string {
  if (!(ms >= 0 && ms < MAX_ISO_MS)) return new Date(ms).toISOString()
  const day = Math.floor(ms / DAY_MS)
  let date = datePrefixes.get(day)
  if (date === undefined) {
    if (datePrefixes.size >= 1024) datePrefixes.clear()
    date = new Date(day * DAY_MS).toISOString().slice(0, 11)
    datePrefixes.set(day, date)
  }
  let rest = ms - day * DAY_MS
  const hours = Math.floor(rest / 3_600_000)
  rest -= hours * 3_600_000
  const minutes = Math.floor(rest / 60_000)
  rest -= minutes * 60_000
  const seconds = Math.floor(rest / 1000)
  return `${date}${pad2(hours)}:${pad2(minutes)}:${pad2(seconds)}.${pad3(Math.floor(rest - seconds * 1000))}Z`
}

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

/** The body of `PUT /v1/entries/:key`. */
export function renderWrite(e: StoredEntry): string {
  return `{"key":${JSON.stringify(e.key)},"etag":"${e.etag}","expiresAt":"${iso(e.expiresAt)}"}`
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
    ttlMs: e.expiresAt - e.createdAt,
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
