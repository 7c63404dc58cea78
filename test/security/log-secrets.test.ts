import { spawn } from 'node:child_process'
import { connect } from 'node:net'
import { fileURLToPath } from 'node:url'
import { Redis } from 'ioredis'
import t, { type Test } from 'tap'
import { buildApp } from '../../src/app.js'
import { DEFAULT_SECURITY, parseApiKeys } from '../../src/config.js'
import { loggerOptions } from '../../src/logger.js'
import { captureLogs } from '../helpers/build.js'
import { requireRedisServer, startRedis } from '../helpers/redis-server.js'

// A whole session of requests, with the log captured: no API secret, no clear token and no
// cached value may appear in it, at the most verbose level.

const SECRETS = {
  admin: 'ADMIN-SECRET-c4n4ry-7f3a9e',
  ops: 'OPS-SECRET-c4n4ry-51bd02',
  rw: 'RW-SECRET-c4n4ry-90c1aa',
}
const API_KEYS = `admin:admin:${SECRETS.admin},ops:admin:${SECRETS.ops},svc:read+write+invalidate:${SECRETS.rw}`
const VALUE_MARK = 'VALUE-c4n4ry'

type Send = (method: string, url: string, opts?: { key?: string | null; body?: unknown; raw?: string }) => Promise<{ status: number; json: () => any }>

/** The session: every kind of request, good and bad. Returns the tokens it was given. */
async function session(send: Send): Promise<string[]> {
  const tokens: string[] = []
  const value = (i: number) => ({ secretish: `${VALUE_MARK}-${i}`, nested: [`${VALUE_MARK}-deep-${i}`] })
  for (let i = 0; i < 5; i++) {
    await send('PUT', `/v1/entries/session:${i}`, { key: SECRETS.rw, body: { value: value(i), userId: 'u1', tags: ['t1'] } })
  }
  await send('GET', '/v1/entries/session:0', { key: SECRETS.rw })
  await send('GET', '/v1/entries/missing', { key: SECRETS.rw })
  await send('POST', '/v1/entries/batch-get', { key: SECRETS.rw, body: { keys: ['session:1', 'nope'] } })
  await send('POST', '/v1/entries/batch-set', { key: SECRETS.rw, body: { entries: [{ key: 'b1', value: value(10) }, { key: '', value: value(11) }] } })
  await send('PUT', '/v1/entries/big', { key: SECRETS.rw, body: { value: `${VALUE_MARK}-big-${'x'.repeat(1024 * 1024)}` } })
  await send('PUT', '/v1/entries/deep', { key: SECRETS.rw, raw: `{"value":${'['.repeat(100)}"${VALUE_MARK}-in-deep"${']'.repeat(100)}}` })
  await send('PUT', '/v1/entries/broken', { key: SECRETS.rw, raw: `{"value":"${VALUE_MARK}-broken` })
  await send('PUT', '/v1/entries/proto', { key: SECRETS.rw, raw: `{"value":"${VALUE_MARK}-proto","__proto__":{"x":1}}` })
  await send('GET', '/v1/debug/entries/session:2', { key: SECRETS.admin })
  await send('GET', '/v1/debug/users/u1', { key: SECRETS.admin })
  await send('POST', '/v1/invalidations', { key: SECRETS.rw, body: { prefixes: ['session:'], reason: 'rotate' } })
  await send('POST', '/v1/invalidations', { key: SECRETS.rw, body: { tags: ['t1'], mode: 'stale' } })
  // Bad credentials: wrong, truncated, another scheme, a secret in the wrong place.
  await send('GET', '/v1/stats', { key: `${SECRETS.admin}-wrong` })
  await send('GET', '/v1/stats', { key: SECRETS.admin.slice(0, -2) })
  await send('GET', '/v1/stats', { key: null })
  await send('POST', '/v1/stats/reset', { key: SECRETS.admin })
  // The emergency clear: issued, refused (wrong, foreign, expired-looking), then used twice.
  const issued = await send('POST', '/v1/admin/clear-token', { key: SECRETS.admin, body: { reason: 'log test' } })
  const token = issued.json().token as string
  tokens.push(token)
  await send('POST', '/v1/admin/clear', { key: SECRETS.admin, body: { token: `${token}x` } })
  await send('POST', '/v1/admin/clear', { key: SECRETS.ops, body: { token } })
  await send('POST', '/v1/admin/clear', { key: SECRETS.admin, body: { token } })
  await send('POST', '/v1/admin/clear', { key: SECRETS.admin, body: { token } })
  const second = await send('POST', '/v1/admin/clear-token', { key: SECRETS.ops, body: { reason: 'second' } })
  tokens.push(second.json().token)
  await send('POST', '/v1/admin/clear', { key: SECRETS.admin, body: { token: second.json().token } })
  await send('GET', '/v1/debug/audit', { key: SECRETS.admin })
  await send('GET', '/v1/entries/%zz', { key: SECRETS.rw })
  return tokens
}

function assertClean(t: Test, logged: string, tokens: string[]) {
  t.ok(logged.length > 0, 'something was logged')
  // A Buffer serialized into a log line is an array of byte values: read those as text too.
  const buffers = [...logged.matchAll(/"data":\[([\d,]+)\]/g)].map((m) => Buffer.from(m[1]!.split(',').map(Number)).toString('latin1'))
  const log = [logged, ...buffers].join('\n')
  t.match(log, /clear_token_issued/, 'the audit records are in the log')
  t.match(log, /"action":"clear","reason":"log test","outcome":"succeeded"/)
  for (const [name, secret] of Object.entries(SECRETS)) {
    t.notOk(log.includes(secret), `the ${name} secret is not logged`)
    t.notOk(log.includes(secret.slice(0, 20)), `no prefix of the ${name} secret is logged`)
  }
  t.equal(tokens.length, 2)
  for (const token of tokens) {
    t.match(token, /^cwclr_/)
    t.notOk(log.includes(token), 'the clear token is not logged')
    t.notOk(log.includes(token.slice(6, 26)), 'no part of the clear token is logged')
  }
  t.notOk(log.includes('c4n4ry'), 'no cached value (nor secret) is logged')
}

t.test('the log of a session through buildApp holds no secret, token or value', async (t) => {
  const { lines, stream } = captureLogs()
  const app = await buildApp(
    { apiKeys: parseApiKeys(API_KEYS), security: { ...DEFAULT_SECURITY, clearRateLimitMax: 100 } },
    { logger: { ...loggerOptions('trace'), stream } },
  )
  t.teardown(() => app.close())
  await app.ready()
  const tokens = await session(async (method, url, opts = {}) => {
    const headers: Record<string, string> = {}
    if (opts.key) headers.authorization = `Bearer ${opts.key}`
    const payload = opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body))
    if (payload !== undefined) headers['content-type'] = 'application/json'
    const res = await app.inject({ method: method as 'GET', url, headers, payload })
    return { status: res.statusCode, json: () => res.json() }
  })
  await app.close()
  assertClean(t, lines.join('\n'), tokens)
})

t.test('the log of src/server.ts, run as a process, holds no secret, token or value', async (t) => {
  const root = fileURLToPath(new URL('../..', import.meta.url))
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: root,
    env: { ...process.env, CACHEWARDEN_API_KEYS: API_KEYS, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'trace', CLEAR_RATE_LIMIT_MAX: '100' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let log = ''
  child.stdout.on('data', (d) => (log += d))
  child.stderr.on('data', (d) => (log += d))
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${log}`)), 60_000)
    const onData = () => {
      const m = /listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(log)
      if (m) {
        clearTimeout(timer)
        resolve(Number(m[1]))
      }
    }
    child.stdout.on('data', onData)
    child.on('exit', () => reject(new Error(`server exited: ${log}`)))
  })
  const tokens = await session(async (method, url, opts = {}) => {
    const headers: Record<string, string> = {}
    if (opts.key) headers.authorization = `Bearer ${opts.key}`
    const body = opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body))
    if (body !== undefined) headers['content-type'] = 'application/json'
    const res = await fetch(`http://127.0.0.1:${port}${url}`, { method, headers, body })
    const text = await res.text()
    return { status: res.status, json: () => JSON.parse(text) }
  })
  // Requests Node's parser refuses, carrying a secret and a value: a bad header line, headers
  // over the limit, a broken chunk. Logged (at trace) as the parser's error, never its bytes.
  const auth = `Authorization: Bearer ${SECRETS.rw}\r\n`
  for (const raw of [
    `GET /v1/stats HTTP/1.1\r\nHost: x\r\n${auth}Bad Header Line\r\n\r\n`,
    `GET /v1/stats HTTP/1.1\r\nHost: x\r\n${auth}X-Big: ${'a'.repeat(20_000)}\r\n\r\n`,
    `PUT /v1/entries/k HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n{"value":"${VALUE_MARK}"}zz\r\n`,
  ]) {
    const reply = await new Promise<string>((resolve) => {
      const socket = connect(port, '127.0.0.1', () => socket.write(raw))
      let out = ''
      socket.on('data', (d) => (out += d.toString('latin1')))
      socket.on('close', () => resolve(out))
      socket.on('error', () => resolve(out))
    })
    t.match(reply, /^HTTP\/1\.1 400 /, 'the parser refused it')
  }
  child.kill('SIGTERM')
  t.equal(await exited, 0, 'the server shut down cleanly on SIGTERM')
  t.match(log, /client error/, 'the parser errors were logged')
  assertClean(t, log, tokens)
})

t.test('a Redis error is logged without the command that failed (its arguments hold the value)', async (t) => {
  if (!requireRedisServer(t)) return
  const redis = await startRedis(t)
  const { lines, stream } = captureLogs()
  const app = await buildApp(
    { apiKeys: parseApiKeys(API_KEYS), redisUrl: redis.url },
    { logger: { ...loggerOptions('trace'), stream } },
  )
  t.teardown(() => app.close())
  await app.ready()
  // Redis refuses every write (a replica of a master that is not there: READONLY), and
  // ioredis puts the command, arguments and all, on the error.
  const side = new Redis(redis.url)
  t.teardown(() => side.quit())
  await side.call('REPLICAOF', '127.0.0.1', '1')
  const res = await app.inject({
    method: 'PUT',
    url: '/v1/entries/oom',
    headers: { authorization: `Bearer ${SECRETS.rw}`, 'content-type': 'application/json' },
    payload: JSON.stringify({ value: `${VALUE_MARK}-oom`, userId: 'u-c4n4ry' }),
  })
  t.equal(res.statusCode, 503, res.body)
  const log = lines.join('\n')
  t.match(log, /Redis write failed/, 'the failure was logged')
  t.match(log, /READONLY/, 'with the cause')
  t.notOk(log.includes('c4n4ry'), 'but not the value or the user')
})
