/** Most keys in one chunk by default; a fuller one splits in two. */
const CHUNK = 512

/**
 * A set of strings in order (UTF-16 code units, as `<` compares them), so the keys starting
 * with a prefix are one run: found in O(log n) and read in order, whatever the set's size.
 *
 * Kept as sorted chunks of at most CHUNK keys, each wholly before the next: an add or delete
 * is two binary searches and a splice of at most CHUNK slots, and a key costs one array slot
 * (and a chunk emptied by deletes is dropped, so a chunk holds at least one key).
 */
export class SortedKeys {
  readonly #chunks: string[][] = []

  /** `chunk`: most keys in one chunk (tests pass a few, to split and merge often). */
  constructor(readonly chunk = CHUNK) {}

  /** Adds `key`; false if it was there. */
  add(key: string): boolean {
    const chunks = this.#chunks
    if (chunks.length === 0) {
      chunks.push([key])
      return true
    }
    // The first chunk whose last key is at or after `key`, or the last chunk.
    const c = Math.min(this.#chunkAt(key), chunks.length - 1)
    const chunk = chunks[c]!
    const i = lowerBound(chunk, key)
    if (chunk[i] === key) return false
    chunk.splice(i, 0, key)
    if (chunk.length > this.chunk) chunks.splice(c + 1, 0, chunk.splice(this.chunk >> 1))
    return true
  }

  /** Deletes `key`; false if it was not there. */
  delete(key: string): boolean {
    const c = this.#chunkAt(key)
    const chunk = this.#chunks[c]
    if (chunk === undefined) return false
    const i = lowerBound(chunk, key)
    if (chunk[i] !== key) return false
    chunk.splice(i, 1)
    if (chunk.length === 0) this.#chunks.splice(c, 1)
    return true
  }

  clear(): void {
    this.#chunks.length = 0
  }

  /**
   * Up to `limit` keys in order from `from` on (past it when `after`), copied: the set may
   * change while the caller works through them, and it goes on from the last one it got.
   */
  take(from: string, after: boolean, limit: number): string[] {
    const out: string[] = []
    const chunks = this.#chunks
    let c = this.#chunkAt(from)
    if (c >= chunks.length) return out
    let i = lowerBound(chunks[c]!, from)
    if (after && chunks[c]![i] === from) i++
    for (; c < chunks.length && out.length < limit; c++, i = 0) {
      const chunk = chunks[c]!
      const end = Math.min(chunk.length, i + limit - out.length)
      for (; i < end; i++) out.push(chunk[i]!)
    }
    return out
  }

  /** Every key in order, for tests. */
  *[Symbol.iterator](): IterableIterator<string> {
    for (const chunk of this.#chunks) yield* chunk
  }

  /** The first chunk whose last key is at or after `key` (the chunk count if none). */
  #chunkAt(key: string): number {
    const chunks = this.#chunks
    let lo = 0
    let hi = chunks.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      const chunk = chunks[mid]!
      if (chunk[chunk.length - 1]! < key) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}

/** The first index in sorted `keys` whose key is at or after `key`. */
function lowerBound(keys: readonly string[], key: string): number {
  let lo = 0
  let hi = keys.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (keys[mid]! < key) lo = mid + 1
    else hi = mid
  }
  return lo
}

/** Every key of `keys` starting with `prefix`, in runs of `batch`: the set may change between them. */
export function* prefixRuns(keys: SortedKeys, prefix: string, batch: number): Generator<string[]> {
  let from = prefix
  let after = false
  for (;;) {
    const run = keys.take(from, after, batch)
    let end = run.length
    while (end > 0 && !run[end - 1]!.startsWith(prefix)) end--
    if (end > 0) yield end === run.length ? run : run.slice(0, end)
    if (end < batch) return
    from = run[end - 1]!
    after = true
  }
}

/**
 * A test for "starts with one of `prefixes`" that costs one binary search however many
 * prefixes there are (a scan of every key against 1000 prefixes was 1000 `startsWith` each).
 * A prefix that starts with another is dropped first, as that one covers it; of what is
 * left, only the greatest prefix at or before a key can start it, since every string between
 * a prefix and a key starting with it starts with that prefix too.
 */
export function prefixMatcher(prefixes: readonly string[]): (key: string) => boolean {
  const sorted = [...new Set(prefixes)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
  const kept: string[] = []
  for (const prefix of sorted) {
    // In order, a prefix's own extensions come right after it (before any other string).
    if (kept.length === 0 || !prefix.startsWith(kept[kept.length - 1]!)) kept.push(prefix)
  }
  if (kept.length === 1) {
    const only = kept[0]!
    return (key) => key.startsWith(only)
  }
  return (key) => {
    // The number of kept prefixes at or before `key`, minus one: the greatest of them.
    let lo = 0
    let hi = kept.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (kept[mid]! <= key) lo = mid + 1
      else hi = mid
    }
    return lo > 0 && key.startsWith(kept[lo - 1]!)
  }
}

/**
 * The longest start all `strings` share, cut before a lone high surrogate, so it is whole
 * characters (and, in UTF-8, a byte prefix of each of them).
 */
export function sharedStart(strings: readonly string[]): string {
  if (strings.length === 0) return ''
  let end = strings[0]!.length
  for (const s of strings) {
    end = Math.min(end, s.length)
    for (let i = 0; i < end; i++) {
      if (s.charCodeAt(i) !== strings[0]!.charCodeAt(i)) {
        end = i
        break
      }
    }
  }
  const last = strings[0]!.charCodeAt(end - 1)
  return strings[0]!.slice(0, last >= 0xd800 && last <= 0xdbff ? end - 1 : end)
}
