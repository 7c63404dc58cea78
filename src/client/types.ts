// The client's types, taken from the same TypeBox schemas the routes validate with, so the
// client and the server cannot drift apart. Type-only imports: no TypeBox at run time.
import type { Static } from '@sinclair/typebox'
import type { InvalidationResult as InvalidationResultSchema, MissBody } from '../schemas/common.js'
import type {
  BatchGetResult as BatchGetResultSchema,
  BatchSetResult as BatchSetResultSchema,
  Entry as EntrySchema,
  WriteBody,
  WriteResult as WriteResultSchema,
} from '../schemas/entries.js'
import type { SelectorBody } from '../schemas/invalidations.js'

/** An entry as `GET /v1/entries/:key` returns it, with its value typed as `T`. */
export type Entry<T = unknown> = Omit<Static<typeof EntrySchema>, 'value'> & { value: T }

/** The 404 body of a miss: `not_found` plus the lease. */
export type MissReply = Static<typeof MissBody>

/** A lease handed out with a miss: send `lease` back with the write that fills the key. */
export type Lease = Static<typeof BatchGetResultSchema>['leases'][string]

/** The fields of a write besides the value; `lease` may be the token or the `Lease` object. */
export type WriteOptions = Omit<Static<typeof WriteBody>, 'value' | 'lease'> & { lease?: string | Lease | null }

export type WriteResult = Static<typeof WriteResultSchema>

/** One item of `batchSet`: the PUT body plus `key`. */
export type BatchSetItem = WriteOptions & { key: string; value: unknown }

/** One result of `batchSet`: each item has its own status (200, 400, 409, 413) and error code. */
export type BatchSetItemResult = Static<typeof BatchSetResultSchema>['results'][number]

export type BatchGetResult<T = unknown> = Omit<Static<typeof BatchGetResultSchema>, 'entries'> & {
  entries: Record<string, Entry<T>>
}

/** A selector for `invalidate`: at least one of keys, userIds, tags, prefixes; mode and reason optional. */
export type Selector = Static<typeof SelectorBody>

export type InvalidationResult = Static<typeof InvalidationResultSchema>

export type InvalidationMode = InvalidationResult['mode']

/** What `lookup` found: the entry, a miss with its lease, or (with `ifNoneMatch`) that the caller's copy is current. */
export type LookupResult<T = unknown> =
  | { status: 'hit'; entry: Entry<T> }
  | { status: 'miss'; lease: Lease }
  | { status: 'not_modified'; etag: string }
