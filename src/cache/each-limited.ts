/**
 * Runs `fn` over the items, at most `limit` at a time, in order of start; resolves when all are
 * done. The first failure rejects it, and no item starts after that; nor after `signal` aborts
 * (it then resolves once the items started are done).
 */
export async function eachLimited<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<unknown>,
  signal?: AbortSignal,
): Promise<void> {
  let next = 0
  let failed = false
  const worker = async () => {
    while (!failed && signal?.aborted !== true && next < items.length) {
      try {
        await fn(items[next++]!)
      } catch (error) {
        failed = true
        throw error
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
}
