"""OHIF opens the SR of a chained segmentation -> classification pipeline without trouble.

The SR of ``ct-lung-attenuation`` holds, besides the two lung volume groups, a TID 1501 group
with the classification (finding Present/Absent, probability, threshold) that refers to no
image region. A viewer must still show the study, the SEG overlay and the lung measurements.
Own Orthanc with only that pipeline enabled (the session Triton serves its two models).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer
from devstack.viewer import ViewerServer

from ..conftest import CT_B40, require_data
from .browser import run_check
from .conftest import make_orthanc, shipped_pipelines, study_uid, upload_folder, wait_job_done
from .test_ohif import CHECK_SCRIPT, viewer_tools  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def orthanc_classify(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer
) -> Iterator[OrthancServer]:
    only = [{**p, "enabled": True} for p in shipped_pipelines() if p["name"] == "ct-lung-attenuation"]
    server = make_orthanc(tmp_path_factory.mktemp("ohif-classify"), triton.grpc_port, only)
    server.start(timeout=60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def report(viewer_tools: None, orthanc_classify: OrthancServer, artifacts: Path) -> dict[str, Any]:  # noqa: F811
    require_data(CT_B40)
    with httpx.Client(base_url=orthanc_classify.url, timeout=60) as c:
        uid = study_uid(c, upload_folder(c, CT_B40))
        job = wait_job_done(c, uid, orthanc=orthanc_classify)
    assert job["state"] == "succeeded", job["error"]
    out = artifacts / "ohif-classification"
    out.mkdir(exist_ok=True)
    with ViewerServer(orthanc_classify.url, free_port()) as viewer:
        result = run_check(CHECK_SCRIPT, ["--url", viewer.viewer_url(uid)], out, "ohif-report.json")
    result["job"] = job
    return result


def test_ohif_shows_the_classification_pipeline_outputs(report: dict[str, Any]) -> None:
    assert report["ok"], f"OHIF check failed at step '{report['step']}': {report['error']}"
    assert not report["errorBoundary"], f"OHIF crashed: {json.dumps(report['errorBoundary'])}"
    assert [s["label"] for s in report["seg"]["segments"]] == ["Right lung", "Left lung"]
    shown = {}
    for m in report["sr"]["measurements"]:
        volume = [lbl["value"] for lbl in m["labels"] if lbl["label"] == "Volume"]
        if volume:
            shown[m["trackingIdentifier"]] = volume[0]
    assert set(shown) == {"right-lung", "left-lung"}, report["sr"]["measurements"]
    assert all(re.fullmatch(r"\d+\.\d\d (ml|mL)", v) for v in shown.values()), shown
    (c,) = report["job"]["outputs"]["classifications"]
    (cls,) = [m for m in report["sr"]["measurements"] if m["trackingIdentifier"] == "dense-lung-share"]
    labels = {lbl["label"]: lbl["value"] for lbl in cls["labels"]}
    assert labels["Probability"].split()[0] == f"{c['probability']:.2f}", labels
    assert labels["Threshold Value"].split()[0] == "0.33", labels
    assert cls["coords"] >= 1, "the classification group has no image region for OHIF"
    print(
        f"classification {c}; OHIF measurements {[m['trackingIdentifier'] for m in report['sr']['measurements']]}"
    )
