/** A fixed-size ring of the most recent records, newest first on read. */
export class Ring<T> {
  readonly #items: T[] = []
  #next = 0
  readonly capacity: number

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new TypeError('capacity must be a positive integer')
    this.capacity = capacity
  }

  push(item: T): void {
    if (this.#items.length < this.capacity) this.#items.push(item)
    else this.#items[this.#next] = item
    this.#next = (this.#next + 1) % this.capacity
  }

  /** Up to `limit` items, newest first. */
  recent(limit = this.capacity): T[] {
    const out: T[] = []
    const n = this.#items.length
    for (let i = 1; i <= Math.min(limit, n); i++) out.push(this.#items[(this.#next - i + n) % n]!)
    return out
  }

  get size(): number {
    return this.#items.length
  }
}
