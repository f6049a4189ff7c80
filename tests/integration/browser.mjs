// SPDX-License-Identifier: AGPL-3.0-or-later
// What the headless-browser checks of tests/integration (*_check.mjs, ohif_*.mjs) share: their
// command line, their JSON report, Debian Chromium driven by playwright-core (no bundled browser),
// the page watchers, and the OHIF steps more than one check takes. The Python side is browser.py:
// it runs a check with --out and --chromium and reads the report from the last line of stdout.
//
// A check is written as
//
//   const check = start({ usage: '...', required: ['url'], defaults: { timeout: 60000 } });
//   await drive({ ...check, flags: SOFTWARE_WEBGL, failureShot: 'x-failure.png' }, async (browser) => {
//     const page = await newPage(await ohifContext(browser), check);
//     check.report.step = '...'; ...; check.report.ok = true;
//   });
//
// A check waits for the condition its next step needs, never for a time: settle() polls an inspector
// once per animation frame until two consecutive answers are equal and satisfy a predicate (with a
// deadline and an error naming what it waited for), waitForRenderedImage() does that for the active
// OHIF viewport (the image it is on is drawn, the picture holds still). report.waits lists each.
//
// Exit status 0 when the report was written (even if the page misbehaved), 2 on a usage error.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
// playwright-core lives in viewer/node_modules (scripts/install_viewer.sh), not beside this file.
const require = createRequire(path.join(here, '..', '..', 'viewer', 'package.json'));
export const { chromium } = require('playwright-core');

// Headless, offline, no first-run or sync work, /tmp instead of a small /dev/shm.
export const CHROMIUM_FLAGS = [
  '--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
];
// Software WebGL2 (SwiftShader through ANGLE): OHIF renders without a GPU.
export const SOFTWARE_WEBGL = [
  '--use-gl=angle', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
];

// `--name value` pairs over the defaults (--chromium /usr/bin/chromium); --timeout and the names in
// `numbers` become numbers. A missing required name (--out always is) prints the usage line and
// exits with 2. Creates the --out folder.
export function parseArgs(argv, { usage, required = [], defaults = {}, numbers = [] }) {
  const args = { chromium: '/usr/bin/chromium', ...defaults };
  const fail = (why) => {
    console.error(`${why}\nusage: ${usage}`);
    process.exit(2);
  };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) fail(`expected --name value, got '${argv[i]}'`);
    args[argv[i].slice(2)] = argv[i + 1];
  }
  const missing = ['out', ...required].filter((name) => !args[name]);
  if (missing.length) fail(`missing ${missing.map((name) => `--${name}`).join(', ')}`);
  for (const name of ['timeout', ...numbers]) {
    args[name] = Number(args[name]);
    if (!Number.isFinite(args[name])) fail(`--${name} must be a number`);
  }
  fs.mkdirSync(args.out, { recursive: true });
  return args;
}

// What each settle() waited for, how long (ms) and how many frames it looked at: report.waits.
const settled = [];

// The arguments, the report every check prints (more fields in `fields`), and mark(name), which
// records the seconds since the start in report.timings.
export function start(options, fields = {}) {
  const args = parseArgs(process.argv.slice(2), options);
  const report = {
    ok: false, step: 'launch', error: null, timings: {}, console: [], errorBoundary: [], httpErrors: [],
    screenshots: [], waits: settled, ...fields,
  };
  const t0 = Date.now();
  const mark = (name) => { report.timings[name] = (Date.now() - t0) / 1000; };
  return { args, report, mark, seconds: () => (Date.now() - t0) / 1000 };
}

// Launches Chromium with CHROMIUM_FLAGS plus `flags`, runs `body(browser)`, and whatever happens
// records the error (the step is already in the report), screenshots the first page as
// `failureShot`, closes the browser and prints the report as the last line of stdout.
export async function drive({ args, report, mark, flags = [], failureShot = null, fullPage = false }, body) {
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: args.chromium, args: [...CHROMIUM_FLAGS, ...flags], timeout: args.timeout,
    });
    await body(browser);
    if (report.ok) report.step = 'done';
  } catch (err) {
    report.ok = false;
    report.error = String(err && err.stack ? err.stack : err).slice(0, 3000);
    try {
      const pages = failureShot && browser ? browser.contexts().flatMap((c) => c.pages()) : [];
      if (pages.length) {
        const file = path.join(args.out, failureShot);
        await pages[0].screenshot({ path: file, fullPage });
        report.screenshots.push(file);
      }
    } catch { /* the report matters more than the picture */ }
  } finally {
    if (browser) await browser.close().catch(() => {});
    mark('total');
    console.log(JSON.stringify(report));
  }
}

// A page with the default timeout whose console, uncaught errors and failed answers go into the
// report, each with the step it happened in. OHIF reports the crashes its React error boundaries
// catch through console.debug: every level is read for those. With `origin`, every request
// elsewhere (a CDN...) is listed in report.foreignRequests: the page must work offline.
export async function newPage(context, { args, report, seconds }, { origin = null } = {}) {
  const page = await context.newPage();
  page.setDefaultTimeout(args.timeout);
  const entry = (type, text) => ({ type, step: report.step, t: seconds(), text: text.slice(0, 2000) });
  page.on('console', (msg) => {
    const e = entry(msg.type(), msg.text());
    if (/error boundary/i.test(e.text)) report.errorBoundary.push(e);
    if (['error', 'warning'].includes(msg.type())) report.console.push(e);
  });
  page.on('pageerror', (err) => report.console.push(entry('pageerror', String(err.stack || err))));
  // every answer of 400 or more, with its URL: what the page asked for and did not get
  page.on('response', (r) => {
    if (r.status() >= 400) report.httpErrors.push({ status: r.status(), method: r.request().method(), url: r.url().slice(0, 300) });
  });
  if (origin) {
    report.foreignRequests = [];
    page.on('request', (req) => {
      if (!req.url().startsWith(origin) && !req.url().startsWith('data:')) report.foreignRequests.push(req.url());
    });
  }
  return page;
}

// shot(name) saves a screenshot of `page` in --out and lists it in the report.
export function screenshots(page, { args, report }, { fullPage = false } = {}) {
  return async (name) => {
    const file = path.join(args.out, name);
    await page.screenshot({ path: file, fullPage });
    report.screenshots.push(file);
    return file;
  };
}

// ---- OHIF 3.13

// A browser context for OHIF: no first-visit tours over the viewport, no investigational-use banner
// over the images, and (with a user) Orthanc's login answered like a person at the prompt.
export async function ohifContext(browser, { tours = ['basicViewerTour'], user = null, password = null } = {}) {
  const context = await browser.newContext({
    viewport: { width: 1600, height: 1000 },
    httpCredentials: user ? { username: user, password } : undefined,
  });
  await context.addInitScript((shown) => {
    localStorage.setItem('shownTours', JSON.stringify(shown));
    sessionStorage.setItem('investigationalUseDialog', 'hidden');
    // The image each viewport last finished drawing (Cornerstone's IMAGE_RENDERED, caught on its way
    // down to the viewport's element): viewportState() compares it with the image the viewport is on.
    window.__renderedImage = {};
    document.addEventListener('CORNERSTONE_IMAGE_RENDERED', (event) => {
      const id = event.detail?.viewportId;
      const viewport = id && window.cornerstone?.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
      if (viewport) window.__renderedImage[id] = viewport.getCurrentImageId?.() ?? null;
    }, true);
  }, tours);
  return context;
}

// Until a viewport shows an image: as a person does, the study's first image is on screen before
// another series is chosen (OHIF throws "The stack viewport has been destroyed" when a series
// replaces a viewport whose first image is still loading).
export function waitForFirstImage(page, { polling = 200 } = {}) {
  return page.waitForFunction(() => (window.cornerstone?.getEnabledElements() ?? [])
    .some((e) => e.viewport?.getCurrentImageId?.() && e.viewport?.getRenderingEngine?.()), null, { polling });
}

// Until the active viewport has shown the CT with a segmentation (with `contour`: the one made of
// an RT Structure Set) for a second without being replaced: OHIF first previews a SEG or RTSTRUCT
// in the viewport, then replaces that viewport with one showing the referenced CT with the overlay,
// and acting on a viewport it is about to destroy crashes OHIF ("viewport has been destroyed").
// With `answerPrompt`, OHIF's "open this Segmentation?" is confirmed whenever it shows.
export function waitForSegmentationOnCt(page, { contour = false, answerPrompt = false, polling = 200 } = {}) {
  return page.waitForFunction(({ contour: wantContour, answerPrompt: answer }) => {
    if (answer) {
      const yes = [...document.querySelectorAll('button')].find((b) => b.textContent.trim() === 'Yes');
      if (yes && /open this/i.test(document.body.innerText)) yes.click();
    }
    const { segmentationService, viewportGridService, displaySetService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const shown = viewportGridService.getState().viewports.get(id)?.displaySetInstanceUIDs ?? [];
    const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
    const represented = segmentationService.getSegmentationRepresentations(id);
    let segmented;
    if (wantContour) {
      const c = segmentationService.getSegmentations().find((s) => s.representationData?.Contour);
      segmented = Boolean(c) && represented.some((r) => r.segmentationId === c.segmentationId);
    } else {
      segmented = segmentationService.getSegmentations().length > 0 && represented.length > 0;
    }
    const ready = segmented
      && shown.some((uid) => displaySetService.getDisplaySetByUID(uid)?.Modality === 'CT')
      && viewport?.getCurrentImageId?.();
    const now = performance.now();
    if (!ready || window.__stableViewport !== viewport) {
      window.__stableViewport = ready ? viewport : null;
      window.__stableSince = now;
      return false;
    }
    return now - window.__stableSince > 1000;
  }, { contour, answerPrompt }, { polling });
}

// ---- waiting for what the next step needs, not for a time

// Until `inspect(arg)`, run in the page after each animation frame, gives the same answer on two
// consecutive frames and `until(answer)` holds: a render has finished and nothing is still moving.
// Returns that answer. Past `timeout` ms throws an Error that names `what` and shows the last answer.
export async function settle(page, what, inspect, arg = null, { until = () => true, timeout = 30000 } = {}) {
  const began = Date.now();
  const deadline = began + timeout;
  let previous = null;
  for (let looks = 1; ; looks++) {
    const answer = await page.evaluate(inspect, arg);
    const seen = JSON.stringify(answer);
    if (seen === previous && until(answer)) {
      settled.push({ what, ms: Date.now() - began, looks });
      return answer;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last seen: ${seen.slice(0, 1500)}`);
    }
    previous = seen;
    // the next frame; a page that draws none (its GPU work still queued, or in the background) is
    // looked at again after 100 ms
    await page.evaluate(() => new Promise((resolve) => {
      requestAnimationFrame(() => resolve());
      setTimeout(resolve, 100);
    }));
  }
}

// Runs in the page: the active viewport as the next step of a check needs it. imageId is the image
// it is on, rendered the last image Cornerstone finished drawing in it (ohifContext() listens),
// status Cornerstone's viewportStatus; canvas, read once that image is drawn (reading a picture
// is the slow part), counts the drawn pixels (inked: not black, coloured: not grey, which on a CT
// is the segmentation overlay) with a checksum of them all; svg holds the
// texts and the shapes (contours, measurements) drawn over the image, annotations the Cornerstone
// annotations (contours, measurements) that belong to the image.
export function viewportState() {
  const { viewportGridService } = window.services;
  const id = viewportGridService.getActiveViewportId();
  const displaySets = viewportGridService.getState().viewports.get(id)?.displaySetInstanceUIDs ?? [];
  const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
  if (!viewport) return { viewportId: id, displaySets, imageId: null };
  const state = {
    viewportId: id,
    displaySets,
    imageId: viewport.getCurrentImageId?.() ?? null,
    imageIndex: viewport.getCurrentImageIdIndex?.() ?? null,
    rendered: window.__renderedImage?.[id] ?? null,
    status: viewport.viewportStatus ?? null,
    canvas: null,
    svg: {
      text: [...(viewport.element?.querySelectorAll('svg text') ?? [])].map((t) => t.textContent).filter(Boolean),
      shapes: viewport.element?.querySelectorAll('svg path, svg polyline').length ?? 0,
    },
    annotations: 0,
  };
  if (state.imageId) {
    state.annotations = window.cornerstoneTools.annotation.state.getAllAnnotations()
      .filter((a) => a.metadata?.referencedImageId === state.imageId).length;
  }
  // The picture is read at a quarter of its size through a canvas of our own: reading the
  // viewport's own canvas back would slow Cornerstone's drawing into it.
  const { canvas } = viewport;
  if (state.imageId && state.rendered === state.imageId && state.status === 'rendered' && canvas?.width && canvas.height) {
    const small = (window.__viewportStateCanvas ??= document.createElement('canvas'));
    small.width = Math.ceil(canvas.width / 4);
    small.height = Math.ceil(canvas.height / 4);
    const context = small.getContext('2d');
    context.imageSmoothingEnabled = false;
    context.drawImage(canvas, 0, 0, small.width, small.height);
    const px = context.getImageData(0, 0, small.width, small.height).data;
    let inked = 0;
    let coloured = 0;
    let checksum = 0;
    for (let i = 0; i < px.length; i += 4) {
      const r = px[i];
      const g = px[i + 1];
      const b = px[i + 2];
      if (r || g || b) inked += 1;
      if (Math.max(r, g, b) - Math.min(r, g, b) > 24) coloured += 1;
      checksum = (checksum * 31 + r + 3 * g + 7 * b) >>> 0;
    }
    state.canvas = { width: small.width, height: small.height, inked, coloured, checksum };
  }
  return state;
}

// Until the active viewport has finished drawing the image it is on, its picture is the same on two
// consecutive frames and `until(viewportState())` holds. Returns that state.
export function waitForRenderedImage(page, what, until = () => true, { timeout = 30000 } = {}) {
  return settle(page, what, viewportState, null, {
    until: (s) => Boolean(s.imageId) && s.rendered === s.imageId && s.status === 'rendered' && until(s),
    timeout,
  });
}

// Jumps the active viewport to the centre of a segment (OHIF's jumpToSegmentCenter, without the
// highlight animation) and returns the image it must land on (target, and its index in the stack):
// the one whose plane lies nearest the centre OHIF computed for the segment (null when OHIF has
// none and stays where it is). With `contour`, of the segmentation made of an RT Structure Set,
// else of the first one.
export function jumpToSegmentCentre(page, { segmentIndex = null, contour = false } = {}) {
  return page.evaluate(({ index, wantContour }) => {
    const { segmentationService, viewportGridService } = window.services;
    const all = segmentationService.getSegmentations();
    const s = wantContour ? all.find((x) => x.representationData?.Contour) : all[0];
    const segment = index ?? Math.min(...Object.keys(s.segments).map(Number).filter((k) => s.segments[k]));
    const viewportId = viewportGridService.getActiveViewportId();
    const stats = s.segments[segment]?.cachedStats;
    const world = stats?.center?.world ?? stats?.namedStats?.center?.value ?? null;
    let target = null;
    let targetIndex = null;
    if (world) {
      const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === viewportId).viewport;
      let best = Infinity;
      for (const [k, imageId] of viewport.getImageIds().entries()) {
        const plane = window.cornerstone.metaData.get('imagePlaneModule', imageId);
        if (!plane?.imagePositionPatient) continue;
        const [r, c] = [plane.rowCosines, plane.columnCosines];
        const normal = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
        const d = Math.abs(normal.reduce((sum, n, k) => sum + n * (world[k] - plane.imagePositionPatient[k]), 0));
        if (d < best) [best, target, targetIndex] = [d, imageId, k];
      }
    }
    segmentationService.jumpToSegmentCenter(s.segmentationId, segment, viewportId, 0.9, false, 0);
    return { segment, world, target, targetIndex };
  }, { index: segmentIndex, wantContour: contour });
}
