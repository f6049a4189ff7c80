"""FHIR delivery on real Orthanc + Triton + the project's EHR server process.

The EHR goes down and comes back, and its token changes: every report still arrives, each
exactly once, and a refused token is spelled out in the job's delivery status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from devstack.stack import ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.fhir.report import URI_SYSTEM

from ..conftest import CT_A0001, CT_B40, require_data
from .conftest import study_uid, upload_folder, wait_for, wait_job_done

pytestmark = pytest.mark.integration

#: The token the workers send (from the environment, as in production).
ORTHANC_TOKEN = "orthanc-ai-test-token"
TOKEN_ENV = "EHR_TEST_TOKEN"


class EhrProcess:
    """``python -m devstack.ehr_server`` on a fixed port, restartable, with a data file."""

    def __init__(self, port: int, data: Path, log: Path) -> None:
        self.port = port
        self.data = data
        self.log = log
        self.token: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, token: str | None) -> None:
        assert self._proc is None, "already running"
        self.token = token
        env = dict(os.environ)
        cmd = [
            sys.executable,
            "-m",
            "devstack.ehr_server",
            "--port",
            str(self.port),
            "--data",
            str(self.data),
        ]
        if token is not None:
            env[TOKEN_ENV] = token
            cmd += ["--token-env", TOKEN_ENV]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self._proc.poll() is None, f"EHR exited: {self.log.read_text(errors='replace')[-2000:]}"
            try:
                if httpx.get(f"{self.url}/metadata", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail("the EHR server did not start within 30 s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def get(self, path: str, **params: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        r = httpx.get(f"{self.url}{path}", params=params, headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def search(self, path: str, **params: str) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.get(path, **params).get("entry", [])]


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EhrProcess]:
    tmp = tmp_path_factory.mktemp("ehr")
    server = EhrProcess(free_port(), tmp / "ehr.jsonl", tmp / "ehr.log")
    server.start(ORTHANC_TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc_fhir(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, ehr: EhrProcess
) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("orthanc-fhir")
    server = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=1, stable_age=2, lease_seconds=8, log_file=tmp / "orthanc.log",
        extra_env={
            "ORTHANC_AI_FHIR_URL": ehr.url,
            "ORTHANC_AI_FHIR_TOKEN": ORTHANC_TOKEN,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2",
        },
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()
    # The token is never logged, by Orthanc, the plugin or the workers.
    for log in (tmp / "orthanc.log", *sorted((tmp / "log").glob("*.log"))):
        assert ORTHANC_TOKEN not in log.read_text(errors="replace"), f"token leaked into {log}"


@pytest.fixture(scope="module")
def api(orthanc_fhir: OrthancServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=orthanc_fhir.url, timeout=60) as c:
        yield c


def copy_study(src: Path, dst: Path) -> Path:
    """``src`` as a new study: new Study/Series/SOP Instance UIDs, files under ``dst``."""
    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f.name)
    return dst


def our_id(job: dict[str, Any]) -> str:
    """The DiagnosticReport's identifier value in the job's bundle (``urn:uuid:...``)."""
    (report,) = [
        e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    (ident,) = [i["value"] for i in report["identifier"] if i["system"] == URI_SYSTEM]
    return str(ident)


def delivery(api: httpx.Client, jid: str) -> dict[str, Any]:
    return dict(api.get(f"/ai/jobs/{jid}").json()["delivery"] or {})


def wait_delivery(api: httpx.Client, jid: str, state: str, timeout: float = 60, **kw: Any) -> dict[str, Any]:
    return dict(
        wait_for(
            f"delivery of job {jid} to be {state}",
            lambda: (d := delivery(api, jid)).get("state") == state and d,
            timeout,
            **kw,
        )
    )


def reports_with(ehr: EhrProcess, ident: str) -> list[dict[str, Any]]:
    return ehr.search("/DiagnosticReport", identifier=f"{URI_SYSTEM}|{ident}")


@pytest.fixture(scope="module")
def first_job(api: httpx.Client, orthanc_fhir: OrthancServer) -> dict[str, Any]:
    require_data(CT_B40)
    uid = study_uid(api, upload_folder(api, CT_B40))
    job = wait_job_done(api, uid, orthanc=orthanc_fhir)
    assert job["state"] == "succeeded", job["error"]
    return job


def test_report_arrives_once_with_resolvable_references(
    first_job: dict[str, Any], api: httpx.Client, ehr: EhrProcess, orthanc_fhir: OrthancServer
) -> None:
    st = wait_delivery(api, first_job["id"], "delivered", orthanc=orthanc_fhir)
    assert st["destination"] == ehr.url and st["attempts"] == 1 and st["last_error"] is None
    (report,) = reports_with(ehr, our_id(first_job))
    assert st["response"]["report"].startswith(f"DiagnosticReport/{report['id']}/")
    assert report["subject"]["identifier"]["value"]  # the patient, by identifier
    kinds = []
    for ref in report["result"]:
        obs = ehr.get(f"/{ref['reference']}")
        assert obs["resourceType"] == "Observation"
        # a volume per lung (mL), and a panel of radiomics features per lung (ct-lung turns them on)
        kinds.append("volume" if "valueQuantity" in obs else "features")
        if "valueQuantity" in obs:
            assert obs["valueQuantity"]["unit"] == "mL"
        else:
            assert obs["component"] and all(c["valueQuantity"]["value"] is not None for c in obs["component"])
        assert ehr.get(f"/{obs['device']['reference']}")["resourceType"] == "Device"
    assert sorted(kinds) == ["features", "features", "volume", "volume"]
    (by_study,) = ehr.search("/DiagnosticReport", study=first_job["study"]["StudyInstanceUID"])
    assert by_study["id"] == report["id"]
    assert ehr.get("/_stats")["resources"] == {"Device": 1, "DiagnosticReport": 1, "Observation": 4}
    # Orthanc's read API serves the same report under our own id.
    ours = api.get("/ai/fhir/DiagnosticReport", params={"study": first_job["study"]["StudyInstanceUID"]})
    assert ours.status_code == 200 and ours.json()["total"] == 1
    mine = ours.json()["entry"][0]["resource"]
    assert f"urn:uuid:{mine['id']}" == our_id(first_job)
    assert api.get(f"/ai/fhir/DiagnosticReport/{mine['id']}").json() == mine
    assert api.get(f"/ai/fhir/{mine['result'][0]['reference']}").json()["resourceType"] == "Observation"
    assert api.get("/ai/fhir/DiagnosticReport/00000000-0000-0000-0000-000000000000").status_code == 404
    assert api.get("/ai/health").json()["fhir_backlog"] == 0


def test_ehr_down_during_three_jobs_then_each_report_arrives_once(
    first_job: dict[str, Any],
    api: httpx.Client,
    ehr: EhrProcess,
    orthanc_fhir: OrthancServer,
    tmp_path: Path,
) -> None:
    require_data(CT_A0001)
    ehr.stop()
    folders = [CT_A0001, copy_study(CT_B40, tmp_path / "copy1"), copy_study(CT_B40, tmp_path / "copy2")]
    uids = [study_uid(api, upload_folder(api, f)) for f in folders]
    jobs = [wait_job_done(api, uid, orthanc=orthanc_fhir) for uid in uids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    for j in jobs:
        st = wait_delivery(api, j["id"], "failing", orthanc=orthanc_fhir)
        assert st["last_error"].startswith(f"cannot connect to the EHR at {ehr.url}"), st
    assert api.get("/ai/health").json()["fhir_backlog"] == 3
    wait_for(
        "a second failed attempt of each report",
        lambda: all(delivery(api, j["id"])["attempts"] >= 2 for j in jobs),
        timeout=60, orthanc=orthanc_fhir,
    )  # fmt: skip
    assert all(delivery(api, j["id"])["state"] in ("failing", "delivering") for j in jobs)
    # The outbox outlives the processes: Orthanc and its workers restart before the EHR is back.
    orthanc_fhir.stop()
    ehr.start(ORTHANC_TOKEN)
    orthanc_fhir.start(timeout=60)
    for j in jobs:
        st = wait_delivery(api, j["id"], "delivered", orthanc=orthanc_fhir)
        assert st["attempts"] >= 2
    for j in jobs:
        assert len(reports_with(ehr, our_id(j))) == 1
        assert len(ehr.search("/DiagnosticReport", study=j["study"]["StudyInstanceUID"])) == 1
    assert ehr.get("/_stats")["resources"] == {"Device": 1, "DiagnosticReport": 4, "Observation": 16}
    assert api.get("/ai/health").json()["fhir_backlog"] == 0


def test_refused_token_is_reported_then_delivered_once_fixed(
    first_job: dict[str, Any], api: httpx.Client, ehr: EhrProcess, orthanc_fhir: OrthancServer
) -> None:
    before = ehr.get("/_stats")["resources"]
    ehr.stop()
    ehr.start("a-rotated-token-the-workers-do-not-have")
    # Re-running the job queues its bundle again (replacing the delivered one).
    assert api.post(f"/ai/jobs/{first_job['id']}/retry").status_code == 200
    job = wait_job_done(api, first_job["study"]["StudyInstanceUID"], orthanc=orthanc_fhir)
    assert job["state"] == "succeeded", job["error"]
    st = wait_delivery(api, job["id"], "failing", orthanc=orthanc_fhir)
    assert st["last_http_status"] == 401 and st["last_error_kind"] == "auth"
    assert st["last_error"].startswith(
        "the EHR refused the token (HTTP 401): check the variable ORTHANC_AI_FHIR_TOKEN"
    ), st["last_error"]
    ehr.stop()
    ehr.start(ORTHANC_TOKEN)  # the EHR accepts the workers' token again
    st = wait_delivery(api, job["id"], "delivered", orthanc=orthanc_fhir)
    assert st["last_error"] is None
    # Re-delivered, and the conditional creates matched: still one report.
    assert len(reports_with(ehr, our_id(job))) == 1
    assert ehr.get("/_stats")["resources"] == before
