import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { beforeGraceEnds } from '../config.js'
import type { CoreLogger } from '../cache/cache-service.js'
import { ConsistencyChecker } from '../cache/consistency.js'
import { parseOriginsConfig } from '../origins/config.js'
import { Origins } from '../origins/origins.js'
import { warm } from '../origins/warmer.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Read-through, refresh-ahead, forced refresh and warming against CONFIG_FILE `origins`. */
    origins: Origins
    /** `POST /v1/consistency`; cluster mode adds its L1-vs-Redis comparison to `copyChecks`. */
    consistency: ConsistencyChecker
  }
}

/**
 * Builds the origins from CONFIG_FILE (a bad one throws ConfigError), hooks refresh-ahead
 * into cache hits only when there are origins, and runs `warm.onStartup` once the app is
 * ready and again every `warm.intervalMs`. Everything stops on close.
 */
export default fp(
  async function originsPlugin(app: FastifyInstance) {
    const { origins: specs, warm: warmConfig } = parseOriginsConfig(app.config.configFile, app.cache.limits)
    const log = app.log as CoreLogger
    const origins = new Origins({
      cache: app.cache,
      origins: specs,
      refreshConcurrency: app.config.refreshConcurrency,
      logger: log,
    })
    app.decorate('origins', origins)
    app.decorate('consistency', new ConsistencyChecker(app.cache, origins))
    if (specs.length > 0) app.cache.onHit = origins.onHit

    let timer: NodeJS.Timeout | undefined
    let warming: Promise<unknown> | undefined
    const set = warmConfig.onStartup
    const runWarm = () => {
      // A slow origin must not stack warms on top of each other.
      if (set === undefined || warming !== undefined || origins.stopping.signal.aborted) return
      warming = warm(origins, set, log, origins.stopping.signal)
        .catch((error: unknown) => log.error({ err: error }, 'warm failed'))
        .finally(() => {
          warming = undefined
        })
    }
    app.addHook('onReady', async () => {
      if (set === undefined) return
      // In the background: a slow origin must not hold the server's start.
      runWarm()
      if (warmConfig.intervalMs !== undefined) {
        timer = setInterval(runWarm, warmConfig.intervalMs)
        timer.unref()
      }
    })
    // Shutting down: no new background work. Loads that requests in flight wait for go on, but
    // those still waiting on an origin near the end of the grace are aborted, so their callers
    // get a 503 (or the stale entry) rather than a connection cut when the process exits.
    let abortTimer: NodeJS.Timeout | undefined
    const stopBackground = () => {
      if (timer !== undefined) clearInterval(timer)
      origins.stopping.abort() // a warm under way (startup, interval or POST /v1/warm) loads no further key
      if (app.cache.onHit === origins.onHit) app.cache.onHit = undefined
      origins.refresher.close() // the refreshes queued: those running finish, or are aborted with the rest
    }
    app.addHook('preClose', (done) => {
      stopBackground()
      abortTimer = setTimeout(() => void origins.close(), beforeGraceEnds(app.config.shutdownGraceMs))
      abortTimer.unref()
      done()
    })
    app.addHook('onClose', async () => {
      clearTimeout(abortTimer)
      stopBackground()
      await origins.close()
      await warming
    })
  },
  { name: 'cachewarden-origins' },
)
