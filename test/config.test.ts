import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { ConfigError, loadConfig, parseApiKeys } from '../src/config.js'

t.test('every variable the config reads has its row in the README', async (t) => {
  const source = readFileSync(new URL('../src/config.ts', import.meta.url), 'utf8')
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const variables = [...new Set([...source.matchAll(/'([A-Z][A-Z0-9_]+)'/g)].map((m) => m[1]!))]
  t.ok(variables.length >= 30, `found the variables (${variables.length})`)
  for (const variable of variables) t.ok(readme.includes(`| \`${variable}\` |`), `${variable} has a row`)
})

t.test('defaults', async (t) => {
  const c = loadConfig({})
  t.equal(c.port, 8080)
  t.equal(c.limits.defaultTtlMs, 300_000)
  t.equal(c.pgChannel, 'cachewarden')
  t.same(c.apiKeys, [])
})

t.test('environment values are read and validated', async (t) => {
  const c = loadConfig({ PORT: '9000', CACHE_MAX_ENTRIES: '10', CACHE_MAX_BYTES: '4096', DEFAULT_TTL_MS: '1000', REDIS_URL: 'redis://127.0.0.1:6380' })
  t.match(c, { port: 9000, maxEntries: 10, maxBytes: 4096, redisUrl: 'redis://127.0.0.1:6380' })
  t.equal(c.limits.defaultTtlMs, 1000)
})

t.test('an empty variable counts as unset: its default applies', async (t) => {
  const c = loadConfig({ HOST: '', PORT: ' ', CACHE_MAX_ENTRIES: '', REDIS_URL: '' })
  const d = loadConfig({})
  t.match(c, { host: d.host, port: d.port, maxEntries: d.maxEntries, redisUrl: undefined })
})

t.test('an out-of-range number is quoted as it was given, not as a float rounded it', async (t) => {
  t.throws(() => loadConfig({ PORT: '99999999999999999999' }), { variable: 'PORT', message: 'PORT: must be between 0 and 65535, got 99999999999999999999' })
})

t.test('MAX_KEY_BYTES bounds prefixes too: a prefix can match any key, and no key is longer', async (t) => {
  t.equal(loadConfig({}).limits.maxPrefixBytes, 512)
  t.equal(loadConfig({ MAX_KEY_BYTES: '2000' }).limits.maxPrefixBytes, 2000)
  t.equal(loadConfig({ MAX_KEY_BYTES: '16' }).limits.maxPrefixBytes, 16)
})

t.test('a bad value names its variable', async (t) => {
  const bad: Array<[Record<string, string>, string]> = [
    [{ PORT: 'eighty' }, 'PORT'],
    [{ PORT: '70000' }, 'PORT'],
    [{ CACHE_MAX_ENTRIES: '0' }, 'CACHE_MAX_ENTRIES'],
    [{ CACHE_MAX_BYTES: '-1' }, 'CACHE_MAX_BYTES'],
    [{ DEFAULT_TTL_MS: '1.5' }, 'DEFAULT_TTL_MS'],
    [{ LOG_LEVEL: 'loud' }, 'LOG_LEVEL'],
    [{ REDIS_URL: 'http://x' }, 'REDIS_URL'],
    [{ PG_URL: 'not a url' }, 'PG_URL'],
    [{ PG_CHANNEL: 'drop table;' }, 'PG_CHANNEL'],
    [{ CACHEWARDEN_API_KEYS: 'nocolons' }, 'CACHEWARDEN_API_KEYS'],
    [{ CACHEWARDEN_API_KEYS: 'a:root:secret' }, 'CACHEWARDEN_API_KEYS'],
    [{ CACHEWARDEN_API_KEYS: 'a:read:s\u00e9cret' }, 'CACHEWARDEN_API_KEYS'], // a header could never carry it as sent
    [{ CACHEWARDEN_API_KEYS: 'a:read:two words' }, 'CACHEWARDEN_API_KEYS'],
    [{ CACHEWARDEN_API_KEYS: 'a:read:s1,a:write:s2' }, 'CACHEWARDEN_API_KEYS'],
    [{ CACHEWARDEN_API_KEYS: 'a:read:same-secret,b:write:same-secret' }, 'CACHEWARDEN_API_KEYS'],
    [{ CONFIG_FILE: '/nonexistent/cachewarden.json' }, 'CONFIG_FILE'],
    [{ HOST: 'not_a_host' }, 'HOST'],
    [{ REQUEST_TIMEOUT_MS: '10' }, 'REQUEST_TIMEOUT_MS'],
    [{ SHUTDOWN_GRACE_MS: '500' }, 'SHUTDOWN_GRACE_MS'], // no time to abort origin calls before the end
    [{ HOST: 'a..b' }, 'HOST'],
    [{ HOST: '999.1.1.1' }, 'HOST'], // not an IPv4 address, and no top-level domain is all digits
    [{ HOST: 'http://localhost' }, 'HOST'],
  ]
  for (const [env, variable] of bad) {
    let error: unknown
    try {
      loadConfig(env)
    } catch (e) {
      error = e
    }
    t.ok(error instanceof ConfigError, `${JSON.stringify(env)} is refused`)
    t.equal((error as ConfigError).variable, variable)
    t.ok((error as ConfigError).message.startsWith(`${variable}:`), (error as Error).message)
  }
})

t.test('messages say what a value must be, and never print a secret', async (t) => {
  t.throws(() => loadConfig({ CACHE_MAX_ENTRIES: '-1' }), /CACHE_MAX_ENTRIES: must be a whole number of at least 1, got "-1"/)
  t.throws(() => loadConfig({ AUTH_FAILURE_LIMIT_MAX: '-3' }), /AUTH_FAILURE_LIMIT_MAX: must be a whole number of at least 0/)
  let message = ''
  try {
    loadConfig({ CACHEWARDEN_API_KEYS: 'a:read:same-secret,b:write:same-secret' })
  } catch (e) {
    message = (e as Error).message
  }
  t.match(message, /keys "a" and "b" have the same secret/)
  t.notMatch(message, /same-secret/)
})

t.test('HOST takes IP addresses and host names', async (t) => {
  for (const host of ['0.0.0.0', '127.0.0.1', '::', '::1', 'localhost', 'cache-1.internal.example.com', 'example.com.']) {
    t.equal(loadConfig({ HOST: host }).host, host)
  }
})

t.test('API keys parse name, scopes and a secret that may contain colons', async (t) => {
  const [a, b] = parseApiKeys('svc:read+write:s3cr:et, ops:admin:x')
  t.equal(a!.name, 'svc')
  t.same([...a!.scopes], ['read', 'write'])
  t.equal(a!.secret, 's3cr:et')
  t.same([...b!.scopes], ['admin'])
})

t.test('a keys file adds keys, one per line, with comments', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cw-keys-'))
  const file = join(dir, 'keys')
  writeFileSync(file, '# ops keys\nops:admin:file-secret-1\n\nsvc:read:file-secret-2\n', { mode: 0o600 })
  const c = loadConfig({ CACHEWARDEN_API_KEYS_FILE: file })
  t.same(c.apiKeys.map((k) => k.name), ['ops', 'svc'])
})

t.test('CONFIG_FILE must hold a JSON object', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cw-config-'))
  const file = join(dir, 'config.json')
  writeFileSync(file, '[1]')
  t.throws(() => loadConfig({ CONFIG_FILE: file }), /CONFIG_FILE/)
  writeFileSync(file, '{"rules":[]}')
  t.same(loadConfig({ CONFIG_FILE: file }).configFile, { rules: [] })
  // A misspelt section would otherwise be ignored, and its rules or origins silently missing.
  writeFileSync(file, '{"$schema":"./cachewarden.schema.json","$comment":"ops","rules":[]}')
  t.same(loadConfig({ CONFIG_FILE: file }).configFile.rules, [], 'editor fields starting with $ are allowed')
  writeFileSync(file, '{"rulez":[]}')
  t.throws(() => loadConfig({ CONFIG_FILE: file }), /CONFIG_FILE: "rulez" is not a section \(use rules, origins, warm\)/)
})

t.test('the body limits follow MAX_VALUE_BYTES unless set', async (t) => {
  const MiB = 1024 * 1024
  t.equal(loadConfig({}).bodyLimitBytes, 4 * MiB + 64 * 1024, 'four 1 MiB values plus room')
  const big = loadConfig({ MAX_VALUE_BYTES: String(16 * MiB) })
  t.equal(big.bodyLimitBytes, 64 * MiB + 64 * 1024)
  t.equal(big.batchBodyLimitBytes, big.bodyLimitBytes, 'batch-set takes at least what a PUT takes')
  t.equal(loadConfig({ MAX_VALUE_BYTES: '1024' }).batchBodyLimitBytes, 32 * MiB, 'and 32 MiB otherwise')
  t.equal(loadConfig({ MAX_VALUE_BYTES: String(16 * MiB), BODY_LIMIT_BYTES: '2048' }).bodyLimitBytes, 2048, 'BODY_LIMIT_BYTES wins')
  t.throws(() => loadConfig({ BODY_LIMIT_BYTES: String(8 * MiB), BATCH_BODY_LIMIT_BYTES: String(4 * MiB) }), /BATCH_BODY_LIMIT_BYTES/)
})
