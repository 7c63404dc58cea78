// Flood: writes of large values far beyond CACHE_MAX_BYTES must keep the cache's accounted
// bytes under the bound and the process memory bounded.
//
//   node --expose-gc --import tsx bench/flood.ts [maxBytesMiB=16] [floodFactor=8]
//
// Phases, all through app.inject with real JSON bodies, 8 requests in flight:
//   baseline   writes exactly CACHE_MAX_BYTES of ~1 MiB values (no eviction needed)
//   flood-1/2  write floodFactor × CACHE_MAX_BYTES of ~1 MiB values each (LRU must evict);
//              the second half's peak RSS not above the first's is what "bounded" means
//   batch      the same volume through batch-set, 8 large values a request
//   oversized  5 MiB bodies (413 payload_too_large, past the 4 MiB + 64 KiB body limit) and
//              2 MiB values (413 value_too_large: read and parsed, then refused)
// "RSS after GC" is measured at the end of each phase with global.gc (--expose-gc).
// After every response the store's accounted bytes are checked against the bound; the
// process exits 1 if they ever exceed it.
import { buildApp } from '../src/app.js'
import { parseApiKeys } from '../src/config.js'

const MiB = 1024 * 1024
const maxBytes = Number(process.argv[2] ?? 16) * MiB
const floodFactor = Number(process.argv[3] ?? 8)
const IN_FLIGHT = 8
const VALUE_CHARS = MiB - 1024 // just under the 1 MiB value limit once quoted

const app = await buildApp({
  apiKeys: parseApiKeys('bench:admin:bench-secret-0123456789'),
  maxBytes,
  maxEntries: 1_000_000,
})
await app.ready()
const headers = { authorization: 'Bearer bench-secret-0123456789', 'content-type': 'application/json' }

let peakRss = 0
let peakStoreBytes = 0
let violations = 0
const sample = async () => {
  peakRss = Math.max(peakRss, process.memoryUsage.rss())
  const { bytes } = await app.cache.store.size()
  peakStoreBytes = Math.max(peakStoreBytes, bytes)
  if (bytes > maxBytes) violations++
}
const statuses = new Map<number, number>()
const count = (s: number) => statuses.set(s, (statuses.get(s) ?? 0) + 1)

// Distinct bodies, so nothing is shared between writes; built just in time.
const valueBody = (i: number, chars = VALUE_CHARS) =>
  `{"value":"${String(i).padStart(8, '0')}${'v'.repeat(chars - 8)}","ttlMs":600000,"userId":"u${i % 50}","tags":["t${i % 7}"]}`

async function pump(total: number, make: (i: number) => { method: 'PUT' | 'POST'; url: string; payload: string }) {
  let next = 0
  const worker = async () => {
    while (next < total) {
      const i = next++
      const res = await app.inject({ ...make(i), headers })
      count(res.statusCode)
      await sample()
    }
  }
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker))
}

async function phase(name: string, bytes: number, run: () => Promise<void>) {
  peakRss = 0
  peakStoreBytes = 0
  const started = performance.now()
  await run()
  const ms = performance.now() - started
  const { entries, bytes: storeBytes } = await app.cache.store.size()
  // Twice, a turn apart: the last responses' buffers are only released after a tick.
  for (let i = 0; i < 2; i++) {
    await new Promise((resolve) => setTimeout(resolve, 50))
    global.gc?.()
  }
  const afterGc = process.memoryUsage.rss()
  const { heapUsed, external, arrayBuffers } = process.memoryUsage()
  void arrayBuffers
  const liveMiB = +((heapUsed + external) / MiB).toFixed(1)
  return { name, writtenMiB: Math.round(bytes / MiB), ms: Math.round(ms), peakRssMiB: +(peakRss / MiB).toFixed(1), afterGcMiB: +(afterGc / MiB).toFixed(1), liveMiB, peakStoreMiB: +(peakStoreBytes / MiB).toFixed(1), endEntries: entries, endStoreMiB: +(storeBytes / MiB).toFixed(1) }
}

global.gc?.()
const idleRss = process.memoryUsage.rss()
const rows = []
let key = 0
const fit = Math.floor(maxBytes / (VALUE_CHARS + 64))
rows.push(await phase('baseline', fit * VALUE_CHARS, () => pump(fit, (i) => ({ method: 'PUT', url: `/v1/entries/base:${key++}`, payload: valueBody(i) }))))
const floodN = Math.round((floodFactor * maxBytes) / VALUE_CHARS)
for (const half of ['flood-1', 'flood-2']) {
  rows.push(await phase(half, floodN * VALUE_CHARS, () => pump(floodN, (i) => ({ method: 'PUT', url: `/v1/entries/flood:${key++}`, payload: valueBody(i) }))))
}
const PER_BATCH = 8
const batches = Math.round(floodN / PER_BATCH)
rows.push(
  await phase('batch', batches * PER_BATCH * VALUE_CHARS, () =>
    pump(batches, (b) => ({
      method: 'POST',
      url: '/v1/entries/batch-set',
      payload: `{"entries":[${Array.from({ length: PER_BATCH }, (_, j) => valueBody(b * PER_BATCH + j).replace('{', `{"key":"batch:${key++}",`)).join(',')}]}`,
    })),
  ),
)
rows.push(
  await phase('oversized', (floodN / 2) * 3.5 * MiB, () =>
    pump(Math.round(floodN / 2), (i) =>
      i % 2 === 0
        ? { method: 'PUT', url: `/v1/entries/over:${i}`, payload: valueBody(i, 5 * MiB) }
        : { method: 'PUT', url: `/v1/entries/over:${i}`, payload: valueBody(i, 2 * MiB) },
    ),
  ),
)
await app.close()

const baselinePeak = rows[0]!.peakRssMiB
console.log(`CACHE_MAX_BYTES ${maxBytes / MiB} MiB; idle RSS ${(idleRss / MiB).toFixed(1)} MiB; node ${process.version}`)
console.log('| phase | written MiB | time ms | peak RSS MiB | peak RSS / baseline | RSS after GC MiB | heap+external after GC MiB | peak store MiB | end entries | end store MiB |')
console.log('|---|---|---|---|---|---|---|---|---|---|')
for (const r of rows) {
  console.log(
    `| ${r.name} | ${r.writtenMiB} | ${r.ms} | ${r.peakRssMiB} | ${(r.peakRssMiB / baselinePeak).toFixed(2)} | ${r.afterGcMiB} | ${r.liveMiB} | ${r.peakStoreMiB} | ${r.endEntries} | ${r.endStoreMiB} |`,
  )
}
console.log(`statuses ${JSON.stringify(Object.fromEntries(statuses))}`)
console.log(`store bytes above the bound after a response: ${violations} times`)
if (violations > 0) process.exit(1)
