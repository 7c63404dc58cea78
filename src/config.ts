import { readFileSync } from 'node:fs'
import { DEFAULT_LIMITS, type Limits } from './cache/limits.js'
import { DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES } from './stores/memory-store.js'

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
  [section: string]: unknown
}

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
  apiKeys: ApiKey[]
  metricsToken: string | undefined
  redisUrl: string | undefined
  pgUrl: string | undefined
  pgChannel: string
  l1MaxTtlMs: number
  refreshConcurrency: number
  fillLeaseMs: number
  invalidationLogSize: number
  /** Heartbeat comment interval of `GET /v1/invalidations/stream`. */
  streamHeartbeatMs: number
  /** A stream client with more unsent bytes than this is disconnected (slow reader). */
  streamMaxBufferBytes: number
  configFile: ConfigFile
}

export const DEFAULT_PORT = 8080

export function defaultConfig(): Config {
  return {
    host: '0.0.0.0',
    port: DEFAULT_PORT,
    logLevel: 'info',
    maxEntries: DEFAULT_MAX_ENTRIES,
    maxBytes: DEFAULT_MAX_BYTES,
    limits: { ...DEFAULT_LIMITS },
    bodyLimitBytes: DEFAULT_LIMITS.maxValueBytes + 64 * 1024,
    batchBodyLimitBytes: 32 * 1024 * 1024,
    apiKeys: [],
    metricsToken: undefined,
    redisUrl: undefined,
    pgUrl: undefined,
    pgChannel: 'cachewarden',
    l1MaxTtlMs: 60_000,
    refreshConcurrency: 3,
    fillLeaseMs: 2000,
    invalidationLogSize: 1000,
    streamHeartbeatMs: 15_000,
    streamMaxBufferBytes: 8 * 1024 * 1024,
    configFile: {},
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
    if (!/^\d+$/.test(raw)) throw new ConfigError(name, `must be a whole number, got "${raw}"`)
    const n = Number(raw)
    if (n < min || n > max) throw new ConfigError(name, `must be between ${min} and ${max}, got ${n}`)
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
  c.limits.maxBatch = int('MAX_BATCH', c.limits.maxBatch, 1, 100_000)
  c.bodyLimitBytes = int('BODY_LIMIT_BYTES', c.limits.maxValueBytes + 64 * 1024, 1024)
  c.batchBodyLimitBytes = int('BATCH_BODY_LIMIT_BYTES', c.batchBodyLimitBytes, c.bodyLimitBytes)
  c.metricsToken = str('METRICS_TOKEN')
  c.redisUrl = url('REDIS_URL', ['redis:', 'rediss:'])
  c.pgUrl = url('PG_URL', ['postgres:', 'postgresql:'])
  c.pgChannel = str('PG_CHANNEL') ?? c.pgChannel
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(c.pgChannel)) {
    throw new ConfigError('PG_CHANNEL', 'must be a plain SQL identifier (letters, digits, underscore)')
  }
  c.l1MaxTtlMs = int('L1_MAX_TTL_MS', c.l1MaxTtlMs, 1)
  c.refreshConcurrency = int('REFRESH_CONCURRENCY', c.refreshConcurrency, 1, 1000)
  c.fillLeaseMs = int('FILL_LEASE_MS', c.fillLeaseMs, 1, 600_000)
  c.invalidationLogSize = int('INVALIDATION_LOG_SIZE', c.invalidationLogSize, 1, 1_000_000)
  c.streamHeartbeatMs = int('STREAM_HEARTBEAT_MS', c.streamHeartbeatMs, 100, 3_600_000)
  c.streamMaxBufferBytes = int('STREAM_MAX_BUFFER_BYTES', c.streamMaxBufferBytes, 1024)

  const keys = str('CACHEWARDEN_API_KEYS')
  if (keys !== undefined) c.apiKeys.push(...parseApiKeys(keys, 'CACHEWARDEN_API_KEYS'))
  const keysFile = str('CACHEWARDEN_API_KEYS_FILE')
  if (keysFile !== undefined) {
    let text: string
    try {
      text = readFileSync(keysFile, 'utf8')
    } catch (error) {
      throw new ConfigError('CACHEWARDEN_API_KEYS_FILE', `cannot read ${keysFile}: ${(error as Error).message}`)
    }
    const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'))
    c.apiKeys.push(...parseApiKeys(lines.join(','), 'CACHEWARDEN_API_KEYS_FILE'))
  }
  const names = new Set<string>()
  for (const key of c.apiKeys) {
    if (names.has(key.name)) throw new ConfigError('CACHEWARDEN_API_KEYS', `key name "${key.name}" is used twice`)
    names.add(key.name)
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
    c.configFile = parsed as ConfigFile
  }
  return c
}

/** Parses `name:scope+scope:secret,...`. The secret may itself contain `:`. */
export function parseApiKeys(text: string, variable = 'CACHEWARDEN_API_KEYS'): ApiKey[] {
  return text
    .split(',')
    .map((part) => part.trim())
    .filter((part) => part !== '')
    .map((part, i) => {
      const first = part.indexOf(':')
      const second = part.indexOf(':', first + 1)
      if (first <= 0 || second < 0) {
        throw new ConfigError(variable, `entry ${i + 1} must look like name:scope+scope:secret`)
      }
      const name = part.slice(0, first)
      const scopes = part.slice(first + 1, second).split('+').filter(Boolean)
      const secret = part.slice(second + 1)
      if (scopes.length === 0) throw new ConfigError(variable, `key "${name}" has no scopes`)
      for (const scope of scopes) {
        if (!(SCOPES as readonly string[]).includes(scope)) {
          throw new ConfigError(variable, `key "${name}" has unknown scope "${scope}" (use ${SCOPES.join(', ')})`)
        }
      }
      if (secret === '') throw new ConfigError(variable, `key "${name}" has an empty secret`)
      return { name, scopes: new Set(scopes as Scope[]), secret }
    })
}
