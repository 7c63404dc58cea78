// How long from a row change to the invalidation it causes, through the trigger of
// sql/cachewarden.sql, NOTIFY, and the listener. Baseline in the same run: a plain `pg`
// client LISTENing on the same channel (PostgreSQL's own delivery, without cachewarden).
//
//   node --import tsx bench/pg-invalidation-delay.ts
//
// Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) or BENCH_PG_URL; creates and
// drops its own database.
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import pg from 'pg'
import { buildApp } from '../src/app.js'
import { MemoryStore } from '../src/stores/memory-store.js'

const ADMIN_URL = process.env.BENCH_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'
const ROUNDS = Number(process.env.ROUNDS ?? 300)
const WARMUP = 20

const name = `cw_bench_${randomBytes(4).toString('hex')}`
const admin = new pg.Client({ connectionString: ADMIN_URL })
await admin.connect()
await admin.query(`CREATE DATABASE ${name}`)
const url = new URL(ADMIN_URL)
url.pathname = `/${name}`

const db = new pg.Client({ connectionString: url.toString() })
const raw = new pg.Client({ connectionString: url.toString() })
// A second plain listener: how far apart two backends deliver the same NOTIFY, with no
// cachewarden in the way, so the difference below can be read against it.
const raw2 = new pg.Client({ connectionString: url.toString() })
const app = await buildApp({ pgUrl: url.toString() })
try {
  await db.connect()
  await db.query(readFileSync(new URL('../sql/cachewarden.sql', import.meta.url), 'utf8'))
  await db.query(`CREATE TABLE personas (user_id text PRIMARY KEY, bio text)`)
  await db.query(`INSERT INTO personas SELECT g::text, 'x' FROM generate_series(1, 100) g`)
  await db.query(`
    CREATE TRIGGER personas_cachewarden AFTER INSERT OR UPDATE OR DELETE ON personas
    FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', 'analytics:{user_id}')`)
  await raw.connect()
  await raw.query('LISTEN cachewarden')
  await raw2.connect()
  await raw2.query('LISTEN cachewarden')
  // Unrelated entries, as in a real cache.
  for (let i = 0; i < 1000; i++) await app.cache.write(`other:${i}`, { value: i, ttlMs: 3_600_000 })
  await app.ready()
  while (!(await ready())) await sleep(20)

  const statement: number[] = []
  const baseline: number[] = []
  const applied: number[] = []
  const control: number[] = []
  for (let i = 0; i < ROUNDS + WARMUP; i++) {
    const user = String((i % 100) + 1)
    await app.cache.write(`dash:${user}`, { value: { i }, userId: user })
    const gotRaw = new Promise<number>((resolve) => raw.once('notification', () => resolve(performance.now())))
    const gotRaw2 = new Promise<number>((resolve) => raw2.once('notification', () => resolve(performance.now())))
    const gotApplied = new Promise<number>((resolve) =>
      app.cache.once('invalidation', (record) => {
        if (record.source !== 'postgres' || record.invalidated !== 1) throw new Error('unexpected invalidation')
        resolve(performance.now())
      }),
    )
    const started = performance.now()
    await db.query('UPDATE personas SET bio = $2 WHERE user_id = $1', [user, `bio ${i}`])
    const done = performance.now()
    const [rawAt, raw2At, appliedAt] = await Promise.all([gotRaw, gotRaw2, gotApplied])
    if (i < WARMUP) continue
    control.push(Math.abs(raw2At - rawAt))
    statement.push(done - started)
    baseline.push(rawAt - started)
    applied.push(appliedAt - started)
  }

  const row = (label: string, xs: number[]) =>
    `| ${label} | ${q(xs, 0.5)} | ${q(xs, 0.95)} | ${q(xs, 0.99)} | ${Math.max(...xs).toFixed(2)} |`
  console.log(`${ROUNDS} single-row UPDATEs (autocommit), ms from sending the statement:\n`)
  console.log('| measured | p50 | p95 | p99 | max |\n|---|---|---|---|---|')
  console.log(row('UPDATE returns (commit)', statement))
  console.log(row('baseline: plain pg LISTEN client gets the NOTIFY', baseline))
  console.log(row('cachewarden: invalidation applied', applied))
  const extra = applied.map((a, i) => a - baseline[i]!)
  console.log(row('cachewarden minus baseline (per round)', extra))
  console.log(row('control: two plain LISTEN clients, |difference| (per round)', control))
  console.log(`\nratio cachewarden / baseline at p50: ${(quantile(applied, 0.5) / quantile(baseline, 0.5)).toFixed(2)}`)

  // Deleting the *last* entry of a store once made lru-cache reset arrays of
  // CACHE_MAX_ENTRIES slots; this keeps checking that it costs about what any delete does.
  const lastEntry = async (others: number) => {
    const store = new MemoryStore({ sweepIntervalMs: 0 })
    const times: number[] = []
    const entry = (key: string) => ({ key, value: '1', etag: 'e', userId: 'u', tags: undefined, createdAt: 0,
      expiresAt: Date.now() + 3_600_000, hits: 0, lastAccessAt: 0, stale: false, origin: undefined, size: 10 })
    for (let i = 0; i < others; i++) await store.set({ ...entry(`o${i}`), userId: undefined })
    for (let i = 0; i < 20; i++) {
      await store.set(entry('k'))
      const started = performance.now()
      await store.invalidate({ userIds: ['u'] }, 'delete', Date.now())
      times.push(performance.now() - started)
    }
    await store.close()
    return quantile(times, 0.5)
  }
  const alone = await lastEntry(0)
  const among = await lastEntry(1000)
  console.log(`\nMemoryStore, deleting a user's one entry (p50 of 20): ${among.toFixed(3)} ms among 1000 others, ` +
    `${alone.toFixed(3)} ms when it is the last entry (ratio ${(alone / among).toFixed(0)})`)
} finally {
  await app.close()
  await raw.end().catch(() => {})
  await raw2.end().catch(() => {})
  await db.end().catch(() => {})
  await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
  await admin.end()
}

async function ready() {
  return (await app.inject({ url: '/health/ready' })).statusCode === 200
}

function sleep(ms: number) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

function quantile(xs: number[], p: number): number {
  const sorted = [...xs].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!
}

function q(xs: number[], p: number): string {
  return quantile(xs, p).toFixed(2)
}
