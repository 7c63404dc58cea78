import { Type } from '@sinclair/typebox'
import { Json, orNull } from './common.js'

// An optional field sent as `null` counts as absent, as in a write or a selector (`value: null`
// in a consistency entry is a value, though: the truth may be null).
const names = (what: string) => orNull(Type.Array(Type.String(), { maxItems: 1000, description: what }))

export const WarmBody = Type.Object(
  {
    keys: names('keys to load from their origins'),
    userIds: names('users whose keys to load, through every origin whose keyPattern has `{userId}` as its only part'),
  },
  { additionalProperties: false, examples: [{ keys: ['dashboard:42'], userIds: ['43', '44'] }] },
)

export const WarmSummary = Type.Object(
  {
    requested: Type.Integer({ description: 'distinct keys after userIds were expanded' }),
    loaded: Type.Integer(),
    failed: Type.Integer({ description: 'no origin serves the key, the origin has no data, or it failed' }),
    errors: Type.Array(Type.Object({ key: Type.String(), error: Type.String() }), { description: 'the first 100 failures' }),
  },
  { examples: [{ requested: 3, loaded: 2, failed: 1, errors: [{ key: 'dashboard:44', error: 'origin "dashboards" has no data' }] }] },
)

export const ConsistencyBody = Type.Object(
  {
    keys: names('with against "origin": keys to check'),
    userIds: names('with against "origin": check every cached key of these users'),
    sample: orNull(Type.Integer({ minimum: 1, maximum: 10000, description: 'with against "origin": check up to this many cached keys' })),
    against: Type.Union([Type.Literal('provided'), Type.Literal('origin')], {
      description: '`provided`: `entries` carry the truth; `origin`: cachewarden fetches it from the key\'s origin',
    }),
    entries: orNull(
      Type.Array(
        Type.Object(
          {
            key: Type.String(),
            value: Type.Optional(Json),
            etag: orNull(Type.String({ description: 'the etag of the true value (quoted, weak or bare)' })),
          },
          { additionalProperties: false },
        ),
        { maxItems: 1000, description: 'with against "provided": each key with its true value or etag' },
      ),
    ),
    repair: orNull(
      Type.Union([Type.Literal('none'), Type.Literal('invalidate'), Type.Literal('refresh')], {
        description:
          '`invalidate` deletes the stale entries; `refresh` reloads them from their origin (keys no origin serves, ' +
          'or whose origin has no data, are deleted instead); default `none`',
      }),
    ),
  },
  {
    additionalProperties: false,
    examples: [
      { userIds: ['42'], against: 'origin', repair: 'refresh' },
      { against: 'provided', entries: [{ key: 'dashboard:42', value: { widgets: 3 } }, { key: 'dashboard:43', etag: 'q8rEz0pQ6vWbJm1nVd2c3A' }] },
    ],
  },
)

export const ConsistencyReport = Type.Object(
  {
    checked: Type.Integer({ description: 'keys reported: consistent + stale + missing + keys with errors' }),
    consistent: Type.Integer(),
    stale: Type.Array(Type.String(), { description: 'cached keys whose value differs from the truth (or whose origin no longer has data)' }),
    missing: Type.Array(Type.String(), {
      description: 'keys the caller named (`keys`, `entries`) that are not in the cache: nothing to compare (a key the cache chose that is gone by then is left out)',
    }),
    errors: Type.Array(Type.Object({ key: Type.String(), error: Type.String() })),
    repaired: Type.Integer({ description: 'stale entries invalidated or refreshed' }),
    durationMs: Type.Number(),
  },
  { examples: [{ checked: 10, consistent: 8, stale: ['dashboard:42'], missing: ['dashboard:99'], errors: [], repaired: 1, durationMs: 12.5 }] },
)
