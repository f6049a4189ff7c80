"""Forwarding of the SEG and SR to other destinations, on the real stack: our Orthanc (plugin,
worker, real Triton) sends them by C-STORE to a second Orthanc and by STOW-RS to a third (plain
Orthancs, as a PACS and a DICOMweb archive would be). With both down, the job still succeeds,
forwarding is marked failed with every attempt in the job history and the metrics; once they
are back, ``POST /ai/jobs/{id}/forward`` delivers. About 50 s on 2 cores (27 s of it the job
with both destinations down: 2 x 3 attempts with 2 s and 4 s waits).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.stack import ORTHANC_BIN, ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import CT_B40
from .conftest import copy_as_new_study, wait_for, wait_job_done

pytestmark = pytest.mark.integration


class PlainOrthanc:
    """An Orthanc without our plugin (DICOMweb only), standing in for a PACS or an archive."""

    def __init__(self, folder: Path, aet: str) -> None:
        self.folder, self.aet = folder, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> PlainOrthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.aet, "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }  # fmt: skip
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for(f"{self.aet} to answer", self._up, timeout=30, period=0.2)
        return self

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(30)
        self._proc = None

    def sop_uids(self, modality: str) -> set[str]:
        uids = set()
        for sid in httpx.get(f"{self.url}/series", timeout=10).json():
            s = httpx.get(f"{self.url}/series/{sid}", timeout=10).json()
            if s["MainDicomTags"].get("Modality") == modality:
                for iid in s["Instances"]:
                    tags = httpx.get(f"{self.url}/instances/{iid}", timeout=10).json()["MainDicomTags"]
                    uids.add(tags["SOPInstanceUID"])
        return uids


def new_study_files(dest: Path) -> tuple[str, list[bytes]]:
    """A0002-B40f (30 slices) with new Study/Series/SOP Instance UIDs: (StudyInstanceUID, files)."""
    study, paths = copy_as_new_study(CT_B40, dest)
    return study, [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("forwarding")
    pacs = PlainOrthanc(tmp / "pacs2", "PACS2").start()
    archive = PlainOrthanc(tmp / "archive", "ARCHIVE").start()
    pipelines = yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())
    for p in pipelines["pipelines"]:
        p.setdefault("outputs", {})["forward"] = [{"modality": "PACS2"}, {"dicomweb": "archive"}]
    (tmp / "pipelines.yaml").write_text(yaml.safe_dump(pipelines, sort_keys=False))
    orthanc = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=1, stable_age=1, lease_seconds=8, log_file=tmp / "orthanc.log",
        extra_env={
            "ORTHANC_AI_PIPELINES": str(tmp / "pipelines.yaml"),
            "ORTHANC_AI_DICOM_MODALITIES": json.dumps({"PACS2": ["PACS2", "127.0.0.1", pacs.dicom_port]}),
            "ORTHANC_AI_DICOMWEB_SERVERS": json.dumps({"archive": [f"{archive.url}/dicom-web/"]}),
        },
    )  # fmt: skip
    orthanc.start(timeout=60)
    try:
        yield {"orthanc": orthanc, "pacs": pacs, "archive": archive, "tmp": tmp}
    finally:
        orthanc.stop()
        pacs.stop()
        archive.stop()


def _process(stack: dict[str, Any], name: str) -> dict[str, Any]:
    orthanc: OrthancServer = stack["orthanc"]
    uid, files = new_study_files(stack["tmp"] / name)
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        for data in files:
            c.post(
                "/instances", content=data, headers={"Content-Type": "application/dicom"}
            ).raise_for_status()
        job = wait_job_done(c, uid, timeout=180, orthanc=orthanc)
    assert job["state"] == "succeeded", job["error"]
    return job


def _forward_events(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(e["detail"]) for e in job["events"] if e["kind"] == "forward"]


def test_results_reach_dicom_and_dicomweb_destinations(stack: dict[str, Any]) -> None:
    job = _process(stack, "up")
    seg_uid, sr_uid = (
        job["outputs"]["stored"]["seg"]["SOPInstanceUID"],
        job["outputs"]["stored"]["sr"]["SOPInstanceUID"],
    )
    fwd = job["outputs"]["forward"]
    assert fwd["state"] == "delivered", fwd
    assert {d["destination"]: d["attempts"] for d in fwd["destinations"]} == {
        "modality:PACS2": 1,
        "dicomweb:archive": 1,
    }
    # The same SEG and SR (same UIDs) are now in both destinations.
    for dest in (stack["pacs"], stack["archive"]):
        assert dest.sop_uids("SEG") == {seg_uid}, dest.aet
        assert dest.sop_uids("SR") == {sr_uid}, dest.aet
    assert [e["ok"] for e in _forward_events(job)] == [True, True]
    assert job["forwarding"]["state"] == "delivered"
    assert "forward" in job["timings"]


def test_destination_down_then_retried_through_the_api(stack: dict[str, Any]) -> None:
    orthanc: OrthancServer = stack["orthanc"]
    pacs: PlainOrthanc = stack["pacs"]
    archive: PlainOrthanc = stack["archive"]
    pacs.stop()
    archive.stop()
    t0 = time.time()
    job = _process(stack, "down")
    # The job succeeded (results are safe in Orthanc); forwarding failed, visibly.
    fwd = job["outputs"]["forward"]
    assert fwd["state"] == "failed"
    for d in fwd["destinations"]:
        assert d["state"] == "failed" and d["attempts"] == 3, d
        assert d["error"], d
    events = _forward_events(job)
    assert len(events) == 6 and not any(e["ok"] for e in events)
    assert sorted(e["attempt"] for e in events if e["destination"] == "modality:PACS2") == [1, 2, 3]
    assert job["forwarding"]["state"] == "failed"
    print(f"job with both destinations down took {time.time() - t0:.1f} s")
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        metrics = c.get("/ai/metrics").text
        assert 'orthanc_ai_forward_failing{pipeline="ct-lung",destination="modality:PACS2"} 1' in metrics
        assert 'orthanc_ai_forward_failing{pipeline="ct-lung",destination="dicomweb:archive"} 1' in metrics
        assert (
            'orthanc_ai_forward_attempts_total{pipeline="ct-lung",destination="dicomweb:archive",result="failed"} 3'
            in metrics
        )

        pacs.start()
        archive.start()
        r = c.post(f"/ai/jobs/{job['id']}/forward")
        assert r.status_code == 200, r.text
        assert r.json()["forwarding"]["state"] == "delivered", r.json()
        seg_uid, sr_uid = (
            job["outputs"]["stored"]["seg"]["SOPInstanceUID"],
            job["outputs"]["stored"]["sr"]["SOPInstanceUID"],
        )
        for dest in (pacs, archive):
            assert seg_uid in dest.sop_uids("SEG") and sr_uid in dest.sop_uids("SR"), dest.aet
        again = c.get(f"/ai/jobs/{job['id']}").json()
        assert again["state"] == "succeeded"
        assert again["forwarding"]["state"] == "delivered"
        assert {d["destination"]: d["attempts"] for d in again["forwarding"]["destinations"]} == {
            "modality:PACS2": 4,
            "dicomweb:archive": 4,
        }
        audit = c.get(f"/ai/jobs/{job['id']}/audit").json()
        assert audit["forwarding"]["state"] == "delivered"
        assert all(d["delivered"] for d in audit["forwarding"]["destinations"])
        assert "orthanc_ai_forward_failing{" in c.get("/ai/metrics").text
        assert 'destination="modality:PACS2"} 0' in c.get("/ai/metrics").text
        # Nothing left to send: a second call says so instead of sending twice.
        assert c.post(f"/ai/jobs/{job['id']}/forward").status_code == 409


def test_destinations_are_validated(tmp_path: Path) -> None:
    """No services: a destination is exactly one of modality/dicomweb, with a plain name."""
    from orthanc_plugin.core.config import ConfigError, ForwardDestination, load_pipelines

    assert ForwardDestination(modality="PACS2").label == "modality:PACS2"
    assert ForwardDestination(dicomweb="archive").label == "dicomweb:archive"
    for bad in ({}, {"modality": "A", "dicomweb": "B"}, {"modality": "../x"}):
        with pytest.raises(ValueError):
            ForwardDestination.model_validate(bad)
    pipelines = yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())
    pipelines["pipelines"][0].setdefault("outputs", {})["forward"] = [{"pacs": "X"}]
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(pipelines))
    with pytest.raises(ConfigError, match=r"pipelines\.0\.outputs\.forward\.0"):
        load_pipelines(path)
