import { execFile, execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'

// What `npm pack` (and so `npm publish`) ships, installed and used as a dependant would:
// `import ... from 'cachewarden/client'` and the server started from the package.

const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as {
  exports: Record<string, string | { default: string; types: string }>
  bin: Record<string, string>
}
const run = promisify(execFile)
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

t.test('the build imports only node: modules, its own files and the package\'s dependencies', async (t) => {
  // The install test below resolves from this checkout's node_modules, dev dependencies too;
  // this is what keeps a runtime import of one (which a real install would not have) out.
  if (!existsSync('dist/client/index.js')) throw new Error('dist/ is missing: npm install builds it (npm run build)')
  const { dependencies } = JSON.parse(readFileSync('package.json', 'utf8')) as { dependencies: Record<string, string> }
  const files = packedFiles().filter((f) => f.endsWith('.js'))
  const imported = new Set<string>()
  for (const file of files) {
    for (const m of readFileSync(file, 'utf8').matchAll(/(?:^|[\s;])(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g)) {
      const spec = m[1] ?? m[2]!
      if (spec.startsWith('.') || spec.startsWith('node:')) continue
      imported.add(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!)
    }
  }
  t.ok(imported.has('fastify') && imported.has('undici'), `found the imports (${[...imported].sort().join(', ')})`)
  t.same([...imported].filter((name) => !Object.hasOwn(dependencies, name)), [], 'every one is a dependency')
})

t.test('installed from the tarball, the server starts and the client imported by its package name talks to it', async (t) => {
  if (!existsSync('dist/client/index.js')) throw new Error('dist/ is missing: npm install builds it (npm run build)')
  // Inside this checkout, so the package's own dependencies resolve from node_modules above it
  // as they would from the dependant's node_modules.
  const dir = resolve(`node_modules/.cache/package-test-${process.pid}`)
  rmSync(dir, { recursive: true, force: true })
  const installed = join(dir, 'node_modules/cachewarden')
  mkdirSync(installed, { recursive: true })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const tarball = execFileSync('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', dir], { encoding: 'utf8' }).trim()
  execFileSync('tar', ['-xzf', join(dir, tarball), '-C', installed, '--strip-components=1'])

  // The `cachewarden` command, as npm would link it from the package's `bin`.
  const { bin } = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')) as { bin: Record<string, string> }
  const server = spawn(process.execPath, [join(installed, bin.cachewarden!)], {
    env: { ...process.env, HOST: '127.0.0.1', PORT: '0', LOG_LEVEL: 'info', CACHEWARDEN_API_KEYS: 'svc:read+write:package-test-secret-1' },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  t.teardown(() => void server.kill('SIGKILL'))
  let out = ''
  const port = await new Promise<number>((resolve, reject) => {
    server.stdout.on('data', (d) => {
      out += d
      const m = /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(out)
      if (m) resolve(Number(m[1]))
    })
    server.once('exit', (code) => reject(new Error(`the server exited ${code}: ${out}`)))
  })

  writeFileSync(
    join(dir, 'use.mjs'),
    `
import { CachewardenClient, NotFoundError } from 'cachewarden/client'
import { buildApp } from 'cachewarden'

if (typeof buildApp !== 'function') throw new Error('cachewarden exports no buildApp')
const url = 'http://127.0.0.1:${port}'
const cache = new CachewardenClient({ url, apiKey: 'package-test-secret-1' })
try {
  const value = await cache.getOrSet('greeting:1', async () => ({ hello: 'world' }), { ttlMs: 60000, userId: '1' })
  const entry = await cache.get('greeting:1')
  const docs = await fetch(url + '/docs/json').then((r) => r.json())
  console.log(JSON.stringify({ value, entry: entry?.value, notFound: typeof NotFoundError, title: docs.info.title }))
} finally {
  await cache.close()
}
`,
  )
  const { stdout } = await run(process.execPath, [join(dir, 'use.mjs')], { encoding: 'utf8', timeout: 60_000 })
  t.same(JSON.parse(stdout.trim().split('\n').pop()!), { value: { hello: 'world' }, entry: { hello: 'world' }, notFound: 'function', title: 'cachewarden' })
})
