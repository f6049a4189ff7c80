"""Warm a worker before its first job: the first study of a fresh worker should not pay for it.

A new worker process has imported little, has no connection to Triton, no shared-memory
region registered, and has never run the output writers (highdicom reads the standard's module
tables on first use, ReportLab and Pillow load fonts, scikit-image compiles nothing but imports a
lot). :func:`warm_up` runs every stage a job runs except Orthanc's I/O on a small synthetic
series made here (no patient data), for each enabled pipeline: the volume, the model's tensor, one
request to Triton with a tensor of the model's shape (when it is small enough to be cheap on a
CPU), labels, radiomics and every output writer the pipeline turns on. Nothing is stored or sent;
a failure is logged and the worker goes on (a real job reports its own errors).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from orthanc_plugin.core.config import PipelineConfig, Settings, segment_specs
from orthanc_plugin.core.handoff import JobInput
from orthanc_plugin.core.results import AlgorithmInfo, VolumeMeasurement
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.imaging.quality import airway_in_segments, measure_label
from orthanc_plugin.imaging.volume import build_volume
from orthanc_plugin.inference.triton import TritonClient
from orthanc_plugin.jobs.store import Job
from orthanc_plugin.outputs.highdicom_cache import install_iod_cache
from orthanc_plugin.worker.pipeline import Findings, Run, encode, prepare_tensor, radiomics

log = logging.getLogger("orthanc_ai.worker")

#: a model input of more elements than this is not run for warming (a 256^3 brain volume takes
#: a minute on a CPU); its metadata and shared-memory path still are
WARM_INFERENCE_MAX_ELEMENTS = 4_000_000
_KEY = "warm-up|synthetic"


class _WarmRun(Run):
    """A run that records nothing: the stages' timings belong to real jobs only."""

    def stage(self, name: str, fn: Any) -> Any:
        return fn()


def synthetic_series(slices: int = 12, size: int = 64) -> list[Dataset]:
    """An axial CT-like series (air, a body, two air-filled blobs) with made-up identifiers."""
    study, series, frame = (derived_uid(_KEY, what) for what in ("study", "series", "frame"))
    z, y, x = np.mgrid[:slices, :size, :size]
    body = (y - size / 2) ** 2 + (x - size / 2) ** 2 < (0.45 * size) ** 2
    out = []
    for k in range(slices):
        hu = np.where(body[k], 40, -1000).astype(np.int16)
        for cx in (0.32 * size, 0.68 * size):
            blob = (y[k] - size / 2) ** 2 / (0.3 * size) ** 2 + (x[k] - cx) ** 2 / (0.12 * size) ** 2 < 1
            hu[blob & body[k]] = -850
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(derived_uid(_KEY, f"instance-{k}"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Warm^Up", "WARMUP", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "000000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = hu.tobytes()
        out.append(ds)
    return out


def _job(p: PipelineConfig) -> Job:
    now = time.time()
    return Job(
        id="warm-up", key=f"{_KEY}|{p.name}", study_uid=derived_uid(_KEY, "study"), orthanc_study_id="",
        pipeline=p.name, pipeline_version=p.version, fingerprint="", state="running", priority=0,
        attempts=1, max_attempts=1, not_before=0.0, lease_owner=None, lease_expires=None, stage=None,
        error=None, input=JobInput(), timings={}, outputs=None, fhir=None, created=now, updated=now,
        started=now, finished=None,
    )  # fmt: skip


def warm_pipeline(p: PipelineConfig, settings: Settings, triton: TritonClient | None) -> None:
    """Every stage of ``p`` but Orthanc's I/O, on the synthetic series."""
    volume = build_volume(synthetic_series())
    roles = {r.role: volume for r in p.inputs}
    prepared = prepare_tensor(p, roles)
    if triton is not None:
        model = triton.model_info(p.model.name, p.model.version)
        if prepared.tensor.size <= WARM_INFERENCE_MAX_ELEMENTS:
            triton.infer(model.name, {p.model.input: prepared.tensor}, [p.model.output], model.version)
    specs = segment_specs(p)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    mid = volume.shape[1] // 2
    for i, spec in enumerate(specs[:2]):
        half = slice(None, mid) if i == 0 else slice(mid, None)
        labels[2:-2, half][volume.voxels[2:-2, half] < -500] = spec.label
    present = [s for s in specs if np.any(labels == s.label)]
    # The quality measurements (the pipeline's verdicts do not matter on this series).
    for spec in present:
        measure_label(volume, labels, spec.label)
    airway_in_segments(volume, labels, [s.label for s in present])
    measurements = [
        VolumeMeasurement(s.label, float(np.sum(labels == s.label)) * volume.voxel_volume_ml) for s in present
    ]
    features = radiomics(p, volume, labels, present) if p.outputs.radiomics is not None else []
    findings = Findings(present, measurements, [], features)
    algorithm = AlgorithmInfo(
        name=p.algorithm_name, version=p.version, model_name=p.model.name, model_version="0"
    )
    run = _WarmRun(_job(p), p, settings, "warm-up", None, None, triton, threading.Event())  # type: ignore[arg-type]
    encode(run, volume, labels, findings, algorithm)


def warm_up(pipelines: list[PipelineConfig], settings: Settings, triton: TritonClient | None) -> float:
    """Warm every enabled pipeline; returns the seconds it took. Never raises."""
    t0 = time.perf_counter()
    install_iod_cache()
    for p in pipelines:
        if not p.enabled:
            continue
        try:
            warm_pipeline(p, settings, triton)
        except Exception as e:  # noqa: BLE001 - warming must never keep a worker from its jobs
            log.warning(
                "warm-up of pipeline %s failed (its jobs will start cold): %s: %s",
                p.name,
                type(e).__name__,
                e,
            )
    seconds = time.perf_counter() - t0
    log.info(
        "worker warmed up in %.2f s at %s", seconds, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    return seconds
