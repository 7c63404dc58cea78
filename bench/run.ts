// `npm run bench`: runs every benchmark in bench/ one after another (or those named:
// `npm run bench -- http memory`), each in its own process, printing its tables.
import { spawnSync } from 'node:child_process'
import { readdirSync } from 'node:fs'

const NOT_BENCHES = new Set(['run.ts', 'lib.ts'])
const all = readdirSync('bench')
  .filter((f) => f.endsWith('.ts') && !NOT_BENCHES.has(f))
  .map((f) => f.slice(0, -3))
  .sort()
const wanted = process.argv.slice(2)
const chosen = wanted.length ? all.filter((b) => wanted.includes(b)) : all
let failed = 0
for (const bench of chosen) {
  console.log(`\n## bench/${bench}.ts\n`)
  const r = spawnSync(process.execPath, ['--expose-gc', '--max-old-space-size=8192', '--import', 'tsx', `bench/${bench}.ts`], { stdio: 'inherit' })
  if (r.status !== 0) {
    failed++
    console.log(`bench/${bench}.ts failed (exit ${r.status})`)
  }
}
process.exit(failed ? 1 : 0)
