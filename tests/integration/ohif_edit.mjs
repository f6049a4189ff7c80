// SPDX-License-Identifier: AGPL-3.0-or-later
// A reviewer's edit in OHIF 3.13, driven in headless Debian Chromium (playwright-core) for
// tests/integration/test_ohif_edit.py: opens one study in OHIF's segmentation mode, loads the
// AI's SEG (double-click in the study browser, confirm), picks OHIF's Eraser in the Segmentation
// panel, erases the lateral part of one segment with mouse strokes on several slices (scrolling
// between them with the mouse wheel), and stores the result to the data source with OHIF's own
// action (Segmentation panel menu > Export > DICOM SEG > Save), which is a STOW-RS.
//
//   node tests/integration/ohif_edit.mjs --url <viewer url> --out <artefact dir> --seg <SeriesDescription>
//     --segment <label to erase> --slices <n> [--user U --password P] [--chromium PATH] [--timeout ms]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if OHIF misbehaved), 2 on a usage error.
import {
  SOFTWARE_WEBGL, drive, jumpToSegmentCentre, newPage, ohifContext, screenshots, start, waitForFirstImage,
  waitForRenderedImage, waitForSegmentationOnCt,
} from './browser.mjs';

const check = start({
  usage: 'ohif_edit.mjs --url <viewer url> --out <dir> --seg <SeriesDescription> --segment <label> [--slices n]'
    + ' [--user U --password P] [--chromium PATH] [--timeout ms]',
  required: ['url', 'seg', 'segment'],
  defaults: { timeout: 90000, slices: 4 },
  numbers: ['slices'],
}, { strokes: [], before: null, after: null, stow: null });
const { args, report, mark } = check;

await drive({ ...check, flags: SOFTWARE_WEBGL, failureShot: 'ohif-edit-failure.png' }, async (browser) => {
  // Orthanc's authentication, answered through the proxy like a person at the login prompt.
  const context = await ohifContext(browser, {
    tours: ['basicViewerTour', 'segmentationTour'], user: args.user, password: args.password,
  });
  const page = await newPage(context, check);
  const shot = screenshots(page, check);

  report.step = 'open the study';
  await page.goto(args.url);
  await page.waitForFunction((description) => {
    const sets = window.services?.displaySetService?.getActiveDisplaySets() ?? [];
    return sets.some((d) => d.Modality === 'SEG' && d.SeriesDescription === description);
  }, args.seg);
  const segUid = await page.evaluate((description) => window.services.displaySetService.getActiveDisplaySets()
    .find((d) => d.Modality === 'SEG' && d.SeriesDescription === description).displaySetInstanceUID, args.seg);
  await waitForFirstImage(page);
  mark('ct_shown');

  report.step = 'load the SEG';
  await page.locator(`#thumbnail-${segUid}`).dblclick();
  await waitForSegmentationOnCt(page, { answerPrompt: true });
  const segmentIndex = await page.evaluate((label) => {
    const [s] = window.services.segmentationService.getSegmentations();
    return Number(Object.values(s.segments).find((x) => x && x.label === label)?.segmentIndex ?? 0);
  }, args.segment);
  if (!segmentIndex) throw new Error(`the loaded SEG has no segment '${args.segment}'`);
  report.segmentIndex = segmentIndex;
  report.before = await page.evaluate(countVoxels);
  mark('seg_loaded');

  report.step = 'pick the Eraser';
  await page.locator('[data-cy="Eraser-btn"]').click();
  await page.waitForFunction(() => window.cornerstoneTools.ToolGroupManager.getAllToolGroups()
    .some((g) => g.getActivePrimaryMouseButtonTool() === 'CircularEraser'));
  // Show the middle of the segment to erase: done once the slice jumped to is drawn with the
  // overlay's colours and the picture holds still.
  const jump = await jumpToSegmentCentre(page, { segmentIndex });
  if (!jump.target) throw new Error(`OHIF has no centre for '${args.segment}' to jump to: ${JSON.stringify(jump)}`);
  await waitForRenderedImage(page, `the SEG overlay drawn on the slice jumped to (image ${jump.targetIndex})`,
    (s) => s.imageId === jump.target && s.canvas?.coloured > 0);

  report.step = 'erase';
  for (let n = 0; n < args.slices; n++) {
    // Where the segment's lateral part lies on screen on this slice (page coordinates).
    const stroke = await page.evaluate(strokeOnSlice, segmentIndex);
    if (!stroke) throw new Error(`no '${args.segment}' voxels on the slice shown (stroke ${n + 1})`);
    await page.mouse.move(stroke.points[0][0], stroke.points[0][1]);
    await page.mouse.down();
    for (const [x, y] of stroke.points.slice(1)) await page.mouse.move(x, y);
    await page.mouse.up();
    // The eraser works on the labelmap as the mouse moves: done once the slice has fewer voxels.
    await page.waitForFunction(([index, voxels]) => window.__countShown(index) < voxels,
      [segmentIndex, stroke.voxels], { polling: 100, timeout: 20000 })
      .catch(() => { throw new Error(`the eraser stroke changed nothing on slice ${stroke.imageIndex}`); });
    report.strokes.push({ imageIndex: stroke.imageIndex, points: stroke.points.length, voxelsBefore: stroke.voxels });
    if (n === 0) await shot('ohif-edit-erased.png');
    if (n + 1 < args.slices) {
      // Next slice: the mouse wheel over the image, as a person scrolls.
      const viewportBox = stroke.viewportCentre;
      await page.mouse.move(viewportBox[0], viewportBox[1]);
      await page.mouse.wheel(0, 120);
      // Done once another slice is drawn with its overlay and the picture holds still.
      await waitForRenderedImage(page, `the next slice after ${stroke.imageIndex} drawn with its overlay`,
        (s) => s.imageIndex !== stroke.imageIndex && s.canvas?.coloured > 0);
    }
  }
  report.after = await page.evaluate(countVoxels);
  await shot('ohif-edit-after.png');
  mark('erased');

  report.step = 'store the SEG';
  await page.locator('[data-cy="segmentation-collapsed-more-btn-Labelmap"]').click();
  await page.getByText('Export', { exact: true }).click();
  await page.getByText('DICOM SEG', { exact: true }).click();
  await page.getByText('Store Segmentation').waitFor();
  await shot('ohif-edit-store-dialog.png');
  const stored = page.waitForResponse((r) => r.request().method() === 'POST' && /\/dicom-web\/studies/.test(r.url()));
  await page.locator('[data-cy="input-dialog-save-button"] button').click();
  const answer = await stored;
  const text = await answer.text();
  report.stow = { status: answer.status(), url: answer.url(), sopInstanceUIDs: [] };
  try {
    const body = JSON.parse(text);
    for (const item of body?.['00081199']?.Value ?? []) report.stow.sopInstanceUIDs.push(item['00081155']?.Value?.[0]);
  } catch {
    report.stow.body = text.slice(0, 2000);
  }
  // OHIF adds the stored series to the study browser: done once a display set holds the stored
  // instance and its thumbnail is on screen.
  report.step = 'the stored SEG in the study browser';
  const storedUid = await page.waitForFunction((uids) => {
    const sets = window.services.displaySetService.getActiveDisplaySets();
    const set = sets.find((d) => (d.instances ?? [d.instance]).some((i) => uids.includes(i?.SOPInstanceUID)));
    return set?.displaySetInstanceUID;
  }, report.stow.sopInstanceUIDs, { timeout: 30000 }).then((h) => h.jsonValue()).catch((err) => {
    throw new Error(`no display set holds the stored instance ${report.stow.sopInstanceUIDs}: ${err.message}`);
  });
  await page.locator(`#thumbnail-${storedUid}`).waitFor({ state: 'visible' });
  report.stow.displaySet = storedUid;
  await shot('ohif-edit-stored.png');
  mark('stored');
  report.ok = true;
});

// Runs in the page: voxels per segment on every slice of the loaded labelmap, and installs
// window.__countShown(segment), the voxels on the labelmap slice under the CT slice on screen.
function countVoxels() {
  const { segmentationService, viewportGridService } = window.services;
  const [s] = segmentationService.getSegmentations();
  const { imageIds } = s.representationData.Labelmap;
  const countImage = (index, imageId) => {
    const image = imageId && window.cornerstone.cache.getImage(imageId);
    if (!image) return undefined;
    const data = image.getPixelData();
    let n = 0;
    for (let i = 0; i < data.length; i++) if (data[i] === index) n++;
    return n;
  };
  const count = (index, z) => countImage(index, imageIds[z]);
  window.__countShown = (index) => countImage(index, window.cornerstoneTools.segmentation.state
    .getCurrentLabelmapImageIdForViewport(viewportGridService.getActiveViewportId(), s.segmentationId));
  const out = {};
  for (const index of Object.keys(s.segments).map(Number)) {
    out[index] = imageIds.map((_, z) => count(index, z) ?? -1);
  }
  return out;
}

// Runs in the page: a vertical stroke through the lateral quarter of the segment on the slice
// shown (the patient's left is on the screen's right in an axial view; for a right-sided segment
// the lateral side is the screen's left), as page coordinates, and where the slice is.
function strokeOnSlice(index) {
  const { segmentationService, viewportGridService } = window.services;
  const viewportId = viewportGridService.getActiveViewportId();
  const enabled = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === viewportId);
  const viewport = enabled.viewport;
  const [s] = segmentationService.getSegmentations();
  const imageIndex = viewport.getCurrentImageIdIndex();
  const ctImageId = viewport.getCurrentImageId();
  const labelmapId = window.cornerstoneTools.segmentation.state
    .getCurrentLabelmapImageIdForViewport(viewportId, s.segmentationId);
  const lm = labelmapId && window.cornerstone.cache.getImage(labelmapId);
  if (!lm) return null;
  const data = lm.getPixelData();
  let voxels = 0; let minC = Infinity; let maxC = -1; let minR = Infinity; let maxR = -1; let colSum = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i] !== index) continue;
    const r = Math.floor(i / lm.columns); const c = i % lm.columns;
    voxels++; colSum += c;
    minC = Math.min(minC, c); maxC = Math.max(maxC, c); minR = Math.min(minR, r); maxR = Math.max(maxR, r);
  }
  if (voxels < 200) return null;
  const leftOfScreen = colSum / voxels < lm.columns / 2;
  const column = leftOfScreen ? minC + (maxC - minC) * 0.2 : maxC - (maxC - minC) * 0.2;
  const rect = viewport.canvas.getBoundingClientRect();
  const toPage = (col, row) => {
    const world = window.cornerstone.utilities.imageToWorldCoords(ctImageId, [col, row]);
    const [x, y] = viewport.worldToCanvas(world);
    return [rect.left + x, rect.top + y];
  };
  const points = [];
  for (let k = 0; k <= 8; k++) points.push(toPage(column, minR + ((maxR - minR) * (0.15 + 0.7 * k / 8))));
  return {
    imageIndex, voxels, points,
    viewportCentre: [rect.left + rect.width / 2, rect.top + rect.height / 2],
  };
}
