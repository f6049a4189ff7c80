"""Intake logic against a fake Orthanc change log: cursor, catch-up after restart, idempotency."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.intake.changes import SEQ_KEY, Intake
from orthanc_plugin.jobs.store import JobStore


class FakeOrthanc:
    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.studies: dict[str, dict[str, Any]] = {}
        self.series: dict[str, dict[str, Any]] = {}

    def add_study(self, sid: str, kernels: list[str], n: int = 30) -> None:
        series_ids = []
        for k in kernels:
            ser = f"{sid}-{k}"
            series_ids.append(ser)
            self.series[ser] = {
                "ParentStudy": sid,
                "MainDicomTags": {
                    "Modality": "CT",
                    "SeriesInstanceUID": f"1.2.{len(self.series)}",
                    "SeriesNumber": "2",
                },
                "Instances": [f"{ser}-i{i}" for i in range(n)],
                "_kernel": k,
            }
            self.log("NewSeries", ser, "Series")
        self.studies[sid] = {
            "MainDicomTags": {"StudyInstanceUID": f"1.2.840.{len(self.studies)}"},
            "Series": series_ids,
        }

    def log(self, kind: str, rid: str, level: str = "Study") -> None:
        self.changes.append(
            {"ChangeType": kind, "ID": rid, "ResourceType": level, "Seq": len(self.changes) + 1}
        )

    def get(self, path: str) -> Any:
        if path.startswith("/changes"):
            if path == "/changes?last":
                return {"Last": max((c["Seq"] for c in self.changes), default=0)}
            q = dict(p.split("=") for p in path.split("?")[1].split("&"))
            since, limit = int(q["since"]), int(q["limit"])
            page = [c for c in self.changes if c["Seq"] > since][:limit]
            return {"Changes": page, "Last": page[-1]["Seq"] if page else since, "Done": len(page) < limit}
        kind, rid = path.split("/")[1:3]
        if kind == "studies":
            if rid not in self.studies:
                raise LookupError(path)
            return self.studies[rid]
        if kind == "series":
            return self.series[rid]
        if kind == "instances":
            ser = rid.rsplit("-i", 1)[0]
            return {"ConvolutionKernel": self.series[ser]["_kernel"], "SliceThickness": "5"}
        raise LookupError(path)


@pytest.fixture
def setup(tmp_path):
    pipelines = load_pipelines(ROOT / "config" / "pipelines.yaml")
    orthanc = FakeOrthanc()
    store = JobStore(tmp_path / "jobs.sqlite")
    return orthanc, store, pipelines


def make_intake(orthanc, store, pipelines, delay=0.0, wait_for_gaps=False) -> Intake:
    return Intake(orthanc.get, store, lambda: pipelines, catch_up_delay_s=delay, wait_for_gaps=wait_for_gaps)


def test_stable_study_enqueues_once(setup):
    orthanc, store, pipelines = setup
    intake = make_intake(orthanc, store, pipelines)
    intake.process_changes()  # first start: begins at the present
    orthanc.add_study("s1", ["B70f", "B40f"])
    orthanc.log("StableStudy", "s1")
    intake.process_changes()
    jobs = store.list_jobs()
    assert len(jobs) == 1 and jobs[0].input.roles["ct"].series_id == "s1-B40f"
    # Our outputs arrive, the study is stable again: same inputs, so no second job.
    orthanc.log("NewSeries", "s1-B40f", "Series")
    orthanc.log("StableStudy", "s1")
    intake.process_changes()
    assert len(store.list_jobs()) == 1
    assert int(store.get_kv(SEQ_KEY) or 0) == len(orthanc.changes)


def test_first_start_does_not_reprocess_the_archive(setup):
    orthanc, store, pipelines = setup
    orthanc.add_study("old", ["B40f"])
    orthanc.log("StableStudy", "old")
    make_intake(orthanc, store, pipelines).process_changes()
    assert store.list_jobs() == []


def test_lost_stable_event_is_caught_up_after_restart(setup):
    orthanc, store, pipelines = setup
    first = make_intake(orthanc, store, pipelines)
    first.process_changes()
    orthanc.add_study("s2", ["B40f"])  # series arrive...
    first.process_changes()  # ...are seen, but Orthanc stops before the study is stable
    assert store.list_jobs() == []
    # The persisted position must not have moved past the pending series.
    assert int(store.get_kv(SEQ_KEY) or 0) < orthanc.changes[-1]["Seq"]
    restarted = make_intake(orthanc, store, pipelines, delay=0.0)
    restarted.process_changes()
    jobs = store.list_jobs()
    assert len(jobs) == 1 and jobs[0].orthanc_study_id == "s2"


def test_stable_events_after_restart_are_not_lost(setup):
    orthanc, store, pipelines = setup
    make_intake(orthanc, store, pipelines).process_changes()
    orthanc.add_study("s3", ["B40f"])
    orthanc.log("StableStudy", "s3")  # happened while the plugin was down
    make_intake(orthanc, store, pipelines).process_changes()
    assert [j.orthanc_study_id for j in store.list_jobs()] == ["s3"]


def test_deleted_study_is_skipped(setup):
    orthanc, store, pipelines = setup
    intake = make_intake(orthanc, store, pipelines)
    intake.process_changes()
    orthanc.log("StableStudy", "gone")
    intake.process_changes()
    assert store.list_jobs() == []


def test_dry_run_explains(setup):
    orthanc, store, pipelines = setup
    orthanc.add_study("s4", ["B70f"], n=5)
    decisions = {d.pipeline: d for d in make_intake(orthanc, store, pipelines).dry_run("s4")}
    d = decisions["ct-lung"]
    assert not d.matched
    (failures,) = d.roles[0].rejected.values()
    assert any("ImageCount is 5, below minimum 20" in m for m in failures)


def test_change_committed_late_is_not_skipped(setup, monkeypatch):
    """Two Orthancs on one PostgreSQL index: change 3 may become visible after change 4."""
    orthanc, store, pipelines = setup
    intake = make_intake(orthanc, store, pipelines, wait_for_gaps=True)
    intake.process_changes()
    orthanc.add_study("late", ["B40f"])  # NewSeries, seq 1
    orthanc.log("StableStudy", "other")  # seq 2, unknown study: ignored
    stable = {"ChangeType": "StableStudy", "ID": "late", "ResourceType": "Study", "Seq": 3}
    orthanc.changes.append({"ChangeType": "StableStudy", "ID": "x", "ResourceType": "Study", "Seq": 4})
    intake.process_changes()  # sees 1, 2, then 4 without 3: holds at 2
    assert intake._cursor == 2
    orthanc.changes.insert(2, stable)  # change 3 commits
    intake.process_changes()
    assert intake._cursor == 4
    assert [j.orthanc_study_id for j in store.list_jobs()] == ["late"]


def test_change_number_that_never_comes_is_skipped_after_a_while(setup, monkeypatch):
    orthanc, store, pipelines = setup
    intake = make_intake(orthanc, store, pipelines, wait_for_gaps=True)
    intake.process_changes()
    orthanc.add_study("after-gap", ["B40f"])  # seq 1
    orthanc.changes.append(
        {"ChangeType": "StableStudy", "ID": "after-gap", "ResourceType": "Study", "Seq": 3}
    )
    intake.process_changes()
    assert intake._cursor == 1 and store.list_jobs() == []  # waits for 2
    monkeypatch.setattr(
        "orthanc_plugin.intake.changes.GAP_WAIT_S", 0.0
    )  # a rolled-back transaction: 2 never comes
    intake.process_changes()
    assert intake._cursor == 3
    assert [j.orthanc_study_id for j in store.list_jobs()] == ["after-gap"]


@pytest.mark.parametrize("shared_index", [False, True])
def test_gaps_of_deleted_resources_cost_no_wait(setup, shared_index):
    """Orthanc deletes a resource's changes with it: with one writer (SQLite), or far from the end
    of the log, a gap is not waited for."""
    orthanc, store, pipelines = setup
    intake = make_intake(orthanc, store, pipelines, wait_for_gaps=shared_index)
    intake.process_changes()
    orthanc.add_study("now", ["B40f"])  # NewSeries, seq 1
    seq = 1
    for _ in range(3):
        seq += 5  # four changes of a deleted study are gone
        orthanc.changes.append(
            {"ChangeType": "NewInstance", "ID": "y", "ResourceType": "Instance", "Seq": seq}
        )
    if shared_index:  # push the gaps far from the end of the log
        for _ in range(1100):
            seq += 1
            orthanc.changes.append(
                {"ChangeType": "NewInstance", "ID": "y", "ResourceType": "Instance", "Seq": seq}
            )
    orthanc.changes.append(
        {"ChangeType": "StableStudy", "ID": "now", "ResourceType": "Study", "Seq": seq + 1}
    )
    intake.process_changes()
    assert intake._cursor == seq + 1
    assert [j.orthanc_study_id for j in store.list_jobs()] == ["now"]
