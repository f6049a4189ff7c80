"""OHIF 3.13 shows what the plugin stored: the SEG as an overlay on the CT, the SR's measurements
(volumes, radiomics features in further measurements), the RTSTRUCT's contours on the CT.

Real Orthanc + real Triton (the session fixtures), the viewer proxy of ``devstack.viewer``,
and headless Debian Chromium driven by ``ohif_check.mjs`` (playwright-core). The assertions are on
what OHIF itself reports through ``window.services`` and Cornerstone, not only on pixels; the
screenshots ``test-artifacts/ohif-seg.png``, ``ohif-sr.png`` and ``ohif-rtstruct.png`` are kept for a person to look at.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer, free_port
from devstack.viewer import DEFAULT_DIST, ViewerServer

from ..conftest import CT_B40, require_data
from .browser import require_browser, run_check
from .conftest import study_uid, upload_as_new_study, wait_job_done

pytestmark = pytest.mark.integration

CHECK_SCRIPT = Path(__file__).with_name("ohif_check.mjs")
SEGMENTS = {"right-lung": "Right lung", "left-lung": "Left lung"}
# Aerated lung is around -850 HU; soft tissue, blood and bone are above -100.
LUNG_HU_MAX = -500


@pytest.fixture(scope="session")
def viewer_tools() -> None:
    """A missing browser or viewer is a broken install, not a reason to skip."""
    viewer = (
        [] if (DEFAULT_DIST / "index.html").is_file() else [f"the OHIF viewer in {DEFAULT_DIST} (@ohif/app)"]
    )
    require_browser("OHIF test", viewer)


@pytest.fixture(scope="module")
def ohif(viewer_tools: None, orthanc: OrthancServer, artifacts: Path) -> dict[str, Any]:
    """Process the chest CT, then let OHIF open it, load the SEG and the SR; OHIF's report."""
    require_data(CT_B40)
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        # A copy as a new study: the session's Orthanc keeps the demo study's own UIDs for
        # test_e2e_ct_lung.py, which sends both of its series.
        uid = study_uid(c, upload_as_new_study(c, CT_B40))
        job = wait_job_done(c, uid, orthanc=orthanc)
    assert job["state"] == "succeeded", f"the AI job did not succeed, nothing to show: {job['error']}"
    for name in (
        "ohif-seg.png", "ohif-sr.png", "ohif-rtstruct.png", "ohif-failure.png", "ohif-rtstruct-failure.png",
        "ohif-report.json",
    ):  # fmt: skip
        (artifacts / name).unlink(missing_ok=True)
    with ViewerServer(orthanc.url, free_port()) as viewer:
        report = run_check(
            CHECK_SCRIPT,
            ["--url", viewer.viewer_url(uid), "--expect", "SEG,SR,RTSTRUCT"],
            artifacts,
            "ohif-report.json",
        )
    report["job"] = job
    return report


def _failure(report: dict[str, Any]) -> str:
    console = "\n".join(f"  [{m['type']}] {m['text'][:400]}" for m in report["console"][-15:])
    return (
        f"OHIF check failed at step '{report['step']}': {report['error']}\n"
        f"screenshots: {report['screenshots']}\nlast console errors/warnings:\n{console}"
    )


def test_ohif_loads_the_study_without_crashing(ohif: dict[str, Any]) -> None:
    assert ohif["ok"], _failure(ohif)
    crashes = json.dumps(ohif["errorBoundary"])
    assert not ohif["errorBoundary"], f"OHIF caught a crash (Error Boundary): {crashes}"
    modalities = sorted(d["modality"] for d in ohif["displaySets"])
    assert {"CT", "SEG", "SR", "RTSTRUCT"} <= set(modalities), f"OHIF's display sets: {modalities}"


def test_seg_is_a_visible_overlay_on_the_ct_with_segment_names(ohif: dict[str, Any]) -> None:
    assert ohif["ok"], _failure(ohif)
    seg = ohif["seg"]
    assert [s["label"] for s in seg["segments"]] == ["Right lung", "Left lung"], seg["segments"]
    assert seg["panelText"] == ["Right lung", "Left lung"], "segment names missing in the Segmentation panel"
    assert seg["viewportSeries"]["modality"] == "CT", f"the overlay is not on the CT: {seg['viewportSeries']}"
    rep = seg["representation"]
    assert rep is not None and rep["type"] == "Labelmap" and rep["visible"], f"no visible labelmap: {rep}"
    for index in ("1", "2"):
        assert rep["segments"][index]["visible"], f"segment {index} hidden: {rep['segments']}"
    colours = {tuple(rep["segments"][i]["color"][:3]) for i in ("1", "2")}
    assert len(colours) == 2, f"both segments drawn in one colour: {colours}"


def test_seg_overlay_is_aligned_with_the_ct(ohif: dict[str, Any]) -> None:
    """On the slice OHIF shows, the labelled pixels are aerated lung, on the correct side."""
    assert ohif["ok"], _failure(ohif)
    s = ohif["seg"]["slice"]
    assert s is not None, "Cornerstone holds no labelmap image for the CT slice on screen"
    assert s["sameGrid"], f"labelmap and CT slice differ in size: {s}"
    right, left = s["segments"].get("1"), s["segments"].get("2")
    assert right and left, f"both lungs should be labelled on slice {s['imageIndex']}: {s['segments']}"
    for name, stats in (("Right lung", right), ("Left lung", left)):
        hu = stats["meanHU"]
        assert hu < LUNG_HU_MAX, f"{name} overlay lies on tissue of {hu} HU, not on lung: {s}"
    # An axial CT in the usual orientation shows the patient's right on the screen's left.
    assert right["meanColumn"] < s["columns"] / 2 < left["meanColumn"], f"lungs swapped on screen: {s}"


def test_sr_measurements_are_listed_with_their_volumes(ohif: dict[str, Any]) -> None:
    assert ohif["ok"], _failure(ohif)
    sr = ohif["sr"]
    assert sr["sopClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34", "not a Comprehensive 3D SR"
    shown: dict[str, str] = {}
    for m in sr["measurements"]:
        volume = [lbl["value"] for lbl in m["labels"] if lbl["label"] == "Volume"]
        assert len(volume) == 1 and re.fullmatch(r"\d+\.\d\d (ml|mL)", volume[0]), m
        assert m["coords"] >= 1, f"measurement {m['trackingIdentifier']} has no image region for OHIF"
        shown[SEGMENTS.get(m["trackingIdentifier"], m["trackingIdentifier"])] = volume[0].split()[0]
    expected = {v["segment"]: f"{v['volume_ml']:.2f}" for v in ohif["job"]["outputs"]["measurements"]}
    assert shown == expected, f"OHIF shows {shown}, the job measured {expected}"
    text = " ".join(sr["svgText"])
    drawn = "Volume:" in text and re.search(r"\d+\.\d\d (ml|mL)", text)
    assert drawn, f"no volume drawn on the image: {text!r}"


def test_rtstruct_contours_are_drawn_on_the_ct_with_roi_names(ohif: dict[str, Any], artifacts: Path) -> None:
    """The RT Structure Set loads as OHIF's contour segmentation; its ROIs are drawn on the CT."""
    assert ohif["ok"], _failure(ohif)
    rt = ohif["rtstruct"]
    assert rt is not None, "the study has no RTSTRUCT display set"
    assert rt["error"] is None, f"{rt['error']} (screenshots: {ohif['screenshots']})\n{_failure(ohif)}"
    assert not ohif["errorBoundary"], f"OHIF caught a crash: {json.dumps(ohif['errorBoundary'])}"
    assert rt["isLoaded"] and rt["roiNames"] == ["Right lung", "Left lung"], rt
    seg = rt["segmentation"]
    assert seg is not None and "Contour" in seg["representations"], f"no contour segmentation: {seg}"
    assert [s["label"] for s in seg["segments"]] == ["Right lung", "Left lung"], seg
    rep = rt["representation"]
    assert rep is not None and rep["type"] == "Contour" and rep["visible"], f"no visible contours: {rep}"
    assert rt["viewportSeries"]["modality"] == "CT", f"the contours are not on the CT: {rt['viewportSeries']}"
    on_slice = rt["slice"]
    assert on_slice["segments"] == [1, 2], (
        f"both lungs should be contoured on slice {rt['imageIndex']}: {on_slice}"
    )
    assert on_slice["points"] > 20 and on_slice["svgShapes"] >= 2, f"no contour drawn: {on_slice}"
    assert (artifacts / "ohif-rtstruct.png").is_file()


def test_behind_the_sites_https_proxy_bulk_data_points_at_the_public_origin(
    ohif: dict[str, Any], orthanc: OrthancServer
) -> None:
    """In production the gateway sits behind the site's HTTPS proxy: the ``Forwarded`` header
    (RFC 7239) that proxy sets passes through the gateway, and Orthanc writes the BulkDataURIs OHIF
    fetches on the public origin (an http:// address there would be mixed content the browser
    blocks). Every DICOMweb plugin release here reads it (``X-Forwarded-*`` only from 1.14)."""
    uid = ohif["job"]["study"]["StudyInstanceUID"]
    with ViewerServer(orthanc.url, free_port()) as viewer:
        metadata = httpx.get(
            f"{viewer.url}/dicom-web/studies/{uid}/metadata",
            headers={"Forwarded": "host=pacs.example;proto=https"},
            timeout=60,
        ).json()
    uris = [v["BulkDataURI"] for item in metadata for v in item.values() if "BulkDataURI" in v]
    assert uris, "no BulkDataURI in the study's metadata"
    assert all(u.startswith("https://pacs.example/dicom-web/") for u in uris), uris[:3]
