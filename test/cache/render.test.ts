import fc from 'fast-check'
import t from 'tap'
import { iso } from '../../src/cache/render.js'

t.test('iso() writes exactly what Date#toISOString writes', async (t) => {
  const edges = [0, 1, 999, 1000, 86_399_999, 86_400_000, 951_782_400_000, 4_107_542_399_999, 253_402_300_799_999, 253_402_300_800_000, -1, -86_400_001, 1.5, 8.64e15]
  for (const ms of edges) t.equal(iso(ms), new Date(ms).toISOString(), `at ${ms}`)
  fc.assert(
    fc.property(fc.integer({ min: -8.64e15, max: 8.64e15 }), (ms) => iso(ms) === new Date(ms).toISOString()),
    { numRuns: 20_000 },
  )
  // Around now, where every reply's expiry lies.
  const now = Date.now()
  fc.assert(fc.property(fc.integer({ min: 0, max: 400 * 86_400_000 }), (d) => iso(now + d) === new Date(now + d).toISOString()), { numRuns: 20_000 })
})
