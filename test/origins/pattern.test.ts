import t from 'tap'
import { KeyPattern, parseTemplate, render } from '../../src/origins/pattern.js'

t.test('a key pattern matches whole keys and extracts its named parts', async (t) => {
  const p = new KeyPattern('dashboard:{userId}')
  t.same(p.match('dashboard:42'), { userId: '42' })
  t.same(p.match('dashboard:a/b:c'), { userId: 'a/b:c' })
  t.equal(p.match('dashboard:'), undefined, 'a part has at least one character')
  t.equal(p.match('xdashboard:42'), undefined)
  t.equal(p.match('profile:42'), undefined)
  t.equal(p.key({ userId: '7' }), 'dashboard:7')
})

t.test('a part that is a dot segment (. or ..) does not match: it would move an origin URL', async (t) => {
  const p = new KeyPattern('dashboard:{userId}')
  t.equal(p.match('dashboard:.'), undefined)
  t.equal(p.match('dashboard:..'), undefined)
  t.same(p.match('dashboard:...'), { userId: '...' }, 'three dots are no dot segment')
  t.same(p.match('dashboard:../x'), { userId: '../x' }, 'the slash is encoded: one segment, not a dot segment')
  t.same(p.match('dashboard:%2e%2e'), { userId: '%2e%2e' }, 'its % is encoded too')
  t.equal(new KeyPattern('r:{a}:{b}').match('r:x:..'), undefined, 'any part')
})

t.test('regex characters in the literal text are literal', async (t) => {
  const p = new KeyPattern('a.b+(c)[{id}]?')
  t.same(p.match('a.b+(c)[9]?'), { id: '9' })
  t.equal(p.match('aXb+(c)[9]?'), undefined)
})

t.test('with several parts, earlier parts take the shortest match', async (t) => {
  const p = new KeyPattern('report:{userId}:{month}')
  t.same(p.match('report:1:2026-01'), { userId: '1', month: '2026-01' })
  t.same(p.match('report:1:2:3'), { userId: '1', month: '2:3' })
  t.equal(p.match('report:1'), undefined)
})

t.test('a pattern without parts matches exactly one key', async (t) => {
  const p = new KeyPattern('config:global')
  t.same(p.match('config:global'), {})
  t.equal(p.match('config:global2'), undefined)
})

t.test('render encodes every part when asked, never the literal text', async (t) => {
  const url = parseTemplate('http://svc/users/{userId}/x?q={userId}')
  t.equal(render(url, { userId: 'a/b c&d' }, encodeURIComponent), 'http://svc/users/a%2Fb%20c%26d/x?q=a%2Fb%20c%26d')
  t.equal(render(parseTemplate('analytics:{userId}'), { userId: 'a/b' }), 'analytics:a/b')
})
