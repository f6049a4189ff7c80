"""Typed hand-offs between processes: what intake writes for the worker, what the worker leaves
for audit, forwarding and the API.

Both travel as JSON in the job store (``jobs.input`` and ``jobs.outputs``), written by one
process and read by another, possibly of another release during a rolling update. Each record
is frozen, validated when read (an unknown field or a wrong type is an error naming the field,
not a silent ``None``) and carries ``version``: a reader refuses a version it does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class HandoffError(ValueError):
    """A stored record that this release cannot read; the message names the record and field."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the job store (field aliases, e.g. ``SOPInstanceUID``)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, data: Any) -> Any:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(record)"
            raise HandoffError(f"{cls.__name__}: field '{where}': {first['msg']}") from None


# --------------------------------------------------------------------------- intake -> worker


class RoleInput(_Record):
    """The series routing chose for one role of a pipeline, and why."""

    series_id: str  # Orthanc's id
    series_uid: str
    series_description: str = ""
    instances: tuple[str, ...]  # Orthanc instance ids, the input the job key's fingerprint covers
    reason: str = ""


class JobInput(_Record):
    """What a job is to read: the series of each role, or why it cannot run (``problem``)."""

    version: Literal[1] = 1
    roles: dict[str, RoleInput] = Field(default_factory=dict)
    #: routing found the pipeline applies but a role is missing or ambiguous: the worker fails the
    #: job with this text, so the admin sees it in the job list
    problem: str | None = None
    #: why the study is urgent for the pipeline (its ``urgent`` rule that held), None when routine
    urgent: str | None = None
    #: the job this one supersedes (its input series changed: a late image), None for a first job
    supersedes: str | None = None
    #: the job key the outputs' identifiers derive from (SEG/SR UIDs, FHIR resource ids): the
    #: first job's key, kept along a chain of supersessions so every result replaces the last;
    #: None: the job's own key
    output_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        # The supersession fields only when set: a job without them stays readable by a worker
        # of the release before them (a rolling update).
        out = super().to_json()
        for name in ("supersedes", "output_key"):
            if out.get(name) is None:
                out.pop(name, None)
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobInput:
        result: JobInput = super().from_json(data)
        return result


# --------------------------------------------------------------------------- worker -> audit, forwarding, API


class StoredInstance(_Record):
    """One of our outputs as Orthanc stored it."""

    sop_instance_uid: str = Field(alias="SOPInstanceUID")
    series_instance_uid: str = Field(alias="SeriesInstanceUID")
    orthanc_id: str | None = Field(default=None, alias="ID")
    parent_series: str | None = Field(default=None, alias="ParentSeries")


class MeasurementOutput(_Record):
    segment: str
    label: int
    volume_ml: float
    #: the series cuts the segment (it touches the first or last slice)
    partial: bool = False
    #: the quality measurements of the segment and the model's confidence (imaging.quality)
    quality: dict[str, float] = Field(default_factory=dict)


class ModelRef(_Record):
    name: str
    version: str


class VolumeInfo(_Record):
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]


class InputsInfo(_Record):
    """How the roles became the model's tensor: channel order, grid, and notes (e.g. a zero channel)."""

    channels: tuple[str, ...]
    grid: tuple[int, ...]
    notes: tuple[str, ...] = ()


class AcquisitionInfo(_Record):
    """How the reference series was acquired, for input-drift monitoring: the scanner, its
    reconstruction and the patient's age band (a band of years, never the age or birth date)."""

    manufacturer: str | None = None
    model: str | None = None  # ManufacturerModelName
    kernel: str | None = None  # ConvolutionKernel, values joined by "\\"
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: float | None = None  # the row spacing (PixelSpacing[0])
    age_band: str | None = None  # e.g. "40-59"; see imaging.acquisition.AGE_BANDS


class ClassificationOutput(_Record):
    name: str
    finding: str
    positive: bool
    probability: float
    threshold: float
    classes: dict[str, float]
    model: ModelRef


class SegmentFeaturesOutput(_Record):
    segment: str
    label: int
    #: {IBSI feature id: value}; None where the feature has no finite value
    values: dict[str, float | None]


class FeaturesOutput(_Record):
    """Radiomics features of a job (research export): versioned apart from the job's outputs."""

    version: Literal[1] = 1
    standard: str = "IBSI-1"
    settings: dict[str, Any]
    #: {feature id: {"name": ..., "unit": ...}}
    definitions: dict[str, dict[str, str]]
    segments: tuple[SegmentFeaturesOutput, ...]


class JobOutputs(_Record):
    """A succeeded job's results: where its objects are stored and what it measured.

    Version 2 lets a kind hold several instances (``key_images``: one Secondary Capture per slice);
    version 1 records (one instance per kind) read unchanged.
    """

    version: Literal[1, 2] = 2
    #: every stored output object by kind (``seg``, ``sr``, ``key_images``, ``pdf``), in the order
    #: they were stored; a kind of several instances holds a list
    stored: dict[str, StoredInstance | tuple[StoredInstance, ...]] = Field(default_factory=dict)
    measurements: tuple[MeasurementOutput, ...] = ()
    model: ModelRef
    volume: VolumeInfo
    inputs: InputsInfo
    #: the forwarding summary (``orthanc_rest.forwarding``), None without destinations
    forward: dict[str, Any] | None = None
    classifications: tuple[ClassificationOutput, ...] = ()
    features: FeaturesOutput | None = None
    #: the reference series' acquisition (monitoring); None in records written before it existed
    acquisition: AcquisitionInfo | None = None

    @model_validator(mode="before")
    @classmethod
    def _earlier_layout(cls, data: Any) -> Any:
        # Jobs that succeeded before ``stored`` existed kept "seg" and "sr" at the top level.
        if isinstance(data, dict) and "stored" not in data and ("seg" in data or "sr" in data):
            data = dict(data)
            data["stored"] = {k: data.pop(k) for k in ("seg", "sr") if data.get(k) is not None}
            data.pop("seg", None), data.pop("sr", None)
        return data

    @classmethod
    def from_json(cls, data: Any) -> JobOutputs:
        result: JobOutputs = super().from_json(data)
        return result

    def one(self, kind: str) -> StoredInstance | None:
        """The stored object of a kind that has one instance (``seg``, ``sr``, ``pdf``...), else None."""
        value = self.stored.get(kind)
        return value if isinstance(value, StoredInstance) else None

    def instances(self) -> list[tuple[str, StoredInstance]]:
        """(kind, instance) of every stored output object, in store order."""
        out: list[tuple[str, StoredInstance]] = []
        for kind, value in self.stored.items():
            out.extend((kind, s) for s in (value if isinstance(value, tuple) else (value,)))
        return out

    def instance_ids(self) -> list[str]:
        """Orthanc ids of every stored output object."""
        return [s.orthanc_id for _, s in self.instances() if s.orthanc_id]
