import fc from 'fast-check'
import t from 'tap'
import { prefixMatcher, prefixRuns, sharedStart, SortedKeys } from '../../src/stores/sorted-keys.js'

// Short keys over a small alphabet (with one astral character, two UTF-16 units), so that
// adds, deletes and prefixes collide often; chunks of a few keys, so that they split and
// empty often.
const key = fc.string({ unit: fc.constantFrom('a', 'b', 'c', ':', '/', 'é', '😀'), maxLength: 4 })
const op = fc.oneof(
  fc.record({ op: fc.constant('add' as const), key }),
  fc.record({ op: fc.constant('delete' as const), key }),
  fc.record({ op: fc.constant('clear' as const) }),
)

t.test('after any adds and deletes, the keys are the set\'s, in `<` order, and every prefix run is the brute-force filter', async (t) => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 200 }), fc.integer({ min: 2, max: 6 }), fc.array(key, { minLength: 1, maxLength: 4 }), fc.integer({ min: 1, max: 5 }), (ops, chunk, prefixes, batch) => {
      const keys = new SortedKeys(chunk)
      const model = new Set<string>()
      for (const o of ops) {
        if (o.op === 'clear') {
          keys.clear()
          model.clear()
        } else if (o.op === 'add') {
          if (keys.add(o.key) === model.has(o.key)) throw new Error(`add(${o.key}) answered wrong`)
          model.add(o.key)
        } else {
          if (keys.delete(o.key) !== model.has(o.key)) throw new Error(`delete(${o.key}) answered wrong`)
          model.delete(o.key)
        }
      }
      const expected = [...model].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
      t.same([...keys], expected)
      for (const prefix of prefixes) {
        const runs = [...prefixRuns(keys, prefix, batch)]
        if (runs.some((run) => run.length === 0 || run.length > batch)) throw new Error('a run is empty or over its batch')
        t.same(runs.flat(), expected.filter((k) => k.startsWith(prefix)), `prefix ${JSON.stringify(prefix)}`)
      }
    }),
    { numRuns: 300 },
  )
})

t.test('take goes on past the last key it gave, and from a key that is not in the set', async (t) => {
  const keys = new SortedKeys(2)
  for (const k of ['d', 'b', 'f', 'a', 'c', 'e']) keys.add(k)
  t.same(keys.take('a', false, 3), ['a', 'b', 'c'])
  t.same(keys.take('c', true, 3), ['d', 'e', 'f'])
  t.same(keys.take('bb', false, 2), ['c', 'd'], 'from between two keys')
  t.same(keys.take('bb', true, 2), ['c', 'd'], '`after` skips only the key itself')
  t.same(keys.take('g', false, 3), [], 'past the end')
})

t.test('a prefix run read while the set changes between batches: each key once, keys added ahead are reached', async (t) => {
  const keys = new SortedKeys(4)
  for (let i = 0; i < 100; i++) keys.add(`p:${String(i).padStart(3, '0')}`)
  keys.add('q')
  const seen: string[] = []
  for (const run of prefixRuns(keys, 'p:', 7)) {
    for (const k of run) {
      seen.push(k)
      keys.delete(k) // as an invalidation deletes what it reaches
    }
    // Writes landing between two batches: one behind the run, one ahead of it.
    keys.add(`${run[0]}-behind`)
    if (seen.length === 7) keys.add('p:zzz')
  }
  t.equal(new Set(seen).size, seen.length, 'no key twice')
  t.equal(seen.filter((k) => /^p:\d{3}$/.test(k)).length, 100, 'every key there at the start')
  t.ok(seen.includes('p:zzz'), 'a key added ahead of the run')
  t.notOk(seen.some((k) => k.endsWith('-behind')), 'none added behind it')
  t.same([...keys].filter((k) => !k.startsWith('p:')), ['q'], 'the key after the prefix is untouched')
})

t.test('prefixMatcher answers as testing every prefix would, for any prefixes, overlapping and repeated', async (t) => {
  fc.assert(
    fc.property(fc.array(key, { maxLength: 12 }), fc.array(key, { maxLength: 40 }), (prefixes, keys) => {
      const matches = prefixMatcher(prefixes)
      for (const k of keys) {
        const expected = prefixes.some((p) => k.startsWith(p))
        if (matches(k) !== expected) throw new Error(`${JSON.stringify(k)} against ${JSON.stringify(prefixes)}: expected ${expected}`)
      }
    }),
    { numRuns: 1000 },
  )
  const m = prefixMatcher(['user:1', 'user:10', 'user:2/', 'tag'])
  t.same(['user:1', 'user:105', 'user:2', 'user:2/x', 'tag:a', 'ta', 'u'].map(m), [true, true, false, true, true, false, false])
  t.equal(prefixMatcher([])('x'), false, 'no prefixes match nothing')
})

t.test('sharedStart is the longest start every string has, in whole characters', async (t) => {
  fc.assert(
    fc.property(fc.array(key, { minLength: 1, maxLength: 6 }), (strings) => {
      const start = sharedStart(strings)
      if (!strings.every((s) => s.startsWith(start))) throw new Error(`${JSON.stringify(start)} does not start all of ${JSON.stringify(strings)}`)
      const last = start.charCodeAt(start.length - 1)
      if (last >= 0xd800 && last <= 0xdbff) throw new Error(`${JSON.stringify(start)} ends in half a character`)
      // One more unit is not shared, unless it would be half a character.
      const next = strings[0]!.slice(0, start.length + 1)
      const nextLast = next.charCodeAt(next.length - 1)
      const longer = next.length > start.length && strings.every((s) => s.startsWith(next))
      if (longer && !(nextLast >= 0xd800 && nextLast <= 0xdbff)) throw new Error(`${JSON.stringify(next)} is shared too`)
    }),
    { numRuns: 1000 },
  )
  t.equal(sharedStart(['user:1:', 'user:2:', 'user:10']), 'user:')
  t.equal(sharedStart(['😀a', '😁b']), '', 'not the half of 😀 and 😁 they share')
  t.equal(sharedStart(['a😀', 'a😀b']), 'a😀')
})
