// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives the orthanc-ai admin page (/ai/ui/) and Orthanc Explorer's "AI jobs" button in headless
// Debian Chromium (playwright-core, no bundled browser) for tests/integration/test_admin_ui.py.
//
//   node tests/integration/admin_ui_check.mjs --base <orthanc url> --job <job id> --out <dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if the page misbehaved), 2 on a usage error.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
// playwright-core lives in viewer/node_modules (scripts/install_viewer.sh), not beside this file.
const require = createRequire(path.join(here, '..', '..', 'viewer', 'package.json'));
const { chromium } = require('playwright-core');

const args = { chromium: '/usr/bin/chromium', timeout: 45000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
args.timeout = Number(args.timeout);
if (!args.base || !args.job || !args.out) {
  console.error('usage: admin_ui_check.mjs --base <orthanc url> --job <id> --out <dir> [--chromium PATH]');
  process.exit(2);
}
fs.mkdirSync(args.out, { recursive: true });

const report = { ok: false, step: 'launch', error: null, timings: {}, console: [], screenshots: [] };
const t0 = Date.now();
const mark = (name) => { report.timings[name] = (Date.now() - t0) / 1000; };
const rowSel = `tr[data-job-id="${args.job}"]`;

let browser;
try {
  browser = await chromium.launch({
    executablePath: args.chromium,
    args: ['--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
    timeout: args.timeout,
  });
  const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
  page.setDefaultTimeout(args.timeout);
  page.on('console', (msg) => {
    if (['error', 'warning'].includes(msg.type())) report.console.push({ type: msg.type(), step: report.step, text: msg.text().slice(0, 1000) });
  });
  page.on('pageerror', (err) => report.console.push({ type: 'pageerror', step: report.step, text: String(err.stack || err).slice(0, 1000) }));
  // Anything the page asks from outside Orthanc (a CDN...) is a failure: it must work offline.
  const origin = new URL(args.base).origin;
  report.foreignRequests = [];
  page.on('request', (req) => { if (!req.url().startsWith(origin) && !req.url().startsWith('data:')) report.foreignRequests.push(req.url()); });
  const shot = async (name) => {
    const file = path.join(args.out, name);
    await page.screenshot({ path: file, fullPage: true });
    report.screenshots.push(file);
  };
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
  await page.$eval(`${rowSel} button.cancel`, (b) => { b.disabled = false; });
  page.once('dialog', (d) => d.accept());
  await page.click(`${rowSel} button.cancel`);
  await page.waitForFunction(() => /refused/.test(document.getElementById('message').innerText));
  report.refusal = await page.$eval('#message', (m) => m.innerText);
  await page.waitForTimeout(300);
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
  report.step = 'done';
} catch (e) {
  report.error = String(e && e.stack ? e.stack : e).slice(0, 3000);
  try {
    const pages = browser ? browser.contexts().flatMap((c) => c.pages()) : [];
    if (pages.length) {
      const file = path.join(args.out, 'admin-ui-failure.png');
      await pages[0].screenshot({ path: file, fullPage: true });
      report.screenshots.push(file);
    }
  } catch (e2) { /* the report matters more than the picture */ }
} finally {
  if (browser) await browser.close().catch(() => {});
}
console.log(JSON.stringify(report));
