"""Real services for integration tests: tritonserver from the wheel, Orthanc from Debian, our plugin.

They are started the same way `make up` starts them (devstack.stack), on free ports in a
temporary folder, so a running local stack is never disturbed.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from devstack.derive import as_new_series
from devstack.medplum_server import MedplumServer, missing
from devstack.stack import ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import require_data

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("triton")
    # Another model repository can be tried with ORTHANC_AI_MODEL_REPO; the default is the project's.
    repo = Path(os.environ.get("ORTHANC_AI_MODEL_REPO", ROOT / "triton_models"))
    server = TritonServer(
        repo,
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp / "triton.log", backend_root=tmp / "backends",
    )  # fmt: skip
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=1, stable_age=2, lease_seconds=8, log_file=tmp / "orthanc.log",
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()


@pytest.fixture
def api(orthanc: OrthancServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        yield c


def upload_folder(client: httpx.Client, folder: Path) -> str:
    """POST every file of ``folder`` to Orthanc; returns the Orthanc study id."""
    study = ""
    files = sorted(folder.glob("*.dcm"))
    assert files, f"no DICOM files in {folder}"
    for f in files:
        r = client.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        study = r.json()["ParentStudy"]
    return study


def upload_as_new_study(client: httpx.Client, folder: Path) -> str:
    """``folder`` uploaded as a study of its own (new Study/Series/SOP Instance UIDs, in memory only):
    its job leaves the jobs of the other tests of the session (sharing one Orthanc) as they expect them."""
    study, series = generate_uid(), generate_uid()
    study_id = ""
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = io.BytesIO()
        ds.save_as(buf)
        r = client.post("/instances", content=buf.getvalue(), headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        study_id = r.json()["ParentStudy"]
    return study_id


def study_uid(client: httpx.Client, study_id: str) -> str:
    return str(client.get(f"/studies/{study_id}").json()["MainDicomTags"]["StudyInstanceUID"])


def wait_for(
    what: str,
    fn: Callable[[], Any],
    timeout: float = 180,
    period: float = 0.5,
    orthanc: OrthancServer | None = None,
) -> Any:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(period)
    log = ""
    if orthanc is not None and orthanc.log_file is not None:
        log = "\n".join(orthanc.log_file.read_text(errors="replace").splitlines()[-40:])
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last value {last!r}\n{log}")


def last_change(client: httpx.Client) -> int:
    return int(client.get("/changes", params={"last": ""}).json()["Last"])


def wait_intake_handled_stable(client: httpx.Client, study_id: str, after: int, **kw: Any) -> int:
    """Wait until Orthanc logged the study stable after change ``after`` and the plugin's intake
    has read past that change: whatever the routing did with it is then done. Returns its number."""

    def handled() -> int | None:
        page = client.get("/changes", params={"since": after, "limit": 10000}).json()
        stable = [
            c["Seq"] for c in page["Changes"] if c["ChangeType"] == "StableStudy" and c["ID"] == study_id
        ]
        position = client.get("/ai/health").json()["intake"]["last_change"]
        return stable[-1] if stable and position is not None and position >= stable[-1] else None

    return int(
        wait_for(
            f"study {study_id} stable and read by the intake", handled, timeout=kw.pop("timeout", 60), **kw
        )
    )


def wait_job_done(client: httpx.Client, uid: str, timeout: float = 240, **kw: Any) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        jobs = client.get("/ai/jobs", params={"study": uid}).json()
        if jobs and all(j["state"] in TERMINAL for j in jobs):
            return dict(client.get(f"/ai/jobs/{jobs[0]['id']}").json())
        return None

    return dict(wait_for(f"the job of study {uid}", done, timeout, **kw))


class ReuseRetry(httpx.HTTPTransport):
    """Sends a request once more when Orthanc closed the kept-alive connection under it.

    Orthanc 1.10.1 keeps idle connections for 1 s whatever "KeepAliveTimeout" says (its answers
    carry "Keep-Alive: timeout=1"), so a client polling about once a second now and then writes
    into a connection the server has just closed: "Server disconnected without sending a
    response". Only for tests whose requests are idempotent (reads, uploads of the same UIDs).
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.RemoteProtocolError:
            return super().handle_request(request)


def client(url: str, timeout: float = 60) -> httpx.Client:
    """An httpx client for Orthanc that survives its 1 s keep-alive (see :class:`ReuseRetry`)."""
    return httpx.Client(base_url=url, timeout=timeout, transport=ReuseRetry())


def series_by_modality(client: httpx.Client, study_id: str, modality: str) -> list[dict[str, Any]]:
    return [
        s
        for s in client.get(f"/studies/{study_id}/series").json()
        if s["MainDicomTags"].get("Modality") == modality
    ]


def make_orthanc(
    tmp: Path, triton_grpc_port: int, pipelines: list[dict[str, Any]] | None = None, **kw: Any
) -> OrthancServer:
    """An Orthanc with the plugin on free ports and the tests' defaults (one worker, stable after
    1 s, 8 s leases), with its own pipelines file when ``pipelines`` is given. Not started."""
    env = dict(kw.pop("extra_env", {}))
    if pipelines is not None:
        (tmp / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
        env["ORTHANC_AI_PIPELINES"] = str(tmp / "pipelines.yaml")
    settings: dict[str, Any] = {
        "workers": 1,
        "stable_age": 1,
        "lease_seconds": 8,
        "log_file": tmp / "orthanc.log",
    }
    settings.update(kw)
    return OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton_grpc_port,
        extra_env=env, **settings,
    )  # fmt: skip


def reviewer_stack(
    tmp: Path, triton_grpc_port: int, fhir_url: str, passwords: dict[str, str]
) -> OrthancServer:
    """The ct-lung pipeline behind Orthanc's authentication, as a site runs the review loop:
    ``admin`` an admin, ``rad`` the one reviewer, ``worker`` the workers' own account (every name
    of ``passwords`` a user), reports to ``fhir_url``. Not started."""
    return make_orthanc(
        tmp, triton_grpc_port, [p for p in shipped_pipelines() if p["name"] == "ct-lung"],
        stable_age=1,
        http_auth=("admin", passwords["admin"]),
        extra_env={
            "ORTHANC_AI_FHIR_URL": fhir_url,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "1",
            "ORTHANC_AI_AUTH": "true",
            "ORTHANC_AI_USERS": json.dumps(passwords),
            "ORTHANC_AI_ADMINS": json.dumps(["admin"]),
            "ORTHANC_AI_REVIEWERS": json.dumps(["rad"]),
            "ORTHANC_AI_WORKER_USER": "worker",
            "ORTHANC_AI_WORKER_PASSWORD": passwords["worker"],
        },
    )  # fmt: skip


def shipped_pipelines() -> list[dict[str, Any]]:
    """The pipelines of config/pipelines.yaml as plain data, for tests to adapt."""
    return list(yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())["pipelines"])


def copy_as_new_study(folder: Path, dest: Path) -> tuple[str, list[Path]]:
    """The series in ``folder`` as a new study (new Study, Series and SOP Instance UIDs) in ``dest``,
    its files in slice order."""
    require_data(folder)
    study = generate_uid()
    return study, as_new_series(folder, dest, study)


@pytest.fixture(scope="module")
def medplum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    """The Medplum FHIR server (a third-party FHIR engine) for one test module."""
    if missing():
        pytest.fail(
            f"the Medplum FHIR server is not installed: {missing()}; run scripts/install_fhir_peer.sh"
        )
    with MedplumServer(log_file=tmp_path_factory.mktemp("medplum") / "medplum.log") as server:
        yield server
