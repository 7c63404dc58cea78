import { Type } from '@sinclair/typebox'
import { Json, Timestamp } from './common.js'

export const KeyParams = Type.Object({
  key: Type.String({ minLength: 1, description: 'the entry key, URL-encoded; may contain `:` `/` and any printable character' }),
})

export const ReadQuery = Type.Object({
  allowStale: Type.Optional(Type.Boolean({ description: 'return a stale entry (with `stale: true`) instead of 404' })),
  load: Type.Optional(Type.Boolean({ description: 'fill a miss from the matching origin (read-through)' })),
})

export const Entry = Type.Object(
  {
    key: Type.String(),
    value: Json,
    userId: Type.Union([Type.String(), Type.Null()]),
    tags: Type.Array(Type.String()),
    etag: Type.String({ description: 'content hash of the value; the `ETag` header carries it quoted' }),
    expiresAt: Timestamp,
    ttlRemainingMs: Type.Integer(),
    stale: Type.Boolean(),
  },
  {
    examples: [
      {
        key: 'dashboard:42',
        value: { widgets: 3 },
        userId: '42',
        tags: ['analytics:42'],
        etag: 'q8rEz0pQ6vWbJm1nVd2c3A',
        expiresAt: '2026-11-22T10:05:00.000Z',
        ttlRemainingMs: 299000,
        stale: false,
      },
    ],
  },
)

/** A lease as a write sends it back: the token, or the miss body's `lease` object. */
export const LeaseInput = Type.Union([
  Type.String({ maxLength: 128 }),
  Type.Object({ lease: Type.Optional(Type.String({ maxLength: 128 })), token: Type.Optional(Type.String({ maxLength: 128 })) }),
  Type.Null(),
])

const writeFields = {
  value: Json,
  ttlMs: Type.Optional(Type.Union([Type.Integer({ description: 'time to live in ms (1 ms to 30 days); default 300000' }), Type.Null()])),
  userId: Type.Optional(Type.Union([Type.String({ description: 'owner, for invalidation by user (1–128 UTF-8 bytes)' }), Type.Null()])),
  // The schema bounds the array the parser holds; the limit (32 by default) is checked with the others.
  tags: Type.Optional(
    Type.Union([Type.Array(Type.String(), { maxItems: 1000, description: 'for invalidation by tag: at most 32 tags (by default), each 1–128 UTF-8 bytes' }), Type.Null()]),
  ),
  lease: Type.Optional(LeaseInput),
}

export const WriteBody = Type.Object(writeFields, {
  // A misspelt field (`userid`) would be dropped, and the entry with it left out of its
  // user's invalidations without a word: an unknown field is a 400 naming it.
  additionalProperties: false,
  examples: [{ value: { widgets: 3 }, ttlMs: 300000, userId: '42', tags: ['analytics:42'] }],
})

export const WriteResult = Type.Object({
  key: Type.String(),
  etag: Type.String(),
  expiresAt: Timestamp,
})

export const BatchGetBody = Type.Object(
  { keys: Type.Array(Type.String(), { maxItems: 1000 }) },
  { additionalProperties: false, examples: [{ keys: ['dashboard:42', 'dashboard:43'] }] },
)

export const BatchGetResult = Type.Object({
  entries: Type.Record(Type.String(), Entry),
  missing: Type.Array(Type.String()),
  leases: Type.Record(
    Type.String(),
    Type.Object({ lease: Type.String(), fill: Type.Boolean(), retryAfterMs: Type.Optional(Type.Integer()) }),
    { description: 'a lease for each missing key' },
  ),
})

// Items are checked one by one in the core, so one bad item fails alone, not the batch.
const BatchSetItem = Type.Unsafe<Record<string, unknown>>({
  description:
    'the PUT body plus `key`: {key, value, ttlMs?, userId?, tags?, lease?}, and no other field; each item is validated on its own',
})

export const BatchSetBody = Type.Object(
  { entries: Type.Array(BatchSetItem, { maxItems: 1000 }) },
  { additionalProperties: false, examples: [{ entries: [{ key: 'dashboard:42', value: { widgets: 3 }, userId: '42' }] }] },
)

export const BatchSetResult = Type.Object({
  results: Type.Array(
    Type.Object({
      key: Type.String(),
      status: Type.Integer({ description: 'the status this entry alone would have had: 200, 400, 409 or 413' }),
      etag: Type.Optional(Type.String()),
      expiresAt: Type.Optional(Timestamp),
      error: Type.Optional(Type.String({ description: 'the error code, when status is not 200' })),
      message: Type.Optional(Type.String()),
    }),
  ),
})
