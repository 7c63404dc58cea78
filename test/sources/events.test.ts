import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { CacheService } from '../../src/cache/cache-service.js'
import { DEFAULT_LIMITS } from '../../src/cache/limits.js'
import { ConfigError, loadConfig } from '../../src/config.js'
import { CacheError } from '../../src/errors.js'
import { EventProcessor, EventRules, compileRules } from '../../src/sources/events.js'
import { MemoryStore } from '../../src/stores/memory-store.js'
import { FakeClock } from '../helpers/build.js'

const limits = DEFAULT_LIMITS

/** The ConfigError message compileRules throws for these rules. */
function configError(rules: unknown): string {
  try {
    compileRules(rules, limits)
  } catch (error) {
    if (error instanceof ConfigError) {
      if (error.variable !== 'CONFIG_FILE') throw new Error(`wrong variable ${error.variable}`)
      return error.message
    }
    throw error
  }
  throw new Error('no error thrown')
}

const persona = { event: 'persona.updated', invalidate: { userIds: ['{{data.userId}}'], tags: ['analytics:{{data.userId}}'] } }

t.test('bad rules are refused with a message naming the rule and the field', async (t) => {
  t.match(configError({}), /^CONFIG_FILE: rules: must be an array/)
  t.match(configError([persona, 'x']), /^CONFIG_FILE: rules\[1\]: must be an object/)
  t.match(configError([{ invalidate: { keys: ['a'] } }]), /rules\[0\]\.event: must be a non-empty event type/)
  t.match(configError([{ event: 'e', invalidate: { keys: ['a'] }, mode: 'burn' }]), /rules\[0\]\.mode: must be "delete" or "stale"/)
  t.match(configError([{ event: 'e', invalidates: { keys: ['a'] } }]), /rules\[0\]\.invalidates: is not a rule field/)
  t.match(configError([{ event: 'e' }]), /rules\[0\]\.invalidate: must be an object/)
  t.match(configError([{ event: 'e', invalidate: { users: ['a'] } }]), /rules\[0\]\.invalidate\.users: is not a selector list/)
  t.match(configError([{ event: 'e', invalidate: { keys: 'a' } }]), /rules\[0\]\.invalidate\.keys: must be an array/)
  t.match(configError([{ event: 'e', invalidate: { keys: [] } }]), /rules\[0\]\.invalidate: needs at least one non-empty list/)
  t.match(
    configError([persona, persona, { event: 'e', invalidate: { userIds: ['{{data.userId}}', 7] } }]),
    /^CONFIG_FILE: rules\[2\]\.invalidate\.userIds\[1\]: must be a non-empty string/,
  )
  t.match(configError([{ event: 'e', invalidate: { tags: ['x:{{userId}}'] } }]), /rules\[0\]\.invalidate\.tags\[0\]: .*malformed placeholder/)
  t.match(configError([{ event: 'e', invalidate: { tags: ['x:{{data.}}'] } }]), /rules\[0\]\.invalidate\.tags\[0\]: .*malformed placeholder/)
  t.match(configError([{ event: 'e', invalidate: { tags: ['x:{{data.a}'] } }]), /malformed placeholder/)
  t.match(configError([{ event: 'e', invalidate: { prefixes: ['x'.repeat(600)] } }]), /rules\[0\]\.invalidate: prefixes\[0\] is longer than 512 bytes/)
  t.equal(compileRules(undefined, limits).length, 0)
  t.equal(compileRules([persona, { ...persona, description: 'docs', mode: 'stale' }], limits).length, 2)
})

t.test('loadConfig stops on a bad rule in CONFIG_FILE, naming it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'cw-rules-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'config.json')
  writeFileSync(file, JSON.stringify({ rules: [persona, { event: 'x', invalidate: { userIds: [''] } }] }))
  t.throws(() => loadConfig({ CONFIG_FILE: file }), {
    name: 'ConfigError',
    variable: 'CONFIG_FILE',
    message: 'CONFIG_FILE: rules[1].invalidate.userIds[0]: must be a non-empty string',
  })
  writeFileSync(file, JSON.stringify({ rules: [persona] }))
  t.same(loadConfig({ CONFIG_FILE: file }).configFile.rules, [persona])
})

t.test('templates fill from nested fields, numbers and booleans; a bad field names itself', async (t) => {
  const rules = new EventRules(
    [{ event: 'order.placed', invalidate: { keys: ['order:{{data.order.id}}:{{ data.order.paid }}'], userIds: ['{{data.user.id}}'] } }],
    limits,
  )
  const [resolved] = rules.resolve({ type: 'order.placed', data: { order: { id: 7, paid: true }, user: { id: 'u1' } } }, limits)
  t.same(resolved!.selector, { keys: ['order:7:true'], userIds: ['u1'] })

  const bad = (data: Record<string, unknown>) => {
    try {
      rules.resolve({ type: 'order.placed', data }, limits)
    } catch (error) {
      t.ok(error instanceof CacheError && error.code === 'invalid_request')
      return (error as Error).message
    }
    return 'no error'
  }
  const ok = { order: { id: 7, paid: true }, user: { id: 'u1' } }
  t.match(bad({ ...ok, user: {} }), /^data\.user\.id is missing \(needed by rules\[0\]\.invalidate\.userIds\[0\]\)/)
  t.match(bad({ ...ok, user: null }), /data\.user\.id is missing/)
  t.match(bad({ ...ok, user: { id: null } }), /data\.user\.id is missing/)
  t.match(bad({ ...ok, user: { id: ['u1'] } }), /data\.user\.id must be a string, number or boolean/)
  t.match(bad({ ...ok, user: { id: { x: 1 } } }), /data\.user\.id must be a string, number or boolean/)
  t.match(bad({ ...ok, user: { id: '' } }), /data\.user\.id is empty/)
  t.match(bad({ ...ok, order: 'flat' }), /data\.order\.id is missing \(needed by rules\[0\]\.invalidate\.keys\[0\]\)/)
  // Inherited properties are not fields of the event.
  const proto = new EventRules([{ event: 'p', invalidate: { keys: ['{{data.constructor}}'] } }], limits)
  t.throws(() => proto.resolve({ type: 'p', data: {} }, limits), { message: /data\.constructor is missing/ })
  t.match(bad({ ...ok, user: { id: 'x'.repeat(200) } }), /rules\[0\]\.invalidate\.userIds\[0\] is longer than 128 bytes/)
  t.same(rules.resolve({ type: 'other', data: {} }, limits), [])
})

t.test('remembered event ids are bounded and expire after the window', async (t) => {
  const clock = new FakeClock()
  const cache = new CacheService({ store: new MemoryStore({ now: clock.now, sweepIntervalMs: 0 }), now: clock.now })
  t.teardown(() => cache.close())
  const rules = new EventRules([{ event: 'e', invalidate: { keys: ['k:{{data.n}}'] } }], limits)
  const processor = new EventProcessor(cache, rules, { maxRemembered: 3, windowMs: 1000 })
  for (let n = 0; n < 5; n++) await processor.apply({ id: `id${n}`, type: 'e', data: { n } })
  t.equal(processor.remembered, 3, 'bounded')
  t.equal((await processor.apply({ id: 'id0', type: 'e', data: { n: 0 } })).replayed, false, 'the oldest was forgotten first')
  t.equal((await processor.apply({ id: 'id4', type: 'e', data: { n: 4 } })).replayed, true)
  clock.advance(1000)
  t.equal((await processor.apply({ id: 'id4', type: 'e', data: { n: 4 } })).replayed, false, 'expired after the window')
  t.equal(cache.totals.invalidations, 7)
})

t.test('two concurrent deliveries of one event id apply it once', async (t) => {
  const cache = new CacheService({ store: new MemoryStore({ sweepIntervalMs: 0 }) })
  t.teardown(() => cache.close())
  const processor = new EventProcessor(cache, new EventRules([persona], limits))
  const event = { id: 'evt-1', type: 'persona.updated', data: { userId: '42' } }
  const [a, b] = await Promise.all([processor.apply(event), processor.apply(event)])
  t.same(a.response, b.response)
  t.same([a.replayed, b.replayed], [false, true])
  t.equal(cache.totals.invalidations, 1)
})
