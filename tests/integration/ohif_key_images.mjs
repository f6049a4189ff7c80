// SPDX-License-Identifier: AGPL-3.0-or-later
// Drives OHIF 3.13 in headless Debian Chromium for tests/integration/test_pacs_outputs.py: opens a
// study, shows its key image series (Secondary Capture) in the viewport the way a user does
// (double-click in the study browser) and reports what OHIF says it shows.
//
//   node tests/integration/ohif_key_images.mjs --url <viewer url> --out <artefact dir> [--chromium PATH]
//
// Prints one JSON object on the last line of stdout; the Python test makes the assertions.
// Exit status 0 when the report was written (even if OHIF misbehaved), 2 on a usage error.
import {
  SOFTWARE_WEBGL, drive, newPage, ohifContext, screenshots, start, waitForFirstImage, waitForRenderedImage,
} from './browser.mjs';

const check = start({
  usage: 'ohif_key_images.mjs --url <viewer url> --out <dir> [--chromium PATH] [--timeout ms]',
  required: ['url'],
  defaults: { timeout: 60000 },
});
const { args, report } = check;

await drive({ ...check, flags: SOFTWARE_WEBGL }, async (browser) => {
  const page = await newPage(await ohifContext(browser), check);
  const shot = screenshots(page, check);

  report.step = 'open the study';
  await page.goto(args.url);
  await page.waitForFunction(() => (window.services?.displaySetService?.getActiveDisplaySets() ?? [])
    .some((d) => /key images/i.test(d.SeriesDescription ?? '')));
  report.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map((d) => ({
    uid: d.displaySetInstanceUID, modality: d.Modality, description: d.SeriesDescription,
    images: d.images?.length ?? d.numImageFrames ?? null,
  })));
  const keys = report.displaySets.find((d) => /key images/i.test(d.description ?? ''));

  await waitForFirstImage(page);

  report.step = 'show the key images';
  await page.locator(`#thumbnail-${keys.uid}`).dblclick();
  // The image renders asynchronously: done once the viewport shows the key image series, has drawn
  // its image and the picture holds still.
  const shown = await waitForRenderedImage(page, 'the key image drawn in the viewport',
    (s) => s.displaySets.includes(keys.uid) && s.canvas?.inked > 0);
  report.shown = await page.evaluate(() => {
    const { viewportGridService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const viewport = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === id)?.viewport;
    return { imageId: viewport.getCurrentImageId(), images: viewport.getImageIds?.().length ?? null };
  });
  report.shown.canvas = shown.canvas;
  await shot('ohif-key-images.png');
  report.ok = true;
});
