import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { ConfigError, DEFAULT_SECURITY, loadConfig } from '../src/config.js'
import { build } from './helpers/build.js'

function keysFile(t: { teardown(fn: () => void): void }, text: string, mode = 0o600): string {
  const dir = mkdtempSync(join(tmpdir(), 'cachewarden-keys-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const path = join(dir, 'keys')
  writeFileSync(path, text)
  chmodSync(path, mode)
  return path
}

t.test('a keys file holds one key a line, with comments, blank lines and CRLF', async (t) => {
  const path = keysFile(
    t,
    '# cachewarden keys\n\nreporting:read:s3cret:with:colons\r\n  ops:admin:comma,in,secret  \n# old:read:gone\nfill:read+write:abc\n',
  )
  const config = loadConfig({ CACHEWARDEN_API_KEYS_FILE: path })
  t.same(
    config.apiKeys.map((k) => [k.name, [...k.scopes], k.secret]),
    [
      ['reporting', ['read'], 's3cret:with:colons'],
      ['ops', ['admin'], 'comma,in,secret'],
      ['fill', ['read', 'write'], 'abc'],
    ],
  )
})

t.test('keys from the file authenticate requests', async (t) => {
  const path = keysFile(t, 'ops:admin:file-secret-123456\n')
  const app = await build(t, { apiKeys: loadConfig({ CACHEWARDEN_API_KEYS_FILE: path }).apiKeys })
  const ok = await app.inject({ method: 'GET', url: '/v1/stats', headers: { authorization: 'Bearer file-secret-123456' } })
  t.equal(ok.statusCode, 200)
  const no = await app.inject({ method: 'GET', url: '/v1/stats', headers: { authorization: 'Bearer file-secret-12345' } })
  t.equal(no.statusCode, 401)
})

t.test('the file adds to CACHEWARDEN_API_KEYS, and a name used in both is refused', async (t) => {
  const path = keysFile(t, 'ops:admin:one\n')
  t.equal(loadConfig({ CACHEWARDEN_API_KEYS: 'svc:read:two', CACHEWARDEN_API_KEYS_FILE: path }).apiKeys.length, 2)
  const twice = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS: 'ops:read:two', CACHEWARDEN_API_KEYS_FILE: path })) as ConfigError
  t.match(twice.message, /used twice/)
  t.equal(twice.variable, 'CACHEWARDEN_API_KEYS_FILE', 'named where the second use is')
})

t.test('a stray "+" in the scopes and a METRICS_TOKEN no header can carry stop the start', async (t) => {
  for (const keys of ['adm:admin+:secret-1', 'adm:+read:secret-1', 'adm:read++write:secret-1']) {
    const error = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS: keys })) as ConfigError
    t.equal(error.variable, 'CACHEWARDEN_API_KEYS')
    t.match(error.message, /empty scope/, keys)
  }
  for (const [keys, where] of [[',b:reed:x', 'entry 2'], ['a:read:x,,b:reed:y', 'entry 3']]) {
    const error = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS: keys! })) as ConfigError
    t.match(error.message, `CACHEWARDEN_API_KEYS: ${where}: key "b" has unknown scope "reed"`, 'numbered as written, empty entries counted')
  }
  for (const keys of [',', ' , ,']) {
    const error = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS: keys })) as ConfigError
    t.equal(error.variable, 'CACHEWARDEN_API_KEYS')
    t.match(error.message, /holds no keys/, `${JSON.stringify(keys)} is not "no keys configured"`)
  }
  for (const token of ['t\u00f6ken', 'two words', 'tab\there']) {
    const error = t.throws(() => loadConfig({ METRICS_TOKEN: token })) as ConfigError
    t.equal(error.variable, 'METRICS_TOKEN')
    t.match(error.message, /printable ASCII/)
  }
  t.equal(loadConfig({ METRICS_TOKEN: 'prom-Token_1.2~' }).metricsToken, 'prom-Token_1.2~')
})

t.test('a keys file other users can read or write is refused', { skip: process.platform === 'win32' && 'no POSIX modes' }, async (t) => {
  for (const mode of [0o644, 0o604, 0o602, 0o666]) {
    const path = keysFile(t, 'ops:admin:secret-in-open-file\n', mode)
    const error = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS_FILE: path })) as ConfigError
    t.ok(error instanceof ConfigError)
    t.equal(error.variable, 'CACHEWARDEN_API_KEYS_FILE')
    t.match(error.message, /chmod/)
    t.notMatch(error.message, /secret-in-open-file/, 'the message never shows the secret')
  }
  for (const mode of [0o600, 0o400, 0o640, 0o440]) {
    const path = keysFile(t, 'ops:admin:x\n', mode)
    t.equal(loadConfig({ CACHEWARDEN_API_KEYS_FILE: path }).apiKeys.length, 1, `mode ${mode.toString(8)} is accepted`)
  }
})

t.test('bad keys files stop the start with a message naming the variable, never the secret', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['ops:admin\n', /name:scope\+scope:secret/],
    ['ops:root:hunter2-secret\n', /unknown scope "root"/],
    ['ops:admin:\n', /empty secret/],
    ['ops:admin:hunter2-s\u00e9cret\n', /printable ASCII/],
    ['# keys\n\nops:admin\n', /^line 3: must look like/], // numbered as an editor numbers lines
    ['a:read:s1\r\n  # indented comment\r\n\r\nb:reed:hunter2-secret\r\n', /^line 4: key "b" has unknown scope "reed"/],
    ['a:read:s1\nb:read:s2\na:write:hunter2-secret\n', /^line 3: key name "a" is used twice/],
    ['ops:admin+:hunter2-secret\n', /key "ops" has an empty scope/],
    ['', /holds no keys/],
    ['# every key commented out\n# ops:admin:hunter2-secret\n\n', /holds no keys/], // not a generated admin key
  ]
  for (const [text, pattern] of cases) {
    const path = keysFile(t, text)
    const error = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS_FILE: path })) as ConfigError
    t.equal(error.variable, 'CACHEWARDEN_API_KEYS_FILE')
    t.match(error.message.slice(`${error.variable}: `.length), pattern)
    t.notMatch(error.message, /hunter2/)
  }
  const missing = t.throws(() => loadConfig({ CACHEWARDEN_API_KEYS_FILE: '/nonexistent/keys' })) as ConfigError
  t.equal(missing.variable, 'CACHEWARDEN_API_KEYS_FILE')
})

t.test('the rate-limit and audit variables are read and checked', async (t) => {
  t.same(loadConfig({}).security, DEFAULT_SECURITY)
  const c = loadConfig({
    CLEAR_RATE_LIMIT_MAX: '3',
    CLEAR_RATE_LIMIT_WINDOW_MS: '1000',
    AUTH_FAILURE_LIMIT_MAX: '0',
    AUTH_FAILURE_WINDOW_MS: '5000',
    RATE_LIMIT_MAX: '100',
    RATE_LIMIT_WINDOW_MS: '2000',
    AUDIT_LOG_SIZE: '10',
  })
  t.same(c.security, {
    clearRateLimitMax: 3,
    clearRateLimitWindowMs: 1000,
    authFailureLimitMax: 0,
    authFailureWindowMs: 5000,
    rateLimitMax: 100,
    rateLimitWindowMs: 2000,
    auditLogSize: 10,
  })
  for (const name of ['CLEAR_RATE_LIMIT_MAX', 'CLEAR_RATE_LIMIT_WINDOW_MS', 'AUTH_FAILURE_LIMIT_MAX', 'RATE_LIMIT_MAX', 'AUDIT_LOG_SIZE']) {
    t.throws(() => loadConfig({ [name]: '-1' }), new RegExp(name))
    t.throws(() => loadConfig({ [name]: 'many' }), new RegExp(name))
  }
  t.throws(() => loadConfig({ AUDIT_LOG_SIZE: '0' }), /AUDIT_LOG_SIZE/)
  t.throws(() => loadConfig({ CLEAR_RATE_LIMIT_WINDOW_MS: '0' }), /CLEAR_RATE_LIMIT_WINDOW_MS/)
})
