// Key patterns and templates with named parts: `dashboard:{userId}`,
// `http://svc/users/{userId}/dashboard`, `analytics:{userId}`.

const PART = /\{([A-Za-z_][A-Za-z0-9_]*)\}/g

/** Named parts of a template and the literal text around them (`literals.length === names.length + 1`). */
export interface Template {
  readonly source: string
  readonly names: readonly string[]
  readonly literals: readonly string[]
}

/** Parses `{name}` parts; throws an Error (for the config check to name the field) on stray braces. */
export function parseTemplate(source: string): Template {
  const names: string[] = []
  const literals: string[] = []
  let last = 0
  for (const m of source.matchAll(PART)) {
    literals.push(source.slice(last, m.index))
    names.push(m[1]!)
    last = m.index + m[0].length
  }
  literals.push(source.slice(last))
  if (literals.some((l) => l.includes('{') || l.includes('}'))) {
    throw new Error('has a brace that is not part of a {name} placeholder')
  }
  return { source, names, literals }
}

/** Fills a template; `encode` is applied to every part (URL templates pass encodeURIComponent). */
export function render(t: Template, params: Readonly<Record<string, string>>, encode?: (s: string) => string): string {
  let out = t.literals[0]!
  for (let i = 0; i < t.names.length; i++) {
    const value = params[t.names[i]!] ?? ''
    out += (encode ? encode(value) : value) + t.literals[i + 1]!
  }
  return out
}

/**
 * A key pattern: literal text and named parts, each part matching at least one character.
 * When a key could split several ways (`a:{x}:{y}` against `a:1:2:3`), earlier parts take
 * the shortest match (x = 1, y = 2:3).
 */
export class KeyPattern {
  readonly template: Template
  readonly #regex: RegExp

  constructor(source: string) {
    this.template = parseTemplate(source)
    const { names, literals } = this.template
    if (new Set(names).size !== names.length) throw new Error('names a part twice')
    for (let i = 1; i < names.length; i++) {
      if (literals[i] === '') throw new Error(`has two parts with nothing between them ({${names[i - 1]}}{${names[i]}})`)
    }
    let re = '^' + escape(literals[0]!)
    for (let i = 0; i < names.length; i++) {
      re += (i === names.length - 1 ? '(.+)' : '(.+?)') + escape(literals[i + 1]!)
    }
    this.#regex = new RegExp(re + '$', 'su')
  }

  get names(): readonly string[] {
    return this.template.names
  }

  /**
   * The named parts of `key`, or undefined when the key does not match. A part that is `.`
   * or `..` does not match: URL-encoding leaves dots alone, so as a path segment of an
   * origin URL it would move the request to another path on the origin (`dashboard:..`
   * would fetch `/dashboard`, not `/users/../dashboard`).
   */
  match(key: string): Record<string, string> | undefined {
    const m = this.#regex.exec(key)
    if (m === null) return undefined
    const params: Record<string, string> = {}
    for (let i = 0; i < this.template.names.length; i++) {
      const part = m[i + 1]!
      if (part === '.' || part === '..') return undefined
      params[this.template.names[i]!] = part
    }
    return params
  }

  /** The key for these parts. */
  key(params: Readonly<Record<string, string>>): string {
    return render(this.template, params)
  }
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')
