import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import pg from 'pg'

/** The system PostgreSQL the tests use (trust auth); each test makes its own database on it. */
export const PG_ADMIN_URL = process.env.TEST_PG_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'

interface TestLike {
  teardown(fn: () => unknown): void
  comment(...message: unknown[]): void
}

/** True when the server answers (else callers skip); under CI=true a missing server throws instead. */
export async function postgresAvailable(t: TestLike): Promise<boolean> {
  const client = new pg.Client({ connectionString: PG_ADMIN_URL, connectionTimeoutMillis: 3000 })
  try {
    await client.connect()
    await client.end()
    return true
  } catch (error) {
    await client.end().catch(() => {})
    if (process.env.CI === 'true') throw new Error(`PostgreSQL is required under CI at ${PG_ADMIN_URL}: ${(error as Error).message}`)
    t.comment(`skipping: PostgreSQL is not reachable at ${PG_ADMIN_URL}: ${(error as Error).message}`)
    return false
  }
}

/**
 * Creates a database with a unique name (dropped in teardown, connections and all) and
 * returns its URL and a connected client. `sql/cachewarden.sql` is installed in it.
 */
export async function createDatabase(t: TestLike): Promise<{ url: string; name: string; db: pg.Client }> {
  const name = `cw_test_${Date.now().toString(36)}_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  const url = new URL(PG_ADMIN_URL)
  url.pathname = `/${name}`
  const db = new pg.Client({ connectionString: url.toString() })
  await db.connect()
  await db.query(readFileSync(new URL('../../sql/cachewarden.sql', import.meta.url), 'utf8'))
  t.teardown(async () => {
    await db.end().catch(() => {})
    const admin = new pg.Client({ connectionString: PG_ADMIN_URL })
    await admin.connect()
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  })
  return { url: url.toString(), name, db }
}

/** Resolves when `check` returns true, polling; rejects after `timeoutMs`. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs = 20_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}
