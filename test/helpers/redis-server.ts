import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createServer, connect } from 'node:net'
import type { Test } from 'tap'

/** True when `redis-server` can run here. */
export function hasRedisServer(): boolean {
  return spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0
}

/**
 * Skips the test file when redis-server is missing, except under CI=true where that is a
 * failure. Returns false when the caller should stop.
 */
export function requireRedisServer(t: Test): boolean {
  if (hasRedisServer()) return true
  if (process.env.CI === 'true') t.fail('redis-server is not installed, and CI=true requires it')
  else t.plan(0, 'redis-server is not installed: skipping the Redis tests (they run under CI=true)')
  return false
}

/** A free TCP port on 127.0.0.1 (never 6379). */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const server = createServer()
      server.unref()
      server.on('error', reject)
      server.listen(0, '127.0.0.1', () => {
        const { port } = server.address() as { port: number }
        server.close(() => resolve(port))
      })
    })
    if (port !== 6379) return port
  }
}

/** A redis-server child process on its own port, which a test can stop and start again. */
export class RedisServer {
  #child: ChildProcess | undefined

  constructor(readonly port: number) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`
  }

  /** Starts redis-server (no persistence) and waits until it accepts connections. */
  async start(): Promise<void> {
    const child = spawn(
      'redis-server',
      ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no'],
      { stdio: 'ignore' },
    )
    this.#child = child
    const deadline = Date.now() + 10_000
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`redis-server on port ${this.port} exited with ${child.exitCode}`)
      if (await accepts(this.port)) return
      await new Promise((r) => setTimeout(r, 25))
    }
    throw new Error(`redis-server on port ${this.port} did not start`)
  }

  /** Freezes (SIGSTOP) or thaws (SIGCONT) redis-server: connections stay open but nothing answers. */
  pause(frozen: boolean): void {
    this.#child?.kill(frozen ? 'SIGSTOP' : 'SIGCONT')
  }

  /** Kills redis-server and waits until it is gone (its data goes with it). */
  async stop(): Promise<void> {
    const child = this.#child
    this.#child = undefined
    if (child === undefined || child.exitCode !== null) return
    await new Promise<void>((resolve) => {
      child.once('exit', () => resolve())
      child.kill('SIGKILL')
      child.kill('SIGCONT') // a frozen process takes its SIGKILL only once thawed on some systems
    })
  }
}

/** Starts a redis-server on a free port and stops it in teardown. */
export async function startRedis(t: { teardown(fn: () => unknown): void }): Promise<RedisServer> {
  const server = new RedisServer(await freePort())
  await server.start()
  t.teardown(() => server.stop())
  return server
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    socket.once('connect', () => {
      socket.write('PING\r\n')
    })
    socket.once('data', (data) => {
      socket.destroy()
      resolve(data.toString().startsWith('+PONG'))
    })
    socket.once('error', () => resolve(false))
  })
}

/** Polls `check` until it is true or `timeoutMs` passes; returns the last result. */
export async function waitUntil(check: () => boolean | Promise<boolean>, timeoutMs = 10_000, stepMs = 10): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return true
    if (Date.now() >= deadline) return false
    await new Promise((r) => setTimeout(r, stepMs))
  }
}
