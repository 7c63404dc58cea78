import { checkKey, checkUserId, type Limits } from '../cache/limits.js'
import { ConfigError, type ConfigFile } from '../config.js'
import { KeyPattern, parseTemplate, render, type Template } from './pattern.js'

export const DEFAULT_REFRESH_AHEAD = 0.8
export const DEFAULT_ORIGIN_TIMEOUT_MS = 5000
export const DEFAULT_ORIGIN_RETRIES = 2
export const DEFAULT_BACKOFF_MS = 100
export const MAX_ORIGIN_RETRIES = 10
/** Shortest `warm.intervalMs`: re-warming more often than this is a load test, not a cache. */
export const MIN_WARM_INTERVAL_MS = 100

/** One origin of CONFIG_FILE `origins`, checked and compiled. */
export interface OriginSpec {
  name: string
  pattern: KeyPattern
  url: Template
  ttlMs: number
  tags: Template[]
  userId: Template | undefined
  /** Fraction of the TTL after which a read schedules a background refresh; 1 turns it off. */
  refreshAhead: number
  /** Per attempt, connection to last body byte. */
  timeoutMs: number
  /** Attempts after the first. */
  retries: number
  /** First backoff; each retry doubles it, with jitter. */
  backoffMs: number
  headers: Record<string, string>
}

/** What to warm: keys as they are, userIds through every origin whose pattern is just `{userId}` plus text. */
export interface WarmSet {
  keys: string[]
  userIds: string[]
}

export interface WarmConfig {
  onStartup: WarmSet | undefined
  intervalMs: number | undefined
}

export interface OriginsConfig {
  origins: OriginSpec[]
  warm: WarmConfig
}

const ORIGIN_FIELDS = new Set([
  'name', 'keyPattern', 'url', 'ttlMs', 'tags', 'userId', 'refreshAhead', 'timeoutMs', 'retries', 'backoffMs', 'headers',
])

/** Checks and compiles `origins` and `warm` of CONFIG_FILE; throws ConfigError('CONFIG_FILE', '<field> …'). */
export function parseOriginsConfig(file: ConfigFile, limits: Limits): OriginsConfig {
  const fail = (message: string): never => {
    throw new ConfigError('CONFIG_FILE', message)
  }
  const raw = file.origins ?? []
  if (!Array.isArray(raw)) fail('origins must be an array')
  const origins: OriginSpec[] = []
  const names = new Set<string>()
  raw.forEach((item: unknown, i: number) => {
    const at = `origins[${i}]`
    if (item === null || typeof item !== 'object' || Array.isArray(item)) fail(`${at} must be an object`)
    const o = item as Record<string, unknown>
    for (const field of Object.keys(o)) if (!ORIGIN_FIELDS.has(field)) fail(`${at}.${field} is not a known field`)

    const str = (field: string, required: boolean): string | undefined => {
      const v = o[field]
      if (v === undefined && !required) return undefined
      if (typeof v !== 'string' || v === '') fail(`${at}.${field} must be a non-empty string`)
      return v as string
    }
    const int = (field: string, fallback: number, min: number, max: number): number => {
      const v = o[field]
      if (v === undefined) return fallback
      if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
        fail(`${at}.${field} must be a whole number between ${min} and ${max}`)
      }
      return v as number
    }
    const template = (field: string, source: string): Template => {
      try {
        return parseTemplate(source)
      } catch (error) {
        return fail(`${at}.${field} ${(error as Error).message}`)
      }
    }

    const name = str('name', true)!
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) fail(`${at}.name must be 1-64 letters, digits, '_', '.' or '-'`)
    if (names.has(name)) fail(`${at}.name "${name}" is used by an earlier origin`)
    names.add(name)

    const keyPattern = str('keyPattern', true)!
    let pattern: KeyPattern
    try {
      pattern = new KeyPattern(keyPattern)
    } catch (error) {
      return fail(`${at}.keyPattern ${(error as Error).message}`)
    }
    const parts = new Set(pattern.names)
    const onlyParts = (field: string, t: Template) => {
      for (const n of t.names) if (!parts.has(n)) fail(`${at}.${field} uses {${n}}, which keyPattern does not have`)
    }

    const url = template('url', str('url', true)!)
    onlyParts('url', url)
    let parsed: URL | undefined
    try {
      parsed = new URL(render(url, Object.fromEntries(pattern.names.map((n) => [n, 'x']))))
    } catch {
      // reported below
    }
    if (parsed === undefined || (parsed.protocol !== 'http:' && parsed.protocol !== 'https:')) {
      fail(`${at}.url must be an http:// or https:// URL`)
    }
    // The key fills the path and query only: a part in the host would let any reader send the
    // origin's request, headers and all, wherever its key says. Judged on the URL as parsed
    // (a `\` or a tab in the text can move a part into the host), with two sample keys.
    const sample = (value: string) => {
      try {
        return new URL(render(url, Object.fromEntries(pattern.names.map((n) => [n, value]))))
      } catch {
        return undefined
      }
    }
    const [a, b] = [sample('a'), sample('b')]
    if (a === undefined || b === undefined || a.origin !== b.origin || a.username !== b.username || a.password !== b.password) {
      fail(`${at}.url must not have a placeholder before its path: the key would choose the host`)
    }

    const ttlMs = int('ttlMs', limits.defaultTtlMs, limits.minTtlMs, limits.maxTtlMs)

    const tags: Template[] = []
    if (o.tags !== undefined) {
      if (!Array.isArray(o.tags) || o.tags.length > limits.maxTags) fail(`${at}.tags must be an array of at most ${limits.maxTags} strings`)
      ;(o.tags as unknown[]).forEach((tag, j) => {
        if (typeof tag !== 'string' || tag === '') fail(`${at}.tags[${j}] must be a non-empty string`)
        const t = template(`tags[${j}]`, tag as string)
        onlyParts(`tags[${j}]`, t)
        tags.push(t)
      })
    }

    let userId: Template | undefined
    const userIdSource = str('userId', false)
    if (userIdSource !== undefined) {
      userId = template('userId', userIdSource)
      onlyParts('userId', userId)
    } else if (parts.has('userId')) {
      userId = parseTemplate('{userId}')
    }

    let refreshAhead = DEFAULT_REFRESH_AHEAD
    if (o.refreshAhead !== undefined) {
      if (typeof o.refreshAhead !== 'number' || !(o.refreshAhead > 0 && o.refreshAhead <= 1)) {
        fail(`${at}.refreshAhead must be a number above 0 and at most 1 (1 turns refresh-ahead off)`)
      }
      refreshAhead = o.refreshAhead as number
    }

    const headers: Record<string, string> = {}
    if (o.headers !== undefined) {
      if (o.headers === null || typeof o.headers !== 'object' || Array.isArray(o.headers)) fail(`${at}.headers must be an object of strings`)
      for (const [h, v] of Object.entries(o.headers as object)) {
        if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(h)) fail(`${at}.headers has an invalid header name "${h}"`)
        if (typeof v !== 'string' || /[\r\n\0]/.test(v)) fail(`${at}.headers.${h} must be a string without line breaks`)
        headers[h.toLowerCase()] = v as string
      }
    }

    origins.push({
      name,
      pattern,
      url,
      ttlMs,
      tags,
      userId,
      refreshAhead,
      timeoutMs: int('timeoutMs', DEFAULT_ORIGIN_TIMEOUT_MS, 1, 600_000),
      retries: int('retries', DEFAULT_ORIGIN_RETRIES, 0, MAX_ORIGIN_RETRIES),
      backoffMs: int('backoffMs', DEFAULT_BACKOFF_MS, 1, 60_000),
      headers,
    })
  })

  return { origins, warm: parseWarm(file.warm, limits, fail) }
}

function parseWarm(raw: unknown, limits: Limits, fail: (message: string) => never): WarmConfig {
  if (raw === undefined) return { onStartup: undefined, intervalMs: undefined }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail('warm must be an object')
  const w = raw as Record<string, unknown>
  for (const field of Object.keys(w)) if (field !== 'onStartup' && field !== 'intervalMs') fail(`warm.${field} is not a known field`)
  let onStartup: WarmSet | undefined
  if (w.onStartup !== undefined) {
    const s = w.onStartup as Record<string, unknown>
    if (s === null || typeof s !== 'object' || Array.isArray(s)) fail('warm.onStartup must be an object {keys?, userIds?}')
    for (const field of Object.keys(s)) if (field !== 'keys' && field !== 'userIds') fail(`warm.onStartup.${field} is not a known field`)
    const list = (field: 'keys' | 'userIds') => {
      const v = s[field]
      if (v === undefined) return []
      if (!Array.isArray(v) || v.length > limits.maxBatch) fail(`warm.onStartup.${field} must be an array of at most ${limits.maxBatch} strings`)
      // The API's own checks (length, control characters, well-formed Unicode), named for the file.
      const check = field === 'keys' ? checkKey : checkUserId
      ;(v as unknown[]).forEach((x, i) => {
        try {
          check(x, limits, `warm.onStartup.${field}[${i}]`)
        } catch (error) {
          fail((error as Error).message)
        }
      })
      return v as string[]
    }
    onStartup = { keys: list('keys'), userIds: list('userIds') }
  }
  let intervalMs: number | undefined
  if (w.intervalMs !== undefined) {
    const v = w.intervalMs
    if (typeof v !== 'number' || !Number.isInteger(v) || v < MIN_WARM_INTERVAL_MS) {
      fail(`warm.intervalMs must be a whole number of at least ${MIN_WARM_INTERVAL_MS}`)
    }
    if (onStartup === undefined) fail('warm.intervalMs needs warm.onStartup: it re-warms that set')
    intervalMs = v as number
  }
  return { onStartup, intervalMs }
}
