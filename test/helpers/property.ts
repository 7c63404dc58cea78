import type { Parameters } from 'fast-check'

/**
 * fast-check's run options for a property test: `numRuns` sequences, or FC_RUNS of them (a
 * longer hunt: `FC_RUNS=1000 npx tap -t 0 <file>`, past tap's 180 s limit); FC_SEED and FC_PATH
 * replay the failure a run reported (the same sequence: a step whose outcome hangs on timing,
 * a race, may then pass).
 */
export function runs(numRuns: number): Parameters<unknown> & { numRuns: number } {
  const seed = process.env.FC_SEED
  return {
    numRuns: Number(process.env.FC_RUNS) || numRuns,
    // Under CI, the first failure as found: shrinking a sequence of Redis round trips can run
    // past tap's time limit, and a timeout shows no counterexample.
    endOnFailure: process.env.CI === 'true',
    ...(seed ? { seed: Number(seed), path: process.env.FC_PATH } : {}),
  }
}

/** Waits `n` turns of the event loop (none if n <= 0), each letting I/O in: how far apart a race's two sides start. */
export async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve))
}
