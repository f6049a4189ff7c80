"""The job's life in a worker process: claim, heartbeat, run the pipeline, succeed or fail, repeat.

Runs outside Orthanc (its own interpreter, no shared GIL). What one run does, stage by stage,
is :mod:`orthanc_plugin.worker.pipeline`; this module decides what a failure means (retry or
not) and keeps the lease alive meanwhile.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from orthanc_plugin.core.config import PipelineConfig, Settings
from orthanc_plugin.core.logs import log_context
from orthanc_plugin.core.tls import triton_tls_options
from orthanc_plugin.fhir.delivery import start_delivery_thread
from orthanc_plugin.hl7.delivery import start_hl7_threads
from orthanc_plugin.imaging.volume import VolumeError
from orthanc_plugin.inference.triton import InferenceError, TritonClient
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import Job, JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError
from orthanc_plugin.orthanc_rest.labels import StudyLabels
from orthanc_plugin.outputs.highdicom_cache import install_iod_cache
from orthanc_plugin.review.apply import ReviewContext, ReviewProblem, apply_review
from orthanc_plugin.worker.memory import one_heap, release_free_heap
from orthanc_plugin.worker.pipeline import BadInput, JobAborted, Run, Superseded, run_pipeline
from orthanc_plugin.worker.warmup import warm_up

log = logging.getLogger("orthanc_ai.worker")
T = TypeVar("T")


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipelines: list[PipelineConfig],
        store: JobStore,
        orthanc: OrthancClient,
        triton: TritonClient,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines = {p.name: p for p in pipelines}
        self.store = store
        self.orthanc = orthanc
        self.triton = triton
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
        self.stop = threading.Event()
        # Set when a job succeeded: the delivery loops beside the worker (FHIR, HL7) send at once.
        self.delivery_wakes: list[threading.Event] = []
        self._ready = False
        self._ready_checked = 0.0
        self.reviews = Reviews(store.path)

    # ------------------------------------------------------------------ loop

    def run_forever(self, poll_s: float = 0.5, parent_pid: int | None = None) -> None:
        log.info("worker %s started", self.owner)
        while not self.stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                # Orthanc died without stopping us: a new Orthanc starts its own workers.
                log.warning("worker %s: parent process %d is gone, exiting", self.owner, parent_pid)
                break
            # Reviews first: they need no Triton, and a person is waiting for them.
            if self.apply_one_review():
                continue
            if not self.triton_ready():
                # Claiming now would only burn an attempt: wait for Triton to come back.
                self.stop.wait(max(poll_s, 1.0))
                continue
            job = self.store.claim(self.owner, self.settings.lease_seconds)
            if job is None:
                self.stop.wait(poll_s)
                continue
            self.labels.sync(self.store, job.study_uid, job.orthanc_study_id)  # ai-queued while running
            self.run_job(job)
            self.labels.sync(self.store, job.study_uid, job.orthanc_study_id)  # ai-done / ai-failed
        log.info("worker %s stopped", self.owner)

    def apply_one_review(self) -> bool:
        """Claim and apply one recorded review; False when none was waiting."""
        review = self.reviews.claim(self.owner, self.settings.lease_seconds * 4)
        if review is None:
            return False
        ctx = ReviewContext(self.settings, self.pipelines, self.store, self.reviews, self.orthanc)
        with log_context(job_id=review.job_id), _collect_after():
            try:
                result, fhir = apply_review(ctx, review)
            except (ReviewProblem, VolumeError) as e:
                self.reviews.failed(review, self.owner, str(e), retry=False)
                log.warning("job %s: review %d cannot be applied: %s", review.job_id, review.n, e)
                return True
            except OrthancError as e:
                state = self.reviews.failed(
                    review, self.owner, str(e), retry=e.status is None or e.status >= 500
                )
                log.warning("job %s: review %d failed (%s): %s", review.job_id, review.n, state, e)
                return True
            except Exception as e:  # noqa: BLE001 - a bug must not stop the worker
                log.exception("job %s: applying review %d crashed", review.job_id, review.n)
                self.reviews.failed(
                    review, self.owner, f"internal error: {type(e).__name__}: {e}", retry=True
                )
                return True
        if self.reviews.applied(review, self.owner, result, fhir, self.settings.fhir_base_url):
            log.info("job %s: review %d applied (%s)", review.job_id, review.n, review.review_state)
        return True

    def triton_ready(self) -> bool:
        now = time.monotonic()
        if now - self._ready_checked < 2.0 and self._ready:
            return True
        self._ready = self.triton.is_ready()
        self._ready_checked = now
        if not self._ready:
            log.warning("Triton at %s is not ready; not taking jobs", self.settings.triton_url)
        return self._ready

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; returns the job's new state."""
        lost = threading.Event()
        pipeline = self.pipelines.get(job.pipeline)
        if pipeline is None:
            return self.store.fail(
                job.id, self.owner, f"pipeline '{job.pipeline}' is not configured on this worker", False, 0
            )
        run = Run(job, pipeline, self.settings, self.owner, self.store, self.orthanc, self.triton, lost)
        with log_context(job_id=job.id, study_uid=job.study_uid, pipeline=job.pipeline), _collect_after():
            profile_dir = os.environ.get("ORTHANC_AI_PROFILE_DIR")
            if not profile_dir:
                return self._run(run)
            # Diagnostics for bench/pipeline_stages.py --profile: one cProfile file per attempt.
            import cProfile

            profiler = cProfile.Profile()
            try:
                return profiler.runcall(self._run, run)
            finally:
                profiler.dump_stats(os.path.join(profile_dir, f"job-{job.id}-{job.attempts}.prof"))

    def _run(self, run: Run) -> str:
        job = run.job
        log.info("job %s: start %s attempt %d", job.id, job.pipeline, job.attempts)
        with self._heartbeat(job, run.lost):
            try:
                outputs, encoded = run_pipeline(run)
            except Superseded as e:
                log.info("job %s: superseded by job %s; its outputs were not stored", job.id, e.by)
                self.store.abandon_superseded(job.id, self.owner, e.by)
                return "cancelled"
            except JobAborted as e:
                log.warning("job %s: aborted: %s", job.id, e)
                return "aborted"
            except (BadInput, VolumeError) as e:
                return self._failed(job, f"input not usable: {e}", retryable=False)
            except InferenceError as e:
                # Unreachable/not ready is worth retrying; a shape or type mismatch is not.
                return self._failed(job, f"inference failed: {e}", retryable=e.retryable)
            except OrthancError as e:
                return self._failed(job, str(e), retryable=e.status is None or e.status >= 500)
            except Exception as e:  # noqa: BLE001 - a bug must fail the job, not the worker
                log.exception("job %s: unexpected error", job.id)
                return self._failed(job, f"internal error: {type(e).__name__}: {e}", retryable=True)
        if self.store.succeed(
            job.id, self.owner, outputs, encoded.fhir, deliver_to=self.settings.fhir_base_url, hl7=encoded.hl7
        ):
            log.info("job %s: succeeded", job.id)
            for wake in self.delivery_wakes:
                wake.set()
            return "succeeded"
        log.warning("job %s: finished but no longer leased to us; result left to the new owner", job.id)
        return "lost"

    def _failed(self, job: Job, error: str, retryable: bool) -> str:
        state = self.store.fail(job.id, self.owner, error, retryable, self.settings.retry_backoff_seconds)
        log.warning("job %s: attempt %d failed (%s): %s", job.id, job.attempts, state, error)
        return state

    @contextmanager
    def _heartbeat(self, job: Job, lost: threading.Event) -> Iterator[None]:
        stop = threading.Event()
        # A connection of its own: sqlite connections must not be shared between threads at once.
        hb_store = JobStore(self.store.path)

        def beat() -> None:
            period = self.settings.lease_seconds / 3
            while not stop.wait(period):
                if not hb_store.heartbeat(job.id, self.owner, self.settings.lease_seconds):
                    lost.set()
                    return

        t = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            hb_store.close()


@contextmanager
def _collect_after() -> Iterator[None]:
    """Python's cyclic garbage collector off while a job runs, one collection after it.

    A job makes hundreds of thousands of small objects (a parsed dataset per slice, the SR's
    content items); the collector then runs again and again on all of them, 0.24 s per job
    on a 320-slice CT (``gc.callbacks`` timing). Almost everything a job makes is freed by
    reference counting anyway; the rest goes in the one collection after the job's result is
    recorded, off the job's clock.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
        release_free_heap()  # what the job freed, for the other processes of the node


def lower_priority(nice: int) -> None:
    """Run at CPU niceness ``nice`` (never raising our priority): on a node shared with Orthanc,
    a viewer's query is served first and the AI job waits for the spare cycles."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as e:  # not fatal: the job still runs, only without that courtesy
        log.warning("could not lower the worker's CPU priority to nice %d: %s", nice, e)


def main(settings_path: str, owner: str | None = None, parent_pid: int | None = None) -> int:
    """Entry of ``python -m orthanc_plugin worker``."""
    one_heap()  # before any thread: what the fetch threads free must go back at the trims
    import json
    from pathlib import Path

    from orthanc_plugin.core.config import load_pipelines, load_settings

    settings = load_settings(json.loads(Path(settings_path).read_text()), settings_path)
    lower_priority(settings.worker_nice)
    install_iod_cache()
    pipelines = load_pipelines(settings.pipelines_file)
    store = JobStore(settings.database())  # SQLite file, or PostgreSQL shared with other hosts
    password = os.environ.get(settings.orthanc_password_env) if settings.orthanc_password_env else None
    orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, password)
    triton = TritonClient(
        settings.triton_url, use_shared_memory=settings.triton_shared_memory, **triton_tls_options(settings)
    )
    worker = Worker(settings, pipelines, store, orthanc, triton, owner)

    def on_term(signum: int, frame: object) -> None:
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Deliveries run beside the jobs, in every worker: the outbox lease keeps them apart.
    # Before the first claim: a fresh worker's first job costs what a warm one does.
    warm_up(pipelines, settings, triton if worker.triton_ready() else None)
    # A job that succeeds wakes them, so its report leaves at once rather than at the next poll.
    fhir_wake = threading.Event()
    delivery = start_delivery_thread(settings, worker.owner, worker.stop, wake=fhir_wake)
    if delivery is not None:
        worker.delivery_wakes.append(fhir_wake)
    hl7 = start_hl7_threads(settings, worker.owner, worker.stop, wakes=worker.delivery_wakes)
    try:
        worker.run_forever(parent_pid=parent_pid)
    finally:
        worker.stop.set()
        if delivery is not None:
            delivery.join(timeout=5)  # an unfinished POST is re-sent after its lease: harmless
        for t in hl7:
            t.join(timeout=5)  # an unacknowledged message is re-sent with the same MSH-10
        triton.close()
        orthanc.close()
        store.close()
    return 0
