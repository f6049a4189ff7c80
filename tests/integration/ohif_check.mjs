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
import {
  SOFTWARE_WEBGL, drive, jumpToSegmentCentre, newPage, ohifContext, screenshots, start, waitForFirstImage,
  waitForRenderedImage, waitForSegmentationOnCt,
} from './browser.mjs';

const check = start({
  usage: 'ohif_check.mjs --url <viewer url> --out <dir> [--chromium PATH] [--timeout ms] [--expect SEG,SR,RTSTRUCT]',
  required: ['url'],
  defaults: { timeout: 60000 },
});
const { args, report, mark } = check;

await drive({ ...check, flags: SOFTWARE_WEBGL, failureShot: 'ohif-failure.png' }, async (browser) => {
  const page = await newPage(await ohifContext(browser), check);
  const shot = screenshots(page, check);

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
  await waitForFirstImage(page); // the CT is on screen
  mark('ct_shown');

  report.step = 'load the SEG';
  await page.locator(`#thumbnail-${seg.uid}`).dblclick();
  await page.getByText('Do you want to open this Segmentation?').waitFor();
  await page.getByRole('button', { name: 'Yes', exact: true }).click();
  await waitForSegmentationOnCt(page, { polling: 100 });
  mark('seg_loaded');
  // Show the panel that lists the segment names, then the first segment's middle slice (opening
  // the panel narrows the viewport: after the jump it would be drawn once more).
  await page.evaluate(() => window.services.panelService
    .activatePanel('@ohif/extension-cornerstone.panelModule.panelSegmentation', true));
  await page.getByText('Right lung').first().waitFor();
  const jump = await jumpToSegmentCentre(page, { segmentIndex: 1 });
  if (!jump.target) throw new Error(`OHIF has no centre for segment 1 of the SEG to jump to: ${JSON.stringify(jump)}`);
  // The jump and the overlay render asynchronously: done once the slice jumped to is drawn with the
  // overlay's colours and the picture holds still.
  const segShown = await waitForRenderedImage(page, `the SEG overlay drawn on the slice jumped to (image ${jump.targetIndex})`,
    (s) => s.imageId === jump.target && s.canvas?.coloured > 0);
  report.seg = await page.evaluate(inspectSegmentation);
  report.seg.shown = { imageIndex: segShown.imageIndex, canvas: segShown.canvas };
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
  // The SR viewport draws its measurements as SVG text next to the image: done once its image is
  // drawn with a volume written on it and both hold still.
  const srShown = await waitForRenderedImage(page, 'the SR viewport drawing its image with a volume label',
    (s) => s.displaySets.includes(sr.uid) && s.canvas?.inked > 0 && s.svg.text.some((t) => /Volume/.test(t)));
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
  report.sr.shown = { imageIndex: srShown.imageIndex, svgShapes: srShown.svg.shapes };
  await shot('ohif-sr.png');
  mark('sr_screenshot');
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
      // contours.
      await waitForSegmentationOnCt(page, { contour: true, answerPrompt: true });
      mark('rtstruct_loaded');
      // Show the middle of the first ROI, where both lungs are drawn.
      const rtJump = await jumpToSegmentCentre(page, { contour: true });
      // Done once the slice jumped to (where OHIF knows the ROI's centre) is drawn, carries
      // annotations and has its contours drawn (SVG), and both hold still.
      const rtShown = await waitForRenderedImage(page, `the RTSTRUCT contours drawn on the slice jumped to (image ${rtJump.targetIndex})`,
        (s) => (!rtJump.target || s.imageId === rtJump.target) && s.annotations > 0 && s.svg.shapes > 0);
      report.rtstruct = await page.evaluate(inspectContours, rt.uid);
      report.rtstruct.error = null;
      report.rtstruct.shown = { jumpTarget: rtJump.target, imageIndex: rtShown.imageIndex, svgShapes: rtShown.svg.shapes };
      await shot('ohif-rtstruct.png');
      mark('rtstruct_screenshot');
    } catch (err) {
      report.rtstruct = { ...(report.rtstruct ?? {}), error: String(err && err.message ? err.message : err) };
      await shot('ohif-rtstruct-failure.png').catch(() => {});
    }
  }
});

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
