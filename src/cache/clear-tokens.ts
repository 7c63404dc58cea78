import { hash, randomBytes } from 'node:crypto'
import type { SharedRecords } from '../stores/store.js'

export const CLEAR_TOKEN_TTL_MS = 60_000
/** Most outstanding tokens kept in process; beyond it the oldest is forgotten (and so refused). */
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
 * how close a guess came (as for API keys). In cluster mode they live in the store's shared
 * records, so a token issued by one instance is redeemed on any other (a load balancer may
 * send the two steps to different instances), still exactly once.
 */
export class ClearTokens {
  readonly #pending = new Map<string, Pending>()
  readonly #records: SharedRecords | undefined
  readonly #now: () => number
  readonly #ttlMs: number
  readonly #max: number

  constructor(options: { now?: () => number; ttlMs?: number; max?: number; records?: SharedRecords } = {}) {
    this.#now = options.now ?? Date.now
    this.#ttlMs = options.ttlMs ?? CLEAR_TOKEN_TTL_MS
    this.#max = options.max ?? MAX_CLEAR_TOKENS
    this.#records = options.records
  }

  /** Issues a token for `owner` (an API key name). */
  async issue(owner: string, reason: string): Promise<{ token: string; expiresAt: number }> {
    const now = this.#now()
    const token = PREFIX + randomBytes(32).toString('base64url')
    const expiresAt = now + this.#ttlMs
    const pending: Pending = { owner, reason, expiresAt }
    if (this.#records !== undefined) {
      // Kept as long again past its expiry, so a late redeem is told "expired", not "unknown".
      await this.#records.putRecord(recordName(sha256(token)), JSON.stringify(pending), 2 * this.#ttlMs)
    } else {
      this.#prune(now)
      this.#pending.set(sha256(token), pending)
    }
    return { token, expiresAt }
  }

  /**
   * Redeems a token for `caller`. A token is consumed when its owner presents it, valid or
   * expired; another key presenting it leaves it alone (it is useless to them anyway).
   */
  async redeem(token: unknown, caller: string): Promise<RedeemResult> {
    if (typeof token !== 'string' || token === '') return { ok: false, why: 'missing' }
    if (token.length > 256) return { ok: false, why: 'unknown' }
    const id = sha256(token)
    const found = await this.#find(id)
    if (found === undefined) return { ok: false, why: 'unknown' }
    const { pending, consume } = found
    if (pending.owner !== caller) return { ok: false, why: 'foreign' }
    // Two redeems of one token at once (on one instance or two): only one consumes it.
    if (!(await consume())) return { ok: false, why: 'unknown' }
    if (pending.expiresAt <= this.#now()) return { ok: false, why: 'expired', reason: pending.reason }
    return { ok: true, reason: pending.reason }
  }

  async #find(id: string): Promise<{ pending: Pending; consume: () => Promise<boolean> } | undefined> {
    if (this.#records === undefined) {
      const pending = this.#pending.get(id)
      return pending && { pending, consume: async () => this.#pending.delete(id) }
    }
    const records = this.#records
    const raw = await records.getRecord(recordName(id))
    return raw === undefined ? undefined : { pending: JSON.parse(raw) as Pending, consume: () => records.swapRecord(recordName(id), raw, undefined, 0) }
  }

  #prune(now: number): void {
    for (const [id, p] of this.#pending) if (p.expiresAt <= now) this.#pending.delete(id)
    // Maps iterate in insertion order: the first is the oldest.
    while (this.#pending.size >= this.#max) this.#pending.delete(this.#pending.keys().next().value!)
  }
}

const sha256 = (text: string) => hash('sha256', text, 'base64')
const recordName = (id: string) => `clear-token:${id}`
