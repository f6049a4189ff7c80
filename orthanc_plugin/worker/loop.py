"""AI worker process: claim a job, run its pipeline, store the results, repeat.

Runs outside Orthanc (its own interpreter, no shared GIL). The path of the data follows
the story: job -> series -> volume -> tensor -> prediction -> labels -> SEG/SR/FHIR -> store.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
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
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from orthanc_plugin.core.config import PipelineConfig, Settings
from orthanc_plugin.core.logs import log_context
from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    OutputUIDs,
    SegmentSpec,
    StudyRef,
    VolumeMeasurement,
)
from orthanc_plugin.core.tls import triton_tls_options
from orthanc_plugin.core.uids import output_uids
from orthanc_plugin.fhir import report as fhir_report
from orthanc_plugin.fhir.delivery import start_delivery_thread
from orthanc_plugin.imaging import postprocess
from orthanc_plugin.imaging.model_input import Float32Array, Prepared, prepare
from orthanc_plugin.imaging.volume import PixelReader, Volume, VolumeError, build_volume
from orthanc_plugin.inference.triton import InferenceError, ModelInfo, TritonClient
from orthanc_plugin.jobs.store import Job, JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError
from orthanc_plugin.orthanc_rest.forwarding import forward
from orthanc_plugin.orthanc_rest.labels import StudyLabels
from orthanc_plugin.outputs import seg, sr

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
        self.labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
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
            self.labels.sync(self.store, job.study_uid, job.orthanc_study_id)  # ai-queued while running
            self.run_job(job)
            self.labels.sync(self.store, job.study_uid, job.orthanc_study_id)  # ai-done / ai-failed
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
        with log_context(job_id=job.id, study_uid=job.study_uid, pipeline=job.pipeline), _collect_after():
            profile_dir = os.environ.get("ORTHANC_AI_PROFILE_DIR")
            if not profile_dir:
                return self._run(ctx, job, lost)
            # Diagnostics for bench/pipeline_stages.py --profile: one cProfile file per attempt.
            import cProfile

            profiler = cProfile.Profile()
            try:
                return profiler.runcall(self._run, ctx, job, lost)
            finally:
                profiler.dump_stats(os.path.join(profile_dir, f"job-{job.id}-{job.attempts}.prof"))

    def _run(self, ctx: _Context, job: Job, lost: threading.Event) -> str:
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
        if job.input.get("problem"):
            # Routing found the pipeline applies but a role is missing or ambiguous.
            raise BadInput(str(job.input["problem"]))
        roles: dict[str, Any] = job.input["roles"]
        wanted = [r for r in p.inputs if r.role in roles]
        missing = [r.role for r in p.inputs if r.required and r.role not in roles]
        if missing:
            raise BadInput(f"required role(s) {', '.join(missing)} have no series in the job")

        datasets = self._stage(
            ctx,
            "fetch",
            lambda: {r.role: self.orthanc.read_instances(roles[r.role]["instances"]) for r in wanted},
        )
        volumes = self._stage(
            ctx,
            "volume",
            lambda: {
                r.role: _role_volume(r.role, datasets[r.role], self.orthanc.pixels, r.temporal_position)
                for r in wanted
            },
        )
        prepared = self._stage(ctx, "preprocess", lambda: self._prepare(p, volumes))
        volume = prepared.reference
        model = self.triton.model_info(p.model.name, p.model.version)
        probs = self._stage(ctx, "inference", lambda: self._infer(p, model, prepared.tensor))
        labels = self._stage(ctx, "postprocess", lambda: prepared.labels(probs[0], p.largest_component))
        specs = segment_specs(p)
        values = [s.label for s in specs]
        vols = postprocess.volumes_ml(labels, values, volume.voxel_volume_ml)
        present = [s for s in specs if vols[s.label] > 0]
        if not present:
            raise BadInput(
                f"the model found none of the segments ({', '.join(s.name for s in specs)}) in this series"
            )
        _check_plausible(p, labels, volume, present)
        measurements = [VolumeMeasurement(s.label, round(vols[s.label], 2)) for s in present]
        classifications: list[ClassificationResult] = []
        if p.classify is not None:
            classifications.append(
                self._stage(ctx, "classify", lambda: self._classify(p, prepared.tensor, probs, present))
            )
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
                classifications=classifications,
            ),
        )  # fmt: skip
        first = volume.datasets[0]
        fhir = None
        if p.outputs.fhir:
            fhir = self._stage(
                ctx,
                "fhir_build",
                lambda: self._fhir(first, present, measurements, algorithm, uids, classifications),
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
                # Deleted between the check above and now? Our outputs would have re-created
                # the study around themselves: the source series tell.
                if not all(self.orthanc.series_exists(roles[r.role]["series_id"]) for r in wanted):
                    raise BadInput("the study was deleted while the job ran; nothing was stored")
            except (OrthancError, JobAborted, BadInput):
                # All or nothing: an SR must never be left without its SEG, nor a SEG alone.
                for done in stored.values():
                    with contextlib.suppress(OrthancError):
                        if done.get("ID"):
                            self.orthanc.delete_instance(done["ID"])
                raise
            return stored

        stored = self._stage(ctx, "store", store)
        forwarded = self._stage(
            ctx, "forward",
            lambda: forward(self.orthanc, ctx.store, job.id, p.outputs.forward, stored, self.settings,
                            study_uid=job.study_uid),
        )  # fmt: skip
        ctx.store.record_stage(job.id, ctx.owner, "total", time.perf_counter() - t_start)
        outputs = {
            **stored,
            "measurements": [
                {"segment": s.name, "label": s.label, "volume_ml": m.volume_ml}
                for s, m in zip(present, measurements, strict=True)
            ],
            "model": {"name": model.name, "version": model.version},
            "volume": {"shape": list(volume.shape), "spacing_mm": [round(x, 4) for x in volume.spacing]},
            "inputs": {
                "channels": [r.role for r in p.inputs],
                "grid": list(prepared.tensor.shape[2:]),
                "notes": prepared.notes,
            },
            "forward": forwarded,
        }
        if classifications:
            outputs["classifications"] = [_classification_json(c) for c in classifications]
        return outputs, fhir

    def _prepare(self, p: PipelineConfig, volumes: dict[str, Volume]) -> Prepared:
        try:
            return prepare(p, volumes)
        except ValueError as e:
            raise BadInput(str(e)) from None

    def _infer(self, p: PipelineConfig, model: ModelInfo, tensor: Float32Array) -> Float32Array:
        """The model's output for ``tensor`` [1, C, *grid]: one request, or sliding windows."""

        def predict(batch: Float32Array) -> Float32Array:
            out = self.triton.infer(
                model.name, {p.model.input: batch}, [p.model.output], model.version, p.inference.timeout_s
            )
            return np.asarray(out[p.model.output], dtype=np.float32)

        if p.inference.mode == "whole":
            return predict(tensor)
        from orthanc_plugin.inference.sliding_window import sliding_window_inference

        inf = p.inference
        assert inf.roi is not None
        result = sliding_window_inference(
            tensor[0], inf.roi, predict, sw_batch_size=inf.batch, overlap=inf.overlap, mode=inf.blend
        )
        return result[np.newaxis]

    def _classify(
        self, p: PipelineConfig, tensor: Float32Array, probs: Float32Array, present: list[SegmentSpec]
    ) -> ClassificationResult:
        """Run the chained classifier on the first model's input and output."""
        c = p.classify
        assert c is not None
        model = self.triton.model_info(c.model.name, c.model.version)
        feeds = {name: (tensor if source == "image" else probs) for name, source in c.inputs.items()}
        out = self.triton.infer(model.name, feeds, [c.model.output], model.version)[c.model.output]
        scores = np.asarray(out, dtype=np.float64).reshape(-1)
        if scores.size != len(c.classes) or not np.all(np.isfinite(scores)):
            raise InferenceError(
                f"classifier {model.name} answered {scores.size} values, the pipeline names "
                f"{len(c.classes)} classes ({', '.join(c.classes)})",
                retryable=False,
            )
        if np.any(scores < 0) or np.any(scores > 1):
            raise InferenceError(
                f"classifier {model.name} answered values outside [0, 1] ({scores.round(4).tolist()}): "
                "it must output probabilities (add a softmax/sigmoid to the model)",
                retryable=False,
            )
        sites = {s.anatomic_region for s in present if s.anatomic_region is not None}
        return ClassificationResult(
            name=c.name,
            tracking_id=re.sub(r"[^a-z0-9]+", "-", c.name.lower()).strip("-") or "classification",
            finding=c.finding.to_code(),
            probability=float(scores[c.classes.index(c.positive)]),
            threshold=c.operating_point,
            classes=tuple(c.classes),
            probabilities=tuple(float(x) for x in scores),
            model_name=model.name,
            model_version=model.version,
            finding_site=sites.pop() if len(sites) == 1 else None,
            absent=c.absent.to_code() if c.absent is not None else None,
            validated_for=c.validated_for,
        )

    def _fhir(
        self,
        first: Dataset,
        present: list[SegmentSpec],
        measurements: list[VolumeMeasurement],
        algorithm: AlgorithmInfo,
        uids: OutputUIDs,
        classifications: list[ClassificationResult],
    ) -> dict[str, Any]:
        return fhir_report.build_diagnostic_report(
            StudyRef.from_dataset(first), present, measurements, algorithm, ids=uids, issued=datetime.now(UTC),
            fhir_version=self.settings.fhir_version, classifications=classifications,
        )  # fmt: skip


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


def _check_plausible(
    p: PipelineConfig, labels: NDArray[np.uint8], volume: Volume, present: list[SegmentSpec]
) -> None:
    """A model run on the wrong kind of image still outputs something: refuse segments whose
    mean source value is outside the configured range (e.g. 'lungs' that are not aerated)."""
    unit = " HU" if str(volume.datasets[0].get("Modality", "")) == "CT" else ""
    configured = {s.label: s for s in p.segments}
    for spec in present:
        seg = configured[spec.label]
        if seg.plausible_mean is None:
            continue
        low, high = seg.plausible_mean
        # Every other voxel along each axis is plenty for a mean (and 8x cheaper on a big series).
        sub = labels[::2, ::2, ::2] == spec.label
        if sub.any():
            mean = float(volume.voxels[::2, ::2, ::2][sub].mean())
        else:
            mean = float(volume.voxels[labels == spec.label].mean())
        if not low <= mean <= high:
            what = seg.plausible_as or f"a {seg.name.lower()}"
            raise BadInput(
                f"the segment '{seg.name}' is not {what}: mean {mean:.0f}{unit} inside, expected {low:g} to "
                f"{high:g}{unit}; is this the kind of study the pipeline is for? Nothing was stored"
            )


def _role_volume(
    role: str, datasets: list[Dataset], pixels: PixelReader, temporal_position: int | None
) -> Volume:
    try:
        return build_volume(datasets, pixels, temporal_position=temporal_position)
    except VolumeError as e:
        raise VolumeError(f"role '{role}': {e}") from None


def _classification_json(c: ClassificationResult) -> dict[str, Any]:
    return {
        "name": c.name,
        "finding": c.finding.meaning,
        "positive": c.positive,
        "probability": round(c.probability, 4),
        "threshold": round(c.threshold, 4),
        "classes": dict(zip(c.classes, (round(x, 4) for x in c.probabilities), strict=True)),
        "model": {"name": c.model_name, "version": c.model_version},
    }


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
    import json
    from pathlib import Path

    from orthanc_plugin.core.config import load_pipelines, load_settings

    settings = load_settings(json.loads(Path(settings_path).read_text()), settings_path)
    lower_priority(settings.worker_nice)
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
