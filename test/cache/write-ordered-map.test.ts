import fc from 'fast-check'
import t from 'tap'
import { WriteOrderedMap } from '../../src/cache/write-ordered-map.js'

// A model: a plain array of [key, value] in the order last set, with deletes removing the pair.
const key = fc.integer({ min: 0, max: 30 })
const op = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('set' as const), key, value: fc.integer() }), weight: 5 },
  { arbitrary: fc.record({ op: fc.constant('delete' as const), key }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('shift' as const) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('clear' as const) }), weight: 1 },
)

t.test('after any sets, deletes, shifts and clears, it answers as a map kept in the order its keys were last set', async (t) => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 3000 }), (ops) => {
      const map = new WriteOrderedMap<number, number>()
      let model: Array<[number, number]> = []
      for (const o of ops) {
        if (o.op === 'set') {
          model = model.filter(([k]) => k !== o.key)
          model.push([o.key, o.value])
          map.set(o.key, o.value)
        } else if (o.op === 'delete') {
          const had = model.some(([k]) => k === o.key)
          model = model.filter(([k]) => k !== o.key)
          if (map.delete(o.key) !== had) throw new Error(`delete(${o.key}) answered wrong`)
        } else if (o.op === 'shift') {
          const expected = model.shift()
          if (JSON.stringify(map.shift()) !== JSON.stringify(expected)) throw new Error('shift gave another pair')
        } else {
          model = []
          map.clear()
        }
        if (map.size !== model.length) throw new Error(`size ${map.size}, model ${model.length}`)
        if (JSON.stringify(map.oldest()) !== JSON.stringify(model[0])) throw new Error('oldest is not the model\'s')
      }
      for (const [k, v] of model) if (map.get(k) !== v) throw new Error(`get(${k})`)
    }),
    { numRuns: 200 },
  )
  t.pass('200 random sequences of up to 3000 steps')
})

t.test('a long run of sets and shifts at the bound keeps the same pairs as the model, each shift the oldest', async (t) => {
  // Past the queue's compaction points many times over: 100 000 sets on a map held at 1000.
  const map = new WriteOrderedMap<string, number>()
  for (let i = 0; i < 100_000; i++) {
    map.set(`k${i % 1500}`, i)
    if (map.size > 1000) {
      const [k, v] = map.shift()!
      // Keys are set in turn, so the oldest is always the one set 1000 sets ago.
      if (v !== i - 1000 || k !== `k${(i - 1000) % 1500}`) throw new Error(`shift gave ${k}=${v} at ${i}`)
    }
  }
  t.equal(map.size, 1000)
  t.same(map.oldest(), [`k${99_000 % 1500}`, 99_000], 'the oldest left is the one set 1000 sets before the end')
})

t.test('shiftWhile drops the oldest keys until one fails the test, and none after it', async (t) => {
  const map = new WriteOrderedMap<string, number>()
  for (const [k, v] of [['a', 1], ['b', 2], ['c', 9], ['d', 1]] as const) map.set(k, v)
  map.set('a', 3) // now the newest
  map.shiftWhile((v) => v < 5)
  t.same([map.get('a'), map.get('b'), map.get('c'), map.get('d')], [3, undefined, 9, 1], 'b went; c stopped it; d and a are newer')
  t.same(map.oldest(), ['c', 9])
})
