"""FHIR delivery outbox: transitions, idempotent enqueue, backoff, leases, durability."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from orthanc_plugin.jobs.outbox import Outbox, enqueue_in
from orthanc_plugin.jobs.store import JobStore

URL = "http://ehr.example/fhir"


def bundle(tag: str = "a") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [], "id": tag}


@pytest.fixture
def db_target(tmp_path: Path) -> Any:
    """Where the outbox lives; tests/integration/test_outbox_postgres.py runs these tests on PostgreSQL."""
    return tmp_path / "jobs.sqlite"


@pytest.fixture
def outbox(db_target: Any) -> Any:
    o = Outbox(db_target, first_backoff_s=1, max_backoff_s=8)
    yield o
    o.close()


def test_enqueue_claim_deliver(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    assert outbox.status_for_job("job1")["state"] == "pending"
    assert outbox.backlog() == 1
    d = outbox.claim("w1", lease_s=30)
    assert d is not None and d.job_id == "job1" and d.bundle == bundle() and d.attempts == 1
    assert outbox.status_for_job("job1")["state"] == "delivering"
    assert outbox.claim("w2", lease_s=30) is None  # leased: nobody else gets it
    assert outbox.delivered(d, {"http_status": 200, "report": "DiagnosticReport/x/_history/1"})
    st = outbox.status_for_job("job1")
    assert st["state"] == "delivered" and st["delivered_at"] and st["last_error"] is None
    assert st["response"]["report"] == "DiagnosticReport/x/_history/1" and st["destination"] == URL
    assert outbox.backlog() == 0 and outbox.claim("w1", 30) is None
    assert outbox.status_for_job("unknown") is None


def test_reenqueue_replaces_and_never_duplicates(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle("a"), URL)
    d = outbox.claim("w1", 30)
    assert d is not None and outbox.delivered(d, {"http_status": 200})
    outbox.enqueue("job1", bundle("b"), URL)  # the job was retried: new bundle, pending again
    outbox.enqueue("job1", bundle("c"), URL)
    assert len(outbox.list()) == 1 and outbox.backlog() == 1
    st = outbox.status_for_job("job1")
    assert st["state"] == "pending" and st["attempts"] == 0 and st["delivered_at"] is None
    d2 = outbox.claim("w1", 30)
    assert d2 is not None and d2.bundle["id"] == "c"


def test_stale_attempt_cannot_complete_a_replaced_bundle(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle("old"), URL)
    old = outbox.claim("w1", 30)
    assert old is not None
    outbox.enqueue("job1", bundle("new"), URL)  # job re-run while the old bundle was in flight
    assert not outbox.delivered(old, {"http_status": 200})
    assert outbox.failed_attempt(old, "late failure") is None
    assert outbox.status_for_job("job1")["state"] == "pending"
    new = outbox.claim("w1", 30)
    assert new is not None and new.bundle["id"] == "new" and new.revision == old.revision + 1


def test_backoff_doubles_up_to_the_cap_and_never_gives_up(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    delays = []
    for _ in range(7):
        # Make the row due at once, as if the wait had passed.
        outbox._db.execute("UPDATE fhir_outbox SET not_before=0")
        d = outbox.claim("w1", 30)
        assert d is not None
        delays.append(outbox.failed_attempt(d, "cannot connect to the EHR", "retry"))
        st = outbox.status_for_job("job1")
        assert st["state"] == "failing" and st["last_error"] == "cannot connect to the EHR"
        assert st["next_attempt"] == pytest.approx(time.time() + delays[-1], abs=1)
    assert delays == [1, 2, 4, 8, 8, 8, 8]
    assert outbox.status_for_job("job1")["attempts"] == 7
    assert outbox.claim("w1", 30) is None  # not due yet
    outbox._db.execute("UPDATE fhir_outbox SET not_before=0")
    d = outbox.claim("w1", 30)
    assert d is not None and outbox.delivered(d, {"http_status": 200})
    assert outbox.status_for_job("job1")["state"] == "delivered"


def test_refusals_wait_the_cap_and_keep_a_clear_error(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    d = outbox.claim("w1", 30)
    assert d is not None
    msg = "the EHR refused the token (HTTP 401): check the variable FHIR_TOKEN"
    assert outbox.failed_attempt(d, msg, "auth", 401) == 8
    st = outbox.status_for_job("job1")
    assert st["state"] == "failing" and st["last_error"] == msg
    assert st["last_error_kind"] == "auth" and st["last_http_status"] == 401
    assert [r["job_id"] for r in outbox.list(state="failing")] == ["job1"]
    assert outbox.list(state="pending") == []
    with pytest.raises(ValueError, match="unknown delivery state"):
        outbox.list(state="lost")
    # Retry-After is honoured, but never beyond the cap.
    outbox._db.execute("UPDATE fhir_outbox SET not_before=0")
    d = outbox.claim("w1", 30)
    assert d is not None and outbox.failed_attempt(d, "busy", "retry", 429, retry_after_s=5) == 5
    outbox._db.execute("UPDATE fhir_outbox SET not_before=0")
    d = outbox.claim("w1", 30)
    assert d is not None and outbox.failed_attempt(d, "busy", "retry", 429, retry_after_s=3600) == 8


def test_a_success_wakes_the_backlog_of_that_destination(outbox: Outbox) -> None:
    for j in ("job1", "job2", "job3"):
        outbox.enqueue(j, bundle(j), URL)
    outbox.enqueue("other", bundle(), "http://other.example/fhir")
    for _ in range(2):
        d = outbox.claim("w1", 30, destination=URL)
        assert d is not None
        outbox.failed_attempt(d, "down", "retry")
    d = outbox.claim("w1", 30, destination=URL)
    assert d is not None and d.job_id == "job3"
    assert outbox.delivered(d, {"http_status": 200})
    # job1 and job2 waited on a transient fault: they are due at once now.
    got = {outbox.claim("w1", 30, destination=URL).job_id for _ in range(2)}  # type: ignore[union-attr]
    assert got == {"job1", "job2"}
    assert outbox.claim("w1", 30, destination=URL) is None  # "other" is not ours to send
    assert outbox.backlog(URL) == 2 and outbox.backlog() == 3


def test_expired_lease_is_claimed_again(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    dead = outbox.claim("dead", lease_s=0.05)
    assert dead is not None
    time.sleep(0.1)
    alive = outbox.claim("alive", lease_s=30)
    assert alive is not None and alive.job_id == "job1" and alive.attempts == 2
    assert not outbox.delivered(dead, {"http_status": 200})  # the old owner lost it
    assert outbox.delivered(alive, {"http_status": 200})


def test_release_gives_back_an_unattempted_claim(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    d = outbox.claim("w1", 30)
    assert d is not None
    outbox.release(d)
    st = outbox.status_for_job("job1")
    assert st["state"] == "pending" and st["attempts"] == 0


def test_release_owner_frees_a_dead_process_rows(outbox: Outbox) -> None:
    outbox.enqueue("job1", bundle(), URL)
    outbox.enqueue("job2", bundle(), URL)
    d1, d2 = outbox.claim("dead/delivery", 300), outbox.claim("alive/delivery", 300)
    assert d1 is not None and d2 is not None
    assert outbox.release_owner("dead/delivery") == 1
    again = outbox.claim("alive/delivery", 300)
    assert again is not None and again.job_id == d1.job_id
    assert outbox.claim("other", 300) is None  # d2 stays with its live owner


def test_survives_reopening_and_shares_the_job_store_file(db_target: Any) -> None:
    path = db_target
    store = JobStore(path)
    first = Outbox(path)
    first.enqueue("job1", bundle("x"), URL)
    d = first.claim("w1", lease_s=0.05)
    assert d is not None
    first.close()  # the process died while delivering
    time.sleep(0.1)
    again = Outbox(path)
    d2 = again.claim("w2", 30)
    assert d2 is not None and d2.bundle == bundle("x") and d2.attempts == 2
    assert again.delivered(d2, {"http_status": 201})
    again.close()
    # One database: the job store's connection sees the outbox's rows.
    row = store._db.execute("SELECT COUNT(*) AS n FROM fhir_outbox WHERE job_id=?", ("job1",)).fetchone()
    assert row == {"n": 1}
    last = Outbox(path)
    assert last.status_for_job("job1")["state"] == "delivered"
    last.close()
    store.close()


def test_enqueue_in_joins_the_callers_database_transaction(db_target: Any) -> None:
    store = JobStore(db_target)
    with pytest.raises(RuntimeError, match="rolled back"), store._db.transaction() as db:
        enqueue_in(db, "job1", bundle(), URL)
        raise RuntimeError("the job's success was rolled back")
    outbox = Outbox(db_target)
    assert outbox.backlog() == 0
    with store._db.transaction() as db:
        enqueue_in(db, "job1", bundle(), URL)
    assert outbox.backlog() == 1
    outbox.close()
    store.close()


def test_enqueue_in_joins_the_callers_transaction(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    enqueue_in(db, "job1", bundle(), URL)
    db.execute("ROLLBACK")  # the job's success was rolled back: no delivery either
    outbox = Outbox(path)
    assert outbox.backlog() == 0
    db.execute("BEGIN IMMEDIATE")
    enqueue_in(db, "job1", bundle(), URL)
    db.execute("COMMIT")
    assert outbox.backlog() == 1
    outbox.close()
    db.close()


@pytest.mark.parametrize(
    ("job_id", "payload", "destination", "match"),
    [
        ("", bundle(), URL, "job_id"),
        ("j", bundle(), "", "destination"),
        ("j", {"resourceType": "Patient"}, URL, "Bundle"),
    ],
)
def test_enqueue_checks_its_arguments(
    outbox: Outbox, job_id: str, payload: dict[str, Any], destination: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        outbox.enqueue(job_id, payload, destination)


# --------------------------------------------------------------------------- HL7 ORU (hl7_outbox)

ORU = "MSH|^~\\&|ORTHANC-AI||RIS||20240101||ORU^R01^ORU_R01|abc|P|2.5\rPID|1||123"


def test_a_job_success_queues_its_hl7_messages_in_the_same_transaction(db_target: Any) -> None:
    from orthanc_plugin.core.handoff import JobInput
    from orthanc_plugin.jobs.outbox import HL7

    from .jobs_helpers import outputs

    store = JobStore(db_target)
    hl7 = Outbox(db_target, first_backoff_s=1, max_backoff_s=8, table=HL7)
    fhir = Outbox(db_target)
    try:
        job, _ = store.enqueue("1.2|p|1|f", "1.2", "s", "p", "1", "f", JobInput())
        assert store.claim("w", 30) is not None
        assert store.succeed(job.id, "w", outputs(seg="1.3"), None, hl7={"ris": ORU, "lab": ORU})
        assert [s["destination"] for s in hl7.statuses_for_job(job.id)] == ["lab", "ris"]
        assert fhir.status_for_job(job.id) is None  # the FHIR outbox is untouched
        assert {e["kind"] for e in store.events(job.id)} >= {"hl7_queued"}
        d = hl7.claim("w/hl7", 30, destination="ris")
        assert d is not None and d.bundle["message"] == ORU
        assert hl7.refused(d, "RIS answered an error (AE): unknown patient")
        (ris,) = [s for s in hl7.statuses_for_job(job.id) if s["destination"] == "ris"]
        assert ris["state"] == "failed" and "unknown patient" in ris["last_error"]
        assert hl7.claim("w/hl7", 30, destination="ris") is None, "a refused message is never sent again"
        assert hl7.backlog() == 1 and hl7.list("failed")[0]["destination"] == "ris"
        d = hl7.claim("w/hl7", 30, destination="lab")
        assert d is not None and hl7.failed_attempt(d, "cannot reach lab") == 1
        assert hl7.list("failing")[0]["destination"] == "lab"
    finally:
        store.close(), hl7.close(), fhir.close()


def test_fhir_rows_are_never_given_up_and_hl7_rows_must_be_messages(outbox: Outbox, db_target: Any) -> None:
    from orthanc_plugin.jobs.outbox import HL7

    outbox.enqueue("j1", bundle(), URL)
    d = outbox.claim("w", 30)
    assert d is not None
    with pytest.raises(ValueError, match="never given up"):
        outbox.refused(d, "no")
    hl7 = Outbox(db_target, table=HL7)
    try:
        with pytest.raises(ValueError, match="ER7"):
            hl7.enqueue("j1", bundle(), "ris")
    finally:
        hl7.close()
