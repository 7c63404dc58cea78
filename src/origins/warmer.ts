import type { CoreLogger } from '../cache/cache-service.js'
import { eachLimited } from '../cache/each-limited.js'
import { checkKey, checkUserId } from '../cache/limits.js'
import type { WarmSet } from './config.js'
import type { Origins } from './origins.js'

/** Origin loads a warm runs at once. */
export const WARM_CONCURRENCY = 5
/** A warm logs its progress every this many keys. */
const PROGRESS_EVERY = 100
/** Errors listed in a warm summary (the counts are always complete). */
const MAX_REPORTED_ERRORS = 100

export interface WarmSummary {
  requested: number
  loaded: number
  failed: number
  errors: Array<{ key: string; error: string }>
}

/** The keys a warm set names: its keys, then each userId through every origin whose pattern's only part is `{userId}`. */
export function expandWarmSet(origins: Origins, set: WarmSet): string[] {
  const keys = new Set(set.keys)
  const byUser = origins.list.filter((o) => o.pattern.names.length === 1 && o.pattern.names[0] === 'userId')
  for (const userId of set.userIds) for (const origin of byUser) keys.add(origin.pattern.key({ userId }))
  return [...keys]
}

/**
 * Loads every key of the set from its origin, WARM_CONCURRENCY at once, whether or not it
 * is cached (a warm is a refresh). Each load is a `refresh` event; a key no origin serves,
 * an invalid key, an origin without data, a failing origin or a load that invalidations
 * voided twice (not cached) counts as failed.
 */
export async function warm(
  origins: Origins,
  set: WarmSet,
  logger?: CoreLogger,
  /** Once aborted (shutdown, or the caller gone), no further key is loaded; the summary counts what was done. */
  signal?: AbortSignal,
  concurrency = WARM_CONCURRENCY,
): Promise<WarmSummary> {
  const keys = expandWarmSet(origins, set)
  const summary: WarmSummary = { requested: keys.length, loaded: 0, failed: 0, errors: [] }
  const started = performance.now()
  const fail = (key: string, error: string) => {
    summary.failed++
    if (summary.errors.length < MAX_REPORTED_ERRORS) summary.errors.push({ key, error })
  }
  logger?.info({ requested: keys.length }, 'warm started')
  let done = 0
  await eachLimited(keys, concurrency, async (key) => {
    try {
      checkKey(key, origins.cache.limits)
      const match = origins.match(key)
      if (match === undefined) fail(key, 'no origin serves this key')
      else {
        const outcome = await origins.refreshMatch(match)
        if (!outcome.found) fail(key, `origin "${match.origin.name}" has no data`)
        else if (!outcome.cached) fail(key, 'invalidations of the key landed during the load and its retry: not cached')
        else summary.loaded++
      }
    } catch (error) {
      fail(key, (error as Error).message)
    }
    if (++done % PROGRESS_EVERY === 0 && done < keys.length) {
      logger?.info({ done, requested: keys.length, loaded: summary.loaded, failed: summary.failed }, 'warm progress')
    }
  }, signal)
  if (signal?.aborted === true && done < keys.length) logger?.info({ done, requested: keys.length }, 'warm stopped before its end')
  logger?.info(
    { requested: summary.requested, loaded: summary.loaded, failed: summary.failed, durationMs: Math.round(performance.now() - started) },
    'warm finished',
  )
  return summary
}

/** Checks a warm request's names (400 naming the field), as every other list in the API is checked. */
export function checkWarmSet(origins: Origins, set: Partial<WarmSet>): WarmSet {
  const limits = origins.cache.limits
  const keys = (set.keys ?? []).map((k, i) => checkKey(k, limits, `keys[${i}]`))
  const userIds = (set.userIds ?? []).map((u, i) => checkUserId(u, limits, `userIds[${i}]`))
  return { keys, userIds }
}
