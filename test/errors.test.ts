import t from 'tap'
import { CacheError, ERROR_CODES } from '../src/errors.js'

t.test('every error code is unique and has a 4xx or 5xx status', async (t) => {
  const codes = Object.keys(ERROR_CODES)
  t.equal(new Set(codes).size, codes.length)
  for (const [code, status] of Object.entries(ERROR_CODES)) {
    t.ok(status >= 400 && status < 600, `${code} has status ${status}`)
  }
})

t.test('a CacheError carries its code, status and extra fields', async (t) => {
  const error = new CacheError('not_found', 'gone', { lease: 'x' })
  t.equal(error.code, 'not_found')
  t.equal(error.statusCode, 404)
  t.same(error.extra, { lease: 'x' })
})
