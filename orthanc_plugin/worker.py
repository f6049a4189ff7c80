"""AI worker process: claim a job, run its pipeline, store the results, repeat.

Runs outside Orthanc (its own interpreter, no shared GIL). The path of the data follows
the story: job -> series -> volume -> tensor -> prediction -> labels -> SEG/SR/FHIR -> store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from pydicom.dataset import Dataset

from . import fhir_report, postprocess, preprocess, seg, sr
from .config import PipelineConfig, Settings
from .fhir_delivery import start_delivery_thread
from .inference import InferenceError, TritonClient
from .jobstore import Job, JobStore
from .orthanc_client import OrthancClient, OrthancError
from .results import AlgorithmInfo, OutputUIDs, SegmentSpec, StudyRef, VolumeMeasurement
from .uids import output_uids
from .volume import Volume, VolumeError, axial_flips, build_volume

log = logging.getLogger("orthanc_ai.worker")
T = TypeVar("T")


class JobAborted(RuntimeError):
    """The job was cancelled or its lease lost while it ran: stop without writing anything."""


class BadInput(ValueError):
    """The study cannot be processed as it is; retrying will not help."""


@dataclass
class _Context:
    job: Job
    pipeline: PipelineConfig
    owner: str
    store: JobStore
    lost: threading.Event


def segment_specs(p: PipelineConfig) -> list[SegmentSpec]:
    return [
        SegmentSpec(
            label=s.label,
            name=s.name,
            category=s.category.to_code(),
            type=s.type.to_code(),
            anatomic_region=s.anatomic_region.to_code() if s.anatomic_region else None,
            color_rgb=s.color,
            tracking_id=s.tracking_id or s.name,
        )
        for s in p.segments
    ]


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
        self.stop = threading.Event()
        self._ready = False
        self._ready_checked = 0.0

    # ------------------------------------------------------------------ loop

    def run_forever(self, poll_s: float = 0.5, parent_pid: int | None = None) -> None:
        log.info("worker %s started", self.owner)
        while not self.stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                # Orthanc died without stopping us: a new Orthanc starts its own workers.
                log.warning("worker %s: parent process %d is gone, exiting", self.owner, parent_pid)
                break
            if not self._triton_ready():
                # Claiming now would only burn an attempt: wait for Triton to come back.
                self.stop.wait(max(poll_s, 1.0))
                continue
            job = self.store.claim(self.owner, self.settings.lease_seconds)
            if job is None:
                self.stop.wait(poll_s)
                continue
            self.run_job(job)
        log.info("worker %s stopped", self.owner)

    def _triton_ready(self) -> bool:
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
        ctx = _Context(job, pipeline, self.owner, self.store, lost)
        log.info("job %s: start %s attempt %d", job.id, job.pipeline, job.attempts)
        with self._heartbeat(job, lost):
            try:
                outputs, fhir = self._process(ctx)
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
        if self.store.succeed(job.id, self.owner, outputs, fhir, deliver_to=self.settings.fhir_base_url):
            log.info("job %s: succeeded", job.id)
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

    # ------------------------------------------------------------------ pipeline

    def _stage(self, ctx: _Context, name: str, fn: Callable[[], T]) -> T:
        if ctx.lost.is_set():
            raise JobAborted("the job was cancelled or its lease was taken over")
        t0 = time.perf_counter()
        result = fn()
        ctx.store.record_stage(ctx.job.id, ctx.owner, name, time.perf_counter() - t0)
        return result

    def _process(self, ctx: _Context) -> tuple[dict[str, Any], dict[str, Any] | None]:
        job, p = ctx.job, ctx.pipeline
        t_start = time.perf_counter()
        roles: dict[str, Any] = job.input["roles"]
        role = p.inputs[0]
        chosen = roles.get(role.role)
        if chosen is None:
            raise BadInput(f"role '{role.role}' has no series in the job")
        instances: list[str] = chosen["instances"]

        datasets = self._stage(ctx, "fetch", lambda: self.orthanc.read_instances(instances))
        volume = self._stage(
            ctx,
            "volume",
            lambda: build_volume(datasets, self.orthanc.pixels, temporal_position=role.temporal_position),
        )
        flips = axial_flips(volume)
        tensor = self._stage(ctx, "preprocess", lambda: self._preprocess(p, volume, flips))
        model = self.triton.model_info(p.model.name, p.model.version)
        probs = self._stage(
            ctx,
            "inference",
            lambda: self.triton.infer(model.name, {p.model.input: tensor}, [p.model.output], model.version)[
                p.model.output
            ],
        )
        labels = self._stage(
            ctx,
            "postprocess",
            lambda: np.ascontiguousarray(
                np.flip(
                    postprocess.labels_from_probabilities(probs[0], volume.shape, p.largest_component), flips
                )
            ),
        )
        specs = segment_specs(p)
        values = [s.label for s in specs]
        vols = postprocess.volumes_ml(labels, values, volume.voxel_volume_ml)
        present = [s for s in specs if vols[s.label] > 0]
        if not present:
            raise BadInput(
                f"the model found none of the segments ({', '.join(s.name for s in specs)}) in this series"
            )
        measurements = [VolumeMeasurement(s.label, round(vols[s.label], 2)) for s in present]
        algorithm = AlgorithmInfo(
            name=p.algorithm_name,
            version=p.version,
            model_name=model.name,
            model_version=model.version,
        )
        uids = output_uids(job.key)
        number = p.outputs.series_number

        seg_ds = self._stage(
            ctx,
            "seg_encode",
            lambda: seg.build_seg(
                list(volume.datasets), labels, present, algorithm,
                series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_instance,
                series_number=number, series_description=f"AI {p.algorithm_name} segmentation",
                seg_type=p.outputs.seg_type,
            ),
        )  # fmt: skip
        sr_ds = self._stage(
            ctx,
            "sr_encode",
            lambda: sr.build_sr(
                list(volume.datasets), seg_ds, present, measurements, algorithm,
                series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_instance,
                series_number=number + 1, series_description=f"AI {p.algorithm_name} report", labels=labels,
            ),
        )  # fmt: skip
        first = volume.datasets[0]
        fhir = None
        if p.outputs.fhir:
            fhir = self._stage(
                ctx, "fhir_build", lambda: self._fhir(first, present, measurements, algorithm, uids)
            )

        def store() -> dict[str, Any]:
            if not self.orthanc.study_exists(job.orthanc_study_id):
                raise BadInput("the study was deleted while the job ran; nothing was stored")
            stored: dict[str, Any] = {}
            try:
                for name, ds in (("seg", seg_ds), ("sr", sr_ds)):
                    if ctx.lost.is_set():
                        raise JobAborted("lease lost before storing")
                    r = self.orthanc.store(ds)
                    stored[name] = {
                        "SOPInstanceUID": str(ds.SOPInstanceUID),
                        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                        "ID": r.get("ID"),
                        "ParentSeries": r.get("ParentSeries"),
                    }
            except (OrthancError, JobAborted):
                # All or nothing: an SR must never be left without its SEG, nor a SEG alone.
                for done in stored.values():
                    with contextlib.suppress(OrthancError):
                        if done.get("ID"):
                            self.orthanc.delete_instance(done["ID"])
                raise
            return stored

        stored = self._stage(ctx, "store", store)
        ctx.store.record_stage(job.id, ctx.owner, "total", time.perf_counter() - t_start)
        outputs = {
            **stored,
            "measurements": [
                {"segment": s.name, "label": s.label, "volume_ml": m.volume_ml}
                for s, m in zip(present, measurements, strict=True)
            ],
            "model": {"name": model.name, "version": model.version},
            "volume": {"shape": list(volume.shape), "spacing_mm": [round(x, 4) for x in volume.spacing]},
        }
        return outputs, fhir

    def _preprocess(
        self, p: PipelineConfig, volume: Volume, flips: tuple[int, ...]
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        v = np.flip(volume.voxels, flips) if flips else volume.voxels
        if p.preprocess.window is not None:
            v = preprocess.window(v, *p.preprocess.window)
        elif p.preprocess.minmax:
            v = preprocess.minmax(v)
        v = preprocess.resize(v, p.preprocess.shape, order=1)
        return np.ascontiguousarray(v[np.newaxis, np.newaxis], dtype=np.float32)

    def _fhir(
        self,
        first: Dataset,
        present: list[SegmentSpec],
        measurements: list[VolumeMeasurement],
        algorithm: AlgorithmInfo,
        uids: OutputUIDs,
    ) -> dict[str, Any]:
        return fhir_report.build_diagnostic_report(
            StudyRef.from_dataset(first), present, measurements, algorithm, ids=uids, issued=datetime.now(UTC),
            fhir_version=self.settings.fhir_version,
        )  # fmt: skip


def main(settings_path: str, owner: str | None = None, parent_pid: int | None = None) -> int:
    """Entry of ``python -m orthanc_plugin worker``."""
    import json
    from pathlib import Path

    from .config import load_pipelines, load_settings

    settings = load_settings(json.loads(Path(settings_path).read_text()), settings_path)
    pipelines = load_pipelines(settings.pipelines_file)
    assert settings.job_store is not None
    store = JobStore(settings.job_store)
    password = os.environ.get(settings.orthanc_password_env) if settings.orthanc_password_env else None
    orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, password)
    triton = TritonClient(settings.triton_url, use_shared_memory=settings.triton_shared_memory)
    worker = Worker(settings, pipelines, store, orthanc, triton, owner)

    def on_term(signum: int, frame: object) -> None:
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Deliveries run beside the jobs, in every worker: the outbox lease keeps them apart.
    delivery = start_delivery_thread(settings, worker.owner, worker.stop)
    try:
        worker.run_forever(parent_pid=parent_pid)
    finally:
        worker.stop.set()
        if delivery is not None:
            delivery.join(timeout=5)  # an unfinished POST is re-sent after its lease: harmless
        triton.close()
        orthanc.close()
        store.close()
    return 0
