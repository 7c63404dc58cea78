// The HTTP benchmarks' workload, shared by the server processes (bench/servers/http-target.ts)
// and the load generators (bench/http*.ts). No side effects: importing it starts nothing.

export const BENCH_SECRET = 'bench-secret-0123456789abcdef'
export const auth = { authorization: `Bearer ${BENCH_SECRET}` }

/** Entry i's value: about 200 bytes serialized (189). */
export function entryValue(i: number) {
  return { id: i, name: `user-${i}`, plan: 'pro', widgets: [1, 2, 3, 4, 5], note: 'x'.repeat(120) }
}

/** Entry i's key, as stored. */
export const entryKey = (i: number) => `user:${i}:dashboard`

/** A random entry's key among `entries`, URL-encoded for a path. */
export const randomKey = (entries: number) => encodeURIComponent(entryKey(Math.floor(Math.random() * entries)))

/** The body every benchmarked PUT sends (the bare and naive routes parse it too). */
export const putBody = JSON.stringify({ value: entryValue(1), ttlMs: 3_600_000, userId: '1' })
export const putRequest = { method: 'PUT' as const, body: putBody, headers: { 'content-type': 'application/json' } }
