"""The review loop's parts without Orthanc: recording reviews, the outbox's order per job, the
FHIR update, the verified SR and the agreement of an edit."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from orthanc_plugin.core.errors import BadRequest
from orthanc_plugin.core.results import OutputUIDs
from orthanc_plugin.fhir.report import build_diagnostic_report
from orthanc_plugin.fhir.review import review_bundle
from orthanc_plugin.imaging.agreement import agreement
from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.reviews import Reviews, ReviewStateError, outbox_key
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.outputs.sr_review import verified_sr

from .jobs_helpers import NO_INPUT, outputs
from .test_fhir_report import ALGORITHM, ISSUED, MEASUREMENTS, SEGMENTS, STUDY

WHEN = dt.datetime(2025, 3, 4, 10, 30, tzinfo=dt.UTC)


@pytest.fixture
def stores(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    reviews = Reviews(store.path)
    yield store, reviews
    reviews.close()
    store.close()


def succeeded(store: JobStore, key: str = "k1") -> str:
    job, _ = store.enqueue(key, "1.2.3", "oid", "ct-lung", "1.0.0", "fp", NO_INPUT)
    claimed = store.claim("w", 30)
    assert claimed is not None
    assert store.succeed(job.id, "w", outputs(seg="1.2", sr="1.3"), None)
    return job.id


def test_a_review_is_recorded_once_and_a_later_one_supersedes_it(stores) -> None:
    store, reviews = stores
    jid = succeeded(store)
    first, created = reviews.record(jid, "accept", "rad", "api")
    again, created_again = reviews.record(jid, "accept", "rad", "api")
    assert created and not created_again and again.id == first.id
    second, created = reviews.record(jid, "reject", "rad", "api", reason="wrong side")
    assert created and second.n == 2
    assert [r.review_state for r in reviews.for_job(jid)] == ["accepted", "rejected"]
    kinds = [e["detail"] for e in store.events(jid) if e["kind"] == "review_recorded"]
    assert len(kinds) == 2 and "supersedes review 1" in kinds[1]
    # The review filter of the job list follows the latest review.
    assert [j.id for j in store.list_jobs(review="rejected")] == [jid]
    assert store.list_jobs(review="pending") == []


def test_an_edit_is_recorded_once_per_revised_seg(stores) -> None:
    store, reviews = stores
    jid = succeeded(store)
    a, created = reviews.record(jid, "edit", "rad", "revised SEG", seg_uid="2.25.9", seg_id="x")
    b, created_b = reviews.record(jid, "edit", "rad", "revised SEG", seg_uid="2.25.9", seg_id="x")
    assert created and not created_b and a.id == b.id


def test_reviews_that_make_no_sense_are_refused(stores) -> None:
    store, reviews = stores
    jid = succeeded(store)
    with pytest.raises(BadRequest, match="reason"):
        reviews.record(jid, "reject", "rad", "api")
    with pytest.raises(BadRequest, match="decision"):
        reviews.record(jid, "maybe", "rad", "api")
    queued, _ = store.enqueue("k2", "1.2.3", "oid", "ct-lung", "1.0.0", "fp2", NO_INPUT)
    with pytest.raises(ReviewStateError, match="only succeeded"):
        reviews.record(queued.id, "accept", "rad", "api")


def test_reviews_of_a_job_are_applied_in_order(stores) -> None:
    store, reviews = stores
    jid = succeeded(store)
    reviews.record(jid, "accept", "rad", "api")
    reviews.record(jid, "reject", "rad", "api", reason="no")
    first = reviews.claim("w1", 30)
    assert first is not None and first.n == 1
    assert reviews.claim("w2", 30) is None  # review 2 waits for review 1
    assert reviews.applied(first, "w1", {"sr": {}}, {"resourceType": "Bundle", "entry": []}, "http://ehr")
    second = reviews.claim("w2", 30)
    assert second is not None and second.n == 2


def test_the_outbox_delivers_a_jobs_report_and_its_updates_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "jobs.sqlite")
    jid, other = "a" * 20, "b" * 20
    for key in (jid, outbox_key(jid, 1), outbox_key(jid, 2), other):
        outbox.enqueue(
            key, {"resourceType": "Bundle", "type": "transaction", "entry": [], "tag": key}, "http://ehr"
        )
    order = []
    while (d := outbox.claim("w", 30)) is not None:
        # While a row of a job is out, no later row of that job is handed out.
        while (more := outbox.claim("w2", 30)) is not None:
            assert more.job_id[:20] != d.job_id[:20], (d.job_id, more.job_id)
            outbox.release(more)
            break
        order.append(d.job_id)
        if d.job_id == outbox_key(jid, 1) and d.attempts == 1:
            outbox.failed_attempt(d, "EHR down", retry_after_s=0)
            continue
        assert outbox.delivered(d, {"http_status": 200})
    mine = [k for k in order if k.startswith(jid)]
    assert mine == [jid, outbox_key(jid, 1), outbox_key(jid, 1), outbox_key(jid, 2)]
    assert other in order
    outbox.close()


def job_bundle() -> dict:
    uids = OutputUIDs("2.25.11", "2.25.12", "2.25.21", "2.25.22", key="job-a")
    return build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, uids, ISSUED)


@pytest.mark.parametrize(
    ("decision", "status"), [("accept", "final"), ("edit", "amended"), ("reject", "entered-in-error")]
)
def test_a_review_updates_the_same_resources(decision: str, status: str) -> None:
    original = job_bundle()
    name = next(
        e["resource"]["code"]["text"]
        for e in original["entry"]
        if e["resource"]["resourceType"] == "Observation"
    )
    volumes = {name: 12.5} if decision == "edit" else None
    update = review_bundle(
        original, decision, "rad", WHEN, "wrong" if decision == "reject" else None, volumes
    )
    assert [e["fullUrl"] for e in update["entry"]] == [e["fullUrl"] for e in original["entry"]]
    for sent, before in zip(update["entry"], original["entry"], strict=True):
        resource = sent["resource"]
        if resource["resourceType"] == "Device":
            assert sent["request"] == before["request"]  # still a conditional create
            continue
        identifier = before["request"]["ifNoneExist"].split("=", 1)[1]
        assert sent["request"] == {
            "method": "PUT",
            "url": f"{resource['resourceType']}?identifier={identifier}",
        }
        assert resource["status"] == status
        if resource["resourceType"] == "DiagnosticReport":
            assert resource["resultsInterpreter"] == [{"display": "rad"}]
            if decision == "reject":
                assert "wrong" in resource["conclusion"] and "must not be used" in resource["conclusion"]
        elif decision == "edit" and resource["code"]["text"] == name:
            assert resource["valueQuantity"]["value"] == 12.5
    with pytest.raises(ValueError, match="no observation"):
        review_bundle(original, "edit", "rad", WHEN, None, {"Spleen volume": 1.0})


def sr(uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.VerificationFlag, ds.CompletionFlag, ds.PreliminaryFlag = "UNVERIFIED", "COMPLETE", "PRELIMINARY"
    ds.ContentSequence = []
    return ds


def test_the_verified_sr_names_its_reviewer_and_predecessors() -> None:
    ai = sr("2.25.1")
    v = verified_sr(ai, [ai], "rad", "Hospital", WHEN, "2.25.2", 2, comment="rejected: wrong")
    assert (v.VerificationFlag, v.PreliminaryFlag, v.SOPInstanceUID, v.InstanceNumber) == (
        "VERIFIED", "FINAL", "2.25.2", 2,
    )  # fmt: skip
    (observer,) = v.VerifyingObserverSequence
    assert (observer.VerifyingObserverName, observer.VerifyingOrganization) == ("rad", "Hospital")
    assert observer.VerificationDateTime.startswith("20250304103000")
    (study,) = v.PredecessorDocumentsSequence
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "2.25.1"
    assert v.ContentSequence[-1].TextValue == "rejected: wrong"
    assert ai.VerificationFlag == "UNVERIFIED" and not ai.ContentSequence  # the AI's SR is untouched


def test_agreement_per_segment() -> None:
    ai = np.zeros((4, 8, 8), np.uint8)
    ai[:, :4] = 1
    ai[:, 4:] = 2
    edited = ai.copy()
    edited[1:3, :2] = 0  # two slices of segment 1 half erased
    one, two = agreement(ai, edited, [1, 2], voxel_volume_ml=0.5)
    assert one.dice < 1 and one.slices_touched == 2 and one.volume_diff_ml == -16 * 0.5 * 2
    assert one.volume_diff_pct == pytest.approx(-25.0)
    assert two.dice == 1.0 and two.slices_touched == 0 and two.volume_diff_ml == 0
