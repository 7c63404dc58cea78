/**
 * Whether a connection answered a question (a PING, a `SELECT 1`) within `timeoutMs`: `ok`,
 * `failed` (the request failed: the connection is going, and its own events say so) or
 * `late`. A stall of this process's event loop runs timers before sockets are read, so a
 * late answer gets one more turn of the loop to arrive; with `heard` (a count of what else
 * arrives on the same connection), anything that arrived meanwhile is an answer too.
 */
export async function answerInTime(ask: Promise<unknown>, timeoutMs: number, heard?: () => number): Promise<'ok' | 'failed' | 'late'> {
  const before = heard?.()
  let outcome: 'ok' | 'failed' | undefined
  const answer = ask.then(
    () => void (outcome = 'ok'),
    () => void (outcome = 'failed'),
  )
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)))
  try {
    await Promise.race([answer, late])
    if (outcome === undefined) await new Promise((resolve) => setImmediate(resolve))
  } finally {
    clearTimeout(timer)
  }
  if (outcome !== undefined) return outcome
  return heard !== undefined && heard() !== before ? 'ok' : 'late'
}
