import { createHash, randomBytes, timingSafeEqual } from 'node:crypto'

export const CLEAR_TOKEN_TTL_MS = 60_000
/** Most outstanding tokens kept; beyond it the oldest is forgotten (and so refused). */
export const MAX_CLEAR_TOKENS = 64
const PREFIX = 'cwclr_'

interface Pending {
  digest: Buffer
  owner: string
  reason: string
  expiresAt: number
}

export type RedeemResult =
  | { ok: true; reason: string }
  | { ok: false; why: 'missing' | 'unknown' | 'expired' | 'foreign'; reason?: string }

/**
 * Single-use tokens for the emergency clear, each bound to the key that asked for it and
 * valid for a minute. Only SHA-256 digests are kept, so the store holds nothing a reader
 * could replay, and digests are compared with `timingSafeEqual`.
 */
export class ClearTokens {
  readonly #pending = new Map<string, Pending>()
  readonly #now: () => number
  readonly #ttlMs: number
  readonly #max: number

  constructor(options: { now?: () => number; ttlMs?: number; max?: number } = {}) {
    this.#now = options.now ?? Date.now
    this.#ttlMs = options.ttlMs ?? CLEAR_TOKEN_TTL_MS
    this.#max = options.max ?? MAX_CLEAR_TOKENS
  }

  /** Issues a token for `owner` (an API key name). */
  issue(owner: string, reason: string): { token: string; expiresAt: number } {
    const now = this.#now()
    this.#prune(now)
    const token = PREFIX + randomBytes(32).toString('base64url')
    const digest = sha256(token)
    const expiresAt = now + this.#ttlMs
    this.#pending.set(digest.toString('base64'), { digest, owner, reason, expiresAt })
    return { token, expiresAt }
  }

  /**
   * Redeems a token for `caller`. A token is consumed when its owner presents it, valid or
   * expired; another key presenting it leaves it alone (it is useless to them anyway).
   */
  redeem(token: unknown, caller: string): RedeemResult {
    if (typeof token !== 'string' || token === '') return { ok: false, why: 'missing' }
    if (token.length > 256) return { ok: false, why: 'unknown' }
    const digest = sha256(token)
    const id = digest.toString('base64')
    const pending = this.#pending.get(id)
    if (pending === undefined || !timingSafeEqual(pending.digest, digest)) return { ok: false, why: 'unknown' }
    if (pending.owner !== caller) return { ok: false, why: 'foreign' }
    this.#pending.delete(id)
    if (pending.expiresAt <= this.#now()) return { ok: false, why: 'expired', reason: pending.reason }
    return { ok: true, reason: pending.reason }
  }

  /** Tokens outstanding (expired ones included until pruned). */
  get size(): number {
    return this.#pending.size
  }

  #prune(now: number): void {
    for (const [id, p] of this.#pending) if (p.expiresAt <= now) this.#pending.delete(id)
    // Maps iterate in insertion order: the first is the oldest.
    while (this.#pending.size >= this.#max) this.#pending.delete(this.#pending.keys().next().value!)
  }
}

const sha256 = (text: string) => createHash('sha256').update(text).digest()
