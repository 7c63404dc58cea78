// Shared bench plumbing: start a server in its own process and drive it with autocannon.
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import autocannon from 'autocannon'

export interface Target {
  port: number
  child: ChildProcess
  stop(): Promise<void>
}

export interface TargetOptions {
  /** A command node runs under, say `['valgrind', '--tool=callgrind']`. */
  wrapper?: string[]
  /** Flags for node itself (`--trace-gc`, which NODE_OPTIONS does not take). */
  nodeFlags?: string[]
}

/** Spawns `node --import tsx <script> ...args` and waits for its "ready <port>" line. */
export async function startTarget(script: string, args: string[] = [], env: Record<string, string> = {}, options: TargetOptions = {}): Promise<Target> {
  const command = [...(options.wrapper ?? []), process.execPath, ...(options.nodeFlags ?? []), '--import', 'tsx', script, ...args]
  const child = spawn(command[0]!, command.slice(1), {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, ...env },
  })
  const lines = createInterface({ input: child.stdout! })
  const port = await new Promise<number>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`${script} exited with ${code} before it was ready`)))
    lines.on('line', (line) => {
      const m = /^ready (\d+)/.exec(line)
      if (m) resolve(Number(m[1]))
    })
  })
  return {
    port,
    child,
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM')
        await once(child, 'exit')
      }
    },
  }
}

export interface LoadResult {
  rps: number
  p50: number
  p99: number
  errors: number
  non2xx: number
}

/** Runs autocannon for `seconds` against the given requests and returns the headline numbers. */
export async function load(opts: autocannon.Options): Promise<LoadResult> {
  const result = await autocannon({ connections: 50, pipelining: 1, duration: 10, ...opts })
  return {
    rps: Math.round(result.requests.average),
    p50: result.latency.p50,
    p99: result.latency.p99,
    errors: result.errors,
    non2xx: result.non2xx,
  }
}

export const ratio = (a: number, b: number) => Math.round((a / b) * 1000) / 1000
