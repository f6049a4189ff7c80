"""Per-series start and supersession, against a fake Orthanc change log and a fake clock."""

from __future__ import annotations

import time
from typing import Any

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.intake import changes
from orthanc_plugin.intake.changes import Intake
from orthanc_plugin.intake.series import expected_instances
from orthanc_plugin.jobs.store import JobStore
from tests.unit.test_intake import FakeOrthanc

QUIET = 3.0


class Clock:
    """``time`` for the intake module with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class Orthanc(FakeOrthanc):
    """Also answers ``/instances/{id}`` (its series) and knows ImagesInAcquisition per series."""

    def __init__(self) -> None:
        super().__init__()
        self.in_acquisition: dict[str, int] = {}

    def add_instances(self, series: str, n: int) -> None:
        ids = self.series[series]["Instances"]
        start = len(ids)
        for i in range(start, start + n):
            ids.append(f"{series}-i{i}")
            self.log("NewInstance", f"{series}-i{i}", "Instance")

    def add_series(self, study: str, kernel: str, n: int) -> str:
        ser = f"{study}-{kernel}"
        self.series[ser] = {
            "ParentStudy": study,
            "MainDicomTags": {
                "Modality": "CT",
                "SeriesInstanceUID": f"1.2.{len(self.series)}",
                "SeriesNumber": "3",
            },
            "Instances": [],
            "_kernel": kernel,
        }
        self.studies[study]["Series"].append(ser)
        self.log("NewSeries", ser, "Series")
        self.add_instances(ser, n)
        return ser

    def get(self, path: str) -> Any:
        if path.startswith("/instances/"):
            rid = path.split("/")[2]
            ser = rid.rsplit("-i", 1)[0]
            if path.count("/") == 2:
                return {"ParentSeries": ser}
            tags = {"ConvolutionKernel": self.series[ser]["_kernel"], "SliceThickness": "5"}
            if ser in self.in_acquisition:
                tags["ImagesInAcquisition"] = str(self.in_acquisition[ser])
            return tags
        return super().get(path)


@pytest.fixture
def world(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(changes, "time", clock)
    orthanc = Orthanc()
    store = JobStore(tmp_path / "jobs.sqlite")
    pipelines = [p for p in load_pipelines(ROOT / "config" / "pipelines.yaml") if p.name == "ct-lung"]
    intake = Intake(orthanc.get, store, lambda: pipelines, catch_up_delay_s=600, series_quiet_s=QUIET)
    intake.process_changes()  # first start: begins at the present
    orthanc.studies["s"] = {"MainDicomTags": {"StudyInstanceUID": "1.2.840.9"}, "Series": []}
    return orthanc, store, intake, clock


def test_a_quiet_series_starts_its_pipeline_without_a_stable_study(world):
    orthanc, store, intake, clock = world
    orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET - 0.5
    intake.process_changes()
    assert store.list_jobs() == []  # still within the quiet time
    assert intake.next_due() == pytest.approx(0.5)
    clock.now += 0.6
    intake.process_changes()
    jobs = store.list_jobs()
    assert len(jobs) == 1 and len(jobs[0].input.roles["ct"].instances) == 30
    # The safety net finds the same inputs: no second job.
    orthanc.log("StableStudy", "s")
    intake.process_changes()
    assert len(store.list_jobs()) == 1


def test_an_instance_restarts_the_quiet_time(world):
    orthanc, store, intake, clock = world
    ser = orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET - 1
    orthanc.add_instances(ser, 1)
    intake.process_changes()
    clock.now += QUIET - 1
    intake.process_changes()
    assert store.list_jobs() == []
    clock.now += 1.1
    intake.process_changes()
    assert [len(j.input.roles["ct"].instances) for j in store.list_jobs()] == [31]


def test_a_series_short_of_its_expected_count_waits(world):
    orthanc, store, intake, clock = world
    orthanc.in_acquisition["s-B40f"] = 40
    ser = orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 1
    intake.process_changes()
    assert store.list_jobs() == []
    assert intake.next_due() is None  # nothing to time: the next instance wakes the loop
    orthanc.add_instances(ser, 10)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    assert [len(j.input.roles["ct"].instances) for j in store.list_jobs()] == [40]


def test_a_series_that_never_reaches_its_count_is_left_to_the_stable_study(world):
    orthanc, store, intake, clock = world
    orthanc.in_acquisition["s-B40f"] = 40
    orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 1
    intake.process_changes()
    assert intake.receiving == 1
    clock.now += changes.PENDING_TTL_S
    intake.process_changes()
    assert intake.receiving == 0 and store.list_jobs() == []  # forgotten, not routed
    orthanc.log("StableStudy", "s")
    intake.process_changes()
    assert len(store.list_jobs()) == 1


def test_a_later_series_neither_delays_nor_duplicates_the_job(world):
    orthanc, store, intake, clock = world
    orthanc.add_series("s", "B70f", 30)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    (first,) = store.list_jobs()
    # The series the pipeline prefers arrives later, while the first job exists.
    orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    orthanc.log("StableStudy", "s")
    intake.process_changes()
    assert [j.id for j in store.list_jobs()] == [first.id]


def test_a_late_image_supersedes_the_job_once(world):
    orthanc, store, intake, clock = world
    ser = orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    (first,) = store.list_jobs()
    orthanc.add_instances(ser, 1)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    jobs = store.list_jobs()
    assert len(jobs) == 2
    second = next(j for j in jobs if j.id != first.id)
    assert second.input.supersedes == first.id
    assert second.output_key == first.key  # the outputs keep the first job's UIDs
    assert store.superseded_by(first.id) == second.id
    assert store.get(first.id).state == "cancelled"  # it had not run yet
    assert "superseded" in [e["kind"] for e in store.events(first.id)]
    assert "supersedes" in [e["kind"] for e in store.events(second.id)]
    # The same instances sent again, and the stable study: nothing new.
    orthanc.log("NewInstance", f"{ser}-i3", "Instance")
    orthanc.log("StableStudy", "s")
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    assert len(store.list_jobs()) == 2
    # Another late image: the third job supersedes the second, same output identity.
    orthanc.add_instances(ser, 1)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    third = store.list_jobs()[0]
    assert (third.input.supersedes, third.output_key) == (second.id, first.key)


def test_our_own_outputs_start_nothing(world):
    orthanc, store, intake, clock = world
    orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    seg = orthanc.add_series("s", "SEG", 1)
    orthanc.series[seg]["MainDicomTags"]["Modality"] = "SEG"
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    assert len(store.list_jobs()) == 1


def test_expected_instances_from_the_headers():
    assert expected_instances({"ExpectedNumberOfInstances": 64}, {}) == 64
    assert expected_instances({}, {"ImagesInAcquisition": "120"}) == 120
    assert expected_instances({}, {"NumberOfTemporalPositions": "4", "NumberOfSlices": "30"}) == 120
    assert expected_instances({"ExpectedNumberOfInstances": 64}, {"NumberOfFrames": "200"}) == 1
    assert expected_instances({"ExpectedNumberOfInstances": None}, {"ImagesInAcquisition": "0"}) is None
    assert expected_instances({}, {"ImagesInAcquisition": "x"}) is None


def test_a_running_superseded_job_stores_nothing(tmp_path):
    from orthanc_plugin.core.handoff import JobInput

    store = JobStore(tmp_path / "jobs.sqlite")
    old, _ = store.enqueue("1.2|p|1|a", "1.2", "s", "p", "1", "a", JobInput())
    claimed = store.claim("w1", 30)
    assert claimed is not None and claimed.id == old.id
    new, _ = store.enqueue("1.2|p|1|b", "1.2", "s", "p", "1", "b", JobInput(supersedes=old.id))
    store.supersede(old.id, new.id, "late image")
    assert store.get(old.id).state == "running"  # not killed mid-write
    assert store.abandon_superseded(old.id, "w1", new.id)
    done = store.get(old.id)
    assert done.state == "cancelled" and "not stored" in (done.error or "")
    assert store.superseded_ids([old.id, new.id]) == {old.id}


def test_a_late_image_seen_just_before_a_restart_still_supersedes(world):
    """The change log position is not moved past a series still being fed: after a crash within
    its quiet time (Orthanc forgets its pending stable event too), the late image is read again
    and supersedes the result."""
    orthanc, store, intake, clock = world
    ser = orthanc.add_series("s", "B40f", 30)
    intake.process_changes()
    clock.now += QUIET + 0.1
    intake.process_changes()
    orthanc.log("StableStudy", "s")
    intake.process_changes()
    (first,) = store.list_jobs()
    orthanc.add_instances(ser, 1)  # the late image, after the study was stable
    intake.process_changes()
    assert intake.receiving == 1
    # Crash before the quiet time is over: a new intake on the same job store.
    pipelines = [p for p in load_pipelines(ROOT / "config" / "pipelines.yaml") if p.name == "ct-lung"]
    restarted = Intake(orthanc.get, store, lambda: pipelines, catch_up_delay_s=600, series_quiet_s=QUIET)
    restarted.process_changes()
    clock.now += QUIET + 0.1
    restarted.process_changes()
    jobs = store.list_jobs()
    assert len(jobs) == 2
    second = next(j for j in jobs if j.id != first.id)
    assert second.input.supersedes == first.id and len(second.input.roles["ct"].instances) == 31
    # Once it is handled the position moves on: another restart reads nothing again.
    again = Intake(orthanc.get, store, lambda: pipelines, catch_up_delay_s=600, series_quiet_s=QUIET)
    again.process_changes()
    clock.now += QUIET + 0.1
    again.process_changes()
    assert len(store.list_jobs()) == 2 and again.receiving == 0
