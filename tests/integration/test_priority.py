"""Urgent before routine, and the off-hours window, on the real stack (Orthanc, plugin, Triton).

One worker; routine studies queue up behind each other; an urgent study (its series described
as trauma, the pipeline's rule) sent after them is taken before every routine job still waiting
when it arrived, while the routine job running then finishes untouched. A pipeline whose
routine jobs run only in a window that is closed now defers them (shown in the job and the
metrics) and still runs an urgent study at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from devstack.stack import OrthancServer
from devstack.triton_server import TritonServer

from ..conftest import CT_B40
from .conftest import copy_as_new_study, make_orthanc, shipped_pipelines, wait_for

pytestmark = pytest.mark.integration

ROUTINE = 8  # routine studies queued before the urgent one: several still wait when it arrives
URGENT_RULES = {"rules": [{"SeriesDescription": {"matches": "(?i)trauma"}}], "priority": 100}


def ct_lung(**extra: Any) -> list[dict[str, Any]]:
    (p,) = [p for p in shipped_pipelines() if p["name"] == "ct-lung"]
    return [p | {"urgent": URGENT_RULES} | extra]


def stack(tmp: Path, triton: TritonServer, pipelines: list[dict[str, Any]]) -> OrthancServer:
    # A series is complete 1 s after its last image; StableAge far away: per-series start alone.
    return make_orthanc(
        tmp, triton.grpc_port, pipelines, stable_age=60,
        extra_env={"ORTHANC_AI_SERIES_QUIET_SECONDS": "1"},
    )  # fmt: skip


def study_files(tmp: Path, name: str, description: str | None = None) -> tuple[str, list[Path]]:
    uid, files = copy_as_new_study(CT_B40, tmp / name)
    if description is not None:
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SeriesDescription = description
            ds.save_as(f, enforce_file_format=True)
    return uid, files


def upload(api: httpx.Client, files: list[Path]) -> None:
    for f in files:
        api.post("/instances", content=f.read_bytes()).raise_for_status()


def job_of(api: httpx.Client, uid: str) -> dict[str, Any] | None:
    jobs = api.get("/ai/jobs", params={"study": uid}).json()
    return dict(jobs[0]) if jobs else None


def waiting(api: httpx.Client) -> dict[str, float]:
    metrics = api.get("/ai/metrics").text
    out = {}
    for line in metrics.splitlines():
        if line.startswith("orthanc_ai_jobs_waiting{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture
def one_worker(tmp_path: Path, triton: TritonServer) -> Iterator[tuple[OrthancServer, httpx.Client]]:
    server = stack(tmp_path, triton, ct_lung())
    server.start(timeout=60)
    with httpx.Client(base_url=server.url, timeout=60) as api:
        yield server, api
    server.stop()


def test_an_urgent_study_goes_before_the_routine_ones_waiting(
    tmp_path: Path, one_worker: tuple[OrthancServer, httpx.Client]
) -> None:
    server, api = one_worker
    routine = [study_files(tmp_path, f"routine-{i}") for i in range(ROUTINE)]
    urgent_uid, urgent_files = study_files(tmp_path, "urgent", "TRAUMA CHEST")
    for _, files in routine:
        upload(api, files)
    jobs = wait_for(
        "a job for every routine study",
        lambda: (found := [job_of(api, uid) for uid, _ in routine]) and all(found) and found,
        timeout=120, orthanc=server,
    )  # fmt: skip
    assert all(j["urgent"] is None and j["priority"] == 0 for j in jobs)
    upload(api, urgent_files)
    urgent = wait_for("the urgent job", lambda: job_of(api, urgent_uid), timeout=60, orthanc=server)
    assert urgent["urgent"] and "trauma" in urgent["urgent"].lower() and urgent["priority"] == 100

    def all_done() -> list[dict[str, Any]] | None:
        found = [job_of(api, uid) for uid, _ in [*routine, (urgent_uid, urgent_files)]]
        return found if all(j and j["state"] in ("succeeded", "failed") for j in found) else None  # type: ignore[return-value]

    done = wait_for("every job finished", all_done, timeout=600, orthanc=server)
    assert [j["state"] for j in done] == ["succeeded"] * (ROUTINE + 1), [j["error"] for j in done]
    *routine_jobs, urgent = done
    # Still waiting when the urgent job was queued: every one of them started after it.
    behind = [j for j in routine_jobs if j["started"] > urgent["created"]]
    assert len(behind) >= 2, "the routine queue ran dry before the urgent study arrived: nothing was tested"
    assert all(urgent["started"] < j["started"] for j in behind)
    # The one running when it arrived was not interrupted: one attempt each, none retried.
    assert all(j["attempts"] == 1 for j in done)
    running = [j for j in routine_jobs if j["started"] <= urgent["created"] < j["finished"]]
    assert len(running) <= 1 and all(urgent["started"] >= j["finished"] for j in running)


def test_off_hours_defers_routine_jobs_but_not_urgent_ones(tmp_path: Path, triton: TritonServer) -> None:
    now = dt.datetime.now().astimezone()
    # A one-hour window two hours from now: routine jobs wait for it.
    start = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    server = stack(tmp_path, triton, ct_lung(schedule={"run_between": [start, end]}))
    server.start(timeout=60)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as api:
            routine_uid, routine_files = study_files(tmp_path, "routine")
            urgent_uid, urgent_files = study_files(tmp_path, "urgent", "Trauma CT")
            upload(api, routine_files)
            routine = wait_for(
                "the routine job", lambda: job_of(api, routine_uid), timeout=60, orthanc=server
            )
            assert routine["state"] == "queued" and routine["deferred_until"] is not None
            assert routine["deferred_until"] > now.timestamp() + 3600  # when the window opens
            assert waiting(api) == {"urgent": 0.0, "routine": 0.0, "deferred": 1.0}
            upload(api, urgent_files)
            urgent = wait_for(
                "the urgent job done",
                lambda: (j := job_of(api, urgent_uid)) and j["state"] == "succeeded" and j,
                timeout=180, orthanc=server,
            )  # fmt: skip
            assert urgent["deferred_until"] is None and urgent["urgent"]
            routine = job_of(api, routine_uid)
            assert routine is not None and routine["state"] == "queued" and routine["started"] is None
            assert waiting(api)["deferred"] == 1.0
            events = [e["kind"] for e in api.get(f"/ai/jobs/{routine['id']}").json()["events"]]
            assert "deferred" in events, events
    finally:
        server.stop()
