// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives OHIF 3.13 in headless Debian Chromium for tests/integration/test_pacs_outputs.py: opens a
// study, shows its key image series (Secondary Capture) in the viewport the way a user does
// (double-click in the study browser) and reports what OHIF says it shows.
//
//   node tests/integration/ohif_key_images.mjs --url <viewer url> --out <artefact dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', '..', 'viewer', 'package.json'));
const { chromium } = require('playwright-core');

const args = { chromium: '/usr/bin/chromium', timeout: 60000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
if (!args.url || !args.out) {
  console.error('usage: ohif_key_images.mjs --url <viewer url> --out <dir> [--chromium PATH]');
  process.exit(2);
}
args.timeout = Number(args.timeout);
const CHROMIUM_FLAGS = [
  '--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--use-gl=angle',
  '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
];
fs.mkdirSync(args.out, { recursive: true });
const report = { ok: false, step: 'launch', error: null, console: [], errorBoundary: [], screenshots: [] };

let browser;
try {
  browser = await chromium.launch({ executablePath: args.chromium, args: CHROMIUM_FLAGS, timeout: args.timeout });
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  await context.addInitScript(() => {
    localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
    sessionStorage.setItem('investigationalUseDialog', 'hidden');
  });
  const page = await context.newPage();
  page.setDefaultTimeout(args.timeout);
  page.on('console', (msg) => {
    const entry = { type: msg.type(), step: report.step, text: msg.text().slice(0, 1000) };
    if (/error boundary/i.test(entry.text)) report.errorBoundary.push(entry);
    if (['error', 'warning'].includes(msg.type())) report.console.push(entry);
  });

  report.step = 'open the study';
  await page.goto(args.url);
  await page.waitForFunction(() => (window.services?.displaySetService?.getActiveDisplaySets() ?? [])
    .some((d) => /key images/i.test(d.SeriesDescription ?? '')));
  report.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map((d) => ({
    uid: d.displaySetInstanceUID, modality: d.Modality, description: d.SeriesDescription,
    images: d.images?.length ?? d.numImageFrames ?? null,
  })));
  const keys = report.displaySets.find((d) => /key images/i.test(d.description ?? ''));

  // As a person does: wait until the viewer shows the study's first image before choosing another
  // series (OHIF 3.13 throws "The stack viewport has been destroyed" when a series replaces a
  // viewport whose first image is still loading).
  await page.waitForFunction(() => (window.cornerstone?.getEnabledElements() ?? [])
    .some((e) => e.viewport?.getCurrentImageId?.() && e.viewport?.getRenderingEngine?.()), null, { polling: 200 });

  report.step = 'show the key images';
  await page.locator(`#thumbnail-${keys.uid}`).dblclick();
  await page.waitForFunction((uid) => {
    const { viewportGridService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const shown = viewportGridService.getState().viewports.get(id)?.displaySetInstanceUIDs ?? [];
    const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
    return shown.includes(uid) && viewport?.getCurrentImageId?.();
  }, keys.uid, { polling: 200 });
  await page.waitForTimeout(1500); // the image renders asynchronously
  report.shown = await page.evaluate(() => {
    const { viewportGridService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
    return { imageId: viewport.getCurrentImageId(), images: viewport.getImageIds?.().length ?? null };
  });
  const file = path.join(args.out, 'ohif-key-images.png');
  await page.screenshot({ path: file });
  report.screenshots.push(file);
  report.ok = true;
} catch (err) {
  report.error = String(err && err.message ? err.message : err).slice(0, 2000);
} finally {
  if (browser) await browser.close();
}
console.log(JSON.stringify(report));
