// Writes openapi/openapi.json from the route schemas: `npm run openapi`.
import { mkdirSync, writeFileSync } from 'node:fs'
import { renderOpenApi } from '../src/openapi.js'

const target = new URL('../openapi/openapi.json', import.meta.url)
mkdirSync(new URL('.', target), { recursive: true })
writeFileSync(target, await renderOpenApi())
process.stdout.write(`wrote ${target.pathname}\n`)
