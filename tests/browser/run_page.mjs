// Opens a page in headless Chromium (the Debian package; no browser download)
// and, once the page sets document.body.dataset.state to "done" or "error",
// prints {state, reply, error, appends, console} as one JSON line.
// `appends` counts the changes to #reply, i.e. how many pieces the reply came in.
//
// usage: node run_page.mjs URL [TIMEOUT_MS]     (CHROMIUM_BIN overrides /usr/bin/chromium)
import { chromium } from 'playwright-core';

const [url, timeout = '30000'] = process.argv.slice(2);
if (!url) {
  console.error('usage: node run_page.mjs URL [TIMEOUT_MS]');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  timeout: 30_000,
});
try {
  const page = await browser.newPage();
  const consoleLines = [];
  page.on('console', (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`pageerror: ${err.message}`));
  await page.addInitScript(() => {
    window.__appends = 0;
    document.addEventListener('DOMContentLoaded', () => {
      new MutationObserver((records) => { window.__appends += records.length; })
        .observe(document.getElementById('reply'), { childList: true, characterData: true, subtree: true });
    });
  });
  await page.goto(url, { timeout: Number(timeout) });
  await page.waitForFunction(
    () => ['done', 'error'].includes(document.body.dataset.state),
    null,
    { timeout: Number(timeout) },
  );
  const result = await page.evaluate(() => ({
    state: document.body.dataset.state,
    reply: document.getElementById('reply').textContent,
    error: document.getElementById('error').textContent,
    appends: window.__appends,
  }));
  console.log(JSON.stringify({ ...result, console: consoleLines }));
} finally {
  await browser.close();
}
