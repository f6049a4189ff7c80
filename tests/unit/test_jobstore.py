from __future__ import annotations

import time

import pytest

from orthanc_plugin.jobs.store import JobStateError, JobStore

from .jobs_helpers import NO_INPUT, outputs


@pytest.fixture
def db_target(tmp_path):
    """Where the store lives; tests/integration/test_jobstore_postgres.py runs these tests on PostgreSQL."""
    return tmp_path / "jobs.sqlite"


@pytest.fixture
def store(db_target):
    s = JobStore(db_target)
    yield s
    s.close()


def enqueue(store: JobStore, key: str = "k1", max_attempts: int = 3):
    return store.enqueue(key, "1.2.3", "oid", "ct-lung", "1.0.0", "fp", NO_INPUT, max_attempts=max_attempts)


def test_enqueue_is_idempotent(store):
    j1, created1 = enqueue(store)
    j2, created2 = enqueue(store)
    assert created1 and not created2 and j1.id == j2.id
    assert store.counts()["queued"] == 1


def test_claim_lease_and_succeed(store):
    enqueue(store)
    job = store.claim("w1", lease_s=30)
    assert job is not None and job.state == "running" and job.attempts == 1
    assert store.claim("w2", lease_s=30) is None  # nobody else gets it
    store.record_stage(job.id, "w1", "fetch", 0.25)
    assert store.succeed(job.id, "w1", outputs(seg="1.2"), {"resourceType": "Bundle"})
    done = store.get(job.id)
    assert (
        done.state == "succeeded"
        and done.timings == {"fetch": 0.25}
        and done.fhir == {"resourceType": "Bundle"}
    )
    assert [e["kind"] for e in store.events(job.id)] == ["queued", "running", "succeeded"]


def test_expired_lease_goes_back_to_queue(store):
    enqueue(store)
    job = store.claim("dead", lease_s=0.05)
    time.sleep(0.1)
    again = store.claim("alive", lease_s=30)
    assert again is not None and again.id == job.id and again.attempts == 2 and again.lease_owner == "alive"
    assert not store.heartbeat(job.id, "dead", 30)  # the old owner lost it
    assert not store.succeed(job.id, "dead", outputs(), None)
    assert "requeued" in [e["kind"] for e in store.events(job.id)]


def test_release_owner_requeues_at_once(store):
    enqueue(store)
    job = store.claim("w:1", lease_s=300)
    assert store.release_owner("w:1", "worker died") == 1
    assert store.get(job.id).state == "queued"


def test_lost_too_often_fails_with_reason(store):
    enqueue(store, max_attempts=1)
    job = store.claim("w", lease_s=300)
    store.release_owner("w", "worker died")
    failed = store.get(job.id)
    assert failed.state == "failed" and "worker lost during attempt 1 of 1" in (failed.error or "")


def test_retryable_failure_backs_off_then_fails(store):
    enqueue(store, max_attempts=2)
    job = store.claim("w", 30)
    assert store.fail(job.id, "w", "Triton unreachable", retryable=True, backoff_s=60) == "queued"
    assert store.claim("w", 30) is None  # backoff not over
    assert store.get(job.id).not_before > time.time() + 50


def test_non_retryable_failure_and_retry(store):
    enqueue(store)
    job = store.claim("w", 30)
    assert (
        store.fail(job.id, "w", "input not usable: a slice is missing", retryable=False, backoff_s=1)
        == "failed"
    )
    with pytest.raises(JobStateError):
        store.cancel(job.id)
    again = store.retry(job.id)
    assert again.state == "queued" and again.attempts == 0 and again.error is None


def test_retry_running_refused_and_cancel(store):
    enqueue(store)
    job = store.claim("w", 30)
    with pytest.raises(JobStateError):
        store.retry(job.id)
    assert store.cancel(job.id).state == "cancelled"
    assert not store.heartbeat(job.id, "w", 30)


def test_list_filters_and_kv(store):
    enqueue(store, "a")
    enqueue(store, "b")
    assert len(store.list_jobs()) == 2 and len(store.list_jobs(state="queued", study_uid="1.2.3")) == 2
    assert store.list_jobs(study_uid="9.9") == []
    with pytest.raises(ValueError):
        store.list_jobs(state="bogus")
    assert store.get_kv("x") is None
    store.set_kv("x", "1")
    store.set_kv("x", "2")
    assert store.get_kv("x") == "2"


def test_two_processes_never_claim_the_same_job(db_target):
    import multiprocessing as mp

    s = JobStore(db_target)
    for i in range(40):
        enqueue(s, f"k{i}")
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_claim_all, [(db_target, "a"), (db_target, "b")])
    claimed = results[0] + results[1]
    assert len(claimed) == 40 and len(set(claimed)) == 40
    s.close()


def _claim_all(target, owner: str) -> list[str]:
    s = JobStore(target)
    out = []
    while (j := s.claim(owner, 30)) is not None:
        out.append(j.id)
    s.close()
    return out


def test_concurrent_claims_and_enqueues_from_many_connections(db_target):
    """Threads with a connection each: every job claimed once, and one study enqueued at the same
    moment by several intakes (two Orthancs sharing the store) makes one job."""
    import threading

    seed = JobStore(db_target)
    for i in range(30):
        enqueue(seed, f"k{i}")
    stores = [JobStore(db_target) for _ in range(4)]
    start = threading.Barrier(len(stores))
    claimed: list[list[str]] = [[] for _ in stores]
    created: list[bool] = []

    def run(i: int) -> None:
        start.wait()
        created.append(enqueue(stores[i], "same-study")[1])
        while (j := stores[i].claim(f"w{i}", 30)) is not None:
            claimed[i].append(j.id)
            assert stores[i].succeed(j.id, f"w{i}", outputs(), None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [jid for c in claimed for jid in c]
    assert sorted(created) == [False, False, False, True]
    assert len(everything) == 31 and len(set(everything)) == 31
    assert seed.counts()["succeeded"] == 31
    for s in (*stores, seed):
        s.close()


def test_succeed_queues_the_report_for_delivery_in_the_same_transaction(store):
    from orthanc_plugin.jobs.outbox import Outbox

    enqueue(store)
    job = store.claim("w1", lease_s=30)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    assert store.succeed(job.id, "w1", outputs(), bundle, deliver_to="http://ehr.example/fhir")
    outbox = Outbox(store.path)  # the same store, a connection of its own
    status = outbox.status_for_job(job.id)
    assert status["state"] == "pending" and status["destination"] == "http://ehr.example/fhir"
    assert "fhir_queued" in [e["kind"] for e in store.events(job.id)]
    # A lost lease records nothing, and queues nothing.
    enqueue(store, "k2")
    other = store.claim("w1", lease_s=30)
    assert not store.succeed(
        other.id, "someone-else", outputs(), bundle, deliver_to="http://ehr.example/fhir"
    )
    assert outbox.status_for_job(other.id) is None
    outbox.close()
