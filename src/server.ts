#!/usr/bin/env node
import { randomBytes } from 'node:crypto'
import closeWithGrace from 'close-with-grace'
import { buildApp } from './app.js'
import { ConfigError, loadConfig, type Config } from './config.js'
import { loggerOptions } from './logger.js'

/**
 * A stop signal this soon after the first is the same stop, not an insistence: Ctrl-C (or
 * systemd's stop, SIGTERM then SIGHUP) signals the whole process group, and `npm start`
 * passes its copy on.
 */
const REPEATED_SIGNAL_MS = 1000

function configOrExit(): Config {
  try {
    return loadConfig()
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`cachewarden: invalid configuration: ${error.message}\n`)
      process.exit(78) // EX_CONFIG
    }
    throw error
  }
}

const config = configOrExit()

let generatedSecret: string | undefined
if (config.apiKeys.length === 0) {
  // Closed by default: with no keys configured, make one admin key and show it once.
  generatedSecret = randomBytes(24).toString('base64url')
  config.apiKeys.push({ name: 'generated-admin', scopes: new Set(['admin']), secret: generatedSecret })
}

const app = await buildApp(config, {
  logger: loggerOptions(config.logLevel),
})

// The signals that stop a server (close-with-grace's, but for the faults SIGILL, SIGSEGV…) are
// handled below, so a repeat is the same stop whichever they are; close-with-grace handles
// the faults and errors.
const STOP_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR2'] as const
let stopSignal: NodeJS.Signals | undefined
let stopAt = 0
// Set once any shutdown starts (a stop signal, an error): a stop signal then is a second one.
let closing = false
const closer = closeWithGrace({ delay: config.shutdownGraceMs, skip: [...STOP_SIGNALS] }, async ({ signal = stopSignal, err }) => {
  closing = true
  if (err) app.log.error({ err }, 'shutting down after an error')
  // SIGTERM and SIGINT are the usual way to stop; any other signal (a closed terminal's SIGHUP…) is worth a warning.
  else if (signal === 'SIGTERM' || signal === 'SIGINT') app.log.info({ signal }, 'shutting down')
  else app.log.warn({ signal }, 'shutting down')
  // close() drops the idle keep-alive connections; the others close after their last reply
  // (src/app.ts, frontDoor), sent whole.
  await app.close()
})
for (const name of STOP_SIGNALS) {
  process.on(name, (signal: NodeJS.Signals) => {
    if (stopSignal === undefined && !closing) {
      stopSignal = signal
      stopAt = Date.now()
      void closer.close()
    } else if (stopSignal !== undefined && Date.now() - stopAt < REPEATED_SIGNAL_MS) {
      app.log.info({ signal }, 'signal repeated (the process group was signalled): still shutting down gracefully')
    } else {
      app.log.error({ signal }, 'second signal: exiting without waiting for requests in flight')
      process.exit(1)
    }
  })
}

try {
  await app.listen({ host: config.host, port: config.port })
} catch (error) {
  // An address this machine does not have, or a name that resolves to none, is a bad HOST:
  // said as a bad value is (exit 78). A port taken or forbidden names PORT, and may pass.
  const code = (error as { code?: string }).code
  const variable = code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' ? 'HOST' : code === 'EADDRINUSE' || code === 'EACCES' ? 'PORT' : undefined
  const where = `${config.host}:${config.port}`
  if (variable === undefined) {
    app.log.fatal({ err: error }, 'could not start')
    process.stderr.write(`cachewarden: could not start: ${(error as Error).message}\n`)
  } else {
    // A setting, not a bug: no stack. Said on stderr as a bad value is, whatever LOG_LEVEL.
    const message = `cannot listen on ${where} (${variable}, ${code})`
    app.log.fatal({ variable, code }, `could not start: ${message}`)
    // A taken port may free up (exit 1, try again); an address the machine lacks will not (78).
    process.stderr.write(`cachewarden: ${variable === 'HOST' ? 'invalid configuration' : 'could not start'}: ${message}\n`)
  }
  process.exit(variable === 'HOST' ? 78 : 1)
}

if (generatedSecret !== undefined) {
  // Printed straight to stdout, never through the logger, so it is not shipped to log stores.
  process.stdout.write(
    `\nNo API keys configured (CACHEWARDEN_API_KEYS): generated one admin key for this run.\n` +
      `  Authorization: Bearer ${generatedSecret}\n` +
      `It is shown once and lost on restart; configure keys for real use.\n\n`,
  )
}
