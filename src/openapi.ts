import { buildApp } from './app.js'

/** The OpenAPI document the routes generate, as the stable text `npm run openapi` commits. */
export async function renderOpenApi(): Promise<string> {
  const app = await buildApp({ apiKeys: [] })
  try {
    await app.ready()
    const doc = app.swagger() as { paths?: Record<string, unknown> }
    // Paths sorted, so the file does not depend on the order plugins register routes in.
    if (doc.paths) doc.paths = Object.fromEntries(Object.entries(doc.paths).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
    return `${JSON.stringify(doc, null, 2)}\n`
  } finally {
    await app.close()
  }
}
