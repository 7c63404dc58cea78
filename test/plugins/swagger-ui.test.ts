import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'
import t from 'tap'
import { KEYS, build } from '../helpers/build.js'

const CHROMIUM = '/usr/bin/chromium'

if (!existsSync(CHROMIUM)) {
  if (process.env.CI === 'true') throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium`)
  t.test('Swagger UI in a real browser', { skip: `${CHROMIUM} is missing (apt-get install -y chromium); skipped outside CI` }, () => {})
} else {
  t.test('Swagger UI authorizes with a key and runs an authenticated request in a real browser', async (t) => {
    const app = await build(t)
    await app.listen({ host: '127.0.0.1', port: 0 })
    const address = app.server.address()
    if (address === null || typeof address === 'string') throw new Error('no port')
    const base = `http://127.0.0.1:${address.port}`

    const profile = mkdtempSync(join(tmpdir(), 'cachewarden-chromium-'))
    t.teardown(() => rmSync(profile, { recursive: true, force: true }))
    const browser = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      timeout: 60_000,
    })
    t.teardown(() => browser.close())
    const page = browser.pages()[0] ?? (await browser.newPage())
    page.setDefaultTimeout(30_000)

    // Every request the page makes to the API, so the test can see what Swagger UI sent.
    const sent: Array<{ url: string; authorization: string | undefined }> = []
    page.on('request', (request) => {
      if (request.url().includes('/v1/')) sent.push({ url: request.url(), authorization: request.headers().authorization })
    })

    await page.goto(`${base}/docs`)
    await page.locator('.swagger-ui .information-container .title').filter({ hasText: 'cachewarden' }).waitFor()

    // Authorize with the admin key through the dialog.
    await page.locator('.swagger-ui .auth-wrapper .authorize').click()
    const dialog = page.locator('.swagger-ui .modal-ux')
    await dialog.waitFor()
    // The API key's scheme (the other is /metrics' own token).
    const apiKey = dialog.locator('form').filter({ hasText: 'bearerAuth' })
    await apiKey.locator('input').fill(KEYS.admin)
    await apiKey.locator('.auth-btn-wrapper .authorize').click()
    await dialog.locator('.auth-btn-wrapper .btn-done').first().click()
    await dialog.waitFor({ state: 'detached' })

    // Open GET /v1/stats (scope admin), Try it out, Execute.
    const operation = page.locator('#operations-inspection-get_v1_stats')
    await operation.locator('.opblock-summary').first().click()
    await operation.locator('.try-out__btn').click()
    await operation.locator('.execute').click()
    const status = operation.locator('.live-responses-table .response .response-col_status').first()
    await status.waitFor()
    t.equal((await status.innerText()).trim(), '200', 'Swagger UI shows the 200')
    const body = await operation.locator('.live-responses-table .response-col_description pre').first().innerText()
    t.match(JSON.parse(body), { entries: Number, hitRatio: Number }, 'and the stats body')

    const statsCall = sent.find((r) => r.url === `${base}/v1/stats`)
    t.ok(statsCall, 'the browser really called the API')
    t.equal(statsCall?.authorization, `Bearer ${KEYS.admin}`, 'with the key it was authorized with')
  })
}
