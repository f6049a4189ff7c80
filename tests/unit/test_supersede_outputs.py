"""Storing a superseding job's outputs: the old result's leftovers go, a superseded job stores nothing."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset

from orthanc_plugin.core.handoff import InputsInfo, JobInput, JobOutputs, ModelRef, StoredInstance, VolumeInfo
from orthanc_plugin.jobs.store import Job, JobStore
from orthanc_plugin.worker.pipeline import Encoded, Run, Superseded, store_outputs


class Orthanc:
    def __init__(self) -> None:
        self.stored: list[str] = []
        self.deleted: list[str] = []

    def study_exists(self, sid: str) -> bool:
        return True

    def series_exists(self, sid: str) -> bool:
        return True

    def store(self, ds: Dataset) -> dict[str, Any]:
        self.stored.append(str(ds.SOPInstanceUID))
        return {"ID": f"id-{ds.SOPInstanceUID}", "ParentSeries": f"id-{ds.SeriesInstanceUID}"}

    def delete_instance(self, iid: str) -> None:
        self.deleted.append(iid)


def ds(series: str, sop: str) -> Dataset:
    d = Dataset()
    d.SeriesInstanceUID, d.SOPInstanceUID = series, sop
    return d


def stored(series: str, sop: str) -> StoredInstance:
    return StoredInstance(SOPInstanceUID=sop, SeriesInstanceUID=series, ID=f"id-{sop}")


def run_of(job: Job, store: JobStore, orthanc: Orthanc) -> Run:
    fake: Any = SimpleNamespace()
    return Run(job, fake, fake, "w1", store, orthanc, fake, threading.Event())  # type: ignore[arg-type]


@pytest.fixture
def jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    old, _ = store.enqueue("1.2|p|1|a", "1.2", "s", "p", "1", "a", JobInput())
    assert store.claim("w1", 30) is not None
    outputs = JobOutputs(
        stored={
            "seg": stored("2.1", "2.1.1"),
            "sr": stored("2.2", "2.2.1"),
            "key_images": (stored("2.3", "2.3.1"), stored("2.3", "2.3.2"), stored("2.3", "2.3.3")),
        },
        model=ModelRef(name="m", version="1"),
        volume=VolumeInfo(shape=(30, 8, 8), spacing_mm=(1.0, 1.0, 1.0)),
        inputs=InputsInfo(channels=("ct",), grid=(8, 8, 8)),
    )
    assert store.succeed(old.id, "w1", outputs, None)
    new, _ = store.enqueue(
        "1.2|p|1|b", "1.2", "s", "p", "1", "b", JobInput(supersedes=old.id, output_key=old.key)
    )
    store.supersede(old.id, new.id, "late image")
    return store, store.get(old.id), new


def test_the_superseding_result_replaces_the_old_one_and_removes_its_leftovers(jobs):
    store, old, new = jobs
    orthanc = Orthanc()
    assert store.claim("w1", 30) is not None
    encoded = Encoded(
        {
            "seg": ds("2.1", "2.1.1"),
            "sr": ds("2.2", "2.2.1"),
            "key_images": [ds("2.3", "2.3.1"), ds("2.3", "2.3.2")],
        },
        None,
    )
    store_outputs(run_of(store.get(new.id), store, orthanc), [], encoded)
    assert orthanc.stored == ["2.1.1", "2.2.1", "2.3.1", "2.3.2"]  # the same UIDs: Orthanc overwrites
    assert orthanc.deleted == ["id-2.3.3"]  # the key image the new result has no counterpart for


def test_a_superseded_job_stores_nothing(jobs):
    store, old, new = jobs
    orthanc = Orthanc()
    with pytest.raises(Superseded) as e:
        store_outputs(run_of(old, store, orthanc), [], Encoded({"seg": ds("2.1", "2.1.1")}, None))
    assert e.value.by == new.id
    assert orthanc.stored == [] and orthanc.deleted == []


def test_the_report_withdrawn_from_is_the_latest_one_delivered(tmp_path) -> None:
    """A job superseded before it ran made no report: the one before it is what the EHR holds."""
    from orthanc_plugin.worker.pipeline import superseded_report

    store = JobStore(tmp_path / "jobs.sqlite")
    first, _ = store.enqueue("1.2|p|1|a", "1.2", "s", "p", "1", "a", JobInput())
    assert store.claim("w1", 30) is not None
    outputs = JobOutputs(
        stored={"seg": stored("2.1", "2.1.1")},
        model=ModelRef(name="m", version="1"),
        volume=VolumeInfo(shape=(30, 8, 8), spacing_mm=(1.0, 1.0, 1.0)),
        inputs=InputsInfo(channels=("ct",), grid=(8, 8, 8)),
    )
    report = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    assert store.succeed(first.id, "w1", outputs, report)
    second, _ = store.enqueue("1.2|p|1|b", "1.2", "s", "p", "1", "b", JobInput(supersedes=first.id))
    store.supersede(first.id, second.id, "late image")
    third, _ = store.enqueue("1.2|p|1|c", "1.2", "s", "p", "1", "c", JobInput(supersedes=second.id))
    store.supersede(second.id, third.id, "another late image")
    assert store.get(second.id).fhir is None
    assert superseded_report(run_of(store.get(third.id), store, Orthanc())) == report
    assert superseded_report(run_of(store.get(first.id), store, Orthanc())) is None
