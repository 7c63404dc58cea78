import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { buildApp, type BuildOptions } from '../../src/app.js'
import { CachewardenClient, type ClientOptions } from '../../src/client/index.js'
import type { Config } from '../../src/config.js'
import { KEYS, TEST_API_KEYS } from './build.js'

interface Teardown {
  teardown(fn: () => unknown): void
}

/**
 * Starts the app on a real port (127.0.0.1, port 0) with the test keys, and returns it with a
 * client factory. Clients are closed before the server when the test ends.
 */
export async function serve(t: Teardown, config: Partial<Config> = {}, options: BuildOptions = {}) {
  const app: FastifyInstance = await buildApp({ apiKeys: TEST_API_KEYS, ...config }, options)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  const clients: CachewardenClient[] = []
  const client = (opts: Partial<ClientOptions> = {}) => {
    const c = new CachewardenClient({ url, apiKey: KEYS.admin, ...opts })
    clients.push(c)
    return c
  }
  t.teardown(async () => {
    await Promise.all(clients.map((c) => c.close()))
    await app.close()
  })
  return { app, url, client }
}
