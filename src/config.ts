import { readFileSync, statSync } from 'node:fs'
import { isIP } from 'node:net'
import { DEFAULT_LIMITS, type Limits } from './cache/limits.js'
import { compileRules } from './sources/events.js'
import { parseOriginsConfig } from './origins/config.js'
import { DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES } from './stores/memory-store.js'

/** A plain SQL identifier (the listener warns about capitals: an unquoted NOTIFY folds them). */
export const PG_CHANNEL = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/

/**
 * When, after shutdown begins, work that would outlast SHUTDOWN_GRACE_MS is cut short (origin
 * calls, stalled uploads): a second before the grace ends, half-way through a shorter one.
 */
export const beforeGraceEnds = (graceMs: number): number => graceMs - Math.min(1000, graceMs / 2)

export const SCOPES = ['read', 'write', 'invalidate', 'admin'] as const
export type Scope = (typeof SCOPES)[number]

export interface ApiKey {
  name: string
  scopes: ReadonlySet<Scope>
  secret: string
}

/** The JSON of CONFIG_FILE. Each section is validated by the module that uses it. */
export interface ConfigFile {
  rules?: unknown[]
  origins?: unknown[]
  warm?: Record<string, unknown>
}

const CONFIG_SECTIONS = ['rules', 'origins', 'warm']
/** A DNS host name (RFC 1123 labels); `HOST` may also be any IPv4 or IPv6 address. */
const HOSTNAME = /^(?=.{1,253}\.?$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$/i

export interface Config {
  host: string
  port: number
  logLevel: string
  maxEntries: number
  maxBytes: number
  limits: Limits
  /** Largest request body; batch routes allow `batchBodyLimitBytes`. */
  bodyLimitBytes: number
  batchBodyLimitBytes: number
  /** The whole request, headers and body, must arrive within this (408 otherwise). */
  requestTimeoutMs: number
  /**
   * How long in-flight requests get to finish after a stop signal (src/server.ts). Origin
   * calls still running near its end are aborted, so their callers get a 503, not a cut connection.
   */
  shutdownGraceMs: number
  apiKeys: ApiKey[]
  metricsToken: string | undefined
  redisUrl: string | undefined
  pgUrl: string | undefined
  pgChannel: string
  /** What the PostgreSQL listener does on a reconnect, for the notifications it may have missed. */
  pgReconnectPolicy: PgReconnectPolicy
  /** Apply `pgReconnectPolicy` on the first connect too (entries may predate this process, e.g. in Redis). */
  pgReconnectPolicyOnStart: boolean
  l1MaxTtlMs: number
  refreshConcurrency: number
  fillLeaseMs: number
  invalidationLogSize: number
  /** Heartbeat comment interval of `GET /v1/invalidations/stream`. */
  streamHeartbeatMs: number
  /** A stream client with more unsent bytes than this is disconnected (slow reader). */
  streamMaxBufferBytes: number
  configFile: ConfigFile
  /** Rate limits and the audit log (README "Security"). */
  security: SecurityConfig
}

/** Rate limits and audit settings; a `max` of 0 turns that limit off. */
export interface SecurityConfig {
  /** Requests per key per window on each of the two emergency-clear endpoints. */
  clearRateLimitMax: number
  clearRateLimitWindowMs: number
  /** 401s per client IP per window before that IP gets 429 on every authenticated route. */
  authFailureLimitMax: number
  authFailureWindowMs: number
  /** Requests per key (or IP) per window on every authenticated route; 0 (default) is off. */
  rateLimitMax: number
  rateLimitWindowMs: number
  /** How many audit records `GET /v1/debug/audit` can show. */
  auditLogSize: number
}

export const DEFAULT_SECURITY: SecurityConfig = {
  clearRateLimitMax: 10,
  clearRateLimitWindowMs: 60_000,
  authFailureLimitMax: 100,
  authFailureWindowMs: 60_000,
  rateLimitMax: 0,
  rateLimitWindowMs: 60_000,
  auditLogSize: 1000,
}

export const DEFAULT_PORT = 8080

/**
 * The default body limit: four values' worth plus room. A value over its limit but inside
 * this is parsed and refused with `value_too_large`, which says what is wrong; only a body
 * past it is cut off unread (`payload_too_large`). It also leaves room for a value at its
 * limit whose non-ASCII characters are written as JSON escapes (`\u00e9`: six bytes of body
 * for two of value).
 */
export const defaultBodyLimit = (maxValueBytes: number) => 4 * maxValueBytes + 64 * 1024

export const PG_RECONNECT_POLICIES = ['stale-all', 'clear', 'none'] as const
export type PgReconnectPolicy = (typeof PG_RECONNECT_POLICIES)[number]

export function defaultConfig(): Config {
  return {
    host: '0.0.0.0',
    port: DEFAULT_PORT,
    logLevel: 'info',
    maxEntries: DEFAULT_MAX_ENTRIES,
    maxBytes: DEFAULT_MAX_BYTES,
    limits: { ...DEFAULT_LIMITS },
    bodyLimitBytes: defaultBodyLimit(DEFAULT_LIMITS.maxValueBytes),
    batchBodyLimitBytes: 32 * 1024 * 1024,
    requestTimeoutMs: 120_000,
    shutdownGraceMs: 10_000,
    apiKeys: [],
    metricsToken: undefined,
    redisUrl: undefined,
    pgUrl: undefined,
    pgChannel: 'cachewarden',
    pgReconnectPolicy: 'stale-all',
    pgReconnectPolicyOnStart: false,
    l1MaxTtlMs: 60_000,
    refreshConcurrency: 3,
    fillLeaseMs: 2000,
    invalidationLogSize: 1000,
    streamHeartbeatMs: 15_000,
    streamMaxBufferBytes: 8 * 1024 * 1024,
    configFile: {},
    security: { ...DEFAULT_SECURITY },
  }
}

/** A bad configuration value; the message names the variable. */
export class ConfigError extends Error {
  constructor(readonly variable: string, message: string) {
    super(`${variable}: ${message}`)
    this.name = 'ConfigError'
  }
}

type Env = Record<string, string | undefined>

/** Reads and validates the configuration from the environment (DESIGN.md section 9). */
export function loadConfig(env: Env = process.env): Config {
  const c = defaultConfig()
  const str = (name: string) => {
    const v = env[name]
    return v === undefined || v.trim() === '' ? undefined : v.trim()
  }
  const int = (name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER) => {
    const raw = str(name)
    if (raw === undefined) return fallback
    if (!/^\d+$/.test(raw)) throw new ConfigError(name, `must be a whole number of at least ${min}, got "${raw}"`)
    const n = Number(raw)
    if (n < min || n > max) throw new ConfigError(name, `must be between ${min} and ${max}, got ${raw}`)
    return n
  }
  const url = (name: string, protocols: string[]) => {
    const raw = str(name)
    if (raw === undefined) return undefined
    let parsed: URL
    try {
      parsed = new URL(raw)
    } catch {
      throw new ConfigError(name, 'must be a URL')
    }
    if (!protocols.includes(parsed.protocol)) {
      throw new ConfigError(name, `must start with ${protocols.map((p) => `${p}//`).join(' or ')}`)
    }
    return raw
  }

  c.host = str('HOST') ?? c.host
  // A name whose last label is all digits (999.1.1.1) is neither: no such top-level domain.
  if (isIP(c.host) === 0 && (!HOSTNAME.test(c.host) || /(^|\.)\d+\.?$/.test(c.host))) {
    throw new ConfigError('HOST', `must be an IP address or a host name, got "${c.host}"`)
  }
  c.port = int('PORT', c.port, 0, 65535)
  c.logLevel = str('LOG_LEVEL') ?? c.logLevel
  if (!['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].includes(c.logLevel)) {
    throw new ConfigError('LOG_LEVEL', 'must be one of fatal, error, warn, info, debug, trace, silent')
  }
  c.maxEntries = int('CACHE_MAX_ENTRIES', c.maxEntries, 1)
  c.maxBytes = int('CACHE_MAX_BYTES', c.maxBytes, 1024)
  c.limits.defaultTtlMs = int('DEFAULT_TTL_MS', c.limits.defaultTtlMs, c.limits.minTtlMs, c.limits.maxTtlMs)
  c.limits.maxValueBytes = int('MAX_VALUE_BYTES', c.limits.maxValueBytes, 16)
  c.limits.maxKeyBytes = int('MAX_KEY_BYTES', c.limits.maxKeyBytes, 1, 64 * 1024)
  // A prefix can match any key, and no key is longer: the two limits are one.
  c.limits.maxPrefixBytes = c.limits.maxKeyBytes
  // The request schemas bound every list at the contract's 1000; MAX_BATCH can only lower it.
  c.limits.maxBatch = int('MAX_BATCH', c.limits.maxBatch, 1, 1000)
  c.bodyLimitBytes = int('BODY_LIMIT_BYTES', defaultBodyLimit(c.limits.maxValueBytes), 1024)
  c.batchBodyLimitBytes = int('BATCH_BODY_LIMIT_BYTES', Math.max(c.batchBodyLimitBytes, c.bodyLimitBytes), c.bodyLimitBytes)
  c.requestTimeoutMs = int('REQUEST_TIMEOUT_MS', c.requestTimeoutMs, 1000, 3_600_000)
  c.shutdownGraceMs = int('SHUTDOWN_GRACE_MS', c.shutdownGraceMs, 1000, 3_600_000)
  c.metricsToken = str('METRICS_TOKEN')
  // As for API secrets: a header carries bytes, not UTF-8, and a space ends the token.
  if (c.metricsToken !== undefined && !headerSafe(c.metricsToken)) throw new ConfigError('METRICS_TOKEN', `has ${NOT_HEADER_SAFE}`)
  c.redisUrl = url('REDIS_URL', ['redis:', 'rediss:'])
  c.pgUrl = url('PG_URL', ['postgres:', 'postgresql:'])
  c.pgChannel = str('PG_CHANNEL') ?? c.pgChannel
  if (!PG_CHANNEL.test(c.pgChannel)) {
    throw new ConfigError('PG_CHANNEL', 'must be a plain SQL identifier (letters, digits, underscore; at most 63)')
  }
  const policy = str('PG_RECONNECT_POLICY') ?? c.pgReconnectPolicy
  if (!(PG_RECONNECT_POLICIES as readonly string[]).includes(policy)) {
    throw new ConfigError('PG_RECONNECT_POLICY', `must be one of ${PG_RECONNECT_POLICIES.join(', ')}, got "${policy}"`)
  }
  c.pgReconnectPolicy = policy as PgReconnectPolicy
  const onStart = str('PG_RECONNECT_POLICY_ON_START')
  if (onStart !== undefined && onStart !== 'true' && onStart !== 'false') {
    throw new ConfigError('PG_RECONNECT_POLICY_ON_START', `must be true or false, got "${onStart}"`)
  }
  c.pgReconnectPolicyOnStart = onStart === 'true'
  c.l1MaxTtlMs = int('L1_MAX_TTL_MS', c.l1MaxTtlMs, 1)
  c.refreshConcurrency = int('REFRESH_CONCURRENCY', c.refreshConcurrency, 1, 1000)
  c.fillLeaseMs = int('FILL_LEASE_MS', c.fillLeaseMs, 1, 600_000)
  c.invalidationLogSize = int('INVALIDATION_LOG_SIZE', c.invalidationLogSize, 1, 1_000_000)
  c.streamHeartbeatMs = int('STREAM_HEARTBEAT_MS', c.streamHeartbeatMs, 100, 3_600_000)
  c.streamMaxBufferBytes = int('STREAM_MAX_BUFFER_BYTES', c.streamMaxBufferBytes, 1024)

  const sec = c.security
  sec.clearRateLimitMax = int('CLEAR_RATE_LIMIT_MAX', sec.clearRateLimitMax, 0, 1_000_000)
  sec.clearRateLimitWindowMs = int('CLEAR_RATE_LIMIT_WINDOW_MS', sec.clearRateLimitWindowMs, 1)
  sec.authFailureLimitMax = int('AUTH_FAILURE_LIMIT_MAX', sec.authFailureLimitMax, 0, 1_000_000)
  sec.authFailureWindowMs = int('AUTH_FAILURE_WINDOW_MS', sec.authFailureWindowMs, 1)
  sec.rateLimitMax = int('RATE_LIMIT_MAX', sec.rateLimitMax, 0, 100_000_000)
  sec.rateLimitWindowMs = int('RATE_LIMIT_WINDOW_MS', sec.rateLimitWindowMs, 1)
  sec.auditLogSize = int('AUDIT_LOG_SIZE', sec.auditLogSize, 1, 1_000_000)

  const keys = str('CACHEWARDEN_API_KEYS')
  const fromEnv = keys === undefined ? [] : locatedApiKeys(keys, 'CACHEWARDEN_API_KEYS')
  const keysFile = str('CACHEWARDEN_API_KEYS_FILE')
  const fromFile = keysFile === undefined ? [] : readKeysFile(keysFile)
  // Keys configured but none found (a keys file mounted empty, `"$A,$B"` with both unset) must
  // not start a server on a generated key nobody sees: only no keys configured at all does that.
  if (keys !== undefined && fromEnv.length === 0) throw new ConfigError('CACHEWARDEN_API_KEYS', 'holds no keys')
  if (keysFile !== undefined && fromFile.length === 0) {
    throw new ConfigError('CACHEWARDEN_API_KEYS_FILE', `${keysFile} holds no keys`)
  }
  const names = new Set<string>()
  const secrets = new Map<string, string>()
  for (const [variable, list] of [['CACHEWARDEN_API_KEYS', fromEnv], ['CACHEWARDEN_API_KEYS_FILE', fromFile]] as const) {
    for (const { key, where } of list) {
      if (names.has(key.name)) throw new ConfigError(variable, `${where}: key name "${key.name}" is used twice`)
      names.add(key.name)
      // A secret names one key: with two, a request would get one key's scopes, never the other's.
      const other = secrets.get(key.secret)
      if (other !== undefined) throw new ConfigError(variable, `${where}: keys "${other}" and "${key.name}" have the same secret`)
      secrets.set(key.secret, key.name)
      c.apiKeys.push(key)
    }
  }

  const file = str('CONFIG_FILE')
  if (file !== undefined) {
    let parsed: unknown
    try {
      parsed = JSON.parse(readFileSync(file, 'utf8'))
    } catch (error) {
      throw new ConfigError('CONFIG_FILE', `cannot read JSON from ${file}: ${(error as Error).message}`)
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new ConfigError('CONFIG_FILE', 'must hold a JSON object')
    }
    for (const section of Object.keys(parsed)) {
      // `$schema`, `$comment` and the like are for editors and readers, not sections.
      if (!CONFIG_SECTIONS.includes(section) && !section.startsWith('$')) {
        throw new ConfigError('CONFIG_FILE', `"${section}" is not a section (use ${CONFIG_SECTIONS.join(', ')})`)
      }
    }
    c.configFile = parsed as ConfigFile
    // Checked here too (buildApp checks again), so a bad rule stops the start with its name.
    compileRules(c.configFile.rules, c.limits)

    parseOriginsConfig(c.configFile, c.limits) // throws ConfigError naming origins[i].field or warm.field
  }
  return c
}

/**
 * Reads CACHEWARDEN_API_KEYS_FILE: one `name:scopes:secret` a line, `#` comments, blank
 * lines ignored. A secret may contain `,` here (one key a line). The file must not be
 * readable or writable by others (mode `o-rwx`, e.g. 0600 or 0640), as ssh does for its keys.
 */
function readKeysFile(path: string, variable = 'CACHEWARDEN_API_KEYS_FILE'): LocatedKey[] {
  let text: string
  try {
    if (process.platform !== 'win32' && (statSync(path).mode & 0o007) !== 0) {
      throw new ConfigError(
        variable,
        `${path} is accessible to every user of the machine (mode ${(statSync(path).mode & 0o777).toString(8)}); ` +
          `run chmod o-rwx (e.g. chmod 600) on it`,
      )
    }
    text = readFileSync(path, 'utf8')
  } catch (error) {
    if (error instanceof ConfigError) throw error
    throw new ConfigError(variable, `cannot read ${path}: ${(error as Error).message}`)
  }
  // Numbered by line, as an editor shows the file.
  const lines = text.split('\n').map((line, i) => [`line ${i + 1}`, line] as const)
  return parseApiKeyEntries(lines.filter(([, line]) => !line.trim().startsWith('#')), variable)
}

/** Parses `name:scope+scope:secret,...`. The secret may itself contain `:`. */
export function parseApiKeys(text: string, variable = 'CACHEWARDEN_API_KEYS'): ApiKey[] {
  return locatedApiKeys(text, variable).map(({ key }) => key)
}

/** A parsed key and where it was written (`entry 2`, `line 5`), for messages about it. */
interface LocatedKey {
  key: ApiKey
  where: string
}

function locatedApiKeys(text: string, variable: string): LocatedKey[] {
  // Numbered as written, empty entries counted: in `"$A,$B"` with A unset, B is entry 2.
  return parseApiKeyEntries(text.split(',').map((part, i) => [`entry ${i + 1}`, part] as const), variable)
}

/**
 * A header carries bytes, not UTF-8, and a space ends the token: a secret or token with
 * anything but printable ASCII could never match.
 */
const headerSafe = (token: string) => /^[\x21-\x7e]+$/.test(token)
const NOT_HEADER_SAFE = 'a space, control or non-ASCII character; use printable ASCII'

/** Each entry with where it is (`entry 2`, `line 5`), for the messages. */
function parseApiKeyEntries(entries: ReadonlyArray<readonly [string, string]>, variable: string): LocatedKey[] {
  return entries
    .map(([where, part]) => [where, part.trim()] as const)
    .filter(([, part]) => part !== '')
    .map(([where, part]) => {
      const fail = (message: string) => new ConfigError(variable, `${where}: ${message}`)
      const first = part.indexOf(':')
      const second = part.indexOf(':', first + 1)
      if (first <= 0 || second < 0) throw fail('must look like name:scope+scope:secret')
      const name = part.slice(0, first)
      const listed = part.slice(first + 1, second).split('+')
      const scopes = listed.filter(Boolean)
      const secret = part.slice(second + 1)
      if (scopes.length === 0) throw fail(`key "${name}" has no scopes`)
      // `admin+` or `+read`: a scope lost in editing, perhaps the one meant.
      if (scopes.length !== listed.length) throw fail(`key "${name}" has an empty scope (a stray "+")`)
      for (const scope of scopes) {
        if (!(SCOPES as readonly string[]).includes(scope)) throw fail(`key "${name}" has unknown scope "${scope}" (use ${SCOPES.join(', ')})`)
      }
      if (secret === '') throw fail(`key "${name}" has an empty secret`)
      if (!headerSafe(secret)) throw fail(`key "${name}" has a secret with ${NOT_HEADER_SAFE}`)
      return { key: { name, scopes: new Set(scopes as Scope[]), secret }, where }
    })
}
