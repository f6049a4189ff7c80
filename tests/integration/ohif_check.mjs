// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives OHIF 3.13 in headless Debian Chromium (playwright-core, no bundled browser) for
// tests/integration/test_ohif.py: opens one study, loads its SEG, its SR and (when the study has
// one) its RTSTRUCT the way a user does (double-click in the study browser, confirm), and reports
// what OHIF itself says it has loaded.
//
//   node tests/integration/ohif_check.mjs --url <viewer url> --out <artefact dir> [--chromium PATH]
//     [--expect SEG,SR,RTSTRUCT]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if OHIF misbehaved), 2 on a usage error.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
// playwright-core lives in viewer/node_modules (scripts/install_viewer.sh), not beside this file.
const require = createRequire(path.join(here, '..', '..', 'viewer', 'package.json'));
const { chromium } = require('playwright-core');

function parseArgs(argv) {
  const args = { chromium: '/usr/bin/chromium', timeout: 60000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    args[key] = key === 'timeout' ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!args.url || !args.out) {
    console.error('usage: ohif_check.mjs --url <viewer url> --out <dir> [--chromium PATH] [--timeout ms]');
    process.exit(2);
  }
  return args;
}

// Software WebGL2 (SwiftShader through ANGLE): OHIF renders without a GPU.
const CHROMIUM_FLAGS = [
  '--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--use-gl=angle',
  '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
];

const args = parseArgs(process.argv.slice(2));
fs.mkdirSync(args.out, { recursive: true });
const report = { ok: false, step: 'launch', error: null, timings: {}, console: [], errorBoundary: [], screenshots: [] };
const t0 = Date.now();
const mark = (name) => { report.timings[name] = (Date.now() - t0) / 1000; };

let browser;
try {
  browser = await chromium.launch({ executablePath: args.chromium, args: CHROMIUM_FLAGS, timeout: args.timeout });
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  // No first-visit tour over the viewport, no investigational-use banner over the images.
  await context.addInitScript(() => {
    localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
    sessionStorage.setItem('investigationalUseDialog', 'hidden');
  });
  const page = await context.newPage();
  page.setDefaultTimeout(args.timeout);
  // OHIF reports the crashes its React error boundaries catch through console.debug: keep every level.
  page.on('console', (msg) => {
    const text = msg.text();
    const entry = { type: msg.type(), step: report.step, t: (Date.now() - t0) / 1000, text: text.slice(0, 2000) };
    if (/error boundary/i.test(text)) report.errorBoundary.push(entry);
    if (['error', 'warning'].includes(msg.type())) report.console.push(entry);
  });
  // every answer of 400 or more, with its URL: what the viewer asked for and did not get
  report.httpErrors = [];
  page.on('response', (r) => {
    if (r.status() >= 400) report.httpErrors.push({ status: r.status(), method: r.request().method(), url: r.url().slice(0, 300) });
  });
  page.on('pageerror', (err) => report.console.push({
    type: 'pageerror', step: report.step, t: (Date.now() - t0) / 1000, text: String(err.stack || err).slice(0, 2000),
  }));
  const shot = async (name) => {
    const file = path.join(args.out, name);
    await page.screenshot({ path: file });
    report.screenshots.push(file);
  };

  report.step = 'open the study';
  await page.goto(args.url);
  // --expect: the output modalities the study must show (default SEG,SR), besides the CT.
  const expected = (args.expect ?? 'SEG,SR').split(',').filter(Boolean);
  await page.waitForFunction((want) => {
    const sets = window.services?.displaySetService?.getActiveDisplaySets() ?? [];
    window.__ohifCheckModalities = sets.map((d) => d.Modality);
    return want.every((m) => sets.some((d) => d.Modality === m)) && sets.some((d) => d.Modality === 'CT');
  }, expected).catch(async (err) => {
    const seen = await page.evaluate(() => window.__ohifCheckModalities ?? []);
    throw new Error(`display sets ${JSON.stringify(seen)}, expected CT and ${expected.join(', ')}: ${err.message}`);
  });
  report.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map((d) => ({
    uid: d.displaySetInstanceUID, modality: d.Modality, description: d.SeriesDescription,
    frames: d.numImageFrames ?? null,
  })));
  const seg = report.displaySets.find((d) => d.modality === 'SEG');
  const sr = report.displaySets.find((d) => d.modality === 'SR');
  // The CT is on screen once a viewport holds an image.
  await page.waitForFunction(() => (window.cornerstone?.getEnabledElements() ?? [])
    .some((e) => e.viewport?.getCurrentImageId?.()));
  mark('ct_shown');

  report.step = 'load the SEG';
  await page.locator(`#thumbnail-${seg.uid}`).dblclick();
  await page.getByText('Do you want to open this Segmentation?').waitFor();
  await page.getByRole('button', { name: 'Yes', exact: true }).click();
  // OHIF first previews the SEG in the viewport, then replaces that viewport with one showing the
  // referenced CT with the overlay. Act on the viewport only once it has stayed the same for a while:
  // scrolling one that OHIF is about to destroy crashes OHIF ("viewport has been destroyed").
  await page.waitForFunction(() => {
    const { segmentationService, viewportGridService, displaySetService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const shown = viewportGridService.getState().viewports.get(id)?.displaySetInstanceUIDs ?? [];
    const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
    const ready = segmentationService.getSegmentations().length > 0
      && segmentationService.getSegmentationRepresentations(id).length > 0
      && shown.some((uid) => displaySetService.getDisplaySetByUID(uid)?.Modality === 'CT')
      && viewport?.getCurrentImageId?.();
    const now = performance.now();
    if (!ready || window.__ohifCheckViewport !== viewport) {
      window.__ohifCheckViewport = ready ? viewport : null;
      window.__ohifCheckSince = now;
      return false;
    }
    return now - window.__ohifCheckSince > 1000;
  }, null, { polling: 100 });
  mark('seg_loaded');
  // Show the first segment's middle slice and the panel that lists the segment names.
  await page.evaluate(() => {
    const { segmentationService, panelService, viewportGridService } = window.services;
    const id = segmentationService.getSegmentations()[0].segmentationId;
    segmentationService.jumpToSegmentCenter(id, 1, viewportGridService.getActiveViewportId(), 0.9, false, 0);
    panelService.activatePanel('@ohif/extension-cornerstone.panelModule.panelSegmentation', true);
  });
  await page.getByText('Right lung').first().waitFor();
  await page.waitForTimeout(1500); // the jump and the overlay render asynchronously
  report.seg = await page.evaluate(inspectSegmentation);
  report.seg.panelText = await page.locator('body').innerText();
  report.seg.panelText = ['Right lung', 'Left lung'].filter((t) => report.seg.panelText.includes(t));
  await shot('ohif-seg.png');
  mark('seg_screenshot');

  report.step = 'load the SR';
  await page.locator(`#thumbnail-${sr.uid}`).dblclick();
  await page.waitForFunction((uid) => {
    const { viewportGridService, displaySetService } = window.services;
    const shown = [...viewportGridService.getState().viewports.values()]
      .some((v) => (v.displaySetInstanceUIDs ?? []).includes(uid));
    const ds = displaySetService.getDisplaySetByUID(uid);
    return shown && ds?.isLoaded && (ds.measurements ?? []).length > 0;
  }, sr.uid);
  // The SR viewport draws its measurements as SVG text next to the image.
  await page.waitForFunction(() => [...document.querySelectorAll('svg text')].some((t) => /Volume/.test(t.textContent)))
    .catch(() => {});
  await page.waitForTimeout(1500);
  report.sr = await page.evaluate((uid) => {
    const ds = window.services.displaySetService.getDisplaySetByUID(uid);
    return {
      sopClassUID: ds.SOPClassUID,
      measurements: (ds.measurements ?? []).map((m) => ({
        trackingIdentifier: m.TrackingIdentifier,
        labels: (m.labels ?? []).map((l) => ({ label: l.label, value: l.value })),
        graphicType: m.graphicType ?? null,
        coords: (m.coords ?? []).length,
      })),
      svgText: [...document.querySelectorAll('svg text')].map((t) => t.textContent).filter(Boolean),
    };
  }, sr.uid);
  await shot('ohif-sr.png');
  mark('sr_screenshot');
  await page.waitForTimeout(500);
  report.ok = true;

  // The RT Structure Set, when the study has one: its own try, so that a failure here is reported
  // as report.rtstruct.error and does not hide what the SEG and SR steps found.
  const rt = report.displaySets.find((d) => d.modality === 'RTSTRUCT');
  report.rtstruct = rt ? { error: null } : null;
  if (rt) {
    try {
      report.step = 'load the RTSTRUCT';
      await page.locator(`#thumbnail-${rt.uid}`).dblclick();
      // OHIF asks as for a SEG ("open this Segmentation?"), then shows the referenced CT with the
      // contours. Answer the prompt whenever it shows; done once the viewport has stayed the same
      // (CT on screen, a contour segmentation represented in it) for a second.
      await page.waitForFunction(() => {
        const yes = [...document.querySelectorAll('button')].find((b) => b.textContent.trim() === 'Yes');
        if (yes && /open this/i.test(document.body.innerText)) yes.click();
        const { segmentationService, viewportGridService, displaySetService } = window.services;
        const id = viewportGridService.getActiveViewportId();
        const shown = viewportGridService.getState().viewports.get(id)?.displaySetInstanceUIDs ?? [];
        const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
        const contour = segmentationService.getSegmentations().find((s) => s.representationData?.Contour);
        const ready = contour
          && segmentationService.getSegmentationRepresentations(id)
            .some((r) => r.segmentationId === contour.segmentationId)
          && shown.some((uid) => displaySetService.getDisplaySetByUID(uid)?.Modality === 'CT')
          && viewport?.getCurrentImageId?.();
        const now = performance.now();
        if (!ready || window.__ohifCheckViewport !== viewport) {
          window.__ohifCheckViewport = ready ? viewport : null;
          window.__ohifCheckSince = now;
          return false;
        }
        return now - window.__ohifCheckSince > 1000;
      }, null, { polling: 200 });
      mark('rtstruct_loaded');
      // Show the middle of the first ROI, where both lungs are drawn.
      await page.evaluate(() => {
        const { segmentationService, viewportGridService } = window.services;
        const contour = segmentationService.getSegmentations().find((s) => s.representationData?.Contour);
        const first = Math.min(...Object.keys(contour.segments).map(Number).filter((k) => contour.segments[k]));
        segmentationService.jumpToSegmentCenter(
          contour.segmentationId, first, viewportGridService.getActiveViewportId(), 0.9, false, 0,
        );
      });
      // Done once the slice on screen carries contour annotations of the structure set.
      await page.waitForFunction(() => {
        const { viewportGridService } = window.services;
        const id = viewportGridService.getActiveViewportId();
        const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
        const imageId = viewport?.getCurrentImageId?.();
        return window.cornerstoneTools.annotation.state.getAllAnnotations()
          .some((a) => a.metadata?.referencedImageId === imageId && a.data?.segmentation);
      }, null, { polling: 200 }).catch(() => {});
      await page.waitForTimeout(1000); // the contours are drawn (SVG) on the next render
      report.rtstruct = await page.evaluate(inspectContours, rt.uid);
      report.rtstruct.error = null;
      await shot('ohif-rtstruct.png');
      mark('rtstruct_screenshot');
    } catch (err) {
      report.rtstruct = { ...(report.rtstruct ?? {}), error: String(err && err.message ? err.message : err) };
      const file = path.join(args.out, 'ohif-rtstruct-failure.png');
      await page.screenshot({ path: file }).then(() => report.screenshots.push(file)).catch(() => {});
    }
  }
  report.step = 'done';
} catch (err) {
  report.error = String(err && err.message ? err.message : err);
  try {
    const pages = browser ? browser.contexts().flatMap((c) => c.pages()) : [];
    if (pages.length) {
      const file = path.join(args.out, 'ohif-failure.png');
      await pages[0].screenshot({ path: file });
      report.screenshots.push(file);
    }
  } catch { /* the screenshot is a bonus */ }
} finally {
  if (browser) await browser.close().catch(() => {});
  mark('total');
  console.log(JSON.stringify(report));
}

// Runs in the page: what OHIF and Cornerstone hold for the loaded segmentation, and where its
// voxels fall on the CT slice on screen (mean HU under each segment, centre column).
function inspectSegmentation() {
  const { segmentationService, viewportGridService, displaySetService } = window.services;
  const viewportId = viewportGridService.getActiveViewportId();
  const vpState = viewportGridService.getState().viewports.get(viewportId);
  const shownSet = displaySetService.getDisplaySetByUID(vpState.displaySetInstanceUIDs[0]);
  const [segmentation] = segmentationService.getSegmentations();
  const reps = segmentationService.getSegmentationRepresentations(viewportId);
  const rep = reps.find((r) => r.segmentationId === segmentation.segmentationId);
  const out = {
    label: segmentation.label,
    segments: Object.values(segmentation.segments).filter(Boolean)
      .map((s) => ({ index: s.segmentIndex, label: s.label })),
    viewportSeries: { modality: shownSet?.Modality, description: shownSet?.SeriesDescription },
    representation: rep ? {
      type: rep.type, visible: rep.visible,
      segments: Object.fromEntries(Object.entries(rep.segments ?? {})
        .map(([k, v]) => [k, { visible: v.visible, color: v.color }])),
    } : null,
    slice: null,
  };
  const enabled = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === viewportId);
  const ctImageId = enabled.viewport.getCurrentImageId();
  const labelmapId = window.cornerstoneTools.segmentation.state
    .getCurrentLabelmapImageIdForViewport(viewportId, segmentation.segmentationId);
  const ct = window.cornerstone.cache.getImage(ctImageId);
  const lm = labelmapId && window.cornerstone.cache.getImage(labelmapId);
  if (ct && lm) {
    const hu = ct.getPixelData();
    const labels = lm.getPixelData();
    // Cornerstone usually keeps the pixels already rescaled to HU ("preScale").
    const scaled = Boolean(ct.preScale?.scaled);
    const slope = scaled ? 1 : ct.slope ?? 1;
    const intercept = scaled ? 0 : ct.intercept ?? 0;
    const stats = {};
    for (let i = 0; i < labels.length; i++) {
      const v = labels[i];
      if (!v) continue;
      const s = (stats[v] ??= { voxels: 0, huSum: 0, colSum: 0 });
      s.voxels += 1;
      s.huSum += hu[i] * slope + intercept;
      s.colSum += i % ct.columns;
    }
    out.slice = {
      imageIndex: enabled.viewport.getCurrentImageIdIndex(),
      columns: ct.columns, rows: ct.rows, sameGrid: lm.columns === ct.columns && lm.rows === ct.rows,
      prescaled: scaled, slope: ct.slope, intercept: ct.intercept,
      segments: Object.fromEntries(Object.entries(stats).map(([k, s]) => [k, {
        voxels: s.voxels, meanHU: Math.round(s.huSum / s.voxels), meanColumn: Math.round(s.colSum / s.voxels),
      }])),
    };
  }
  return out;
}

// Runs in the page: the RT Structure Set as OHIF parsed it (its display set's ROIs), the contour
// segmentation made of it, and the contours on the CT slice on screen (annotations, SVG paths).
function inspectContours(rtUid) {
  const { segmentationService, viewportGridService, displaySetService } = window.services;
  const ds = displaySetService.getDisplaySetByUID(rtUid);
  const viewportId = viewportGridService.getActiveViewportId();
  const vpState = viewportGridService.getState().viewports.get(viewportId);
  const shownSet = displaySetService.getDisplaySetByUID(vpState.displaySetInstanceUIDs[0]);
  const contour = segmentationService.getSegmentations().find((s) => s.representationData?.Contour);
  const rep = contour && segmentationService.getSegmentationRepresentations(viewportId)
    .find((r) => r.segmentationId === contour.segmentationId);
  const enabled = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === viewportId);
  const imageId = enabled.viewport.getCurrentImageId();
  const onSlice = window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter((a) => a.metadata?.referencedImageId === imageId && a.data?.segmentation);
  const element = enabled.viewport.element;
  return {
    modality: ds?.Modality,
    isLoaded: Boolean(ds?.isLoaded),
    roiNames: (ds?.structureSet?.ROIContours ?? []).map((r) => r.ROIName),
    segmentation: contour ? {
      label: contour.label,
      representations: Object.keys(contour.representationData ?? {}),
      segments: Object.values(contour.segments).filter(Boolean)
        .map((s) => ({ index: s.segmentIndex, label: s.label })),
    } : null,
    representation: rep ? {
      type: rep.type, visible: rep.visible,
      segments: Object.fromEntries(Object.entries(rep.segments ?? {})
        .map(([k, v]) => [k, { visible: v.visible, color: v.color }])),
    } : null,
    viewportSeries: { modality: shownSet?.Modality, description: shownSet?.SeriesDescription },
    imageIndex: enabled.viewport.getCurrentImageIdIndex(),
    slice: {
      annotations: onSlice.length,
      segments: [...new Set(onSlice.map((a) => a.data.segmentation.segmentIndex))].sort(),
      points: onSlice.reduce((n, a) => n + (a.data?.contour?.polyline?.length ?? 0), 0),
      svgShapes: element ? element.querySelectorAll('svg path, svg polyline').length : 0,
    },
  };
}
