// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives the orthanc-ai admin page (/ai/ui/) and Orthanc Explorer's "AI jobs" button in headless
// Debian Chromium (playwright-core, no bundled browser) for tests/integration/test_admin_ui.py.
//
//   node tests/integration/admin_ui_check.mjs --base <orthanc url> --job <job id> --out <dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if the page misbehaved), 2 on a usage error.
import { drive, newPage, screenshots, start } from './browser.mjs';

const check = start({
  usage: 'admin_ui_check.mjs --base <orthanc url> --job <id> --out <dir> [--chromium PATH]',
  required: ['base', 'job'],
  defaults: { timeout: 45000 },
});
const { args, report, mark } = check;
const rowSel = `tr[data-job-id="${args.job}"]`;

await drive({ ...check, failureShot: 'admin-ui-failure.png', fullPage: true }, async (browser) => {
  const context = await browser.newContext({ viewport: { width: 1500, height: 950 } });
  // Anything the page asks from outside Orthanc (a CDN...) is a failure: it must work offline.
  const page = await newPage(context, check, { origin: new URL(args.base).origin });
  const shot = screenshots(page, check, { fullPage: true });
  const rowInfo = () => page.$eval(rowSel, (tr) => ({
    state: tr.dataset.state,
    pipeline: tr.dataset.pipeline,
    cells: [...tr.children].map((td) => td.innerText.trim()),
    stages: [...tr.querySelectorAll('.stage')].map((s) => ({ name: s.dataset.stage, done: s.classList.contains('done') })),
    retryDisabled: tr.querySelector('button.retry').disabled,
    cancelDisabled: tr.querySelector('button.cancel').disabled,
  }));

  report.step = 'open /ai/ui/';
  await page.goto(`${args.base}/ai/ui/`);
  await page.waitForFunction(() => document.body.dataset.loaded === 'true' && document.querySelector('#pipelines-body tr'));
  report.url = page.url();
  report.title = await page.title();
  mark('loaded');

  report.step = 'find the job row';
  await page.waitForSelector(`${rowSel}[data-state="succeeded"]`);
  report.before = await rowInfo();
  report.pipelines = await page.$$eval('#pipelines-body tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.innerText.trim())));
  report.health = await page.$eval('#health-body', (dl) => dl.innerText);
  report.healthReady = await page.$eval('#health', (s) => s.dataset.ready);
  await shot('admin-ui-before-retry.png');

  report.step = 'retry';
  // Every state the row shows from now on (rows are rebuilt at each refresh).
  await page.evaluate((sel) => {
    window.__states = [];
    const seen = () => {
      const tr = document.querySelector(sel);
      if (tr && window.__states[window.__states.length - 1] !== tr.dataset.state) window.__states.push(tr.dataset.state);
    };
    new MutationObserver(seen).observe(document.getElementById('jobs-body'), { childList: true });
  }, rowSel);
  await page.click(`${rowSel} button.retry`);
  await page.waitForFunction(() => window.__states.some((s) => s === 'queued' || s === 'running'));
  report.message = await page.$eval('#message', (m) => m.innerText);
  mark('retried');
  await page.waitForFunction(
    () => window.__states.length > 1 && window.__states[window.__states.length - 1] === 'succeeded',
    null, { timeout: 120000 });
  report.states = await page.evaluate(() => window.__states);
  report.after = await rowInfo();
  mark('succeeded again');

  report.step = 'cancel a finished job';  // the API refuses (409): the page must say why
  // After the answer the page shows it, then refreshes its tables and writes #updated last: count
  // the refreshes that end while the refusal is on screen.
  await page.evaluate(() => {
    window.__refreshedAfterRefusal = 0;
    new MutationObserver(() => {
      if (/refused/.test(document.getElementById('message').innerText)) window.__refreshedAfterRefusal += 1;
    }).observe(document.getElementById('updated'), { childList: true, characterData: true, subtree: true });
  });
  await page.$eval(`${rowSel} button.cancel`, (b) => { b.disabled = false; });
  page.once('dialog', (d) => d.accept());
  await page.click(`${rowSel} button.cancel`);
  await page.waitForFunction(() => /refused/.test(document.getElementById('message').innerText));
  report.refusal = await page.$eval('#message', (m) => m.innerText);
  await page.waitForFunction((sel) => window.__refreshedAfterRefusal > 0
    && document.querySelector(`${sel}[data-state="succeeded"]`), rowSel);
  await shot('admin-ui.png');

  report.step = 'Orthanc Explorer';
  await page.goto(`${args.base}/app/explorer.html`);
  const link = await page.waitForSelector('#orthanc-ai-jobs', { state: 'visible' });
  report.explorerLink = { text: (await link.innerText()).trim(), href: await link.getAttribute('href') };
  await shot('admin-ui-explorer.png');
  await link.click();
  await page.waitForURL(/\/ai\/ui\/index\.html$/);
  await page.waitForFunction(() => document.body.dataset.loaded === 'true');
  report.explorerLinkOpens = page.url();
  mark('explorer');

  report.ok = true;
});
