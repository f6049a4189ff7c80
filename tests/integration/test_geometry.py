"""A gantry-tilted CT through the real stack: the shared A0001 CT (64 slices of 5 mm, 512 x 512)
re-sliced with a 20 degree tilt (``devstack.derive.tilted``) as a new study.

ct-lung resamples it onto an axial grid, maps the labels back onto the tilted slices and
measures there: lung volumes within 3% of the untilted series' (the model's documented figures
for A0001, ``triton_models/ct_lung/metrics.json``, which the untilted job reproduces within 1%:
``test_e2e_ct_lung.py``), a SEG whose frames reference the tilted instances and lie on their
planes, and dciodvfy without error.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from devstack.common import ROOT
from devstack.derive import copy_study, sorted_slices, tilted
from devstack.stack import OrthancServer
from orthanc_plugin.core.uids import derived_uid

from ..conftest import CT_A0001, require_data
from .conftest import TERMINAL, series_by_modality, wait_for

pytestmark = pytest.mark.integration

TILT = 20.0


@pytest.fixture(scope="module")
def tilted_job(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_data(CT_A0001)
    tag = f"geometry-tilt-{tmp_path_factory.getbasetemp().name}"
    folder = copy_study(tilted(sorted_slices(CT_A0001), TILT), tmp_path_factory.mktemp("tilted"), tag)
    uid = derived_uid(tag, "study")
    with httpx.Client(base_url=orthanc.url, timeout=60) as api:
        sid = ""
        for f in sorted(folder.glob("*.dcm")):
            r = api.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            sid = str(r.json()["ParentStudy"])

        def done() -> dict[str, Any] | None:
            jobs = [
                j for j in api.get("/ai/jobs", params={"study": uid}).json() if j["pipeline"] == "ct-lung"
            ]
            if jobs and jobs[0]["state"] in TERMINAL:
                return dict(api.get(f"/ai/jobs/{jobs[0]['id']}").json())
            return None

        job = wait_for("the ct-lung job of the tilted study", done, timeout=300, orthanc=orthanc)
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in folder.glob("*.dcm")}
    return {"job": job, "study_id": sid, "sent": sent}


def test_tilted_ct_lung_volumes_within_3_percent_of_the_untilted(tilted_job: dict[str, Any]) -> None:
    job = tilted_job["job"]
    assert job["state"] == "succeeded", job["error"]
    notes = " ".join(job["outputs"]["inputs"]["notes"])
    assert (
        f"slices tilted {TILT:.1f} degrees" in notes
        and "labels mapped back onto the 64 source slices" in notes
    )
    untilted = json.loads((ROOT / "triton_models" / "ct_lung" / "metrics.json").read_text())["series"][
        "A0001-5mm"
    ]["predicted_ml"]
    volumes = {m["segment"]: m["volume_ml"] for m in job["outputs"]["measurements"]}
    print(f"tilted {TILT:g} degrees: {volumes}; untilted: {untilted}")
    assert volumes["Right lung"] == pytest.approx(untilted["right_lung"], rel=0.03)
    assert volumes["Left lung"] == pytest.approx(untilted["left_lung"], rel=0.03)
    # Measured on the source slices: their shape and the gap along their normal (5 mm x cos 20).
    assert tuple(job["outputs"]["volume"]["shape"]) == (64, 512, 512)
    assert job["outputs"]["volume"]["spacing_mm"][0] == pytest.approx(5 * np.cos(np.radians(TILT)), abs=1e-3)


def test_seg_lies_on_the_tilted_slices_and_passes_dciodvfy(
    tilted_job: dict[str, Any], orthanc: OrthancServer, tmp_path: Path
) -> None:
    from ..unit.test_seg import run_dciodvfy

    with httpx.Client(base_url=orthanc.url, timeout=60) as api:
        (seg_series,) = series_by_modality(api, tilted_job["study_id"], "SEG")
        (iid,) = seg_series["Instances"]
        seg = pydicom.dcmread(io.BytesIO(api.get(f"/instances/{iid}/file").content))
    sent: dict[str, Path] = tilted_job["sent"]
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) >= 20
    for item in frames:
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert uid in sent
        source = pydicom.dcmread(sent[uid], stop_before_pixels=True)
        # The frame is on its source slice's plane (tilted orientation and position).
        assert np.allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
            atol=1e-3,
        )
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert float(orientation[4]) == pytest.approx(np.cos(np.radians(TILT)), abs=1e-4)
    run_dciodvfy(seg, tmp_path)
