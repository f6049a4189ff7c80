// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives the admin page's Review and Models views (/ai/ui/#review, #models) in headless Debian
// Chromium (playwright-core) for tests/integration/test_monitoring_ui.py.
//
//   node tests/integration/monitoring_ui_check.mjs --base <orthanc url> --model <name> --out <dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if the page misbehaved), 2 on a usage error.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', '..', 'viewer', 'package.json'));
const { chromium } = require('playwright-core');

const args = { chromium: '/usr/bin/chromium', timeout: 45000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
args.timeout = Number(args.timeout);
if (!args.base || !args.model || !args.out) {
  console.error('usage: monitoring_ui_check.mjs --base <orthanc url> --model <name> --out <dir> [--chromium PATH]');
  process.exit(2);
}
fs.mkdirSync(args.out, { recursive: true });

const report = { ok: false, step: 'launch', error: null, timings: {}, console: [], screenshots: [] };
const t0 = Date.now();
const mark = (name) => { report.timings[name] = (Date.now() - t0) / 1000; };

let browser;
try {
  browser = await chromium.launch({
    executablePath: args.chromium,
    args: ['--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--use-gl=angle',
      '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
    timeout: args.timeout,
  });
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(args.timeout);
  page.on('console', (msg) => {
    if (['error', 'warning'].includes(msg.type())) report.console.push({ type: msg.type(), step: report.step, text: msg.text().slice(0, 1000) });
  });
  page.on('pageerror', (err) => report.console.push({ type: 'pageerror', step: report.step, text: String(err.stack || err).slice(0, 1000) }));
  const origin = new URL(args.base).origin;
  report.foreignRequests = [];
  page.on('request', (req) => { if (!req.url().startsWith(origin) && !req.url().startsWith('data:')) report.foreignRequests.push(req.url()); });
  const shot = async (name) => {
    const file = path.join(args.out, name);
    await page.screenshot({ path: file, fullPage: true });
    report.screenshots.push(file);
  };
  const reviewRows = () => page.$$eval('#review-body tr[data-job-id]', (trs) => trs.map((tr) => ({
    id: tr.dataset.jobId,
    cells: [...tr.children].map((td) => td.innerText.trim()),
    href: tr.querySelector('a.open-viewer') ? tr.querySelector('a.open-viewer').href : null,
  })));

  // ---- Models view: charts drawn by Chart.js from /ai/models/{name}/monitoring
  report.step = 'models';
  await page.goto(`${args.base}/ai/ui/index.html#models`);
  await page.waitForSelector('#models[data-loaded="true"]');
  await page.selectOption('#model-select', args.model);
  await page.waitForSelector(`#models-body section.version`);
  // every chart drawn by Chart.js (the view draws them after its data arrives)
  await page.waitForFunction(() => {
    const canvases = [...document.querySelectorAll('#models-body figure.chart canvas')];
    return canvases.length > 0 && canvases.every((c) => window.Chart && window.Chart.getChart(c));
  });
  mark('models');
  report.models = await page.evaluate(() => {
    const figures = [...document.querySelectorAll('#models-body figure.chart')];
    return {
      chartJs: typeof window.Chart === 'function' ? window.Chart.version : null,
      versions: [...document.querySelectorAll('#models-body section.version')].map((s) => ({
        version: s.dataset.version, alert: s.dataset.alert, state: s.dataset.state })),
      charts: figures.map((f) => {
        const canvas = f.querySelector('canvas');
        const c = window.Chart.getChart(canvas);
        // a drawn chart has non-blank pixels: count them
        const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let inked = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked += 1;
        return {
          title: f.dataset.title,
          kind: f.dataset.kind || null,
          caption: f.querySelector('figcaption').innerText.trim(),
          type: c ? c.config.type : null,
          datasets: c ? c.data.datasets.map((d) => ({ label: d.label, data: d.data })) : [],
          labels: c ? c.data.labels : [],
          inked,
        };
      }),
      // the Jobs view's panels are out of sight (hidden, and no style shows them anyway)
      jobsPanelsShown: [...document.querySelectorAll('[data-view-of="jobs"]')].filter((e) => getComputedStyle(e).display !== 'none').length,
    };
  });
  await shot('models-ui.png');

  // ---- Review view: pending jobs oldest first, OHIF link, Accept, Reject (reason required)
  report.step = 'review';
  await page.click('#views a[data-view="review"]');
  await page.waitForSelector('#review[data-loaded="true"] #review-body tr[data-job-id]');
  report.reviewBefore = await reviewRows();
  await shot('review-ui.png');
  const [first, second] = report.reviewBefore;

  report.step = 'open viewer';
  const [popup] = await Promise.all([context.waitForEvent('page'), page.click(`tr[data-job-id="${first.id}"] a.open-viewer`)]);
  await popup.waitForLoadState('domcontentloaded');
  // OHIF boots: its services object appears on the window
  await popup.waitForFunction(() => window.services !== undefined, null, { timeout: args.timeout });
  report.viewerOpened = popup.url();
  await popup.screenshot({ path: path.join(args.out, 'review-ui-ohif.png') });
  report.screenshots.push(path.join(args.out, 'review-ui-ohif.png'));
  await popup.close();

  report.step = 'accept';
  await page.click(`tr[data-job-id="${first.id}"] button.accept`);
  await page.waitForFunction((id) => !document.querySelector(`#review-body tr[data-job-id="${id}"]`), first.id);
  report.acceptMessage = await page.innerText('#message');

  report.step = 'reject without reason';
  await page.click(`tr[data-job-id="${second.id}"] button.reject`);
  await page.waitForFunction(() => /refused/.test(document.getElementById('message').innerText));
  report.refusal = await page.innerText('#message');
  report.stillPending = await page.$(`tr[data-job-id="${second.id}"]`) !== null;

  report.step = 'reject with reason';
  await page.fill(`tr[data-job-id="${second.id}"] input.reason`, 'segmentation leaks into the mediastinum');
  await page.click(`tr[data-job-id="${second.id}"] button.reject`);
  await page.waitForFunction((id) => !document.querySelector(`#review-body tr[data-job-id="${id}"]`), second.id);
  report.rejectMessage = await page.innerText('#message');
  report.reviewAfter = await reviewRows();
  mark('review');
  report.ok = true;
  report.step = 'done';
} catch (e) {
  report.error = String(e.stack || e).slice(0, 3000);
} finally {
  if (browser) await browser.close().catch(() => {});
}
console.log(JSON.stringify(report));
