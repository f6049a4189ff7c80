# SPDX-License-Identifier: AGPL-3.0-or-later
"""Model provenance: a new model version put into the repository of a running Triton is used,
and named in the SEG, the SR, the FHIR Device and the job outputs, without restarting Orthanc.

This test starts its own Triton (polling a temporary copy of the ct_lung model folder) and its
own Orthanc, so the shared session services of the other integration tests are left alone.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from devstack.stack import ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.inference.triton import TritonClient
from orthanc_plugin.models.cli import add_model, read_config

from ..conftest import CT_B40, require_data
from .conftest import series_by_modality, study_uid, upload_folder, wait_for, wait_job_done

pytestmark = pytest.mark.integration

CT_LUNG = ROOT / "triton_models" / "ct_lung"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    shutil.copytree(CT_LUNG, path / "ct_lung")  # production config.pbtxt and version 1
    return path


@pytest.fixture
def triton(tmp_path: Path, repo: Path) -> Iterator[TritonServer]:
    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp_path / "triton.log", backend_root=tmp_path / "backends",
        model_control="poll", poll_interval_s=1,
    )  # fmt: skip
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def orthanc(tmp_path: Path, triton: TritonServer) -> Iterator[OrthancServer]:
    server = OrthancServer(
        tmp_path / "storage", http_port=free_port(), dicom_port=free_port(),
        triton_grpc_port=triton.grpc_port, workers=1, stable_age=1, lease_seconds=8,
        log_file=tmp_path / "orthanc.log",
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()


def _instance(api: httpx.Client, study_id: str, modality: str) -> pydicom.Dataset:
    (series,) = series_by_modality(api, study_id, modality)
    (iid,) = series["Instances"]
    return pydicom.dcmread(io.BytesIO(api.get(f"/instances/{iid}/file").content))


def _check_provenance(api: httpx.Client, study_id: str, job: dict[str, Any], version: str) -> None:
    """Model ct_lung ``version`` is named everywhere the job wrote something."""
    assert job["state"] == "succeeded", job["error"]
    assert job["outputs"]["model"] == {"name": "ct_lung", "version": version}
    description = f"AI model ct_lung version {version}"
    parameters = f"model=ct_lung,model_version={version}"

    seg = _instance(api, study_id, "SEG")
    assert seg.SOPInstanceUID == job["outputs"]["stored"]["seg"]["SOPInstanceUID"]
    (ours,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "orthanc-ai"]
    assert ours.ContributionDescription == description
    for segment in seg.SegmentSequence:
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmParameters == parameters

    sr = _instance(api, study_id, "SR")
    assert sr.SOPInstanceUID == job["outputs"]["stored"]["sr"]["SOPInstanceUID"]
    (ours,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "orthanc-ai"]
    assert ours.ContributionDescription == description
    texts = [str(v) for v in _text_values(sr)]
    assert f"model_version={version}" in texts, texts

    devices = [e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "Device"]
    assert len(devices) == 1 and devices[0]["modelNumber"] == "ct_lung"
    assert {"type": {"text": "model version"}, "value": version} in devices[0]["version"]


def _text_values(ds: pydicom.Dataset) -> Iterator[str]:
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            yield str(item.TextValue)
        yield from _text_values(item)


def test_new_model_version_is_picked_up_without_restarting_orthanc(
    repo: Path, triton: TritonServer, orthanc: OrthancServer
) -> None:
    require_data(CT_B40)
    with (
        httpx.Client(base_url=orthanc.url, timeout=60) as api,
        TritonClient(triton.grpc_url, use_shared_memory=False) as client,
    ):
        assert client.model_info("ct_lung").version == "1"
        sid = upload_folder(api, CT_B40)
        uid = study_uid(api, sid)
        job = wait_job_done(api, uid, timeout=120, orthanc=orthanc)
        _check_provenance(api, sid, job, "1")
        orthanc_pid = orthanc.pid

        # Version 2: same network, dropped into the repository of the running Triton.
        added = add_model(CT_LUNG / "1" / "model.onnx", "ct_lung", repository=repo)
        assert added.version == 2 and not added.config_written  # production config.pbtxt kept
        assert added.model_file.is_file()
        wait_for(
            "Triton to serve ct_lung version 2",
            lambda: _served(client, "ct_lung") == "2",
            timeout=60,
            period=0.5,
        )

        r = api.post(f"/ai/jobs/{job['id']}/retry")
        assert r.status_code == 200 and r.json()["state"] == "queued", r.text
        job2 = wait_job_done(api, uid, timeout=120, orthanc=orthanc)
        assert job2["id"] == job["id"] and orthanc.pid == orthanc_pid
        _check_provenance(api, sid, job2, "2")
        # Same outputs replaced in place: one SEG and one SR, the same UIDs as before.
        assert (
            job2["outputs"]["stored"]["seg"]["SOPInstanceUID"]
            == job["outputs"]["stored"]["seg"]["SOPInstanceUID"]
        )
        assert len(series_by_modality(api, sid, "SEG")) == 1 and len(series_by_modality(api, sid, "SR")) == 1

        # A model added with a generated config.pbtxt (no instance_group) loads and runs too.
        byom = add_model(CT_LUNG / "1" / "model.onnx", "byom_lung", repository=repo)
        _, mbs, inputs, outputs = read_config(byom.config_file)
        assert byom.config_written and (mbs, inputs, outputs) == read_config(CT_LUNG / "config.pbtxt")[1:]
        wait_for("Triton to serve byom_lung", lambda: _served(client, "byom_lung") == "1", timeout=60)
        image = np.zeros((1, 1, 64, 128, 128), dtype=np.float32)
        probs = client.infer("byom_lung", {"image": image}, ["probabilities"])["probabilities"]
        assert probs.shape == (1, 3, 64, 128, 128)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)


def _served(client: TritonClient, name: str) -> str | None:
    try:
        return client.model_info(name).version
    except Exception:  # not (yet) loaded
        return None
