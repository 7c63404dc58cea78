// A server process for bench/http.ts: the bare Fastify baseline, the naive Fastify + lru-cache
// service the issue compares with, or cachewarden with 100k entries of 200-byte JSON values,
// auth on. Prints "ready <port>" when listening.
import Fastify from 'fastify'
import { LRUCache } from 'lru-cache'
import { buildApp } from '../../src/app.js'
import { parseApiKeys } from '../../src/config.js'
import { BENCH_SECRET, entryKey, entryValue as value } from './workload.js'

const mode = process.argv[2] ?? 'cachewarden'
const entries = Number(process.argv[3] ?? 100_000)

if (mode === 'bare') {
  const app = Fastify()
  const constant = value(0)
  app.get('/bare/:key', async () => constant)
  // The PUT baseline parses the same JSON body and returns a constant, as a bare write route would.
  app.put('/bare/:key', async () => constant)
  await app.listen({ port: 0, host: '127.0.0.1' })
  console.log(`ready ${(app.server.address() as { port: number }).port}`)
} else if (mode === 'naive') {
  // What a team writes in an afternoon: no auth, no validation, no indexes, no etags.
  const app = Fastify()
  const lru = new LRUCache<string, object>({ max: entries * 2, ttl: 3_600_000 })
  for (let i = 0; i < entries; i++) lru.set(entryKey(i), value(i))
  app.get<{ Params: { key: string } }>('/naive/:key', async (request, reply) => {
    const value = lru.get(request.params.key)
    return value === undefined ? reply.code(404).send({ error: 'not_found' }) : { key: request.params.key, value }
  })
  app.put<{ Params: { key: string }; Body: { value: object; ttlMs?: number } }>('/naive/:key', async (request) => {
    lru.set(request.params.key, request.body.value, { ttl: request.body.ttlMs })
    return { key: request.params.key }
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  console.log(`ready ${(app.server.address() as { port: number }).port}`)
} else {
  const app = await buildApp(
    { apiKeys: parseApiKeys(`bench:admin:${BENCH_SECRET}`), maxEntries: entries * 2 },
    // BENCH_METRICS=0 measures without the metrics plugin (to see what it costs).
    { metrics: process.env.BENCH_METRICS !== '0' },
  )
  for (let i = 0; i < entries; i++) {
    await app.cache.write(entryKey(i), { value: value(i), userId: String(i), ttlMs: 3_600_000 })
  }
  await app.listen({ port: 0, host: '127.0.0.1' })
  console.log(`ready ${(app.server.address() as { port: number }).port}`)
}

// Exit cleanly so `node --cpu-prof` can write its profile.
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(0))
