import t from 'tap'
import { build, call, put } from '../helpers/build.js'

const read = (app: Awaited<ReturnType<typeof build>>, key: string, ifNoneMatch?: string, query = '') =>
  call(app, {
    method: 'GET',
    url: `/v1/entries/${encodeURIComponent(key)}${query}`,
    headers: ifNoneMatch === undefined ? {} : { 'if-none-match': ifNoneMatch },
  })

t.test('a read carries the entry etag quoted in the ETag header and in the body', async (t) => {
  const app = await build(t)
  const written = await put(app, 'k', { value: { a: 1 } })
  const res = await read(app, 'k')
  t.equal(res.statusCode, 200)
  t.equal(res.headers.etag, `"${written.etag}"`)
  t.equal(res.json().etag, written.etag)
})

t.test('the etag is a content hash: same value same etag, new value new etag', async (t) => {
  const app = await build(t)
  const a = await put(app, 'a', { value: { n: 1 } })
  const b = await put(app, 'b', { value: { n: 1 } })
  t.equal(a.etag, b.etag)
  const c = await put(app, 'a', { value: { n: 2 } })
  t.not(c.etag, a.etag)
  t.equal((await read(app, 'a')).headers.etag, `"${c.etag}"`)
})

t.test('a matching If-None-Match gets 304 with the ETag and no body', async (t) => {
  const app = await build(t)
  const { etag } = await put(app, 'k', { value: 'v' })
  const forms: Array<[string, string]> = [
    ['quoted', `"${etag}"`],
    ['weak', `W/"${etag}"`],
    ['a list', `"nope", "${etag}"`],
    ['a list with a weak member and no spaces', `"nope",W/"${etag}"`],
    ['bare', etag],
    ['*', '*'],
  ]
  for (const [name, header] of forms) {
    const res = await read(app, 'k', header)
    t.equal(res.statusCode, 304, name)
    t.equal(res.headers.etag, `"${etag}"`, `${name}: ETag still sent`)
    t.equal(res.body, '', `${name}: no body`)
  }
})

t.test('a non-matching If-None-Match gets 200 with the entry', async (t) => {
  const app = await build(t)
  const old = await put(app, 'k', { value: 'v1' })
  const now = await put(app, 'k', { value: 'v2' })
  for (const header of [`"${old.etag}"`, `W/"${old.etag}"`, '"a", "b"', `"${now.etag}x"`, '']) {
    const res = await read(app, 'k', header)
    t.equal(res.statusCode, 200, `If-None-Match: ${header}`)
    t.equal(res.json().value, 'v2')
    t.equal(res.headers.etag, `"${now.etag}"`)
  }
})

t.test('If-None-Match on a missing key is still a 404 with a lease', async (t) => {
  const app = await build(t)
  const res = await read(app, 'missing', '*')
  t.equal(res.statusCode, 404)
  t.equal(res.json().error, 'not_found')
  t.type(res.json().lease, 'string')
})

t.test('a stale entry read with allowStale is never a 304: the caller learns it is stale', async (t) => {
  const app = await build(t)
  const { etag } = await put(app, 'k', { value: 'v', userId: 'u' })
  t.equal((await read(app, 'k', `"${etag}"`, '?allowStale=true')).statusCode, 304, 'fresh: 304')
  await call(app, { method: 'DELETE', url: '/v1/users/u/entries?mode=stale' })
  t.equal((await read(app, 'k', `"${etag}"`)).statusCode, 404, 'without allowStale a stale entry is a miss')
  // The caller's copy (same value, same etag) was fresh; the entry now is not.
  const res = await read(app, 'k', `"${etag}"`, '?allowStale=true')
  t.equal(res.statusCode, 200)
  t.equal(res.json().stale, true)
  t.equal(res.headers.etag, `"${etag}"`, 'the etag is still the value\'s')
})
