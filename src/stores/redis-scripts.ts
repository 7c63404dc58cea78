// The Lua scripts of the TieredStore. Each one runs atomically in Redis, so an entry, its
// user and tag index memberships, the expiry index, the byte count and the lease stamps
// can never be seen half-updated by another instance.
//
// Key layout (KEYS[1] is the base, `{<namespace>}:`, so every key shares one hash tag and
// every script touches a single slot, which Redis Cluster requires):
//
//   {ns}:g                  generation; a clear bumps it, so data keys of the old one are
//                           unreachable at once and collected in the background
//   {ns}:<g>:e:<key>        hash: the entry (fields below)
//   {ns}:<g>:u:<userId>     set: keys of a user
//   {ns}:<g>:t:<tag>        set: keys of a tag
//   {ns}:<g>:x              sorted set: key -> expiresAt (TTL sweep, capacity eviction, count)
//   {ns}:<g>:b              integer: accounted bytes
//   {ns}:<g>:f:<key>        string: the lease token holding the key's fill (herd control), with a TTL
//   {ns}:epoch              lease epoch; a Redis that lost its data gets a new one, so
//                           every older lease is refused
//   {ns}:seq                invalidation sequence
//   {ns}:clr                sequence of the last clear
//   {ns}:floor              highest sequence of a forgotten stamp (leases below it are refused)
//   {ns}:st                 sorted set: scope (k\0key, u\0user, t\0tag) -> last sequence
//   {ns}:px                 sorted set: prefix -> last sequence
//   {ns}:bus                pub/sub channel of the invalidation bus
//   {ns}:rec:<name>         string with a TTL: an idempotency record (a domain event's id -> its reply)
//
// Entry hash fields: v value, et etag, u userId, t tags (JSON), c createdAt, x expiresAt,
// h hits, a lastAccessAt, s stale (0/1), o origin, z accounted size.
//
// Numbers travel as strings and are compared with tonumber(); nothing is stored through
// Lua's tostring(), which would print a millisecond timestamp in exponent notation.

const PRELUDE = `
local base = KEYS[1]
local gen = redis.call('GET', base .. 'g') or '0'
local pre = base .. gen .. ':'
local xkey = pre .. 'x'
local bkey = pre .. 'b'
local function ekey(k) return pre .. 'e:' .. k end
local function ukey(u) return pre .. 'u:' .. u end
local function tkey(t) return pre .. 't:' .. t end

-- Removes an entry with its memberships; false when it was not there.
local function drop(k)
  local e = ekey(k)
  local f = redis.call('HMGET', e, 'u', 't', 'z')
  redis.call('ZREM', xkey, k)
  if not f[3] then return false end
  redis.call('DEL', e)
  if f[1] then redis.call('SREM', ukey(f[1]), k) end
  if f[2] then
    for _, t in ipairs(cjson.decode(f[2])) do redis.call('SREM', tkey(t), k) end
  end
  redis.call('DECRBY', bkey, f[3])
  return true
end

-- Keeps a sorted set of stamps to its bound; what is forgotten raises the floor.
local function trim(z, max)
  local n = redis.call('ZCARD', z)
  if n <= max then return end
  local cut = redis.call('ZRANGE', z, n - max - 1, n - max - 1, 'WITHSCORES')
  local floor = tonumber(redis.call('GET', base .. 'floor') or '0')
  if tonumber(cut[2]) > floor then redis.call('SET', base .. 'floor', cut[2]) end
  redis.call('ZREMRANGEBYRANK', z, 0, n - max - 1)
end

-- Extends an index set's TTL to outlive its longest-lived member.
local function keepIndex(idx, px)
  if redis.call('PTTL', idx) < px then redis.call('PEXPIRE', idx, px) end
end
`

/**
 * get(key, now, countHit, allowStale): the entry as a flat field list, 1 if it had expired (and
 * was dropped), or nil. A stale entry counts a hit only when read with allowStale.
 */
const GET = `${PRELUDE}
local k = ARGV[1]
local e = ekey(k)
local x = redis.call('HGET', e, 'x')
if not x then return nil end
if tonumber(x) <= tonumber(ARGV[2]) then
  drop(k)
  return 1
end
if ARGV[3] == '1' then
  if ARGV[4] == '1' or redis.call('HGET', e, 's') ~= '1' then redis.call('HINCRBY', e, 'h', 1) end
  redis.call('HSET', e, 'a', ARGV[2])
end
return redis.call('HGETALL', e)
`

/**
 * set(key, value, etag, userId|'', tagsJson|'', createdAt, expiresAt, size, origin|'', hits,
 * lastAccessAt, stale, pttl, leaseEpoch|'', leaseSeq, maxEntries, maxBytes, channel, message)
 * -> {1, evictedKeys} or {0} when the lease was voided.
 */
const SET = `${PRELUDE}
local k = ARGV[1]
local u = ARGV[4]
local tags = ARGV[5]

if ARGV[14] ~= '' then
  local ok = true
  local ls = tonumber(ARGV[15])
  local cur = tonumber(redis.call('GET', base .. 'seq') or '0')
  if redis.call('GET', base .. 'epoch') ~= ARGV[14] or ls == nil or ls < 0 or ls > cur then
    ok = false
  elseif ls < cur then
    if ls < tonumber(redis.call('GET', base .. 'floor') or '0') or ls < tonumber(redis.call('GET', base .. 'clr') or '0') then
      ok = false
    end
    local function newer(scope)
      local s = redis.call('ZSCORE', base .. 'st', scope)
      return s and tonumber(s) > ls
    end
    if ok and newer('k\\0' .. k) then ok = false end
    if ok and u ~= '' and newer('u\\0' .. u) then ok = false end
    if ok and tags ~= '' then
      for _, t in ipairs(cjson.decode(tags)) do
        if newer('t\\0' .. t) then ok = false break end
      end
    end
    if ok then
      for _, p in ipairs(redis.call('ZRANGEBYSCORE', base .. 'px', '(' .. ARGV[15], '+inf')) do
        if string.sub(k, 1, #p) == p then ok = false break end
      end
    end
  end
  if not ok then return {0} end
end

-- Dropping first removes the old memberships, so an overwrite moves the key between indexes.
drop(k)
local e = ekey(k)
local px = tonumber(ARGV[13])
redis.call('HSET', e, 'v', ARGV[2], 'et', ARGV[3], 'c', ARGV[6], 'x', ARGV[7], 'z', ARGV[8],
  'h', ARGV[10], 'a', ARGV[11], 's', ARGV[12])
if ARGV[9] ~= '' then redis.call('HSET', e, 'o', ARGV[9]) end
if u ~= '' then
  redis.call('HSET', e, 'u', u)
  redis.call('SADD', ukey(u), k)
  keepIndex(ukey(u), px)
end
if tags ~= '' then
  redis.call('HSET', e, 't', tags)
  for _, t in ipairs(cjson.decode(tags)) do
    redis.call('SADD', tkey(t), k)
    keepIndex(tkey(t), px)
  end
end
redis.call('PEXPIRE', e, px)
redis.call('ZADD', xkey, ARGV[7], k)
redis.call('INCRBY', bkey, ARGV[8])
-- The key is filled: the next miss (after an invalidation) may fill at once.
redis.call('DEL', pre .. 'f:' .. k)

-- Over capacity: evict the entries closest to expiry (Redis' own volatile-ttl policy).
local evicted = {}
local maxEntries = tonumber(ARGV[16])
local maxBytes = tonumber(ARGV[17])
while redis.call('ZCARD', xkey) > maxEntries or tonumber(redis.call('GET', bkey) or '0') > maxBytes do
  local victim = redis.call('ZRANGE', xkey, 0, 0)[1]
  if not victim then break end
  drop(victim)
  evicted[#evicted + 1] = victim
end
redis.call('PUBLISH', ARGV[18], ARGV[19])
return {1, evicted}
`

/**
 * invalidate(selectorJson, mode, stamp 1|0, maxScopes, maxPrefixes, channel, message|'', now, big, within, quietMessage?)
 * -> {count, generation, expiredKeys, deferred}. An entry found expired but not yet swept
 * is dropped as the sweep would drop it, and not counted. Stamps every scope (keys, users,
 * tags, prefixes) with a new sequence, and every key a user or tag reaches (a lease on it is
 * refused whatever its write names), then applies keys, users and tags through the indexes:
 * O(matched entries). A user or tag with more than `big` members is not applied here (one
 * script over 200 000 members ran past the command timeout, and Redis serves nobody else
 * meanwhile): the floor rises to this invalidation instead (every older lease refused, as a
 * key no batch has reached yet may be one of them whatever a write names), `deferred` lists
 * the set's name within the generation ('u:<user>' or 't:<tag>'), and the caller walks it with
 * SSCAN in batches, calling this again with stamp=0, the batch as `keys` and `within` = that
 * name: a batch applies only the keys still in that set of the current generation, so a key
 * rewritten for another user, or written after a clear, between SSCAN and the batch is left
 * alone. With anything deferred, the quiet message (L1 upkeep only) goes out instead of the
 * message, and the caller publishes the message once its batches are done. Prefixes are likewise scanned outside Lua in batches, which call this with
 * stamp=0 and no `within`.
 */
const INVALIDATE = `${PRELUDE}
local sel = cjson.decode(ARGV[1])
local mode = ARGV[2]
local seq = 0
local st = base .. 'st'
local maxScopes = tonumber(ARGV[4])
local function stampKeys(keys, s)
  for _, k in ipairs(keys) do redis.call('ZADD', st, s, 'k\\0' .. k) end
end
if ARGV[3] == '1' then
  seq = redis.call('INCR', base .. 'seq')
  stampKeys(sel.keys or {}, seq)
  for _, u in ipairs(sel.userIds or {}) do redis.call('ZADD', st, seq, 'u\\0' .. u) end
  for _, t in ipairs(sel.tags or {}) do redis.call('ZADD', st, seq, 't\\0' .. t) end
  for _, p in ipairs(sel.prefixes or {}) do redis.call('ZADD', base .. 'px', seq, p) end
  trim(base .. 'px', tonumber(ARGV[5]))
end

-- Refuses every lease older than this invalidation.
local function raiseFloor()
  if seq > tonumber(redis.call('GET', base .. 'floor') or '0') then redis.call('SET', base .. 'floor', seq) end
end

-- Whether the n keys a user or tag reaches get their own stamps (LeaseBook.stampsKeys): more
-- than the bound holds would push out every other stamp anyway, so the floor rises instead.
local function stampsKeys(n)
  if seq == 0 then return false end
  if n <= maxScopes then return true end
  raiseFloor()
  return false
end

-- The members of an index set (its name within the generation: rel) to apply here, or nil
-- when there are more than big: the set is deferred to the caller's batches.
local big = tonumber(ARGV[9] or '0') or 0
local deferred = {}
local function membersOf(rel)
  local idx = pre .. rel
  if big > 0 and redis.call('SCARD', idx) > big then
    deferred[#deferred + 1] = rel
    raiseFloor()
    return nil
  end
  return redis.call('SMEMBERS', idx)
end

local count = 0
local now = tonumber(ARGV[8])
local expired = {}
local function apply(k)
  local x = redis.call('HGET', ekey(k), 'x')
  if x and tonumber(x) <= now then
    drop(k)
    expired[#expired + 1] = k
    return true
  end
  if mode == 'delete' then
    if drop(k) then count = count + 1 return true end
    return false
  end
  local e = ekey(k)
  local s = redis.call('HGET', e, 's')
  if not s then return false end
  if s == '0' then
    redis.call('HSET', e, 's', '1')
    count = count + 1
  end
  return true
end
-- A member whose hash Redis expired on its own is an orphan: forget it here.
local function applyMember(idx, k)
  if not apply(k) then redis.call('SREM', idx, k) end
end
local within = ARGV[10] or ''
if within == '' then
  for _, k in ipairs(sel.keys or {}) do
    apply(k)
    -- A fill in flight will be refused (its lease is voided): the next miss becomes the filler.
    redis.call('DEL', pre .. 'f:' .. k)
  end
else
  -- A batch of a deferred set: only what is still in it.
  local idx = pre .. within
  for _, k in ipairs(sel.keys or {}) do
    if redis.call('SISMEMBER', idx, k) == 1 then applyMember(idx, k) end
  end
end
local function applyIndex(rel)
  local members = membersOf(rel)
  if not members then return end
  if stampsKeys(#members) then stampKeys(members, seq) end
  for _, k in ipairs(members) do applyMember(pre .. rel, k) end
end
for _, u in ipairs(sel.userIds or {}) do applyIndex('u:' .. u) end
for _, t in ipairs(sel.tags or {}) do applyIndex('t:' .. t) end
if seq > 0 then trim(st, maxScopes) end
local message = ARGV[7]
if #deferred > 0 and ARGV[11] then message = ARGV[11] end
if message ~= '' then redis.call('PUBLISH', ARGV[6], message) end
return {count, gen, expired, deferred}
`

/** clear(channel, message) -> {entries, oldGeneration}. Voids every lease and switches generation. */
const CLEAR = `${PRELUDE}
local seq = redis.call('INCR', base .. 'seq')
redis.call('SET', base .. 'clr', seq)
local n = redis.call('ZCARD', xkey)
redis.call('INCR', base .. 'g')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {n, gen}
`

/** voidLeases() -> generation: every lease issued before is refused, as after a clear, but the data stays. */
const VOID_LEASES = `
local base = KEYS[1]
redis.call('SET', base .. 'clr', redis.call('INCR', base .. 'seq'))
return redis.call('GET', base .. 'g') or '0'
`

/** The stamp a lease issued now carries: {epoch, seq}; `proposed` becomes the epoch if Redis has none. */
const STAMP_FN = `
local function stamp(proposed)
  redis.call('SET', KEYS[1] .. 'epoch', proposed, 'NX')
  return {redis.call('GET', KEYS[1] .. 'epoch'), tonumber(redis.call('GET', KEYS[1] .. 'seq') or '0')}
end
`

/** stamp(newEpoch) -> {epoch, seq}. */
const STAMP = `${STAMP_FN}
return stamp(ARGV[1])
`

/**
 * claimFill(key, holder, ttlMs, proposedEpoch, now) -> {epoch, seq, left}: the lease stamp (as
 * STAMP) and, in the same step, the fill claim: left is 0 when the fill is now `holder`'s,
 * else the ms another claim has left, or -1 when the key holds a fresh entry (a fill landed
 * since the read that missed, or the reader's copy was behind: nothing to fill, read again).
 */
const CLAIM_FILL = `${PRELUDE}${STAMP_FN}
local out = stamp(ARGV[4])
local f = pre .. 'f:' .. ARGV[1]
local xs = redis.call('HMGET', ekey(ARGV[1]), 'x', 's')
if xs[1] and tonumber(xs[1]) > tonumber(ARGV[5]) and xs[2] ~= '1' then out[3] = -1
elseif redis.call('SET', f, ARGV[2], 'NX', 'PX', ARGV[3]) then out[3] = 0
else out[3] = math.max(1, redis.call('PTTL', f)) end
return out
`

/** releaseFill(key, holder): drops the fill claim if `holder` holds it. */
const RELEASE_FILL = `${PRELUDE}
local f = pre .. 'f:' .. ARGV[1]
if redis.call('GET', f) == ARGV[2] then redis.call('DEL', f) end
return 0
`

/** putRecord(name, value, ttlMs) -> nil when `value` was stored, else the record already there (kept as is). */
const PUT_RECORD = `
local r = KEYS[1] .. 'rec:' .. ARGV[1]
if redis.call('SET', r, ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
return redis.call('GET', r)
`

/** swapRecord(name, expected, drop 1|0, value, ttlMs) -> 1 when the record held `expected` and was replaced or dropped, else 0. */
const SWAP_RECORD = `
local r = KEYS[1] .. 'rec:' .. ARGV[1]
if redis.call('GET', r) ~= ARGV[2] then return 0 end
if ARGV[3] == '1' then redis.call('DEL', r) else redis.call('SET', r, ARGV[4], 'PX', ARGV[5]) end
return 1
`

/** sweep(now, limit) -> expired keys dropped. */
const SWEEP = `${PRELUDE}
local out = {}
for _, k in ipairs(redis.call('ZRANGEBYSCORE', xkey, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))) do
  drop(k)
  out[#out + 1] = k
end
return out
`

/**
 * existing(set, key...) -> those of the keys still in the index set of the current generation
 * named `set` ('u:<user>' or 't:<tag>') and whose entries exist: one batch of that set, read by
 * SSCAN before this ran, so a key may have changed hands or been cleared meanwhile.
 */
const EXISTING = `${PRELUDE}
local idx = pre .. ARGV[1]
local out = {}
for i = 2, #ARGV do
  local k = ARGV[i]
  if redis.call('SISMEMBER', idx, k) == 1 and redis.call('EXISTS', ekey(k)) == 1 then out[#out + 1] = k end
end
return out
`

/**
 * liveEntries(now, userId, key...) -> {key, fields} pairs of those of the keys that are still the
 * user's (in the current generation) and live: one batch of the user's index set.
 */
const LIVE_ENTRIES = `${PRELUDE}
local idx = ukey(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local k = ARGV[i]
  if redis.call('SISMEMBER', idx, k) == 1 then
    local f = redis.call('HGETALL', ekey(k))
    local x
    for j = 1, #f, 2 do
      if f[j] == 'x' then x = f[j + 1] end
    end
    if x and tonumber(x) > tonumber(ARGV[1]) then
      out[#out + 1] = k
      out[#out + 1] = f
    end
  end
end
return out
`

/** info(limit, now) -> {entries, bytes, sampleKeys}. */
const INFO = `${PRELUDE}
local sample = {}
-- Live entries only (one past its expiry may wait for the sweep), the oldest first: with
-- like TTLs, those written longest ago, the likeliest to be stale.
if tonumber(ARGV[1]) > 0 then sample = redis.call('ZRANGEBYSCORE', xkey, '(' .. ARGV[2], '+inf', 'LIMIT', 0, tonumber(ARGV[1])) end
return {redis.call('ZCARD', xkey), tonumber(redis.call('GET', bkey) or '0'), sample}
`

/** The scripts, registered with ioredis' defineCommand (EVALSHA, falling back to EVAL after a Redis restart). */
export const REDIS_SCRIPTS = {
  cwGet: GET,
  cwSet: SET,
  cwInvalidate: INVALIDATE,
  cwClear: CLEAR,
  cwVoidLeases: VOID_LEASES,
  cwStamp: STAMP,
  cwClaimFill: CLAIM_FILL,
  cwReleaseFill: RELEASE_FILL,
  cwPutRecord: PUT_RECORD,
  cwSwapRecord: SWAP_RECORD,
  cwSweep: SWEEP,
  cwExisting: EXISTING,
  cwLiveEntries: LIVE_ENTRIES,
  cwInfo: INFO,
} as const

export type ScriptName = keyof typeof REDIS_SCRIPTS
