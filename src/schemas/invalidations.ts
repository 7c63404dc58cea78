import { Type } from '@sinclair/typebox'
import { MAX_REASON_CHARS } from '../cache/limits.js'
import { InvalidationMode, orNull } from './common.js'

// `null` counts as absent, as in a write.
const names = (what: string) => orNull(Type.Array(Type.String(), { maxItems: 1000, description: what }))

export const SelectorBody = Type.Object(
  {
    keys: names('exact keys'),
    userIds: names('every entry of these users'),
    tags: names('every entry carrying any of these tags'),
    prefixes: names('every entry whose key starts with one of these (never empty)'),
    mode: orNull(InvalidationMode),
    reason: orNull(Type.String({ maxLength: MAX_REASON_CHARS, description: 'why, for the invalidation log' })),
  },
  {
    additionalProperties: false,
    examples: [{ userIds: ['42'], tags: ['analytics:42'], mode: 'delete', reason: 'persona updated' }],
  },
)
