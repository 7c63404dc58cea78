import { Writable } from 'node:stream'
import type { FastifyInstance, InjectOptions } from 'fastify'
import { buildApp, type BuildOptions } from '../../src/app.js'
import { parseApiKeys, type Config } from '../../src/config.js'

/** Secrets of the test keys, one per scope. */
export const KEYS = {
  admin: 'admin-secret-0123456789',
  read: 'read-secret-0123456789',
  write: 'write-secret-0123456789',
  invalidate: 'invalidate-secret-0123456789',
  readwrite: 'readwrite-secret-0123456789',
} as const

export const TEST_API_KEYS = parseApiKeys(
  `admin:admin:${KEYS.admin},reader:read:${KEYS.read},writer:write:${KEYS.write},` +
    `invalidator:invalidate:${KEYS.invalidate},service:read+write:${KEYS.readwrite}`,
)

export const auth = (key: keyof typeof KEYS = 'admin') => ({ authorization: `Bearer ${KEYS[key]}` })

interface Teardown {
  teardown(fn: () => unknown): void
}

/** Builds the app with the test keys and closes it when the test ends. */
export async function build(t: Teardown, config: Partial<Config> = {}, options: BuildOptions = {}): Promise<FastifyInstance> {
  const app = await buildApp({ apiKeys: TEST_API_KEYS, ...config }, options)
  t.teardown(() => app.close())
  await app.ready()
  return app
}

/** `inject` with the admin key (or another) and a JSON body. */
export function call(app: FastifyInstance, opts: InjectOptions & { key?: keyof typeof KEYS | null }) {
  const { key = 'admin', ...rest } = opts
  return app.inject({ ...rest, headers: { ...(key === null ? {} : auth(key)), ...rest.headers } })
}

/** A key as a path segment. */
export const keyPath = (key: string) => encodeURIComponent(key)

/** PUTs a value and fails loudly if it did not land. */
export async function put(app: FastifyInstance, key: string, body: Record<string, unknown>) {
  const res = await call(app, { method: 'PUT', url: `/v1/entries/${keyPath(key)}`, payload: body })
  if (res.statusCode !== 200) throw new Error(`PUT ${key} failed: ${res.statusCode} ${res.body}`)
  return res.json()
}

export const get = (app: FastifyInstance, key: string, query = '') =>
  call(app, { method: 'GET', url: `/v1/entries/${keyPath(key)}${query}` })

/** A clock the test moves by hand. */
export class FakeClock {
  constructor(public ms = Date.UTC(2026, 0, 1)) {}
  now = () => this.ms
  advance(ms: number) {
    this.ms += ms
  }
}

/** A log stream to give an app, the lines written to it, and those lines parsed. */
export function captureLogs() {
  const lines: string[] = []
  const stream = new Writable({
    write(chunk, _encoding, done) {
      lines.push(...String(chunk).split('\n').filter(Boolean))
      done()
    },
  })
  return { lines, stream, records: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) }
}
