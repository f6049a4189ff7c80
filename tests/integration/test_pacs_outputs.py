"""Key images and the PDF summary on real Orthanc + Triton, as every PACS and RIS can use them.

The shipped ct-lung pipeline turns both on: the demo chest CT gets SEG, SR, three key images
(Secondary Capture) and an Encapsulated PDF, each passing dciodvfy; the key images' outlines lie
on the SEG's voxels of their slice; the PDF's text holds the job's lung volumes and the same PDF
is the FHIR report's presentedForm; OHIF shows the key image series (screenshot kept).
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from devstack.stack import OrthancServer, free_port
from devstack.viewer import ViewerServer

from ..conftest import CT_B40
from ..unit.test_seg import run_dciodvfy
from .browser import run_check
from .conftest import client, copy_as_new_study, shipped_pipelines, upload_folder, wait_job_done
from .test_ohif import viewer_tools  # noqa: F401 - the fixture that fails on a missing browser

pytestmark = pytest.mark.integration
OHIF_SCRIPT = Path(__file__).with_name("ohif_key_images.mjs")


@pytest.fixture(scope="module")
def processed(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pacs") / "study"
    uid, _ = copy_as_new_study(CT_B40, folder)
    with client(orthanc.url, timeout=120) as api:
        upload_folder(api, folder)
        job = wait_job_done(api, uid, orthanc=orthanc)
    assert job["state"] == "succeeded", job["error"]
    return {"uid": uid, "job": job}


def _read(api: httpx.Client, stored: dict[str, Any]) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(api.get(f"/instances/{stored['ID']}/file").content))


def test_the_study_gets_seg_sr_key_images_and_pdf_all_conformant(
    processed: dict[str, Any], api: httpx.Client, tmp_path: Path
) -> None:
    stored = processed["job"]["outputs"]["stored"]
    assert list(stored) == ["seg", "sr", "rtstruct", "key_images", "pdf"]
    assert len(stored["key_images"]) == 3
    instances = [stored["seg"], stored["sr"], *stored["key_images"], stored["pdf"]]
    for s in instances:
        ds = _read(api, s)
        assert ds.StudyInstanceUID == processed["uid"]
        run_dciodvfy(ds, tmp_path)
    series = {s["SeriesInstanceUID"] for s in stored["key_images"]}
    assert len(series) == 1
    keys = [_read(api, s) for s in stored["key_images"]]
    assert {k.SeriesNumber for k in keys} == {9904} and keys[0].SeriesDescription.endswith("key images")
    assert _read(api, stored["pdf"]).SeriesNumber == 9905
    assert {"key_images_encode", "pdf_encode"} <= set(processed["job"]["timings"])
    kinds = {e["kind"] for e in processed["job"]["events"]}
    assert "succeeded" in kinds


def _seg_masks(seg: pydicom.Dataset) -> dict[tuple[str, str], np.ndarray]:
    """(source SOP Instance UID, segment label) -> the SEG's mask on that slice."""
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out = {}
    for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence):
        sop = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[(str(sop), labels[number])] = frames[i].astype(bool)
    return out


def test_key_image_outlines_lie_on_the_seg_voxels_of_their_slice(
    processed: dict[str, Any], api: httpx.Client
) -> None:
    stored = processed["job"]["outputs"]["stored"]
    masks = _seg_masks(_read(api, stored["seg"]))
    colours = {
        s["name"]: tuple(s["color"])
        for s in next(p for p in shipped_pipelines() if p["name"] == "ct-lung")["segments"]
    }
    checked = 0
    for s in stored["key_images"]:
        key = _read(api, s)
        sop = str(key.SourceImageSequence[0].ReferencedSOPInstanceUID)
        pixels = key.pixel_array
        for name, colour in colours.items():
            mask = masks.get((sop, name))
            rows, cols = mask.shape if mask is not None else (0, 0)
            drawn = np.all(pixels[:rows, :cols] == np.asarray(colour, dtype=np.uint8), axis=2)
            if mask is None or not mask.any():
                continue
            near = ndimage.binary_dilation(mask & ~ndimage.binary_erosion(mask, iterations=3), iterations=1)
            assert drawn.sum() > 0.5 * (mask & ~ndimage.binary_erosion(mask)).sum(), (
                f"{name}: no outline drawn"
            )
            assert (drawn & ~near).sum() <= 0.01 * drawn.sum(), f"{name}: colour off the SEG's boundary"
            checked += 1
    assert checked >= 4, "both lungs on at least two key images"


def test_pdf_text_has_the_job_volumes_and_is_the_fhir_presented_form(
    processed: dict[str, Any], api: httpx.Client, artifacts: Path
) -> None:
    job = processed["job"]
    ds = _read(api, job["outputs"]["stored"]["pdf"])
    pdf = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    for tool in ("pdftotext", "pdftoppm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install Debian's poppler-utils (scripts/install.sh)")
    path = artifacts / "pdf-summary.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
    volumes = {m["segment"]: m["volume_ml"] for m in job["outputs"]["measurements"]}
    assert set(volumes) == {"Right lung", "Left lung"}
    for name, ml in volumes.items():
        line = next((x for x in text.splitlines() if name in x and "mL" in x), "")
        assert f"{ml:.2f}" in line, f"{name} {ml:.2f} mL not in the PDF: {line!r}"
    words = " ".join(text.split())
    assert "UNVERIFIED" in words and "Not validated for children" in words
    subprocess.run(["pdftoppm", "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", str(path),
                    str(artifacts / "pdf-summary-page1")], check=True)  # fmt: skip
    report = next(
        e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    (form,) = report["presentedForm"]
    assert form["contentType"] == "application/pdf" and base64.b64decode(form["data"]) == pdf


def test_ohif_shows_the_key_image_series(
    processed: dict[str, Any],
    orthanc: OrthancServer,
    artifacts: Path,
    viewer_tools: None,  # noqa: F811
) -> None:
    (artifacts / "ohif-key-images.png").unlink(missing_ok=True)
    with ViewerServer(orthanc.url, free_port()) as viewer:
        report = run_check(
            OHIF_SCRIPT, ["--url", viewer.viewer_url(processed["uid"])], artifacts, "ohif-key-images.json"
        )
    assert report["ok"], f"OHIF step '{report['step']}': {report['error']}; {report['console'][-5:]}"
    assert not report["errorBoundary"], report["errorBoundary"]
    keys = [d for d in report["displaySets"] if "key images" in (d["description"] or "")]
    assert len(keys) == 1 and keys[0]["images"] == 3, report["displaySets"]
    key_uids = {s["SOPInstanceUID"] for s in processed["job"]["outputs"]["stored"]["key_images"]}
    assert any(uid in report["shown"]["imageId"] for uid in key_uids), report["shown"]
    assert (artifacts / "ohif-key-images.png").stat().st_size > 10_000
