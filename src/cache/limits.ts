import { hash } from 'node:crypto'
import { invalidRequest, valueTooLarge } from '../errors.js'
import type { Selector, SelectorInput, SelectorKind } from './types.js'
import { SELECTOR_KINDS } from './types.js'

/** The limits of DESIGN.md section 2; every one is configurable. */
export interface Limits {
  maxKeyBytes: number
  maxUserIdBytes: number
  maxTagBytes: number
  maxTags: number
  maxValueBytes: number
  maxValueDepth: number
  minTtlMs: number
  maxTtlMs: number
  defaultTtlMs: number
  maxPrefixBytes: number
  /** Most items in a batch or in one selector list. */
  maxBatch: number
}

/** The longest `reason` an invalidation or an emergency clear carries, in characters. */
export const MAX_REASON_CHARS = 1024

/** A reason cut to MAX_REASON_CHARS characters (code points, as the schemas count them). */
export function cutReason(reason: string): string {
  return reason.length > MAX_REASON_CHARS ? [...reason].slice(0, MAX_REASON_CHARS).join('') : reason
}

export const DEFAULT_LIMITS: Limits = {
  maxKeyBytes: 512,
  maxUserIdBytes: 128,
  maxTagBytes: 128,
  maxTags: 32,
  maxValueBytes: 1024 * 1024,
  maxValueDepth: 64,
  minTtlMs: 1,
  maxTtlMs: 30 * 24 * 3600 * 1000,
  defaultTtlMs: 300_000,
  maxPrefixBytes: 512,
  maxBatch: 1000,
}

// C0 controls, DEL and C1 controls.
// eslint-disable-next-line no-control-regex
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/

/** Checks a name (key, user id, tag, prefix): a non-empty string within `maxBytes`, no controls. */
export function checkName(field: string, value: unknown, maxBytes: number): string {
  if (typeof value !== 'string') throw invalidRequest(`${field} must be a string`)
  if (value.length === 0) throw invalidRequest(`${field} must not be empty`)
  // UTF-16 length bounds the UTF-8 length from below, so most names skip the byte count.
  if (value.length > maxBytes || (value.length * 3 > maxBytes && Buffer.byteLength(value) > maxBytes)) {
    throw invalidRequest(`${field} is longer than ${maxBytes} bytes`)
  }
  if (CONTROL.test(value)) throw invalidRequest(`${field} must not contain control characters`)
  if (!value.isWellFormed()) {
    throw invalidRequest(`${field} must be well-formed Unicode`)
  }
  return value
}

export function checkKey(key: unknown, limits: Limits, field = 'key'): string {
  return checkName(field, key, limits.maxKeyBytes)
}

export function checkUserId(userId: unknown, limits: Limits, field = 'userId'): string {
  return checkName(field, userId, limits.maxUserIdBytes)
}

export function checkTags(tags: unknown, limits: Limits, field = 'tags'): string[] {
  if (!Array.isArray(tags)) throw invalidRequest(`${field} must be an array of strings`)
  if (tags.length > limits.maxTags) throw invalidRequest(`${field} has more than ${limits.maxTags} tags`)
  tags.forEach((tag, i) => checkName(`${field}[${i}]`, tag, limits.maxTagBytes))
  // Duplicates would double-count in the index; keep the first of each.
  return tags.length > 1 ? [...new Set(tags as string[])] : (tags as string[])
}

export function checkTtl(ttlMs: unknown, limits: Limits, field = 'ttlMs'): number {
  if (ttlMs === undefined || ttlMs === null) return limits.defaultTtlMs
  if (typeof ttlMs !== 'number' || !Number.isInteger(ttlMs)) throw invalidRequest(`${field} must be an integer`)
  if (ttlMs < limits.minTtlMs || ttlMs > limits.maxTtlMs) {
    throw invalidRequest(`${field} must be between ${limits.minTtlMs} and ${limits.maxTtlMs}`)
  }
  return ttlMs
}

/** Serializes a value, enforcing the depth and size limits. */
export function serializeValue(value: unknown, limits: Limits, field = 'value'): string {
  if (value === undefined) throw invalidRequest(`${field} is required`)
  const problem = walk(value, limits.maxValueDepth)
  if (problem === DEEP) throw invalidRequest(`${field} is nested deeper than ${limits.maxValueDepth} levels`)
  if (problem === OVERFLOW) {
    // JSON.parse reads 1e400 as Infinity, which JSON.stringify would store as null.
    throw invalidRequest(`${field} holds a number too large to store (JSON cannot represent Infinity)`)
  }
  const json = JSON.stringify(value)
  if (json.length > limits.maxValueBytes || (json.length * 3 > limits.maxValueBytes && Buffer.byteLength(json) > limits.maxValueBytes)) {
    throw valueTooLarge(`${field} is larger than ${limits.maxValueBytes} bytes serialized`)
  }
  return json
}

/** The content hash of a serialized value: MD5, 22 characters of base64url (a change detector, not a MAC). */
export function etagOf(json: string): string {
  return hash('md5', json, 'base64url')
}

/** An etag as clients send it (`W/"x"`, `"x"`, `x`), bare. */
export function bareEtag(etag: string): string {
  return etag.trim().replace(/^W\//, '').replace(/^"(.*)"$/, '$1')
}

/**
 * The largest JSON body a list request within the limits can need (batch-get's keys, a
 * selector's lists): every name at its byte limit with each byte escaped as `\u00XX` (six
 * characters, which JSON allows), quotes and commas, and 64 KiB for the rest. Routes that
 * take such lists accept at least this, so a valid request never meets the body limit first.
 */
export function listBodyBytes(limits: Limits, kinds: ReadonlyArray<SelectorKind>): number {
  return kinds.reduce((sum, kind) => sum + limits.maxBatch * (6 * maxNameBytes(limits, kind) + 3), 64 * 1024)
}

/** The longest name a selector list of `kind` may hold, in UTF-8 bytes. */
export function maxNameBytes(limits: Limits, kind: SelectorKind): number {
  return kind === 'keys' ? limits.maxKeyBytes
    : kind === 'userIds' ? limits.maxUserIdBytes
    : kind === 'tags' ? limits.maxTagBytes
    : limits.maxPrefixBytes
}

/** Checks a selector: at least one list, each within the batch limit, every name valid. */
export function checkSelector(selector: SelectorInput, limits: Limits): Selector {
  const out: Selector = {}
  let any = false
  for (const kind of SELECTOR_KINDS) {
    const list = selector[kind]
    if (list === undefined || list === null) continue
    if (!Array.isArray(list)) throw invalidRequest(`${kind} must be an array`)
    if (list.length > limits.maxBatch) throw invalidRequest(`${kind} has more than ${limits.maxBatch} items`)
    if (list.length === 0) continue
    const max = maxNameBytes(limits, kind)
    list.forEach((name, i) => checkName(`${kind}[${i}]`, name, max))
    out[kind] = [...new Set(list)]
    any = true
  }
  if (!any) {
    throw invalidRequest('the selector needs at least one non-empty list of keys, userIds, tags or prefixes')
  }
  return out
}

const OK = 0
const DEEP = 1
const OVERFLOW = 2

/** What would keep a value from round-tripping: nesting past `maxDepth`, or a non-finite number. */
function walk(value: unknown, maxDepth: number): number {
  // Recursion stops at maxDepth + 1 levels, so a hostile value cannot overflow the stack.
  if (typeof value === 'number') return Number.isFinite(value) ? OK : OVERFLOW
  if (value === null || typeof value !== 'object') return OK
  if (maxDepth <= 0) return DEEP
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const problem = walk(value[i], maxDepth - 1)
      if (problem !== OK) return problem
    }
    return OK
  }
  for (const key in value) {
    const problem = walk((value as Record<string, unknown>)[key], maxDepth - 1)
    if (problem !== OK) return problem
  }
  return OK
}
