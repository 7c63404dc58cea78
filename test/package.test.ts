import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import t from 'tap'

// What `npm pack` (and so `npm publish`) ships, installed and used as a dependant would:
// `import ... from 'cachewarden/client'` and the server started from the package.

const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as {
  exports: Record<string, string | { default: string; types: string }>
  bin: Record<string, string>
}
const packed = (path: string) => path.replace(/^\.\//, '')

function packedFiles(): string[] {
  // --ignore-scripts: the `prepare` build has run already (npm install); the suite must not
  // rebuild dist/ under the other test files' feet.
  const out = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { encoding: 'utf8' })
  return (JSON.parse(out) as [{ files: { path: string }[] }])[0].files.map((f) => f.path)
}

t.test('the package holds the build, the OpenAPI document, the SQL and the dashboard, and nothing of the workspace', async (t) => {
  if (!existsSync('dist/client/index.js')) throw new Error('dist/ is missing: npm install builds it (npm run build)')
  const files = packedFiles()
  for (const target of Object.values(pkg.exports)) {
    for (const path of typeof target === 'string' ? [target] : [target.default, target.types]) {
      t.ok(files.includes(packed(path)), `export ${path} is packed`)
    }
  }
  t.ok(files.includes(packed(pkg.bin.cachewarden!)), 'the cachewarden command is packed')
  t.match(readFileSync(pkg.bin.cachewarden!, 'utf8'), /^#!\/usr\/bin\/env node\n/, 'and runs with node')
  for (const f of ['dist/server.js', 'openapi/openapi.json', 'sql/cachewarden.sql', 'grafana/cachewarden-dashboard.json', 'README.md']) {
    t.ok(files.includes(f), `${f} is packed`)
  }
  t.same(
    files.filter((f) => /^(src|test|bench|scripts|\.ci|node_modules)\//.test(f) || f.endsWith('.map') || f.startsWith('tsconfig')),
    [],
    'no sources, tests, benchmarks or source maps (they would point at sources not shipped)',
  )
})

t.test('installed from the tarball, the server starts and the client imported by its package name talks to it', async (t) => {
  if (!existsSync('dist/client/index.js')) throw new Error('dist/ is missing: npm install builds it (npm run build)')
  // Inside this checkout, so the package's own dependencies resolve from node_modules above it
  // as they would from the dependant's node_modules.
  const dir = resolve(`node_modules/.cache/package-test-${process.pid}`)
  rmSync(dir, { recursive: true, force: true })
  mkdirSync(join(dir, 'node_modules/cachewarden'), { recursive: true })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const tarball = execFileSync('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', dir], { encoding: 'utf8' }).trim()
  execFileSync('tar', ['-xzf', join(dir, tarball), '-C', join(dir, 'node_modules/cachewarden'), '--strip-components=1'])

  writeFileSync(
    join(dir, 'use.mjs'),
    `
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { CachewardenClient, NotFoundError } from 'cachewarden/client'
import { buildApp } from 'cachewarden'

if (typeof buildApp !== 'function') throw new Error('cachewarden exports no buildApp')
const manifest = createRequire(import.meta.url).resolve('cachewarden/package.json')
const { bin } = JSON.parse(readFileSync(manifest, 'utf8'))
const child = spawn(process.execPath, [join(dirname(manifest), bin.cachewarden)], {
  env: { ...process.env, HOST: '127.0.0.1', PORT: '0', CACHEWARDEN_API_KEYS: 'svc:read+write:package-test-secret-1' },
  stdio: ['ignore', 'pipe', 'inherit'],
})
let out = ''
const port = await new Promise((resolve, reject) => {
  child.stdout.on('data', (d) => {
    out += d
    const m = /Server listening at http:\\/\\/127\\.0\\.0\\.1:(\\d+)/.exec(out)
    if (m) resolve(Number(m[1]))
  })
  child.once('exit', (code) => reject(new Error('server exited ' + code + ': ' + out)))
})
const cache = new CachewardenClient({ url: 'http://127.0.0.1:' + port, apiKey: 'package-test-secret-1' })
try {
  const value = await cache.getOrSet('greeting:1', async () => ({ hello: 'world' }), { ttlMs: 60000, userId: '1' })
  const entry = await cache.get('greeting:1')
  const docs = await fetch('http://127.0.0.1:' + port + '/docs/json').then((r) => r.json())
  console.log(JSON.stringify({ value, entry: entry?.value, notFound: typeof NotFoundError, title: docs.info.title }))
} finally {
  await cache.close()
  child.kill('SIGTERM')
}
`,
  )
  const result = JSON.parse(execFileSync(process.execPath, [join(dir, 'use.mjs')], { encoding: 'utf8', timeout: 60_000 }).trim().split('\n').pop()!)
  t.same(result, { value: { hello: 'world' }, entry: { hello: 'world' }, notFound: 'function', title: 'cachewarden' })
})
