"""One run of a pipeline, one function per stage, in the order a study travels:

check input -> fetch -> volume -> preprocess -> inference -> labels -> measure -> classify ->
encode (SEG, SR, key images, PDF) -> FHIR bundle, HL7 ORU -> store -> forward.

Each stage takes typed values and returns typed values; :func:`run_pipeline` chains them and
:meth:`Run.stage` times each one into the job's record and stops the run when the job was
cancelled or its lease lost. The job's life around a run (claim, heartbeat, succeed, fail,
retry) is :mod:`orthanc_plugin.worker.loop`. A new output kind is a writer in
:mod:`orthanc_plugin.outputs` called from :func:`encode` (and stored by :func:`store_outputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset

from orthanc_plugin.core.config import (
    FeatureRef,
    InputRole,
    PipelineConfig,
    SegmentChecks,
    Settings,
    VolumeOptions,
    segment_specs,
)
from orthanc_plugin.core.errors import NotFound
from orthanc_plugin.core.handoff import (
    ClassificationOutput,
    FeaturesOutput,
    InputsInfo,
    JobOutputs,
    MeasurementOutput,
    ModelRef,
    RoleInput,
    SegmentFeaturesOutput,
    StoredInstance,
    VolumeInfo,
)
from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    FeatureValue,
    SegmentFeatures,
    SegmentSpec,
    StudyRef,
    VolumeMeasurement,
    patient_id_system,
)
from orthanc_plugin.core.uids import derived_uid, key_image_uids, message_control_id, output_uids, pdf_uids
from orthanc_plugin.fhir.report import as_update, build_diagnostic_report, withdraw_missing
from orthanc_plugin.hl7.message import build_oru
from orthanc_plugin.imaging.acquisition import acquisition_of
from orthanc_plugin.imaging.model_input import Float32Array, Prepared, prepare
from orthanc_plugin.imaging.multiframe import seg_sources
from orthanc_plugin.imaging.quality import SegmentQuality, airway_in_segments, confidence, measure_label
from orthanc_plugin.imaging.radiomics import (
    FEATURES_BY_ID,
    RadiomicsError,
    RadiomicsSettings,
    label_features,
)
from orthanc_plugin.imaging.resample import build_regular, segment_volumes_ml, to_source
from orthanc_plugin.imaging.volume import Geometry, PixelReader, Volume, VolumeError
from orthanc_plugin.inference.sliding_window import sliding_window_inference
from orthanc_plugin.inference.triton import InferenceError, ModelInfo, TritonClient
from orthanc_plugin.jobs.store import Job, JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError
from orthanc_plugin.orthanc_rest.forwarding import forward as forward_outputs
from orthanc_plugin.outputs.key_images import KeyImage, build_key_images, render_key_images
from orthanc_plugin.outputs.pdf_report import ValidatedFor, build_encapsulated_pdf, build_pdf
from orthanc_plugin.outputs.rtstruct import build_rtstruct
from orthanc_plugin.outputs.seg import build_seg
from orthanc_plugin.outputs.sr import build_sr
from orthanc_plugin.worker.memory import release_free_heap

T = TypeVar("T")
Labels = NDArray[np.uint8]


class JobAborted(RuntimeError):
    """The job was cancelled or its lease lost while it ran: stop without writing anything."""


class Superseded(JobAborted):
    """A newer job supersedes this one (its input series changed while it ran): store nothing."""

    def __init__(self, by: str) -> None:
        super().__init__(f"superseded by job {by}")
        self.by = by


class BadInput(ValueError):
    """The study cannot be processed as it is; retrying will not help."""


@dataclass
class Run:
    """One attempt of one job: what every stage may use."""

    job: Job
    pipeline: PipelineConfig
    settings: Settings
    owner: str
    store: JobStore
    orthanc: OrthancClient
    triton: TritonClient
    lost: threading.Event

    def stage(self, name: str, fn: Callable[[], T]) -> T:
        """Run one stage and record its time; refuse to start one once the job is no longer ours."""
        if self.lost.is_set():
            raise JobAborted("the job was cancelled or its lease was taken over")
        t0 = time.perf_counter()
        result = fn()
        self.store.record_stage(self.job.id, self.owner, name, time.perf_counter() - t0)
        # What the stage freed goes back to the system now rather than after the job: the next
        # stage's temporaries then come on top of what is live, not of a heap grown by the
        # earlier stages' (320-slice CT: about 40 MB lower peak; a trim costs a millisecond).
        release_free_heap()
        return result


@dataclass(frozen=True)
class Chosen:
    """A role of the pipeline and the series routing chose for it."""

    role: InputRole
    series: RoleInput


@dataclass(frozen=True)
class Findings:
    """What the model found and we measured, before any DICOM is written."""

    present: list[SegmentSpec]
    measurements: list[VolumeMeasurement]
    classifications: list[ClassificationResult]
    features: list[SegmentFeatures] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """The output objects in the order they are stored (a later one may reference an earlier);
    a kind of several instances (``key_images``) holds a list. ``hl7``: the ORU^R01 message per
    HL7 destination name."""

    datasets: dict[str, Dataset | list[Dataset]]
    fhir: dict[str, Any] | None
    hl7: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the chain


def run_pipeline(run: Run) -> tuple[JobOutputs, Encoded]:
    """All stages of one attempt; returns the job's outputs and what was encoded (the FHIR bundle
    and the HL7 messages to deliver among them)."""
    t_start = time.perf_counter()
    p = run.pipeline
    roles = check_input(run)
    datasets = run.stage("fetch", lambda: fetch(run.orthanc, roles))
    volumes = run.stage("volume", lambda: assemble(roles, datasets, run.orthanc.pixels, p.volume))
    release_free_heap()  # the instances' pixel data, dropped once the volume holds the pixels
    prepared = run.stage("preprocess", lambda: prepare_tensor(p, volumes))
    model = run.triton.model_info(p.model.name, p.model.version)
    probs = run.stage("inference", lambda: infer(run.triton, p, model, prepared.tensor))
    # Labels on the first role's source slices (mapped back from a regular grid if it was resampled).
    volume, labels = run.stage(
        "postprocess", lambda: to_source(prepared.reference, prepared.labels(probs[0], p.largest_component))
    )
    present, measurements, quality = run.stage("measure", lambda: measure(p, volume, labels, probs[0]))
    features = []
    if p.outputs.radiomics is not None:
        # Before classify: a classifier may take features as its input.
        features = run.stage("radiomics", lambda: radiomics(p, volume, labels, present))
    classifications = []
    if p.classify is not None:
        classifications.append(
            run.stage("classify", lambda: classify(run.triton, p, prepared.tensor, probs, present, features))
        )
    findings = Findings(present, measurements, classifications, features)
    algorithm = AlgorithmInfo(
        name=p.algorithm_name, version=p.version, model_name=model.name, model_version=model.version
    )
    encoded = encode(run, volume, labels, findings, algorithm)
    stored = run.stage("store", lambda: store_outputs(run, roles, encoded))
    forwarded = run.stage(
        "forward",
        lambda: forward_outputs(
            run.orthanc,
            run.store,
            run.job.id,
            p.outputs.forward,
            stored_ids(stored),
            run.settings,
            study_uid=run.job.study_uid,
        ),  # fmt: skip
    )
    run.store.record_stage(run.job.id, run.owner, "total", time.perf_counter() - t_start)
    outputs = JobOutputs(
        stored=stored,
        measurements=tuple(
            MeasurementOutput(
                segment=s.name,
                label=s.label,
                volume_ml=m.volume_ml,
                partial=m.partial,
                quality=quality[s.label].recorded(),
            )
            for s, m in zip(present, measurements, strict=True)
        ),
        model=ModelRef(name=model.name, version=model.version),
        volume=VolumeInfo(shape=tuple(volume.shape), spacing_mm=tuple(round(x, 4) for x in volume.spacing)),
        inputs=InputsInfo(
            channels=tuple(r.role for r in p.inputs),
            grid=tuple(prepared.tensor.shape[2:]),
            notes=tuple(prepared.notes),
        ),
        forward=forwarded,
        classifications=tuple(classification_output(c) for c in classifications),
        features=features_output(p, present, features),
        acquisition=acquisition_of(volume.datasets[0]) if volume.datasets else None,
    )
    return outputs, encoded


# --------------------------------------------------------------------------- stages


def check_input(run: Run) -> list[Chosen]:
    """The roles this run reads, each with the series routing chose; refuses a job that cannot run."""
    job, p = run.job, run.pipeline
    if job.input.problem:
        # Routing found the pipeline applies but a role is missing or ambiguous.
        raise BadInput(job.input.problem)
    missing = [r.role for r in p.inputs if r.required and r.role not in job.input.roles]
    if missing:
        raise BadInput(f"required role(s) {', '.join(missing)} have no series in the job")
    return [Chosen(r, job.input.roles[r.role]) for r in p.inputs if r.role in job.input.roles]


def fetch(orthanc: OrthancClient, roles: list[Chosen]) -> dict[str, list[Dataset]]:
    """Every instance of each role's series, parsed, pixels included."""
    return {c.role.role: orthanc.read_instances(list(c.series.instances)) for c in roles}


def assemble(
    roles: list[Chosen],
    datasets: dict[str, list[Dataset]],
    pixels: PixelReader,
    options: VolumeOptions | None = None,
) -> dict[str, Volume]:
    """One correctly oriented volume per role (geometry is checked, see imaging.volume; tilted or
    unevenly spaced series within the pipeline's bounds are resampled, see imaging.resample)."""
    o = options or VolumeOptions(duplicates="refuse", max_tilt_deg=None, max_gap_ratio=None)
    geometry = Geometry(max_tilt_deg=o.max_tilt_deg, max_gap_ratio=o.max_gap_ratio)
    volumes = {}
    for c in roles:
        name = c.role.role
        try:
            volumes[name] = build_regular(
                datasets[name], pixels, temporal_position=c.role.temporal_position, duplicates=o.duplicates,
                geometry=geometry,
            )  # fmt: skip
        except VolumeError as e:
            raise VolumeError(f"role '{name}': {e}") from None
        # The volume holds the pixels now; the datasets stay for their attributes (the outputs
        # reference them) without their pixel data nor the file pydicom keeps when it reads
        # from memory (each 168 MB of a 320-slice CT).
        for ds in datasets[name]:
            if "PixelData" in ds:
                del ds.PixelData
            if isinstance(ds, FileDataset):
                ds.buffer = None
    return volumes


def prepare_tensor(p: PipelineConfig, volumes: dict[str, Volume]) -> Prepared:
    """The model's input tensor: roles as channels on the model's grid."""
    try:
        return prepare(p, volumes)
    except ValueError as e:
        raise BadInput(str(e)) from None


def infer(triton: TritonClient, p: PipelineConfig, model: ModelInfo, tensor: Float32Array) -> Float32Array:
    """The model's output for ``tensor`` [1, C, *grid]: one request, or sliding windows."""

    def predict(batch: Float32Array) -> Float32Array:
        out = triton.infer(
            model.name, {p.model.input: batch}, [p.model.output], model.version, p.inference.timeout_s
        )
        return np.asarray(out[p.model.output], dtype=np.float32)

    if p.inference.mode == "whole":
        return predict(tensor)
    inf = p.inference
    assert inf.roi is not None
    result = sliding_window_inference(
        tensor[0], inf.roi, predict, sw_batch_size=inf.batch, overlap=inf.overlap, mode=inf.blend
    )
    return result[np.newaxis]


def measure(
    p: PipelineConfig, volume: Volume, labels: Labels, probabilities: NDArray[np.floating[Any]] | None = None
) -> tuple[list[SegmentSpec], list[VolumeMeasurement], dict[int, SegmentQuality]]:
    """The segments found, each plausible for what it claims to be, their volumes and quality
    measurements (with the model's confidence when its ``probabilities`` [K, *grid] are given)."""
    specs = segment_specs(p)
    vols = segment_volumes_ml(volume, labels, [s.label for s in specs])
    present = [s for s in specs if vols[s.label] > 0]
    if not present:
        raise BadInput(
            f"the model found none of the segments ({', '.join(s.name for s in specs)}) in this series"
        )
    check_plausible(p, labels, volume, present)
    quality = check_quality(p, labels, volume, present, probabilities)
    return (
        present,
        [VolumeMeasurement(s.label, round(vols[s.label], 2), quality[s.label].partial) for s in present],
        quality,
    )


def radiomics(
    p: PipelineConfig, volume: Volume, labels: Labels, present: list[SegmentSpec]
) -> list[SegmentFeatures]:
    """IBSI features of every segment found, on the source volume (see imaging.radiomics)."""
    assert p.outputs.radiomics is not None
    settings = RadiomicsSettings(**p.outputs.radiomics.model_dump())
    spacing_zyx = volume.spacing  # (between slices, rows, columns)
    out = []
    for spec in present:
        try:
            values = label_features(volume.voxels, labels, spec.label, spacing_zyx, settings)
        except RadiomicsError as e:
            raise BadInput(f"radiomics of segment '{spec.name}': {e}") from None
        out.append(
            SegmentFeatures(
                spec.label,
                tuple(
                    FeatureValue(k, FEATURES_BY_ID[k].name, FEATURES_BY_ID[k].unit, v)
                    for k, v in values.items()
                ),
            )
        )
    return out


def features_output(
    p: PipelineConfig, present: list[SegmentSpec], features: list[SegmentFeatures]
) -> FeaturesOutput | None:
    if p.outputs.radiomics is None:
        return None
    names = {s.label: s.name for s in present}
    return FeaturesOutput(
        settings=p.outputs.radiomics.model_dump(mode="json"),
        definitions={f.id: {"name": f.name, "unit": f.unit} for f in FEATURES_BY_ID.values()},
        segments=tuple(
            SegmentFeaturesOutput(
                segment=names[f.segment_label],
                label=f.segment_label,
                values={
                    v.id: (float(f"{v.value:.6g}") if np.isfinite(v.value) else None) for v in f.features
                },
            )
            for f in features
        ),
    )


def classify(
    triton: TritonClient,
    p: PipelineConfig,
    tensor: Float32Array,
    probs: Float32Array,
    present: list[SegmentSpec],
    features: list[SegmentFeatures] | None = None,
) -> ClassificationResult:
    """Run the chained classifier on the first model's input and output, or on radiomics
    features of the segments found (a float32 vector [1, n] per feature-list input)."""
    c = p.classify
    assert c is not None
    model = triton.model_info(c.model.name, c.model.version)
    feeds: dict[str, Float32Array] = {}
    for name, source in c.inputs.items():
        if isinstance(source, list):
            feeds[name] = feature_vector(source, present, features or [])
        else:
            feeds[name] = tensor if source == "image" else probs
    out = triton.infer(model.name, feeds, [c.model.output], model.version)[c.model.output]
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


def feature_vector(
    refs: list[FeatureRef], present: list[SegmentSpec], features: list[SegmentFeatures]
) -> Float32Array:
    """The listed features of the segments found, as a float32 tensor [1, len(refs)]."""
    label_of = {s.tracking_id: s.label for s in present} | {s.name: s.label for s in present}
    values = {(f.segment_label, v.id): v.value for f in features for v in f.features}
    out = []
    for ref in refs:
        label = label_of.get(ref.segment)
        if label is None:
            raise BadInput(
                f"the classifier takes {ref.feature} of the segment '{ref.segment}', which the model did not "
                "find in this series"
            )
        value = values.get((label, ref.feature))
        if value is None or not np.isfinite(value):
            raise BadInput(
                f"the classifier takes {ref.feature} of the segment '{ref.segment}': it has no value"
            )
        out.append(value)
    return np.asarray([out], dtype=np.float32)


def encode(run: Run, volume: Volume, labels: Labels, findings: Findings, algorithm: AlgorithmInfo) -> Encoded:
    """The DICOM objects in store order (SEG, the SR that references it, then the other kinds the
    pipeline turns on), the FHIR bundle and the HL7 messages.

    Series numbers from the pipeline's ``series_number`` n: SEG n, SR n+1, RTSTRUCT n+2, key
    images n+3, PDF summary n+4."""
    p, uids = run.pipeline, output_uids(run.job.output_key)
    sources = list(volume.datasets)
    # Frames of an enhanced multi-frame instance: the SEG, SR and PDF reference the instance
    # (the SEG with ReferencedFrameNumber); the SR then has no per-slice image regions and no
    # RTSTRUCT is made (its contours would need frame references too).
    instances, seg_labels = seg_sources(sources, labels)
    frames = instances is not sources
    number = p.outputs.series_number
    seg_ds = run.stage(
        "seg_encode",
        lambda: build_seg(
            instances, seg_labels, findings.present, algorithm,
            series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_instance,
            series_number=number, series_description=f"AI {p.algorithm_name} segmentation",
            seg_type=p.outputs.seg_type,
        ),
    )  # fmt: skip
    sr_ds = run.stage(
        "sr_encode",
        lambda: build_sr(
            instances, seg_ds, findings.present, findings.measurements, algorithm,
            series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_instance,
            series_number=number + 1, series_description=f"AI {p.algorithm_name} report",
            labels=None if frames else labels,
            classifications=findings.classifications, features=findings.features,
        ),
    )  # fmt: skip
    datasets: dict[str, Dataset | list[Dataset]] = {"seg": seg_ds, "sr": sr_ds}
    now = datetime.now(UTC)
    if p.outputs.rtstruct and not frames:
        datasets["rtstruct"] = run.stage(
            "rtstruct_encode",
            lambda: build_rtstruct(
                sources, labels, findings.present, algorithm,
                series_instance_uid=derived_uid(run.job.output_key, "rtstruct-series"),
                sop_instance_uid=derived_uid(run.job.output_key, "rtstruct-instance"),
                series_number=number + 2, series_description=f"AI {p.algorithm_name} contours",
            ),
        )  # fmt: skip
    images: list[KeyImage] = []
    if p.outputs.key_images.enabled:
        images, key_datasets = run.stage(
            "key_images_encode", lambda: encode_key_images(run, volume, labels, findings, algorithm, now)
        )
        if key_datasets:
            datasets["key_images"] = key_datasets
    pdf: bytes | None = None
    if p.outputs.pdf_report:
        pdf, datasets["pdf"] = run.stage(
            "pdf_encode", lambda: encode_pdf(run, instances, images, findings, algorithm, now)
        )
    fhir = None
    if p.outputs.fhir:
        settings = run.settings
        patient_system = patient_id_system(
            sources[0], settings.patient_id_system, settings.patient_id_issuer_systems
        )
        fhir = run.stage(
            "fhir_build",
            lambda: build_diagnostic_report(
                StudyRef.from_dataset(sources[0], patient_system), findings.present, findings.measurements,
                algorithm, ids=uids, issued=now, fhir_version=settings.fhir_version,
                classifications=findings.classifications, features=findings.features, presented_pdf=pdf,
            ),
        )  # fmt: skip
        if fhir is not None and run.job.input.supersedes:
            # The same resources as the superseded job's report, updated in place, and what it
            # reported that this result no longer has withdrawn.
            fhir = as_update(fhir)
            previous = superseded_report(run)
            if previous is not None:
                fhir = withdraw_missing(fhir, previous)
    hl7: dict[str, str] = {}
    if p.outputs.hl7_oru and run.settings.hl7_destinations:
        hl7 = run.stage("hl7_build", lambda: {
            d.name: build_oru(
                sources[0], findings.present, findings.measurements, algorithm, d,
                control_id=message_control_id(run.job.key), observed=now,
                classifications=findings.classifications,
            )
            for d in run.settings.hl7_destinations
        })  # fmt: skip
    return Encoded(datasets, fhir, hl7)


def superseded_jobs(run: Run) -> Iterator[Job]:
    """The jobs this one supersedes, latest first (each superseded the one before it)."""
    jid, seen = run.job.input.supersedes, set()
    while jid is not None and jid not in seen:
        seen.add(jid)
        try:
            old = run.store.get(jid)
        except NotFound:
            return
        yield old
        jid = old.input.supersedes


def superseded_report(run: Run) -> dict[str, Any] | None:
    """The FHIR bundle of the latest job this one supersedes that made one (a superseded job may
    have been replaced before it ran)."""
    return next((old.fhir for old in superseded_jobs(run) if old.fhir is not None), None)


def encode_key_images(
    run: Run, volume: Volume, labels: Labels, findings: Findings, algorithm: AlgorithmInfo, now: datetime
) -> tuple[list[KeyImage], list[Dataset]]:
    """The key images (slices chosen by segment area, segments drawn) and their Secondary Captures."""
    p = run.pipeline
    ki = p.outputs.key_images
    images = render_key_images(
        volume.voxels, volume.datasets, labels, findings.present, findings.measurements, algorithm,
        count=ki.count, style=ki.style, window=ki.window, fill_opacity=ki.fill_opacity,
    )  # fmt: skip
    series_uid, instance_uids = key_image_uids(run.job.output_key, len(images))
    return images, build_key_images(
        images, algorithm, series_instance_uid=series_uid, sop_instance_uids=instance_uids,
        series_number=p.outputs.series_number + 3, series_description=f"AI {p.algorithm_name} key images",
        content_time=now,
    )  # fmt: skip


def encode_pdf(
    run: Run,
    sources: list[Dataset],
    images: list[KeyImage],
    findings: Findings,
    algorithm: AlgorithmInfo,
    now: datetime,
) -> tuple[bytes, Dataset]:
    """The PDF summary and its Encapsulated PDF instance."""
    p = run.pipeline
    pdf = build_pdf(
        sources[0], findings.present, findings.measurements, algorithm, created=now,
        classifications=findings.classifications, key_images=[i.pixels for i in images],
        validated_for=validation_statements(p, algorithm), description=p.description,
    )  # fmt: skip
    series_uid, instance_uid = pdf_uids(run.job.output_key)
    return pdf, build_encapsulated_pdf(
        pdf, sources[0], algorithm,
        series_instance_uid=series_uid, sop_instance_uid=instance_uid, series_number=p.outputs.series_number + 4,
        series_description=f"AI {p.algorithm_name} summary (PDF)",
        document_title=f"AI {p.algorithm_name} summary", created=now, source_images=sources,
    )  # fmt: skip


def validation_statements(p: PipelineConfig, algorithm: AlgorithmInfo) -> list[ValidatedFor]:
    """What each model of the pipeline is (not) validated for, as configured."""
    out = []
    if p.validated_for:
        out.append(ValidatedFor(f"{algorithm.model_name} {algorithm.model_version}", p.validated_for))
    if p.classify is not None and p.classify.validated_for:
        out.append(ValidatedFor(p.classify.model.name, p.classify.validated_for))
    return out


def store_outputs(
    run: Run, roles: list[Chosen], encoded: Encoded
) -> dict[str, StoredInstance | tuple[StoredInstance, ...]]:
    """Store every output object into the study, all or nothing."""
    orthanc = run.orthanc
    if not orthanc.study_exists(run.job.orthanc_study_id):
        raise BadInput("the study was deleted while the job ran; nothing was stored")
    newer = run.store.superseded_by(run.job.id)
    if newer is not None:
        raise Superseded(newer)
    stored: dict[str, StoredInstance | tuple[StoredInstance, ...]] = {}
    done: list[StoredInstance] = []

    def put(ds: Dataset) -> StoredInstance:
        if run.lost.is_set():
            raise JobAborted("lease lost before storing")
        r = orthanc.store(ds)
        s = StoredInstance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            orthanc_id=r.get("ID"),
            parent_series=r.get("ParentSeries"),
        )
        done.append(s)
        return s

    try:
        for name, value in encoded.datasets.items():
            t0 = time.perf_counter()
            stored[name] = tuple(put(ds) for ds in value) if isinstance(value, list) else put(value)
            if name not in ("seg", "sr"):
                # What each optional output kind adds to the job (bench/pipeline_stages.py).
                run.store.record_stage(run.job.id, run.owner, f"store_{name}", time.perf_counter() - t0)
        # Deleted between the check above and now? Our outputs would have re-created the study
        # around themselves: the source series tell.
        if not all(orthanc.series_exists(c.series.series_id) for c in roles):
            raise BadInput("the study was deleted while the job ran; nothing was stored")
    except (OrthancError, JobAborted, BadInput):
        # All or nothing: an SR must never be left without its SEG, nor a SEG alone.
        for instance in done:
            with contextlib.suppress(OrthancError):
                if instance.orthanc_id:
                    orthanc.delete_instance(instance.orthanc_id)
        raise
    remove_replaced(run, stored)
    return stored


def remove_replaced(run: Run, stored: dict[str, StoredInstance | tuple[StoredInstance, ...]]) -> None:
    """After a superseding job stored its outputs (under the same UIDs, which Orthanc overwrites):
    delete the instances of the superseded jobs that the new result has no counterpart for (e.g.
    a key image fewer), so the study holds one current result."""
    kept = {s.sop_instance_uid for v in stored.values() for s in (v if isinstance(v, tuple) else (v,))}
    for old in superseded_jobs(run):
        for _, instance in old.outputs.instances() if old.outputs is not None else ():
            if instance.sop_instance_uid not in kept and instance.orthanc_id:
                with contextlib.suppress(OrthancError):
                    run.orthanc.delete_instance(instance.orthanc_id)


# --------------------------------------------------------------------------- helpers of the stages


def check_plausible(p: PipelineConfig, labels: Labels, volume: Volume, present: list[SegmentSpec]) -> None:
    """A model run on the wrong kind of image still outputs something: refuse segments whose
    mean source value is outside the configured range (e.g. 'lungs' that are not aerated)."""
    modality = str(volume.datasets[0].get("Modality", "")) if volume.datasets else ""
    unit = " HU" if modality == "CT" else ""
    configured = {s.label: s for s in p.segments}
    for spec in present:
        seg = configured[spec.label]
        if seg.plausible_mean is None:
            continue
        low, high = seg.plausible_mean
        # Every other voxel along each axis is plenty for a mean (and 8x cheaper on a big series).
        sub = labels[::2, ::2, ::2] == spec.label
        # In float32, as the mean of a float32 volume (an int16 one's int16 mean is float64).
        if sub.any():
            mean = float(np.asarray(volume.voxels[::2, ::2, ::2][sub], dtype=np.float32).mean())
        else:
            mean = float(np.asarray(volume.voxels[labels == spec.label], dtype=np.float32).mean())
        if not low <= mean <= high:
            what = seg.plausible_as or f"a {seg.name.lower()}"
            raise BadInput(
                f"the segment '{seg.name}' is not {what}: mean {mean:.0f}{unit} inside, expected {low:g} to "
                f"{high:g}{unit}; is this the kind of study the pipeline is for? Nothing was stored"
            )


def stored_ids(stored: dict[str, StoredInstance | tuple[StoredInstance, ...]]) -> list[str]:
    """Orthanc ids of the stored outputs, in store order."""
    flat = [x for v in stored.values() for x in (v if isinstance(v, tuple) else (v,))]
    return [s.orthanc_id for s in flat if s.orthanc_id]


def check_quality(
    p: PipelineConfig,
    labels: Labels,
    volume: Volume,
    present: list[SegmentSpec],
    probabilities: NDArray[np.floating[Any]] | None,
) -> dict[int, SegmentQuality]:
    """Measure each segment (imaging.quality) and hold it to its configured checks; a segment
    failing one fails the job with the measured value and the range, before anything is stored."""
    configured = {s.label: s for s in p.segments}
    scores = confidence(probabilities, [s.label for s in present]) if probabilities is not None else {}
    # The trachea is found once for every segment checked for it (the lungs together).
    airway_checked = [
        s.label for s in present if (c := configured[s.label].checks) is not None and c.airway_ml is not None
    ]
    airway = airway_in_segments(volume, labels, airway_checked) if airway_checked else {}
    out: dict[int, SegmentQuality] = {}
    for spec in present:
        seg = configured[spec.label]
        checks = seg.checks
        q = measure_label(
            volume, labels, spec.label,
            shell_mm=checks.shell_mm if checks else 10.0,
            tissue_above=checks.tissue_above if checks else None,
            shape_and_surroundings=checks is not None,
        )  # fmt: skip
        if spec.label in scores:
            q = replace(q, confidence=scores[spec.label][0], entropy=scores[spec.label][1])
        if spec.label in airway:
            q = replace(q, airway_ml=airway[spec.label])
        out[spec.label] = q
        if checks is None:
            continue
        failures = quality_failures(checks, q)
        if failures:
            raise BadInput(
                f"the segment '{seg.name}' does not look like {seg.plausible_as or 'a ' + seg.name.lower()}: "
                f"{'; '.join(failures)}. Is this the kind of study the pipeline is for? Nothing was stored"
            )
    return out


def quality_failures(checks: SegmentChecks, q: SegmentQuality) -> list[str]:
    """The checks ``q`` fails, each with the measured value and what was expected."""
    failures = []
    if checks.volume_ml is not None:
        low, high = checks.volume_ml
        share = 1.0
        if q.partial and checks.organ_extent_mm is not None:
            share = min(1.0, q.covered_mm / checks.organ_extent_mm)
        if not low * share <= q.volume_ml <= high * share:
            scaled = f" (scaled to the {q.covered_mm:.0f} mm the series covers)" if share < 1 else ""
            failures.append(
                f"volume {q.volume_ml:.0f} mL, expected {low * share:.0f} to {high * share:.0f} mL{scaled}"
            )
    minimums = (
        ("contrast", checks.contrast, q.contrast, "contrast against its surroundings"),
        ("variation", checks.variation, q.variation, "intensity variation inside (std/mean)"),
        ("enclosed", checks.enclosed, q.enclosed, "share of its surroundings that is tissue"),
        ("compactness", checks.compactness, q.compactness, "compactness (sphericity)"),
        ("confidence", checks.confidence, q.confidence, "model confidence (mean maximum probability)"),
    )
    for _, minimum, value, words in minimums:
        if minimum is not None and value is not None and value < minimum:
            failures.append(f"{words} {value:.2f}, expected at least {minimum:g}")
    if checks.airway_ml is not None and q.airway_ml is not None and q.airway_ml > checks.airway_ml:
        failures.append(
            f"{q.airway_ml:.1f} mL of trachea or main bronchi counted in it, expected at most {checks.airway_ml:g} mL"
        )
    return failures


def classification_output(c: ClassificationResult) -> ClassificationOutput:
    return ClassificationOutput(
        name=c.name,
        finding=c.finding.meaning,
        positive=c.positive,
        probability=round(c.probability, 4),
        threshold=round(c.threshold, 4),
        classes=dict(zip(c.classes, (round(x, 4) for x in c.probabilities), strict=True)),
        model=ModelRef(name=c.model_name, version=c.model_version),
    )
