import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { connect } from 'node:net'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { OriginServer, dashboardOrigin } from './helpers/origin-server.js'

// The real entry point as a user runs it: config from the environment, the generated key,
// and graceful shutdown on a signal.

function start(env: Record<string, string>, command = [process.execPath, '--import', 'tsx', 'src/server.ts'], detached = false) {
  const child = spawn(command[0]!, command.slice(1), {
    env: { ...process.env, HOST: '127.0.0.1', PORT: '0', LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    // Its own process group, as a terminal or systemd gives it, to be signalled as a whole.
    detached,
  })
  let out = ''
  let err = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (err += d))
  const ready = new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listen line in 30 s: ${out} ${err}`)), 30_000)
    child.stdout.on('data', () => {
      const m = /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(out)
      if (m && (!env.EXPECT_KEY || /Bearer \S+/.test(out))) {
        clearTimeout(timer)
        resolve(Number(m[1]))
      }
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`exited ${code}: ${err}`))
    })
  })
  return { child, ready, output: () => out, errors: () => err }
}

t.test('with no keys it prints one admin key once, and that key works', async (t) => {
  const server = start({ CACHEWARDEN_API_KEYS: '', EXPECT_KEY: '1' })
  t.teardown(() => server.child.kill('SIGKILL'))
  const port = await server.ready
  const secret = /Authorization: Bearer (\S+)/.exec(server.output())![1]!
  t.equal(server.output().split(secret).length - 1, 1, 'the secret is printed exactly once')
  const base = `http://127.0.0.1:${port}`
  const put = await fetch(`${base}/v1/entries/hello`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
    body: JSON.stringify({ value: 'world' }),
  })
  t.equal(put.status, 200)
  t.equal((await fetch(`${base}/v1/entries/hello`)).status, 401, 'closed without the key')
  const got = await fetch(`${base}/v1/entries/hello`, { headers: { authorization: `Bearer ${secret}` } })
  t.equal(((await got.json()) as { value: string }).value, 'world')
  server.child.kill('SIGTERM')
  const [code] = await once(server.child, 'exit')
  t.equal(code, 0, 'SIGTERM exits cleanly')
  t.match(server.output(), /"level":30[^\n]*"signal":"SIGTERM"[^\n]*"shutting down"/, 'logged at info')
})

t.test('SIGHUP (a closed terminal) shuts down gracefully as well, logged as a warning', async (t) => {
  const server = start({ CACHEWARDEN_API_KEYS: 'a:admin:server-test-secret-1' })
  t.teardown(() => server.child.kill('SIGKILL'))
  const port = await server.ready
  t.equal((await fetch(`http://127.0.0.1:${port}/health/live`)).status, 200)
  server.child.kill('SIGHUP')
  const [code, signal] = await once(server.child, 'exit')
  t.same([code, signal], [0, null], 'a clean exit, not death by the signal')
  t.match(server.output(), /"level":40[^\n]*"signal":"SIGHUP"[^\n]*"shutting down"/, 'logged at warn')
})

t.test('SIGTERM lets an in-flight request finish', async (t) => {
  // The request is held inside its handler (an origin load the test releases), so it is
  // certainly in flight when the signal arrives, however slow the machine.
  const { origin, server, inFlight } = await withRequestInFlight(t)
  server.child.kill('SIGTERM')
  await until(() => /shutting down/.test(server.output()))
  origin.release()
  const res = await inFlight
  t.equal(res.status, 200, 'the request in flight when the signal came is answered')
  // keep-alive would invite the client's next request onto a connection about to close
  t.equal(res.headers.get('connection'), 'close', 'and tells its client not to send another on the connection')
  t.same(((await res.json()) as { value: unknown }).value, { user: '1' })
  const [code] = await once(server.child, 'exit')
  t.equal(code, 0)
})

t.test('a load still waiting on its origin near the end of SHUTDOWN_GRACE_MS is aborted: its caller gets 503, and the exit is clean', async (t) => {
  const { server, inFlight } = await withRequestInFlight(t, undefined, false, { SHUTDOWN_GRACE_MS: '2000' })
  const signalled = performance.now()
  server.child.kill('SIGTERM') // the origin never answers
  const res = await inFlight
  const waited = performance.now() - signalled
  t.equal(res.status, 503, 'answered, not cut off by the exit')
  t.equal(((await res.json()) as { error: string }).error, 'backend_unavailable')
  t.equal(res.headers.get('connection'), 'close')
  t.ok(waited >= 900 && waited < 2000, `aborted a second before the grace ends (${Math.round(waited)} ms after the signal)`)
  const [code] = await once(server.child, 'exit')
  t.equal(code, 0, 'the shutdown finished within its grace')
  t.notMatch(server.output() + server.errors(), /killed by timeout/)
})

t.test('a request whose body never comes is cut a second before SHUTDOWN_GRACE_MS ends: the exit is clean', async (t) => {
  const server = start({ CACHEWARDEN_API_KEYS: 'a:admin:server-test-secret-1', SHUTDOWN_GRACE_MS: '2000' })
  t.teardown(() => server.child.kill('SIGKILL'))
  const port = await server.ready
  const socket = connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  let received = ''
  socket.on('data', (d) => (received += d))
  socket.on('error', () => {}) // the cut may reset it
  const closed = once(socket, 'close')
  socket.write('PUT /v1/entries/never HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer server-test-secret-1\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n')
  await new Promise((resolve) => setTimeout(resolve, 300)) // its headers are in: a request in flight
  const signalled = performance.now()
  server.child.kill('SIGTERM')
  const [code] = await once(server.child, 'exit')
  await closed
  t.equal(code, 0, 'a clean exit, not killed at the grace')
  t.ok(performance.now() - signalled < 1900, 'before the grace ended')
  t.equal(received, '', 'nothing was applied, so nothing is answered')
  t.notMatch(server.output() + server.errors(), /killed by timeout/)
})

for (const [first, second] of [['SIGTERM', 'SIGHUP'], ['SIGHUP', 'SIGHUP'], ['SIGQUIT', 'SIGTERM']] as const) {
  t.test(`${first} then ${second} within a second is one stop: the request in flight finishes`, async (t) => {
    const { origin, server, inFlight } = await withRequestInFlight(t)
    server.child.kill(first)
    await until(() => /shutting down/.test(server.output()))
    server.child.kill(second) // systemd's stop sends SIGTERM, then SIGHUP with SendSIGHUP=yes
    await until(() => /signal repeated/.test(server.output()))
    origin.release()
    t.equal((await inFlight).status, 200, 'the request in flight is answered')
    const [code] = await once(server.child, 'exit')
    t.equal(code, 0)
    t.notMatch(server.errors(), /second/, 'nothing but the JSON log')
  })
}

/** A server with an origin whose answer the test holds, and a request in flight on it. */
async function withRequestInFlight(t: Test, command?: string[], detached = false, env: Record<string, string> = {}) {
  const origin = await OriginServer.start(t)
  origin.values.set('/users/1/dashboard', { user: '1' })
  origin.hold()
  const dir = mkdtempSync(join(tmpdir(), 'cw-server-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const configFile = join(dir, 'config.json')
  writeFileSync(configFile, JSON.stringify({ origins: [dashboardOrigin(origin)] }))
  const server = start({ CACHEWARDEN_API_KEYS: 'a:admin:server-test-secret-1', CONFIG_FILE: configFile, ...env }, command, detached)
  let pid = 0
  t.teardown(() => {
    if (detached && server.child.pid !== undefined && alive(server.child.pid)) process.kill(-server.child.pid, 'SIGKILL')
    server.child.kill('SIGKILL')
    if (pid !== 0 && alive(pid)) process.kill(pid, 'SIGKILL')
  })
  const port = await server.ready
  pid = Number(/"pid":(\d+)/.exec(server.output())![1])
  const inFlight = fetch(`http://127.0.0.1:${port}/v1/entries/dashboard%3A1?load=true`, {
    headers: { authorization: 'Bearer server-test-secret-1' },
  })
  await origin.waitForCalls(1)
  return { origin, server, inFlight, pid: () => pid }
}

t.test('Ctrl-C on `npm start` (SIGINT to the whole process group, twice over with npm\'s copy) still lets requests in flight finish', async (t) => {
  if (!existsSync('dist/server.js')) throw new Error('dist/server.js is missing: npm install builds it (npm run build)')
  const { origin, server, inFlight, pid } = await withRequestInFlight(t, ['npm', 'start'], true)
  process.kill(-server.child.pid!, 'SIGINT')
  await until(() => /shutting down/.test(server.output()))
  await new Promise((resolve) => setTimeout(resolve, 200)) // npm's copy of the signal has arrived by now
  t.ok(alive(pid()), 'the server is still up, finishing its request')
  origin.release()
  const res = await inFlight
  t.equal(res.status, 200, 'the request in flight when the signal came is answered')
  await until(() => !alive(pid()))
  t.notMatch(server.output(), /second signal/, 'the repeated signal did not cut the shutdown short')
})

t.test('a stop signal repeated within a second (npm passing on its copy) is the same stop: requests in flight finish', async (t) => {
  const { origin, server, inFlight } = await withRequestInFlight(t)
  server.child.kill('SIGINT')
  await until(() => /shutting down/.test(server.output()))
  server.child.kill('SIGINT') // as npm's copy arrives, after the server's own
  await until(() => /signal repeated/.test(server.output()))
  origin.release()
  t.equal((await inFlight).status, 200, 'the request in flight is answered')
  const [code] = await once(server.child, 'exit')
  t.equal(code, 0)
})

t.test('a second SIGTERM a while after the first exits at once, with 1', async (t) => {
  const { server, inFlight } = await withRequestInFlight(t)
  inFlight.catch(() => {}) // cut off by the forced exit
  server.child.kill('SIGTERM')
  await until(() => /shutting down/.test(server.output()))
  await new Promise((resolve) => setTimeout(resolve, 1200))
  t.ok(server.child.exitCode === null, 'still waiting for the request in flight')
  server.child.kill('SIGTERM')
  const [code] = await once(server.child, 'exit')
  t.equal(code, 1)
  t.match(server.output(), /"level":50[^\n]*"second signal: exiting without waiting for requests in flight"/)
})

t.test('SIGTERM to `npm start` reaches the server: it shuts down, nothing is left listening', async (t) => {
  // `npm start` runs the script through a shell; without its `exec` the shell died on the
  // signal npm passed on and the server kept running, orphaned.
  if (!existsSync('dist/server.js')) throw new Error('dist/server.js is missing: npm install builds it (npm run build)')
  const server = start({ CACHEWARDEN_API_KEYS: 'a:admin:server-test-secret-1' }, ['npm', 'start'])
  let pid = 0
  t.teardown(() => {
    server.child.kill('SIGKILL')
    if (pid !== 0 && alive(pid)) process.kill(pid, 'SIGKILL')
  })
  const port = await server.ready
  pid = Number(/"pid":(\d+)/.exec(server.output())![1])
  t.not(pid, server.child.pid, 'the server is a child of npm, not npm itself')
  t.equal((await fetch(`http://127.0.0.1:${port}/health/live`)).status, 200)
  server.child.kill('SIGTERM')
  await once(server.child, 'exit')
  t.match(server.output(), /shutting down/, 'the server got the signal')
  await until(() => !alive(pid))
  t.notOk(alive(pid), 'the server process is gone')
})

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

async function until(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time')
    await new Promise((r) => setTimeout(r, 10))
  }
}

t.test('a bad environment value stops the start with a message naming it', async (t) => {
  const server = start({ CACHE_MAX_ENTRIES: 'lots' })
  await t.rejects(server.ready, /exited 78/)
  t.match(server.errors(), /CACHE_MAX_ENTRIES/)
})

t.test('a HOST this machine has no address for stops the start naming it; a taken PORT names PORT', async (t) => {
  const server = start({ HOST: '192.0.2.1' }) // TEST-NET-1: never a local address
  await t.rejects(server.ready, /exited 78/)
  t.match(server.output(), /cannot listen on 192\.0\.2\.1:0 \(HOST, EADDRNOTAVAIL\)/)
  t.notMatch(server.output(), /"stack"/, 'a setting, not a bug: no stack trace')
  // Whatever the log level, it is said on stderr, as a bad value is.
  const silent = start({ HOST: '192.0.2.1', LOG_LEVEL: 'silent' })
  await t.rejects(silent.ready, /exited 78/)
  t.equal(silent.output(), '', 'nothing logged')
  t.match(silent.errors(), /^cachewarden: invalid configuration: cannot listen on 192\.0\.2\.1:0 \(HOST, EADDRNOTAVAIL\)\n$/)
  const first = start({ CACHEWARDEN_API_KEYS: 'a:read:x' })
  t.teardown(() => first.child.kill('SIGKILL'))
  const port = await first.ready
  const second = start({ CACHEWARDEN_API_KEYS: 'a:read:x', PORT: String(port) })
  await t.rejects(second.ready, /exited 1/)
  t.match(second.output(), new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} \\(PORT, EADDRINUSE\\)`))
  t.match(second.errors(), new RegExp(`^cachewarden: could not start: cannot listen on 127\\.0\\.0\\.1:${port} \\(PORT, EADDRINUSE\\)`))
})
