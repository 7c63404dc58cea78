import type { Registry } from 'prom-client'

type Labels = Record<string, string | number>

/** One label set's buckets: `counts[i]` observations fell in bucket i (the last is +Inf). */
export class LatencyChild {
  readonly counts: Float64Array
  sum = 0
  count = 0

  constructor(
    readonly labels: Labels,
    readonly bounds: readonly number[],
  ) {
    this.counts = new Float64Array(bounds.length + 1)
  }

  reset(): void {
    this.counts.fill(0)
    this.sum = 0
    this.count = 0
  }

  observe(seconds: number): void {
    const bounds = this.bounds
    let i = 0
    while (i < bounds.length && seconds > bounds[i]!) i++
    this.counts[i]!++
    this.sum += seconds
    this.count++
  }
}

/**
 * The per-request latency histogram, exposed like a prom-client Histogram (same lines, same
 * label order) but cheaper to observe: a label set's child is made once, and an observe is a
 * bucket search and three adds, where prom-client validates and hashes the labels on every
 * observe. The request path pays this once per request, so it is worth the difference.
 */
export class LatencyHistogram {
  readonly type = 'histogram'
  readonly aggregator = 'sum'
  readonly #children = new Map<string, LatencyChild>()

  constructor(
    readonly name: string,
    readonly help: string,
    readonly bounds: readonly number[],
    registry: Registry,
  ) {
    // A Registry takes any object with a name and get(); it formats the values it returns.
    registry.registerMetric(this as never)
  }

  /** The child for a label set, created on first use (label values must be bounded). */
  child(labels: Labels): LatencyChild {
    const id = JSON.stringify(labels)
    let child = this.#children.get(id)
    if (child === undefined) {
      child = new LatencyChild(labels, this.bounds)
      this.#children.set(id, child)
    }
    return child
  }

  /** Zeroes every child in place: the route hooks keep their children, so none is dropped. */
  reset(): void {
    for (const child of this.#children.values()) child.reset()
  }

  /** What the Registry formats, shaped as prom-client's Histogram shapes it: cumulative `_bucket` lines (`le` first), `_sum`, `_count`. */
  async getForPromString() {
    const values: { labels: Labels; sharedLabels?: Labels; value: number; metricName: string }[] = []
    for (const child of this.#children.values()) {
      let cumulative = 0
      for (let i = 0; i <= this.bounds.length; i++) {
        cumulative += child.counts[i]!
        const le = i < this.bounds.length ? this.bounds[i]! : '+Inf'
        values.push({ labels: { le }, sharedLabels: child.labels, value: cumulative, metricName: `${this.name}_bucket` })
      }
      values.push({ labels: {}, sharedLabels: child.labels, value: child.sum, metricName: `${this.name}_sum` })
      values.push({ labels: {}, sharedLabels: child.labels, value: child.count, metricName: `${this.name}_count` })
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator }
  }

  /** The same values with each line's labels in one object (Registry.getMetricsAsJSON). */
  async get() {
    const data = await this.getForPromString()
    return { ...data, values: data.values.map(({ labels, sharedLabels, ...rest }) => ({ ...rest, labels: { ...sharedLabels, ...labels } })) }
  }
}
