import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { buildApp } from '../../src/app.js'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import { ConfigError, loadConfig } from '../../src/config.js'
import { parseOriginsConfig } from '../../src/origins/config.js'

const good = { name: 'dashboards', keyPattern: 'dashboard:{userId}', url: 'http://svc/users/{userId}/dashboard' }
const parse = (file: Record<string, unknown>) => parseOriginsConfig(file, DEFAULT_LIMITS)

t.test('a minimal origin gets the documented defaults', async (t) => {
  const [o] = parse({ origins: [good] }).origins
  t.equal(o!.ttlMs, 300_000)
  t.equal(o!.refreshAhead, 0.8)
  t.equal(o!.timeoutMs, 5000)
  t.equal(o!.retries, 2)
  t.equal(o!.backoffMs, 100)
  t.same(o!.userId?.names, ['userId'], 'userId defaults to the {userId} part')
  t.same(o!.tags, [])
})

t.test('a pattern without {userId} has no user unless a userId template is given', async (t) => {
  const [a, b] = parse({
    origins: [
      { name: 'a', keyPattern: 'team:{teamId}', url: 'http://svc/teams/{teamId}' },
      { name: 'b', keyPattern: 'team:{teamId}:{owner}', url: 'http://svc/teams/{teamId}', userId: '{owner}', tags: ['team:{teamId}', 'all-teams'] },
    ],
  }).origins
  t.equal(a!.userId, undefined)
  t.same(b!.userId?.names, ['owner'])
  t.equal(b!.tags.length, 2)
})

const cases: Array<[string, Record<string, unknown>, RegExp]> = [
  ['origins is not an array', { origins: {} }, /^CONFIG_FILE: origins must be an array/],
  ['an origin is not an object', { origins: [1] }, /origins\[0\] must be an object/],
  ['an unknown field', { origins: [{ ...good, colour: 1 }] }, /origins\[0\]\.colour is not a known field/],
  ['no name', { origins: [{ ...good, name: undefined }] }, /origins\[0\]\.name must be a non-empty string/],
  ['a bad name', { origins: [{ ...good, name: 'a b' }] }, /origins\[0\]\.name must be/],
  ['a repeated name', { origins: [good, good] }, /origins\[1\]\.name "dashboards" is used/],
  ['no keyPattern', { origins: [{ ...good, keyPattern: '' }] }, /origins\[0\]\.keyPattern must be a non-empty string/],
  ['keyPattern missing', { origins: [{ ...good, keyPattern: undefined }] }, /^CONFIG_FILE: origins\[0\]\.keyPattern must be a non-empty string$/],
  ['keyPattern not a string', { origins: [{ ...good, keyPattern: 7 }] }, /^CONFIG_FILE: origins\[0\]\.keyPattern must be a non-empty string$/],
  ['a part in the URL\'s host', { origins: [{ ...good, url: 'http://{userId}/dashboard' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a part in the URL\'s host name', { origins: [{ ...good, url: 'http://svc-{userId}.internal/x' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a part in the URL\'s port', { origins: [{ ...good, url: 'http://svc:{userId}/x' }] }, /origins\[0\]\.url must be an http/],
  ['a part in the URL\'s user info', { origins: [{ ...good, url: 'http://{userId}@svc/x' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a part moved into the host by a backslash', { origins: [{ ...good, url: 'http://\\/{userId}:8080/x' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a part moved into the host by a tab', { origins: [{ ...good, url: 'http://\t/{userId}:8080/x' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a part right after the host', { origins: [{ ...good, url: 'http://svc{userId}' }] }, /origins\[0\]\.url must not have a placeholder before its path/],
  ['a stray brace in keyPattern', { origins: [{ ...good, keyPattern: 'a:{userId' }] }, /origins\[0\]\.keyPattern has a brace/],
  ['adjacent parts', { origins: [{ ...good, keyPattern: 'a:{x}{y}' }] }, /origins\[0\]\.keyPattern has two parts with nothing between/],
  ['a repeated part', { origins: [{ ...good, keyPattern: '{x}:{x}' }] }, /origins\[0\]\.keyPattern names a part twice/],
  ['a URL part the pattern lacks', { origins: [{ ...good, url: 'http://svc/{teamId}' }] }, /origins\[0\]\.url uses \{teamId\}/],
  ['a URL that is not http', { origins: [{ ...good, url: 'ftp://svc/{userId}' }] }, /origins\[0\]\.url must be an http/],
  ['a URL that is not a URL', { origins: [{ ...good, url: 'users/{userId}' }] }, /origins\[0\]\.url must be an http/],
  ['a ttlMs out of range', { origins: [{ ...good, ttlMs: 0 }] }, /origins\[0\]\.ttlMs must be a whole number between 1 and/],
  ['a fractional timeoutMs', { origins: [{ ...good, timeoutMs: 1.5 }] }, /origins\[0\]\.timeoutMs/],
  ['too many retries', { origins: [{ ...good, retries: 11 }] }, /origins\[0\]\.retries must be a whole number between 0 and 10/],
  ['refreshAhead of 0', { origins: [{ ...good, refreshAhead: 0 }] }, /origins\[0\]\.refreshAhead must be a number above 0 and at most 1/],
  ['refreshAhead above 1', { origins: [{ ...good, refreshAhead: 1.5 }] }, /origins\[0\]\.refreshAhead/],
  ['a tag part the pattern lacks', { origins: [{ ...good, tags: ['t:{team}'] }] }, /origins\[0\]\.tags\[0\] uses \{team\}/],
  ['tags not an array', { origins: [{ ...good, tags: 't' }] }, /origins\[0\]\.tags must be an array/],
  ['a userId part the pattern lacks', { origins: [{ ...good, userId: '{owner}' }] }, /origins\[0\]\.userId uses \{owner\}/],
  ['a header with a line break', { origins: [{ ...good, headers: { 'x-a': 'b\r\nc' } }] }, /origins\[0\]\.headers\.x-a/],
  ['a bad header name', { origins: [{ ...good, headers: { 'a b': 'c' } }] }, /origins\[0\]\.headers has an invalid header name/],
  ['warm not an object', { warm: [] }, /warm must be an object/],
  ['an unknown warm field', { warm: { often: 1 } }, /warm\.often is not a known field/],
  ['warm.onStartup not an object', { warm: { onStartup: ['1'] } }, /warm\.onStartup must be an object/],
  ['a bad warm key', { warm: { onStartup: { keys: [''] } } }, /warm\.onStartup\.keys\[0\] must not be empty/],
  ['a warm key with a control character', { warm: { onStartup: { keys: ['a\u0001'] } } }, /warm\.onStartup\.keys\[0\] must not contain control characters/],
  ['a warm user id too long', { warm: { onStartup: { userIds: ['u'.repeat(300)] } } }, /warm\.onStartup\.userIds\[0\] is longer than/],
  ['an interval below the floor', { warm: { onStartup: { keys: ['a'] }, intervalMs: 10 } }, /warm\.intervalMs must be a whole number of at least 100/],
  ['an interval without a set', { warm: { intervalMs: 1000 } }, /warm\.intervalMs needs warm\.onStartup/],
]

for (const [what, file, message] of cases) {
  t.test(`a config file with ${what} is refused, naming the field`, async (t) => {
    let caught: unknown
    try {
      parse(file)
    } catch (error) {
      caught = error
    }
    t.type(caught, ConfigError)
    t.equal((caught as ConfigError).variable, 'CONFIG_FILE')
    t.match((caught as ConfigError).message, message)
  })
}

t.test('loadConfig checks origins at start, naming CONFIG_FILE and the field', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cachewarden-origins-'))
  const file = join(dir, 'config.json')
  writeFileSync(file, JSON.stringify({ origins: [{ ...good, retries: -1 }] }))
  t.throws(() => loadConfig({ CONFIG_FILE: file }), { name: 'ConfigError', message: /^CONFIG_FILE: origins\[0\]\.retries/ })
  writeFileSync(file, JSON.stringify({ origins: [good], warm: { onStartup: { userIds: ['42'] } } }))
  t.equal(loadConfig({ CONFIG_FILE: file }).configFile.origins?.length, 1)
})

t.test('buildApp refuses a bad origins section too', async (t) => {
  await t.rejects(buildApp({ configFile: { origins: [{ ...good, url: 'nope' }] } }), { name: 'ConfigError', message: /origins\[0\]\.url/ })
})
