"""Typed, validated configuration: the ``OrthancAI`` section of Orthanc's JSON and the pipelines file.

Errors name the file and the key, so an admin can fix them without reading code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.db_target import DatabaseTarget, PostgresTarget, check_postgres_url
from orthanc_plugin.core.features import FEATURES_BY_ID
from orthanc_plugin.core.results import SegmentSpec, check_identifier_system


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- rules


class Condition(_Strict):
    """Test on one DICOM attribute (keyword) of a series; every given test must hold."""

    equals: str | list[str] | None = None
    not_equals: str | list[str] | None = None
    matches: str | None = Field(default=None, description="regular expression, searched, case-sensitive")
    not_matches: str | None = None
    min: float | None = None
    max: float | None = None
    present: bool | None = None

    @field_validator("matches", "not_matches")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a condition needs at least one of " + ", ".join(type(self).model_fields))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Preference(_Strict):
    """Tie-breaker when several series satisfy a role: the first preference that separates them wins."""

    attribute: str
    matches: str | None = None
    order: Literal["max", "min"] | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> Preference:
        if (self.matches is None) == (self.order is None):
            raise ValueError("a preference needs exactly one of 'matches' or 'order'")
        if self.matches is not None:
            re.compile(self.matches)
        return self


class InputRole(_Strict):
    """A named input of a pipeline and the rule that picks its series from a study."""

    role: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    required: bool = True
    where: dict[str, Condition] = Field(default_factory=dict)
    exclude: dict[str, Condition] = Field(
        default_factory=dict, description="a series for which any of these holds is excluded"
    )
    prefer: list[Preference] = Field(default_factory=list)
    temporal_position: int | None = Field(
        default=None, ge=1, description="for series with several temporal positions: which one to use"
    )
    ambiguous: Literal["fail", "first_by_uid"] = Field(
        default="fail",
        description="when the preferences cannot separate several matching series: fail the job "
        "and name them (default), or take the first by SeriesInstanceUID",
    )


# --------------------------------------------------------------------------- pipelines


class ModelRef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(default="", description="empty: the newest version Triton serves")
    input: str = "image"
    output: str = "probabilities"


class Preprocess(_Strict):
    """From the series' voxels to the model's input grid, for every input channel alike.

    ``grid``: ``resize`` stretches the (axially oriented) volume to ``shape``; ``spacing``
    resamples it to ``spacing_mm`` (slice, row, column) whatever the study's size (use with
    sliding-window inference); ``conform`` resamples it in patient space to ``shape`` voxels of
    ``spacing_mm`` in the ``orientation`` layout, centred on the series (brain MR networks).
    Intensities: ``window`` [low, high] -> [0, 1] before resampling, or ``minmax`` after it.
    """

    grid: Literal["resize", "spacing", "conform"] = "resize"
    window: tuple[float, float] | None = None
    minmax: bool = False
    shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    orientation: Literal["LIA"] = "LIA"

    @model_validator(mode="after")
    def _one_scaling(self) -> Preprocess:
        if self.window is not None and self.minmax:
            raise ValueError("choose either 'window' or 'minmax', not both")
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError(f"window {list(self.window)}: the second value must be greater")
        if self.shape is not None and min(self.shape) < 1:
            raise ValueError("shape: three positive sizes")
        if self.spacing_mm is not None and min(self.spacing_mm) <= 0:
            raise ValueError("spacing_mm: three positive sizes in mm")
        if self.grid in ("resize", "conform") and self.shape is None:
            raise ValueError(f"grid '{self.grid}' needs 'shape' (slices, rows, columns)")
        if self.grid in ("spacing", "conform") and self.spacing_mm is None:
            raise ValueError(f"grid '{self.grid}' needs 'spacing_mm' (slice, row, column)")
        if self.grid == "spacing" and self.shape is not None:
            raise ValueError("grid 'spacing' takes its size from the study: leave 'shape' out")
        return self


class Inference(_Strict):
    """How the model is run on the prepared tensor."""

    mode: Literal["whole", "sliding_window"] = "whole"
    roi: tuple[int, int, int] | None = Field(default=None, description="window (slices, rows, columns)")
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    batch: int = Field(default=2, ge=1, le=64, description="windows sent to Triton per request")
    blend: Literal["constant", "gaussian"] = "gaussian"
    timeout_s: float = Field(default=120.0, gt=0, description="per Triton request (large models on CPU)")

    @model_validator(mode="after")
    def _roi(self) -> Inference:
        if self.mode == "sliding_window" and (self.roi is None or min(self.roi) < 1):
            raise ValueError("sliding_window needs 'roi': three positive sizes")
        return self


class Costs(_Strict):
    false_negative: float = Field(gt=0)
    false_positive: float = Field(gt=0)


class FeatureRef(_Strict):
    """One radiomics feature of one segment, as an element of a classifier's feature vector."""

    segment: str = Field(min_length=1, description="the segment's tracking_id (or its name)")
    feature: str = Field(description="IBSI feature identifier, e.g. stat.mean (docs/radiomics.md)")

    @field_validator("feature")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in FEATURES_BY_ID:
            raise ValueError(
                f"unknown radiomics feature {v!r}; the features computed are listed in docs/radiomics.md"
            )
        return v


class Classifier(_Strict):
    """A classification model chained after the segmentation, in the same job.

    Each of its inputs is a named tensor of the first step, ``image`` (what the segmentation
    model saw) or ``segmentation`` (its output probabilities), or a feature vector: a list of
    radiomics features of the segments found (``outputs.radiomics`` computes them), fed as a
    float32 tensor [1, n] in the order listed. Its output is one probability per class, in the
    order of ``classes``. The finding is ``positive`` when its probability is at least
    ``threshold``, or, given ``costs``, at least the Bayes operating point
    false_positive / (false_positive + false_negative) for calibrated probabilities.
    """

    name: str = Field(description="what is classified, shown in the SR and the FHIR Observation")
    model: ModelRef
    inputs: dict[str, Literal["image", "segmentation"] | list[FeatureRef]] = Field(min_length=1)
    classes: list[str] = Field(min_length=2)
    positive: str
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    costs: Costs | None = None
    finding: CodeSpec = Field(description="the finding reported when positive (SR value, FHIR code)")
    absent: CodeSpec | None = Field(default=None, description="value when negative; default SNOMED 'Absent'")
    validated_for: str = Field(default="", description="plain words on what it is (not) validated for")

    @model_validator(mode="after")
    def _operating_point(self) -> Classifier:
        if self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of classes {self.classes}")
        if (self.threshold is None) == (self.costs is None):
            raise ValueError("give exactly one of 'threshold' or 'costs'")
        for name, source in self.inputs.items():
            if isinstance(source, list) and not source:
                raise ValueError(f"classify input {name!r}: the feature list is empty")
        return self

    @property
    def features(self) -> list[FeatureRef]:
        """Every feature the inputs name (in input order, then list order)."""
        return [f for source in self.inputs.values() if isinstance(source, list) for f in source]

    @property
    def operating_point(self) -> float:
        if self.threshold is not None:
            return self.threshold
        assert self.costs is not None
        return self.costs.false_positive / (self.costs.false_positive + self.costs.false_negative)


class CodeSpec(_Strict):
    value: str
    scheme: str
    meaning: str

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class SegmentChecks(_Strict):
    """Is the segment what it claims to be? Each given check must hold, or the job fails saying
    which, by how much, and asking whether the study is the kind the pipeline is for; no report
    reaches the EHR. What each measures: :mod:`orthanc_plugin.imaging.quality`."""

    volume_ml: tuple[float, float] | None = Field(
        default=None, description="[min, max] volume of the whole organ in mL"
    )
    organ_extent_mm: float | None = Field(
        default=None,
        gt=0,
        description="typical extent of the organ along the slice normal: when the series cuts the "
        "segment and covers less than this, the volume range is scaled by the share covered",
    )
    contrast: float | None = Field(
        default=None, ge=0, le=1, description="minimum Michelson contrast inside vs a shell around it"
    )
    variation: float | None = Field(default=None, ge=0, description="minimum std / |mean| inside")
    enclosed: float | None = Field(
        default=None, ge=0, le=1, description="minimum share of the shell around the segment that is tissue"
    )
    tissue_above: float | None = Field(
        default=None,
        description="source value above which a shell voxel is tissue (HU on CT); default a tenth of "
        "the image's 99.5th percentile",
    )
    compactness: float | None = Field(default=None, gt=0, le=1, description="minimum sphericity")
    confidence: float | None = Field(
        default=None, gt=0, le=1, description="minimum mean maximum probability of the model over the segment"
    )
    shell_mm: float = Field(default=10.0, gt=0, le=100, description="width of the shell around the segment")
    airway_ml: float | None = Field(
        default=None,
        ge=0,
        description="lungs on axial CT: maximum mL of the trachea and main bronchi (the air-filled tube "
        "down the midline from the top of the lungs) counted in the segment",
    )

    @model_validator(mode="after")
    def _ranges(self) -> SegmentChecks:
        if self.volume_ml is not None and not 0 <= self.volume_ml[0] < self.volume_ml[1]:
            raise ValueError(f"volume_ml {list(self.volume_ml)}: two values, 0 <= min < max")
        if self.organ_extent_mm is not None and self.volume_ml is None:
            raise ValueError("organ_extent_mm scales volume_ml: give volume_ml too")
        return self


class SegmentConfig(_Strict):
    label: int = Field(ge=1, le=255)
    name: str
    category: CodeSpec
    type: CodeSpec
    anatomic_region: CodeSpec | None = None
    color: tuple[int, int, int] = (255, 0, 0)
    tracking_id: str | None = None
    plausible_mean: tuple[float, float] | None = Field(
        default=None,
        description="[low, high] mean source value inside the segment (HU on CT); outside it the job "
        "fails instead of reporting an implausible segment",
    )
    plausible_as: str = Field(default="", description="what the segment should be, for that message")
    rt_roi_type: Literal[
        "ORGAN", "OAR", "GTV", "CTV", "PTV", "EXTERNAL", "AVOIDANCE", "CAVITY", "TREATED_VOLUME", "MARKER"
    ] = Field(default="ORGAN", description="RT ROI Interpreted Type of the segment in the RTSTRUCT")
    checks: SegmentChecks | None = Field(
        default=None, description="quality checks of the segment (is this the organ it claims to be?)"
    )

    @model_validator(mode="after")
    def _plausible(self) -> SegmentConfig:
        if self.plausible_mean is not None and not self.plausible_mean[0] < self.plausible_mean[1]:
            raise ValueError(f"plausible_mean {list(self.plausible_mean)}: the second value must be greater")
        return self


class ForwardDestination(_Strict):
    """One place the results go after they are stored: exactly one of ``modality`` (a name in
    Orthanc's ``DicomModalities``, sent by C-STORE) or ``dicomweb`` (a name in Orthanc's
    ``DicomWeb.Servers``, sent by STOW-RS)."""

    modality: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    dicomweb: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _one_kind(self) -> ForwardDestination:
        if (self.modality is None) == (self.dicomweb is None):
            raise ValueError("a forward destination needs exactly one of 'modality' or 'dicomweb'")
        return self

    @property
    def kind(self) -> Literal["modality", "dicomweb"]:
        return "modality" if self.modality is not None else "dicomweb"

    @property
    def name(self) -> str:
        return self.modality if self.modality is not None else str(self.dicomweb)

    @property
    def label(self) -> str:
        """``modality:PACS2`` / ``dicomweb:archive``: how jobs, events and metrics name it."""
        return f"{self.kind}:{self.name}"


class Radiomics(_Strict):
    """IBSI radiomics features per segment (orthanc_plugin.imaging.radiomics): how the image is
    processed first. Exactly one of ``bin_width`` (fixed bin size, e.g. 25 HU) or ``bin_count``."""

    bin_width: float | None = Field(default=None, gt=0)
    bin_count: int | None = Field(default=None, ge=2, le=1024)
    resample_mm: tuple[float, float, float] | None = Field(
        default=None, description="(x, y, z) voxel size to resample to first; null keeps the series' grid"
    )
    resegment: tuple[float, float] | None = Field(
        default=None, description="[low, high]: intensities kept for the intensity and texture features"
    )
    glcm_aggregation: Literal["3D_merged", "3D_averaged"] = "3D_merged"

    @model_validator(mode="after")
    def _one_discretisation(self) -> Radiomics:
        if (self.bin_width is None) == (self.bin_count is None):
            raise ValueError("radiomics needs exactly one of 'bin_width' or 'bin_count'")
        if self.resegment is not None and not self.resegment[0] < self.resegment[1]:
            raise ValueError(f"resegment {list(self.resegment)}: the second value must be greater")
        if self.resample_mm is not None and min(self.resample_mm) <= 0:
            raise ValueError("resample_mm must be three positive sizes")
        return self


class KeyImages(_Strict):
    """Key images: Secondary Capture slices with the segments drawn on the windowed source image,
    a legend (segment names, volumes) and a banner (AI result, unverified, algorithm and model)."""

    enabled: bool = False
    count: int = Field(default=3, ge=1, le=12, description="slices, chosen by segment area")
    style: Literal["outline", "fill"] = Field(
        default="outline", description="outline: coloured contours; fill: translucent areas"
    )
    window: tuple[float, float] | None = Field(
        default=None,
        description="[low, high] source values (HU on CT) shown black to white; unset: the source's "
        "WindowCenter/WindowWidth, else its 1st-99th percentile",
    )
    fill_opacity: float = Field(default=0.35, gt=0, le=1, description="for style 'fill'")

    @model_validator(mode="after")
    def _window(self) -> KeyImages:
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError(f"window {list(self.window)}: the second value must be greater")
        return self


class Outputs(_Strict):
    seg: bool = True
    seg_type: Literal["BINARY", "LABELMAP"] = Field(
        default="BINARY",
        description="LABELMAP: one frame per slice holding every label (DICOM 2024b+ viewers)",
    )
    sr: bool = True
    fhir: bool = True
    key_images: KeyImages = KeyImages()
    pdf_report: bool = Field(
        default=False,
        description="an Encapsulated PDF summary in the study, also attached to the FHIR DiagnosticReport",
    )
    hl7_oru: bool = Field(
        default=False, description="an HL7 v2.5 ORU^R01 to every destination in Hl7Destinations"
    )
    series_number: int = Field(
        default=9900,
        ge=1,
        le=99990,
        description="SEG gets this, SR this + 1, RTSTRUCT this + 2, key images this + 3, the PDF this + 4",
    )
    forward: list[ForwardDestination] = Field(
        default_factory=list, description="where Orthanc sends the SEG and SR once they are stored"
    )
    rtstruct: bool = Field(default=False, description="an RT Structure Set too (series_number + 2)")
    radiomics: Radiomics | None = Field(
        default=None, description="IBSI features per segment: in the SR, the FHIR report and the export"
    )


class Urgency(_Strict):
    """When a study is urgent for this pipeline: any one rule whose conditions all hold. A rule's
    keywords are the study's (``StudyDescription``, ``CallingAETitle``, ``Origin``...) or, for a
    series-level keyword (``SeriesDescription``, ``ProtocolName``), any series of the study."""

    rules: list[dict[str, Condition]] = Field(min_length=1)
    priority: int = Field(default=100, description="the job's priority when urgent (routine: the pipeline's)")


_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class Schedule(_Strict):
    """Routine jobs of this pipeline run only inside a daily window (the host's local time), e.g.
    ``["19:00", "07:00"]`` for nights; a job queued outside it waits for the window. Urgent
    jobs run at once."""

    run_between: tuple[str, str]

    @field_validator("run_between")
    @classmethod
    def _clock(cls, v: tuple[str, str]) -> tuple[str, str]:
        for t in v:
            if not _CLOCK.match(t):
                raise ValueError(f"{t!r} is not a time of day HH:MM (00:00-23:59)")
        if v[0] == v[1]:
            raise ValueError(
                "the window's start and end are the same: leave 'schedule' out to run at any time"
            )
        return v


class VolumeOptions(_Strict):
    """How a pipeline makes a volume of a real-world series (docs/pipelines.md, "Volume")."""

    duplicates: Literal["refuse", "drop_identical"] = Field(
        default="drop_identical",
        description="instances repeating another's position and pixel data: drop them (said in the "
        "job's notes) or refuse the series; differing instances at one position are always refused",
    )
    max_tilt_deg: float | None = Field(
        default=30.0,
        gt=0,
        le=45,
        description="gantry-tilted (sheared) series with a tilt up to this many degrees are resampled "
        "onto a regular grid for the model and the labels mapped back onto the source slices; a larger "
        "tilt is refused; null refuses every tilt",
    )
    max_gap_ratio: float | None = Field(
        default=1.5,
        ge=1.1,
        le=4,
        description="unevenly spaced series whose largest gap is at most this many times the median "
        "gap are resampled the same way; a larger gap (1.5: already one missing slice) is refused; "
        "null refuses any uneven gap",
    )


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    version: str = Field(pattern=r"^[0-9A-Za-z.+-]+$")
    enabled: bool = True
    priority: int = 0
    urgent: Urgency | None = Field(
        default=None, description="rules that make a study urgent, and its priority then"
    )
    schedule: Schedule | None = Field(
        default=None, description="a daily window for routine jobs (off-hours mode)"
    )
    description: str = ""
    algorithm_name: str
    task: Literal["segmentation"] = "segmentation"
    model: ModelRef
    inputs: list[InputRole] = Field(min_length=1)
    study_where: dict[str, Condition] = Field(default_factory=dict)
    preprocess: Preprocess
    volume: VolumeOptions = VolumeOptions()
    inference: Inference = Inference()
    classify: Classifier | None = None
    largest_component: bool = True
    segments: list[SegmentConfig] = Field(min_length=1)
    outputs: Outputs = Outputs()
    validated_for: str = Field(
        default="",
        description="plain words on what the segmentation model is (and is not) validated for; printed "
        "in the PDF summary",
    )

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        roles = [r.role for r in self.inputs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"input roles must be unique, got {roles}")
        if not self.inputs[0].required:
            raise ValueError(f"the first input role ('{roles[0]}') gives the grid: it must be required")
        if self.inference.mode == "sliding_window" and self.preprocess.grid == "resize":
            raise ValueError("sliding_window inference needs preprocess grid 'spacing' or 'conform'")
        labels = [s.label for s in self.segments]
        if len(set(labels)) != len(labels):
            raise ValueError(f"segment labels must be unique, got {labels}")
        if self.classify is not None and self.classify.features:
            if self.outputs.radiomics is None:
                raise ValueError("classify takes radiomics features: turn on outputs.radiomics")
            known = {s.tracking_id or s.name for s in self.segments} | {s.name for s in self.segments}
            for f in self.classify.features:
                if f.segment not in known:
                    raise ValueError(
                        f"classify feature {f.feature} of segment {f.segment!r}: no such segment "
                        f"(tracking_id or name; known: {sorted(known)})"
                    )
        return self


class PipelinesFile(_Strict):
    pipelines: list[PipelineConfig]

    @model_validator(mode="after")
    def _unique_names(self) -> PipelinesFile:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline names must be unique, got {names}")
        return self


# --------------------------------------------------------------------------- plugin settings


class Hl7Destination(_Strict):
    """A RIS (or interface engine) that receives ORU^R01 results over MLLP.

    The receiver should detect duplicates by MSH-10 (Message Control ID): it is derived from the
    job, so a message re-sent after a lost ACK carries the same MSH-10 as the first.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the destination in jobs and logs")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(default=False, description="MLLP inside TLS")
    tls_ca_file: Path | None = Field(default=None, description="PEM CA bundle (default: the system's)")
    sending_application: str = Field(default="ORTHANC-AI", pattern=r"^[^|^~\\&\r\n]{1,180}$")
    sending_facility: str = Field(default="", pattern=r"^[^|^~\\&\r\n]{0,180}$")
    receiving_application: str = Field(pattern=r"^[^|^~\\&\r\n]{1,180}$")
    receiving_facility: str = Field(default="", pattern=r"^[^|^~\\&\r\n]{0,180}$")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="connect and wait for the ACK")

    @model_validator(mode="after")
    def _tls(self) -> Hl7Destination:
        if self.tls_ca_file is not None and not self.tls:
            raise ValueError("tls_ca_file is set but tls is false")
        if self.tls_ca_file is not None and not self.tls_ca_file.is_file():
            raise ValueError(f"TLS file {self.tls_ca_file} does not exist or is not a file")
        return self


class Settings(_Strict):
    """The ``OrthancAI`` section of the Orthanc configuration (paths already resolved)."""

    pipelines_file: Path = Field(alias="PipelinesFile")
    job_store: Path | None = Field(default=None, alias="JobStore")
    # Scale-out: jobs and the FHIR outbox in PostgreSQL, shared by Orthancs and workers on
    # several hosts. Unset: the SQLite file JobStore (one host).
    job_database: str | None = Field(
        default=None,
        alias="JobDatabase",
        description="postgresql://user@host:port/dbname, without password; unset: the SQLite file JobStore",
    )
    job_database_password_env: str | None = Field(
        default=None,
        alias="JobDatabasePasswordEnv",
        description="environment variable holding the JobDatabase password (unset: libpq's PGPASSWORD, ~/.pgpass)",
    )
    workers: int = Field(default=1, ge=0, le=64, alias="Workers")
    worker_python: Path | None = Field(default=None, alias="WorkerPython")
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        alias="WorkerNice",
        description="CPU niceness of the workers: Orthanc's own requests (viewers, PACS) come first",
    )
    triton_url: str = Field(default="127.0.0.1:8001", alias="TritonUrl")
    triton_shared_memory: bool | None = Field(default=None, alias="TritonSharedMemory")
    # TLS to Triton's gRPC endpoint: file paths only (keys stay in files outside the repository).
    triton_tls: bool = Field(default=False, alias="TritonTls", description="gRPC over TLS")
    triton_tls_ca: Path | None = Field(
        default=None, alias="TritonTlsCaFile", description="PEM CA bundle (default: the system's)"
    )
    triton_tls_cert: Path | None = Field(
        default=None, alias="TritonTlsCertFile", description="PEM client certificate (mutual TLS)"
    )
    triton_tls_key: Path | None = Field(default=None, alias="TritonTlsKeyFile", description="its PEM key")
    orthanc_url: str = Field(default="http://127.0.0.1:8042", alias="OrthancUrl")
    orthanc_username: str | None = Field(default=None, alias="OrthancUsername")
    orthanc_password_env: str | None = Field(default=None, alias="OrthancPasswordEnv")
    admin_users: list[str] | None = Field(
        default=None,
        alias="AdminUsers",
        description="with Orthanc authentication on: the users allowed to change state under /ai/ "
        "(retry, cancel, run, reload); null: every authenticated user",
    )
    reviewer_users: list[str] | None = Field(
        default=None,
        alias="ReviewerUsers",
        description="with Orthanc authentication on: the users allowed to review AI results "
        "(accept, edit, reject); null: nobody (the list must name them)",
    )
    reviewer_organization: str = Field(
        default="orthanc-ai",
        min_length=1,
        max_length=64,
        alias="ReviewerOrganization",
        description="VerifyingOrganization of the SRs that reviews verify",
    )
    viewer_url: str | None = Field(
        default=None,
        alias="ViewerUrl",
        description="base URL of the OHIF viewer (its /segmentation?StudyInstanceUIDs= route) that the admin "
        "page's review view links studies to; unset or empty: no link",
    )
    lease_seconds: float = Field(default=30.0, gt=1, alias="LeaseSeconds")
    max_attempts: int = Field(default=3, ge=1, le=20, alias="MaxAttempts")
    retry_backoff_seconds: float = Field(default=5.0, ge=0, alias="RetryBackoffSeconds")
    catch_up_delay_seconds: float = Field(default=-1, alias="CatchUpDelaySeconds")
    series_quiet_seconds: float = Field(
        default=3.0,
        ge=0,
        le=3600,
        alias="SeriesQuietSeconds",
        description="a series is complete once no instance arrived for this long (and its expected "
        "instance count, where the headers give one, is reached): a pipeline starts as soon as the "
        "series it needs are complete, without waiting for Orthanc's StableAge; 0: only when Orthanc "
        "declares the study stable",
    )
    log_dir: Path | None = Field(default=None, alias="LogDirectory")
    # FHIR delivery to the EHR (none when FhirBaseUrl is unset: reports stay in the job store).
    fhir_base_url: str | None = Field(default=None, alias="FhirBaseUrl")
    fhir_token_env: str | None = Field(
        default=None, alias="FhirTokenEnv", description="environment variable holding the bearer token"
    )
    fhir_version: Literal["R4", "R5"] = Field(default="R4", alias="FhirVersion")
    fhir_verify_tls: bool | Path = Field(
        default=True, alias="FhirVerifyTls", description="false, true or a CA file"
    )
    fhir_client_cert: Path | None = Field(
        default=None, alias="FhirClientCertFile", description="PEM client certificate for mutual TLS"
    )
    fhir_client_key: Path | None = Field(default=None, alias="FhirClientKeyFile", description="its PEM key")
    fhir_timeout_seconds: float = Field(default=30.0, gt=0, alias="FhirTimeoutSeconds")
    # The FHIR identifier system of the DICOM Patient IDs (subject of the reports).
    patient_id_system: str | None = Field(
        default=None,
        alias="PatientIdSystem",
        description="identifier system (absolute URI) of Patient IDs that name no issuer",
    )
    patient_id_issuer_systems: dict[str, str] = Field(
        default_factory=dict,
        alias="PatientIdIssuerSystems",
        description="IssuerOfPatientID value -> identifier system (absolute URI)",
    )
    delivery_max_backoff_seconds: float = Field(default=300.0, gt=0, alias="DeliveryMaxBackoffSeconds")
    # HL7 v2 ORU^R01 results to RIS over MLLP (pipelines with outputs.hl7_oru), through the outbox.
    hl7_destinations: list[Hl7Destination] = Field(default_factory=list, alias="Hl7Destinations")
    # Forwarding of SEG/SR to other DICOM / DICOMweb destinations (pipelines' outputs.forward).
    forward_attempts: int = Field(default=3, ge=1, le=10, alias="ForwardAttempts")
    forward_backoff_seconds: float = Field(default=2.0, ge=0, le=300, alias="ForwardBackoffSeconds")
    forward_timeout_seconds: float = Field(default=60.0, gt=0, alias="ForwardTimeoutSeconds")

    @field_validator(
        "triton_tls_ca", "triton_tls_cert", "triton_tls_key", "fhir_client_cert", "fhir_client_key",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_path_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # an unset ${VAR} in orthanc.json

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        for cert, key, names in (
            (self.triton_tls_cert, self.triton_tls_key, "TritonTlsCertFile and TritonTlsKeyFile"),
            (self.fhir_client_cert, self.fhir_client_key, "FhirClientCertFile and FhirClientKeyFile"),
        ):
            if (cert is None) != (key is None):
                raise ValueError(f"{names} go together: give both or neither")
        hl7_names = [d.name for d in self.hl7_destinations]
        if len(set(hl7_names)) != len(hl7_names):
            raise ValueError(f"Hl7Destinations: names must be unique, got {hl7_names}")
        if not self.triton_tls and any((self.triton_tls_ca, self.triton_tls_cert)):
            raise ValueError("TritonTlsCaFile/TritonTlsCertFile are set but TritonTls is false")
        for path in (
            self.triton_tls_ca, self.triton_tls_cert, self.triton_tls_key,
            self.fhir_client_cert, self.fhir_client_key,
        ):  # fmt: skip
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist or is not a file")
        return self

    @field_validator("orthanc_username")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None  # an empty value (an unset ${VAR} in orthanc.json) means no authentication

    @field_validator("job_database")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # an empty value (an unset ${VAR} in orthanc.json) means the SQLite file
        return check_postgres_url(v.strip())

    @field_validator("job_database_password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError(f"must be the name of an environment variable, got {v!r}")
        return v

    def database(self) -> DatabaseTarget:
        """Where jobs and the outbox live: the PostgreSQL JobDatabase, else the SQLite file JobStore."""
        if self.job_database is not None:
            return PostgresTarget(self.job_database, self.job_database_password_env)
        if self.job_store is None:
            raise ConfigError("JobStore is not resolved: load the settings with load_settings()")
        return self.job_store

    @field_validator("patient_id_system")
    @classmethod
    def _system_uri(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # an empty value (an unset ${VAR} in orthanc.json) means none
        return check_identifier_system(v.strip())

    @field_validator("patient_id_issuer_systems")
    @classmethod
    def _issuer_systems(cls, v: dict[str, str]) -> dict[str, str]:
        for issuer, system in v.items():
            if not issuer.strip():
                raise ValueError("an issuer (key) is empty")
            try:
                check_identifier_system(system)
            except ValueError as e:
                raise ValueError(f"issuer {issuer!r}: {e}") from None
        return v

    @field_validator("fhir_base_url")
    @classmethod
    def _optional_http_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # an empty value (e.g. an unset ${VAR} in orthanc.json) means no delivery
        return _http_url(v)

    @field_validator("orthanc_url")
    @classmethod
    def _orthanc_url(cls, v: str) -> str:
        return _http_url(v)


def _http_url(v: str) -> str:
    """An http(s) URL with a host, without its trailing slash."""
    try:
        parts = urlsplit(v.strip())
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise ValueError(f"must be an http(s) URL, got {v!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
    return v.strip().rstrip("/")


def explain_validation(e: ValidationError, source: str) -> str:
    """A validation error in an admin's words: one line per problem, naming ``source`` and the key."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: key '{key}': {err['msg']}")
    return "\n".join(lines)


def load_pipelines(path: Path) -> list[PipelineConfig]:
    """Read and validate a pipelines file (YAML or JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipelines file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    try:
        return PipelinesFile.model_validate(raw).pipelines
    except ValidationError as e:
        raise ConfigError(explain_validation(e, str(path))) from None


def load_settings(orthanc_config: dict[str, Any], source: str = "Orthanc configuration") -> Settings:
    """Validate the ``OrthancAI`` section; relative paths are taken from the working directory."""
    section = orthanc_config.get("OrthancAI")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: key 'OrthancAI' is missing or not an object")
    try:
        settings = Settings.model_validate(section)
    except ValidationError as e:
        raise ConfigError(explain_validation(e, f"{source}: OrthancAI")) from None
    if settings.job_store is None:
        storage = Path(str(orthanc_config.get("StorageDirectory", "OrthancStorage")))
        settings = settings.model_copy(update={"job_store": storage / "orthanc-ai" / "jobs.sqlite"})
    return settings


def settings_to_json(settings: Settings) -> str:
    """Serialise settings for a worker process (aliases kept, so the worker validates them the same way)."""
    return json.dumps({"OrthancAI": settings.model_dump(mode="json", by_alias=True)})


def segment_specs(p: PipelineConfig) -> list[SegmentSpec]:
    """The pipeline's configured segments as the output writers take them."""
    return [
        SegmentSpec(
            label=s.label,
            name=s.name,
            category=s.category.to_code(),
            type=s.type.to_code(),
            anatomic_region=s.anatomic_region.to_code() if s.anatomic_region else None,
            color_rgb=s.color,
            tracking_id=s.tracking_id or s.name,
            rt_roi_type=s.rt_roi_type,
        )
        for s in p.segments
    ]
