import t from 'tap'
import { eachLimited } from '../../src/cache/each-limited.js'

const tick = () => new Promise((resolve) => setImmediate(resolve))

t.test('runs every item, never more than the limit at once, in order of start', async (t) => {
  const started: number[] = []
  let running = 0
  let most = 0
  await eachLimited([...Array(20).keys()], 4, async (i) => {
    started.push(i)
    most = Math.max(most, ++running)
    for (let j = 0; j < (i % 3) + 1; j++) await tick()
    running--
  })
  t.same(started, [...Array(20).keys()])
  t.equal(most, 4)
})

t.test('the first failure rejects, and no item starts after it', async (t) => {
  const started: number[] = []
  const run = eachLimited([...Array(50).keys()], 4, async (i) => {
    started.push(i)
    await tick()
    if (i === 5) throw new Error('boom')
  })
  await t.rejects(run, /boom/)
  await tick()
  await tick()
  t.ok(started.length < 10, `stopped after the failure (started ${started.length} of 50)`)
})

t.test('once the signal aborts no item starts, and it resolves when those started are done', async (t) => {
  const started: number[] = []
  const finished: number[] = []
  const stop = new AbortController()
  await eachLimited(
    [...Array(50).keys()],
    4,
    async (i) => {
      started.push(i)
      if (i === 5) stop.abort()
      await tick()
      finished.push(i)
    },
    stop.signal,
  )
  t.ok(started.length < 10, `stopped after the abort (started ${started.length} of 50)`)
  t.same([...finished].sort((a, b) => a - b), [...started].sort((a, b) => a - b), 'every item started has finished')
})
