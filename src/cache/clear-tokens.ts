import { hash, randomBytes } from 'node:crypto'

export const CLEAR_TOKEN_TTL_MS = 60_000
/** Most outstanding tokens kept; beyond it the oldest is forgotten (and so refused). */
export const MAX_CLEAR_TOKENS = 64
const PREFIX = 'cwclr_'

interface Pending {
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
 * could replay; tokens are looked up by digest, so the lookup's timing says nothing about
 * how close a guess came (as for API keys).
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
    const expiresAt = now + this.#ttlMs
    this.#pending.set(sha256(token), { owner, reason, expiresAt })
    return { token, expiresAt }
  }

  /**
   * Redeems a token for `caller`. A token is consumed when its owner presents it, valid or
   * expired; another key presenting it leaves it alone (it is useless to them anyway).
   */
  redeem(token: unknown, caller: string): RedeemResult {
    if (typeof token !== 'string' || token === '') return { ok: false, why: 'missing' }
    if (token.length > 256) return { ok: false, why: 'unknown' }
    const id = sha256(token)
    const pending = this.#pending.get(id)
    if (pending === undefined) return { ok: false, why: 'unknown' }
    if (pending.owner !== caller) return { ok: false, why: 'foreign' }
    this.#pending.delete(id)
    if (pending.expiresAt <= this.#now()) return { ok: false, why: 'expired', reason: pending.reason }
    return { ok: true, reason: pending.reason }
  }

  #prune(now: number): void {
    for (const [id, p] of this.#pending) if (p.expiresAt <= now) this.#pending.delete(id)
    // Maps iterate in insertion order: the first is the oldest.
    while (this.#pending.size >= this.#max) this.#pending.delete(this.#pending.keys().next().value!)
  }
}

const sha256 = (text: string) => hash('sha256', text, 'base64')
