/**
 * A Map that knows which of its keys was set longest ago, and drops it in O(1) (amortized).
 *
 * A plain Map kept in that order (delete, then set again) would do, but for V8: a Map keeps
 * deleted slots until it rehashes, and `keys().next()` walks every one of them from the front
 * each time. A bounded map that drops its oldest key on every new one piles up such slots
 * between rehashes, and one drop cost up to 55 µs at 100 000 keys (an invalidation of 1000
 * keys then held the event loop for 50–150 ms). Here the order is a queue of the records
 * set, with records that a later set or a delete replaced skipped when they reach its head.
 */
export class WriteOrderedMap<K, V> {
  readonly #map = new Map<K, Entry<K, V>>()
  #queue: Array<Entry<K, V>> = []
  #head = 0

  get size(): number {
    return this.#map.size
  }

  get(key: K): V | undefined {
    return this.#map.get(key)?.value
  }

  /** Sets the value; the key is now the newest. */
  set(key: K, value: V): void {
    const entry = { key, value }
    this.#map.set(key, entry)
    this.#queue.push(entry)
    // Replaced and deleted records wait in the queue until they reach its head: past twice
    // what the map holds, they are swept out at once (O(queue), once per as many sets). The
    // records already passed go too once they are half the array.
    const waiting = this.#queue.length - this.#head
    if (waiting > 2 * this.#map.size + 1024 || (this.#head > 1024 && this.#head > waiting)) this.#compact()
  }

  delete(key: K): boolean {
    return this.#map.delete(key)
  }

  clear(): void {
    this.#map.clear()
    this.#queue = []
    this.#head = 0
  }

  /** The key set longest ago, and its value. */
  oldest(): [K, V] | undefined {
    const queue = this.#queue
    while (this.#head < queue.length) {
      const entry = queue[this.#head]!
      if (this.#map.get(entry.key) === entry) return [entry.key, entry.value]
      queue[this.#head++] = undefined! // let it go
    }
    return undefined
  }

  /** Deletes the oldest keys for as long as `drop` says so of their values. */
  shiftWhile(drop: (value: V) => boolean): void {
    for (let oldest = this.oldest(); oldest !== undefined && drop(oldest[1]); oldest = this.oldest()) this.#map.delete(oldest[0])
  }

  /** Deletes the key set longest ago and returns it with its value. */
  shift(): [K, V] | undefined {
    const oldest = this.oldest()
    if (oldest !== undefined) this.#map.delete(oldest[0])
    return oldest
  }

  #compact(): void {
    const live: Array<Entry<K, V>> = []
    for (let i = this.#head; i < this.#queue.length; i++) {
      const entry = this.#queue[i]!
      if (this.#map.get(entry.key) === entry) live.push(entry)
    }
    this.#queue = live
    this.#head = 0
  }
}

interface Entry<K, V> {
  readonly key: K
  readonly value: V
}
