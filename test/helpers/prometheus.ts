// A small parser for the Prometheus text format, enough for the metrics tests.

export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

export interface Scrape {
  /** Metric family name -> type, from the `# TYPE` lines. */
  types: Map<string, string>
  samples: Sample[]
  /** Every name a query may use: families plus `_bucket`/`_count`/`_sum` of histograms. */
  queryable: Set<string>
}

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g

export function parseScrape(text: string): Scrape {
  const types = new Map<string, string>()
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ')
      types.set(name!, type!)
      continue
    }
    if (line.startsWith('#')) continue
    const m = SAMPLE.exec(line)
    if (!m) throw new Error(`not a sample line: ${line}`)
    const labels: Record<string, string> = {}
    for (const [, k, v] of (m[2] ?? '').matchAll(LABEL)) labels[k!] = v!.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c))
    samples.push({ name: m[1]!, labels, value: Number(m[3]) })
  }
  const queryable = new Set<string>()
  for (const [name, type] of types) {
    queryable.add(name)
    if (type === 'histogram' || type === 'summary') for (const s of ['_bucket', '_count', '_sum']) queryable.add(name + s)
  }
  return { types, samples, queryable }
}

/** The value of the one sample with this name and these labels (undefined if none). */
export function valueOf(scrape: Scrape, name: string, labels: Record<string, string> = {}): number | undefined {
  const found = scrape.samples.filter(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  )
  if (found.length > 1) throw new Error(`${found.length} samples of ${name} match ${JSON.stringify(labels)}`)
  return found[0]?.value
}

/** The metrics DESIGN.md section 8 names. */
export const DESIGN_METRICS = [
  'cachewarden_cache_hits_total',
  'cachewarden_cache_misses_total',
  'cachewarden_cache_sets_total',
  'cachewarden_cache_evictions_total',
  'cachewarden_cache_entries',
  'cachewarden_cache_bytes',
  'cachewarden_invalidations_total',
  'cachewarden_invalidated_entries_total',
  'cachewarden_invalidation_failures_total',
  'cachewarden_last_invalidation_timestamp_seconds',
  'cachewarden_lease_rejections_total',
  'cachewarden_http_request_duration_seconds',
  'cachewarden_origin_requests_total',
  'cachewarden_origin_request_duration_seconds',
  'cachewarden_refreshes_total',
  'cachewarden_bus_connected',
  'cachewarden_pg_listener_connected',
]
