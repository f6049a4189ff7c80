"""Structured logs without patient data, and the per-job audit record, on the real stack.

The chest CT A0001-5mm (64 slices) goes through our Orthanc (plugin, worker, real Triton). Then
every log file of ours (the plugin's ``plugin.log`` and the workers' ``worker-<n>.log`` in
``LogDirectory``; Orthanc's own log is not ours) must be JSON lines without the patient's name,
ID or birth date (read from the files here, never written into this source), and the job id
and StudyInstanceUID must appear in JSON records. About 15 s on 2 cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import CT_A0001, require_data
from .conftest import upload_folder, wait_job_done

pytestmark = pytest.mark.integration

REQUIRED_KEYS = {"time", "level", "logger", "message", "process", "worker"}


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[dict[str, Any]]:
    require_data(CT_A0001)
    tmp = tmp_path_factory.mktemp("logs-audit")
    orthanc = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=1, stable_age=1, lease_seconds=8, log_file=tmp / "orthanc.log",
    )  # fmt: skip
    orthanc.start(timeout=60)
    try:
        with httpx.Client(base_url=orthanc.url, timeout=60) as c:
            study_id = upload_folder(c, CT_A0001)
            uid = str(c.get(f"/studies/{study_id}").json()["MainDicomTags"]["StudyInstanceUID"])
            job = wait_job_done(c, uid, timeout=180, orthanc=orthanc)
            audit = c.get(f"/ai/jobs/{job['id']}/audit")
            missing = c.get("/ai/jobs/0123456789abcdef/audit")
        yield {"job": job, "uid": uid, "audit": audit, "missing": missing, "log_dir": tmp / "log"}
    finally:
        orthanc.stop()


def _our_log_files(log_dir: Path) -> list[Path]:
    files = sorted([*log_dir.glob("plugin.log*"), *log_dir.glob("worker-*.log*")])
    assert any(f.name.startswith("plugin.log") for f in files), f"no plugin.log in {log_dir}"
    assert any(f.name.startswith("worker-") for f in files), f"no worker log in {log_dir}"
    return files


def _patient_values() -> dict[str, str]:
    ds = pydicom.dcmread(next(iter(sorted(CT_A0001.glob("*.dcm")))), stop_before_pixels=True)
    values = {k: str(ds.get(k) or "").strip() for k in ("PatientName", "PatientID", "PatientBirthDate")}
    present = {k: v for k, v in values.items() if v}
    assert present, "the test study should carry patient attributes to look for"
    return present


def test_job_succeeded(processed: dict[str, Any]) -> None:
    assert processed["job"]["state"] == "succeeded", processed["job"]["error"]


def test_logs_are_json_lines_without_patient_data(processed: dict[str, Any]) -> None:
    records: list[dict[str, Any]] = []
    patient = _patient_values()
    for path in _our_log_files(processed["log_dir"]):
        text = path.read_text(encoding="utf-8", errors="replace")
        for key, value in patient.items():
            # Also the name's components and the name without DICOM's '^' separators.
            needles = {value, value.replace("^", " ").strip()} | {
                part for part in value.split("^") if len(part) >= 3
            }
            for needle in needles:
                assert needle not in text, f"{key} found in {path.name}"
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{path.name}:{n} is not JSON: {line[:200]!r}")
            assert record.keys() >= REQUIRED_KEYS, f"{path.name}:{n} lacks {REQUIRED_KEYS - record.keys()}"
            records.append(record)
    job_id, uid = processed["job"]["id"], processed["uid"]
    with_job = [r for r in records if r.get("job_id") == job_id]
    assert with_job, "no JSON record carries the job id"
    assert any(r.get("study_uid") == uid for r in with_job), "no record carries job id and StudyInstanceUID"
    assert {r["process"] for r in records} >= {"plugin", "worker"}
    assert any(r["logger"].startswith("orthanc_ai.") for r in records)


def test_audit_record(processed: dict[str, Any]) -> None:
    job, uid = processed["job"], processed["uid"]
    r = processed["audit"]
    assert r.status_code == 200, r.text
    audit = r.json()
    assert audit["job"]["id"] == job["id"] and audit["job"]["state"] == "succeeded"
    assert audit["study"]["StudyInstanceUID"] == uid
    ct = audit["series"]["ct"]
    assert ct["SeriesInstanceUID"] == job["series"]["ct"]["series_uid"]
    assert ct["instances"] == 64 and ct["why"]
    assert audit["pipeline"]["name"] == "ct-lung" and audit["pipeline"]["version"]
    assert audit["model"] == job["outputs"]["model"] and audit["model"]["name"] == "ct_lung"
    assert audit["model"]["version"]
    for name in ("seg", "sr"):
        assert audit["outputs"][name]["SOPInstanceUID"] == job["outputs"]["stored"][name]["SOPInstanceUID"]
        assert audit["outputs"][name]["ID"]
    assert audit["fhir"] is None  # no FhirBaseUrl in this stack: nothing to deliver
    assert audit["forwarding"] is None  # no destinations configured
    kinds = [e["kind"] for e in audit["events"]]
    assert kinds[0] == "queued" and "running" in kinds and kinds[-1] == "succeeded"
    assert all(e["time"].endswith("+00:00") for e in audit["events"])
    text = json.dumps(audit)
    for value in _patient_values().values():
        assert value not in text
    assert processed["missing"].status_code == 404
