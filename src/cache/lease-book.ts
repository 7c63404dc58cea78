import { randomBytes } from 'node:crypto'
import type { LeaseStamp, Selector } from './types.js'
import { WriteOrderedMap } from './write-ordered-map.js'

export const DEFAULT_MAX_LEASE_SCOPES = 100_000
export const DEFAULT_MAX_LEASE_PREFIXES = 1_000

/**
 * Invalidation sequence numbers per scope, for the lease check (DESIGN.md section 4).
 *
 * Every accepted invalidation takes the next sequence number and stamps it on each scope
 * it names (a key, a user, a tag, a prefix). A lease carries the sequence current when it
 * was issued; a write with it is refused if any scope the write touches was stamped later.
 * The maps are bounded: forgetting a scope raises `floor`, and a lease older than the
 * floor is refused, since we can no longer prove nothing voided it.
 */
export class LeaseBook {
  /** Changes on every start, so leases from a previous process are refused. */
  readonly epoch = randomBytes(6).toString('base64url')
  #seq = 0
  #floor = 0
  #clearSeq = 0
  /** Sequences of user and tag runs still going (see `beginRun`). */
  readonly #runs: number[] = []
  /** The newest stamp of each scope, oldest-stamped first. */
  readonly #scopes = new WriteOrderedMap<string, number>()
  // Appended in sequence order, so the check can walk back from the newest.
  readonly #prefixes: Array<{ prefix: string; seq: number }> = []
  readonly #maxScopes: number
  readonly #maxPrefixes: number

  constructor(maxScopes = DEFAULT_MAX_LEASE_SCOPES, maxPrefixes = DEFAULT_MAX_LEASE_PREFIXES) {
    this.#maxScopes = maxScopes
    this.#maxPrefixes = maxPrefixes
  }

  stamp(): LeaseStamp {
    return { epoch: this.epoch, seq: this.#seq }
  }

  /** Stamps every scope of the selector with a new sequence number and returns it. */
  record(selector: Selector): number {
    const seq = ++this.#seq
    for (const key of selector.keys ?? []) this.#stampScope(`k\u0000${key}`, seq)
    for (const user of selector.userIds ?? []) this.#stampScope(`u\u0000${user}`, seq)
    for (const tag of selector.tags ?? []) this.#stampScope(`t\u0000${tag}`, seq)
    for (const prefix of selector.prefixes ?? []) {
      this.#prefixes.push({ prefix, seq })
      if (this.#prefixes.length > this.#maxPrefixes) {
        const dropped = this.#prefixes.shift()!
        if (dropped.seq > this.#floor) this.#floor = dropped.seq
      }
    }
    return seq
  }

  /**
   * Whether the keys an invalidation reaches through a user or tag index get their own stamps
   * (`touch`), so a lease on one of them is refused even when its write names neither (DESIGN.md
   * section 4: "any invalidation touching the key"). More keys than the book holds would push
   * out every other stamp anyway: then the floor rises to `seq` instead, refusing every older
   * lease, and no key needs a stamp.
   */
  stampsKeys(count: number, seq: number): boolean {
    if (count <= this.#maxScopes) return true
    if (seq > this.#floor) this.#floor = seq
    return false
  }

  /** Stamps one key an invalidation reached through a user or tag index (see `stampsKeys`). */
  touch(key: string, seq: number): void {
    this.#stampScope(`k\u0000${key}`, seq)
  }

  /**
   * A user or tag run (the memory store's, which yields between slices) has started: until
   * `endRun`, every lease older than `seq` is refused, whatever it writes. The run stamps each
   * key only as it reaches it, and a key it has not reached yet may be one of its own.
   */
  beginRun(seq: number): void {
    this.#runs.push(seq)
  }

  endRun(seq: number): void {
    const i = this.#runs.indexOf(seq)
    if (i >= 0) this.#runs.splice(i, 1)
  }

  /** A clear voids every lease issued before it. */
  recordClear(): number {
    this.#clearSeq = ++this.#seq
    return this.#clearSeq
  }

  /** True when a write under `lease` to this key, user and tags may go ahead. */
  allows(lease: LeaseStamp, key: string, userId: string | undefined, tags: readonly string[] | undefined): boolean {
    if (lease.epoch !== this.epoch) return false
    // A sequence we never issued is forged or from another process.
    if (lease.seq > this.#seq || lease.seq < 0) return false
    if (lease.seq === this.#seq) return true
    if (lease.seq < this.#floor || lease.seq < this.#clearSeq) return false
    for (const run of this.#runs) if (lease.seq < run) return false
    if ((this.#scopes.get(`k\u0000${key}`) ?? 0) > lease.seq) return false
    if (userId !== undefined && (this.#scopes.get(`u\u0000${userId}`) ?? 0) > lease.seq) return false
    if (tags) for (const tag of tags) if ((this.#scopes.get(`t\u0000${tag}`) ?? 0) > lease.seq) return false
    for (let i = this.#prefixes.length - 1; i >= 0; i--) {
      const p = this.#prefixes[i]!
      if (p.seq <= lease.seq) break
      if (key.startsWith(p.prefix)) return false
    }
    return true
  }

  #stampScope(scope: string, seq: number): void {
    // Never lowered: a slow run reaching a key after a newer invalidation of it must not undo it.
    if ((this.#scopes.get(scope) ?? 0) >= seq) return
    this.#scopes.set(scope, seq)
    if (this.#scopes.size > this.#maxScopes) {
      const [, oldest] = this.#scopes.shift()!
      if (oldest > this.#floor) this.#floor = oldest
    }
  }
}
