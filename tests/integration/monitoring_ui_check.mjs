// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives the admin page's Review and Models views (/ai/ui/#review, #models) in headless Debian
// Chromium (playwright-core) for tests/integration/test_monitoring_ui.py.
//
//   node tests/integration/monitoring_ui_check.mjs --base <orthanc url> --model <name> --out <dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if the page misbehaved), 2 on a usage error.
import { SOFTWARE_WEBGL, drive, newPage, screenshots, settle, start } from './browser.mjs';

const check = start({
  usage: 'monitoring_ui_check.mjs --base <orthanc url> --model <name> --out <dir> [--chromium PATH]',
  required: ['base', 'model'],
  defaults: { timeout: 45000 },
});
const { args, report, mark } = check;

// The Review view opens OHIF in a popup: it needs WebGL, in software.
await drive({ ...check, flags: SOFTWARE_WEBGL }, async (browser) => {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await newPage(context, check, { origin: new URL(args.base).origin });
  const shot = screenshots(page, check, { fullPage: true });
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
  // every chart drawn by Chart.js (the view draws them after its data arrives, Chart.js animates
  // the drawing): done once no chart is animating, every one has ink on its canvas and none
  // changes between two frames.
  await settle(page, 'every chart of the Models view drawn and holding still', () => [
    ...document.querySelectorAll('#models-body figure.chart canvas'),
  ].map((canvas) => {
    const chart = window.Chart?.getChart(canvas);
    if (!chart || window.Chart.animator.running(chart) || !canvas.width || !canvas.height) return 0;
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let inked = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked += 1;
    return inked;
  }), null, { until: (inked) => inked.length > 0 && inked.every((n) => n > 0) });
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
  await screenshots(popup, check)('review-ui-ohif.png');
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
});
