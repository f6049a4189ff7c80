# SPDX-License-Identifier: AGPL-3.0-or-later
"""Segmentation -> radiomics -> classification from the features, on real Orthanc + real Triton.

The shipped ``ct-lung-radiomics`` pipeline (disabled in config/pipelines.yaml, enabled here on
its own Orthanc; the session Triton serves ct_lung and lung_radiomics from triton_models/) runs
on the chest CT. The classification must be in the job, the SR (TID 1501 group) and the FHIR
Observation with its probability and threshold, and the probability must be what the same ONNX
model gives, run here in-process, on the features the job itself reports
(``GET /ai/jobs/{id}/features``) in the order the pipeline lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from devstack.stack import ROOT, OrthancServer
from devstack.triton_server import TritonServer
from orthanc_plugin.core.config import PipelineConfig

from ..conftest import CT_B40, require_data
from .conftest import make_orthanc, shipped_pipelines, study_uid, upload_folder, wait_job_done
from .test_roles_chaining import _sr_group

pytestmark = pytest.mark.integration

NAME = "ct-lung-radiomics"
MODEL = ROOT / "triton_models" / "lung_radiomics" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def pipeline() -> dict[str, Any]:
    (p,) = [{**p, "enabled": True} for p in shipped_pipelines() if p["name"] == NAME]
    return p


@pytest.fixture(scope="module")
def orthanc_radiomics(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, pipeline: dict[str, Any]
) -> Iterator[OrthancServer]:
    server = make_orthanc(tmp_path_factory.mktemp("radiomics-classifier"), triton.grpc_port, [pipeline])
    server.start(timeout=60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def processed(orthanc_radiomics: OrthancServer) -> Iterator[dict[str, Any]]:
    require_data(CT_B40)
    with httpx.Client(base_url=orthanc_radiomics.url, timeout=60) as api:
        study_id = upload_folder(api, CT_B40)
        job = wait_job_done(api, study_uid(api, study_id), timeout=400, orthanc=orthanc_radiomics)
        assert job["state"] == "succeeded", job["error"]
        features = api.get(f"/ai/jobs/{job['id']}/features")
        assert features.status_code == 200, features.text
        yield {"api": api, "study_id": study_id, "job": job, "features": features.json()}


def test_classification_from_features_equals_the_model_run_in_process(
    processed: dict[str, Any], pipeline: dict[str, Any]
) -> None:
    job = processed["job"]
    (c,) = job["outputs"]["classifications"]
    assert c["model"]["name"] == "lung_radiomics"
    assert c["threshold"] == pytest.approx(0.5)
    assert "radiomics" in job["timings"] and "classify" in job["timings"]
    p = PipelineConfig.model_validate(pipeline)
    assert p.classify is not None
    by_segment = {}
    for s in processed["features"]["segments"]:
        by_segment[s["segment"]] = s["values"]
    tracking = {s.tracking_id: s.name for s in p.segments if s.tracking_id}
    x = np.array(
        [[by_segment[tracking.get(f.segment, f.segment)][f.feature] for f in p.classify.features]], np.float32
    )
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["class_probabilities"], {"features": x})
    print(f"features {x.tolist()} -> in-process {expected.tolist()}; job {c}")
    assert c["probability"] == pytest.approx(float(expected[0, 1]), abs=2e-4)
    assert c["classes"]["normal"] == pytest.approx(float(expected[0, 0]), abs=2e-4)
    assert c["positive"] is (c["probability"] >= c["threshold"])


def test_classification_from_features_is_in_the_sr_and_fhir(processed: dict[str, Any]) -> None:
    job = processed["job"]
    (c,) = job["outputs"]["classifications"]
    found = _sr_group(processed["api"], processed["study_id"], 9932)
    assert found["Probability"] == pytest.approx(c["probability"], abs=1e-4)
    assert found["Threshold Value"] == pytest.approx(0.5, abs=1e-4)
    assert found["codes"]["Abnormal"] == ("Present" if c["positive"] else "Absent")
    (obs,) = [
        e["resource"] for e in job["fhir"]["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"].get("text") == "Dense lung (radiomics)"
    ]  # fmt: skip
    assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if c["positive"] else "NEG")
    comps = {x["code"]["coding"][0]["code"]: x["valueQuantity"]["value"] for x in obs["component"]}
    assert comps["122157"] == pytest.approx(c["probability"], abs=1e-4)
    assert comps["122411"] == pytest.approx(0.5, abs=1e-4)
