"""Per-series start and supersession on real Orthanc (StableAge 60 s) + Triton + Medplum as the EHR.

- A series quiet for ``SeriesQuietSeconds`` starts its pipeline long before Orthanc would call
  the study stable.
- A late image of the series a job read: exactly one superseding job, the SEG/SR/... replaced
  under the same UIDs (one of each in the study), the FHIR report updated once (same resource).
- A second series arriving later: the first job is not delayed and the pipeline gets no second
  job, although routing would prefer the later series.

A second pipeline, ``sentinel``, takes only the B40f series and is held outside its daily window
(it queues, never runs): its job appearing proves that the intake has routed that series.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from devstack.derive import as_new_series
from devstack.medplum_server import MedplumServer
from devstack.stack import OrthancServer
from devstack.triton_server import TritonServer
from orthanc_plugin.fhir.report import URI_SYSTEM

from ..conftest import CT_B40, DATA, require_data
from .conftest import TERMINAL, client, make_orthanc, shipped_pipelines, wait_for

pytestmark = pytest.mark.integration

CT_B70 = DATA / "ct" / "A0002-B70f"
STABLE_AGE = 60
QUIET_S = 1


def pipelines() -> list[dict[str, Any]]:
    ct_lung = next(p for p in shipped_pipelines() if p["name"] == "ct-lung")
    sentinel = copy.deepcopy(ct_lung)
    sentinel["name"] = "sentinel"
    sentinel["algorithm_name"] = "orthanc-ai sentinel"
    sentinel["inputs"][0]["where"]["ConvolutionKernel"] = {"matches": "B40"}
    sentinel["outputs"] = {"series_number": 950, "fhir": False}
    # A window that opens in two hours: its jobs wait, so they cost no inference here.
    opens = dt.datetime.now() + dt.timedelta(hours=2)
    sentinel["schedule"] = {
        "run_between": [opens.strftime("%H:%M"), (opens + dt.timedelta(hours=1)).strftime("%H:%M")]
    }
    return [ct_lung, sentinel]


@pytest.fixture(scope="module")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, medplum: MedplumServer
) -> Iterator[OrthancServer]:
    server = make_orthanc(
        tmp_path_factory.mktemp("orthanc-per-series"), triton.grpc_port, pipelines(),
        stable_age=STABLE_AGE,
        extra_env={
            "ORTHANC_AI_FHIR_URL": medplum.url,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2",
            "ORTHANC_AI_SERIES_QUIET_SECONDS": str(QUIET_S),
        },
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()


@pytest.fixture
def api(orthanc: OrthancServer) -> Iterator[httpx.Client]:
    with client(orthanc.url) as c:
        yield c


def as_series(src: Path, dest: Path, study: str) -> list[Path]:
    """The files of ``src`` as a new series of ``study``, in slice order (along z)."""
    require_data(src)
    return as_new_series(src, dest, study)


def send(api: httpx.Client, files: list[Path], pause_s: float = 0.0) -> str:
    study = ""
    for f in files:
        r = api.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        study = r.json()["ParentStudy"]
        if pause_s:
            time.sleep(pause_s)  # a scanner sending one image after the other
    return study


def jobs_of(api: httpx.Client, uid: str, pipeline: str) -> list[dict[str, Any]]:
    jobs = api.get("/ai/jobs", params={"study": uid}).json()
    return [dict(api.get(f"/ai/jobs/{j['id']}").json()) for j in jobs if j["pipeline"] == pipeline]


def stable_seen(api: httpx.Client, study_id: str) -> bool:
    changes = api.get("/changes", params={"since": 0, "limit": 100000}).json()["Changes"]
    return any(c["ChangeType"] == "StableStudy" and c["ID"] == study_id for c in changes)


def outputs_in_study(api: httpx.Client, study_id: str, source_uid: str) -> list[tuple[str, str, int]]:
    """(Modality, SeriesNumber, instances) of every series but the source, sorted."""
    return sorted(
        (
            s["MainDicomTags"].get("Modality", ""),
            s["MainDicomTags"].get("SeriesNumber", ""),
            len(s["Instances"]),
        )
        for s in api.get(f"/studies/{study_id}/series").json()
        if s["MainDicomTags"].get("SeriesInstanceUID") != source_uid
    )


def reports(medplum: MedplumServer, job: dict[str, Any]) -> list[dict[str, Any]]:
    (report,) = [
        e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    (ident,) = [i["value"] for i in report["identifier"] if i["system"] == URI_SYSTEM]
    return medplum.search("DiagnosticReport", identifier=f"{URI_SYSTEM}|{ident}")


def test_late_image_supersedes_the_result_once(
    api: httpx.Client, orthanc: OrthancServer, medplum: MedplumServer, tmp_path: Path
) -> None:
    files = as_series(CT_B40, tmp_path / "ct", generate_uid())
    late = files.pop()  # the last slice: the series without it is whole, only shorter
    study_id = send(api, files)
    sent = time.time()
    uid = str(api.get(f"/studies/{study_id}").json()["MainDicomTags"]["StudyInstanceUID"])

    (first,) = wait_for("the ct-lung job", lambda: jobs_of(api, uid, "ct-lung"), timeout=40, orthanc=orthanc)
    # Started per series: well before Orthanc's StableAge, and before Orthanc called the study stable.
    assert first["created"] - sent < STABLE_AGE / 2
    assert not stable_seen(api, study_id)

    def delivered(jid: str) -> dict[str, Any] | None:
        job = dict(api.get(f"/ai/jobs/{jid}").json())
        assert job["state"] not in ("failed", "cancelled"), job["error"]
        return (
            job
            if job["state"] == "succeeded" and (job["delivery"] or {}).get("state") == "delivered"
            else None
        )

    first = wait_for(
        "the first result stored and reported", lambda: delivered(first["id"]), timeout=240, orthanc=orthanc
    )
    (report,) = reports(medplum, first)
    assert versions(medplum, f"DiagnosticReport/{report['id']}") == 1
    source_uid = str(pydicom.dcmread(late, stop_before_pixels=True).SeriesInstanceUID)
    before = outputs_in_study(api, study_id, source_uid)
    assert [(m, n) for m, _, n in before if m in ("SEG", "SR")] == [("SEG", 1), ("SR", 1)], before

    send(api, [late])
    second = wait_for(
        "a job superseding the first",
        lambda: next((j for j in jobs_of(api, uid, "ct-lung") if j["supersedes"] == first["id"]), None),
        timeout=40, orthanc=orthanc,
    )  # fmt: skip
    second = wait_for(
        "its result stored and reported", lambda: delivered(second["id"]), timeout=240, orthanc=orthanc
    )

    jobs = jobs_of(api, uid, "ct-lung")
    assert sorted(j["id"] for j in jobs) == sorted([first["id"], second["id"]])  # exactly one more
    old = next(j for j in jobs if j["id"] == first["id"])
    assert old["superseded_by"] == second["id"] and "superseded" in [e["kind"] for e in old["events"]]
    assert "supersedes" in [e["kind"] for e in second["events"]]
    audit = api.get(f"/ai/jobs/{first['id']}/audit").json()
    assert audit["job"]["superseded_by"] == second["id"]
    # Recomputed on every image, stored under the same UIDs: one result in the study.
    assert second["series"]["ct"]["instances"] == first["series"]["ct"]["instances"] + 1
    assert second["outputs"]["volume"]["shape"] != first["outputs"]["volume"]["shape"]
    for kind in ("seg", "sr"):
        assert (
            second["outputs"]["stored"][kind]["SOPInstanceUID"]
            == first["outputs"]["stored"][kind]["SOPInstanceUID"]
        )
    assert outputs_in_study(api, study_id, source_uid) == before
    # The EHR keeps one report, updated once.
    (updated,) = reports(medplum, second)
    assert updated["id"] == report["id"]
    assert versions(medplum, f"DiagnosticReport/{report['id']}") == 2
    assert updated["meta"]["versionId"] != report["meta"]["versionId"]
    # The same image sent again changes nothing.
    send(api, [late])
    assert wait_for("the intake to read past it", lambda: intake_read_all(api), timeout=30)
    assert len(jobs_of(api, uid, "ct-lung")) == 2


def versions(medplum: MedplumServer, reference: str) -> int:
    """How many versions the FHIR server keeps of a resource (its _history)."""
    r = httpx.get(f"{medplum.url}/{reference}/_history", timeout=10)
    r.raise_for_status()
    return len(r.json().get("entry", []))


def intake_read_all(api: httpx.Client) -> bool:
    last = int(api.get("/changes", params={"last": ""}).json()["Last"])
    position = api.get("/ai/health").json()["intake"]["last_change"]
    return position is not None and position >= last


def test_a_later_series_neither_delays_the_job_nor_gets_a_second_one(
    api: httpx.Client, orthanc: OrthancServer, tmp_path: Path
) -> None:
    study = generate_uid()
    sharp = as_series(CT_B70, tmp_path / "b70", study)
    soft = as_series(CT_B40, tmp_path / "b40", study)  # routing prefers this one for ct-lung
    study_id = send(api, sharp)
    uid = str(api.get(f"/studies/{study_id}").json()["MainDicomTags"]["StudyInstanceUID"])
    # The second series arrives image by image while the first one's job starts.
    sending = threading.Thread(target=send, args=(api, soft, 0.3))
    sending.start()
    try:
        (first,) = wait_for(
            "the ct-lung job", lambda: jobs_of(api, uid, "ct-lung"), timeout=40, orthanc=orthanc
        )
        assert sending.is_alive(), "the job waited for the second series"
    finally:
        sending.join()
    # The sentinel pipeline's job shows that the intake routed the second series...
    wait_for("the second series routed", lambda: jobs_of(api, uid, "sentinel"), timeout=40, orthanc=orthanc)
    # ...and ct-lung kept its series and its one job.
    jobs = jobs_of(api, uid, "ct-lung")
    assert [j["id"] for j in jobs] == [first["id"]]
    assert jobs[0]["series"]["ct"]["series_uid"] == str(
        pydicom.dcmread(sharp[0], stop_before_pixels=True).SeriesInstanceUID
    )
    assert not stable_seen(api, study_id)
    wait_for(
        "the first job to end", lambda: jobs_of(api, uid, "ct-lung")[0]["state"] in TERMINAL, timeout=240
    )
