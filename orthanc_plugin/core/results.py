"""Typed results that the worker hands to the output encoders (SEG, SR, FHIR).

Every constructor validates, so an encoder never sees a half-valid object. Fields that
identify the patient are kept out of ``repr`` so that logging one of these objects never
writes patient data into a log.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orthanc_plugin.core.codes import ARTIFICIAL_INTELLIGENCE, Code

if TYPE_CHECKING:
    from pydicom import Dataset

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MAX_LO = 64  # DICOM LO (Segment Label, Manufacturer, Algorithm Name, ...)


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
        raise ValueError(f"{name} must be a DICOM UID (digits and dots, at most 64 chars), got {value!r}")
    return value


_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")


def check_identifier_system(value: str) -> str:
    """Return ``value`` if it can be a FHIR ``Identifier.system``: an absolute URI (``urn:oid:``
    followed by an OID, ``urn:uuid:`` by a UUID), else raise ``ValueError`` saying why."""
    if not isinstance(value, str) or not _URI_RE.match(value):
        raise ValueError(f"an identifier system must be an absolute URI (e.g. urn:oid:1.2.3), got {value!r}")
    lower = value.lower()
    if lower.startswith("urn:oid:") and not _UID_RE.match(value[8:]):
        raise ValueError(f"{value!r}: urn:oid: must be followed by an OID (digits and dots)")
    if lower.startswith("urn:uuid:") and not re.match(
        r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$", lower[9:]
    ):
        raise ValueError(f"{value!r}: urn:uuid: must be followed by a UUID")
    return value


def patient_id_system(
    ds: Dataset, default: str | None = None, issuers: Mapping[str, str] | None = None
) -> str | None:
    """The FHIR identifier system of the dataset's Patient ID, from who issued it.

    In order: the first IssuerOfPatientIDQualifiersSequence item's UniversalEntityID (type ISO
    as ``urn:oid:``, UUID as ``urn:uuid:``, URI as it is); IssuerOfPatientID looked up in
    ``issuers``; IssuerOfPatientID when it is itself an OID or a ``urn:``/``http(s):`` URI. Without any
    issuer, ``default``. An issuer that none of these resolves gives None rather than
    ``default``: labelling another issuer's IDs with the local system could name the wrong patient.
    """
    for item in ds.get("IssuerOfPatientIDQualifiersSequence") or []:
        entity = str(item.get("UniversalEntityID") or "").strip()
        kind = str(item.get("UniversalEntityIDType") or "").strip().upper()
        candidate = {"ISO": f"urn:oid:{entity}", "UUID": f"urn:uuid:{entity.lower()}", "URI": entity}.get(
            kind
        )
        if entity and candidate is not None:
            try:
                return check_identifier_system(candidate)
            except ValueError:
                pass
        break
    issuer = str(ds.get("IssuerOfPatientID") or "").strip()
    if not issuer:
        return default
    if issuers and issuer in issuers:
        return issuers[issuer]
    if _UID_RE.match(issuer):
        candidate = f"urn:oid:{issuer}"
    elif issuer.lower().startswith(("urn:", "http://", "https://")):
        candidate = issuer
    else:
        return None
    try:
        return check_identifier_system(candidate)
    except ValueError:
        return None


def _check_text(value: object, name: str, max_len: int = _MAX_LO) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(value)}")
    if "\\" in value:
        # Backslash is the DICOM value delimiter: it would split the value in two.
        raise ValueError(f"{name} must not contain a backslash")


def _label(value: object, name: str) -> int:
    # numpy integers are welcome (labels often come out of np.unique); stored as int.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= int(value) <= 255:
        raise ValueError(f"{name} must be an integer in 1..255 (a uint8 label value), got {value!r}")
    return int(value)


def _check_code(value: object, name: str) -> None:
    if not isinstance(value, Code):
        raise TypeError(f"{name} must be an orthanc_plugin.core.codes.Code, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One output segment: label value ``label`` in the label map, and how to describe it.

    ``category``/``type`` follow DICOM CID 7150/7151 (Segmented Property Category/Type),
    ``anatomic_region`` CID 4 (or ``None``). ``tracking_id`` is a short human-readable
    identifier that stays the same for this structure across runs (e.g. "lung-left").
    """

    label: int
    name: str
    category: Code
    type: Code
    anatomic_region: Code | None
    color_rgb: tuple[int, int, int]
    tracking_id: str
    #: RT ROI Interpreted Type in an RTSTRUCT (ORGAN, GTV, PTV, OAR, ...)
    rt_roi_type: str = "ORGAN"

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", _label(self.label, "SegmentSpec.label"))
        _check_text(self.name, "SegmentSpec.name")
        _check_code(self.category, "SegmentSpec.category")
        _check_code(self.type, "SegmentSpec.type")
        if self.anatomic_region is not None:
            _check_code(self.anatomic_region, "SegmentSpec.anatomic_region")
        rgb = self.color_rgb
        if isinstance(rgb, list):
            rgb = tuple(rgb)
            object.__setattr__(self, "color_rgb", rgb)
        if (
            not isinstance(rgb, tuple)
            or len(rgb) != 3
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in rgb)
        ):
            raise ValueError(f"SegmentSpec.color_rgb must be three ints in 0..255, got {rgb!r}")
        _check_text(self.tracking_id, "SegmentSpec.tracking_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class AlgorithmInfo:
    """The algorithm (pipeline) and the model behind it, as written into SEG, SR and FHIR."""

    name: str
    version: str
    model_name: str
    model_version: str
    family: Code = ARTIFICIAL_INTELLIGENCE
    manufacturer: str = "orthanc-ai"

    def __post_init__(self) -> None:
        _check_text(self.name, "AlgorithmInfo.name")
        _check_text(self.version, "AlgorithmInfo.version")
        _check_text(self.model_name, "AlgorithmInfo.model_name")
        _check_text(self.model_version, "AlgorithmInfo.model_version")
        _check_code(self.family, "AlgorithmInfo.family")
        _check_text(self.manufacturer, "AlgorithmInfo.manufacturer")

    @property
    def parameters(self) -> dict[str, str]:
        """The model identity, written as DICOM ``Algorithm Parameters``."""
        return {"model": self.model_name, "model_version": self.model_version}


@dataclass(frozen=True, slots=True)
class VolumeMeasurement:
    """Volume in millilitres of the segment whose label is ``segment_label``."""

    segment_label: int
    volume_ml: float
    #: the segment touches the first or last slice: the series covers only part of it, and the
    #: volume is that of the covered part (said in the SR, the FHIR report and the job)
    partial: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "segment_label", _label(self.segment_label, "VolumeMeasurement.segment_label")
        )
        if not isinstance(self.partial, bool):
            raise TypeError(f"VolumeMeasurement.partial must be a bool, got {self.partial!r}")
        vol = self.volume_ml
        if isinstance(vol, bool) or not isinstance(vol, numbers.Real) or not math.isfinite(vol) or vol < 0:
            raise ValueError(f"VolumeMeasurement.volume_ml must be a finite number >= 0, got {vol!r}")
        object.__setattr__(self, "volume_ml", float(vol))


@dataclass(frozen=True, slots=True)
class FeatureValue:
    """One radiomics feature: its IBSI identifier (``morph.vol``), name, UCUM unit ("1": none)."""

    id: str
    name: str
    unit: str
    value: float

    def __post_init__(self) -> None:
        _check_text(self.id, "FeatureValue.id")
        _check_text(self.name, "FeatureValue.name")
        _check_text(self.unit, "FeatureValue.unit")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"FeatureValue.value must be a number, got {v!r}")
        object.__setattr__(self, "value", float(v))


@dataclass(frozen=True, slots=True)
class SegmentFeatures:
    """The radiomics features of the segment whose label is ``segment_label``."""

    segment_label: int
    features: tuple[FeatureValue, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segment_label", _label(self.segment_label, "SegmentFeatures.segment_label"))
        if not all(isinstance(f, FeatureValue) for f in self.features):
            raise TypeError("SegmentFeatures.features must hold FeatureValue")

    def finite(self) -> tuple[FeatureValue, ...]:
        """The features with a finite value (a ratio over zero has none)."""
        return tuple(f for f in self.features if math.isfinite(f.value))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassificationResult:
    """A classifier's answer at its operating point, as written into the SR and FHIR.

    ``finding`` is the concept reported (present when ``positive``); ``probability`` is the
    model's probability of the positive class and ``threshold`` the operating point it was
    compared with (``positive`` is ``probability >= threshold``).
    """

    name: str
    tracking_id: str
    finding: Code
    probability: float
    threshold: float
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    model_name: str
    model_version: str
    finding_site: Code | None = None
    absent: Code | None = None
    validated_for: str = ""

    def __post_init__(self) -> None:
        _check_text(self.name, "ClassificationResult.name")
        _check_text(self.tracking_id, "ClassificationResult.tracking_id")
        _check_code(self.finding, "ClassificationResult.finding")
        for attr in ("probability", "threshold"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"ClassificationResult.{attr} must be a number in [0, 1], got {v!r}")
            object.__setattr__(self, attr, float(v))
        if len(self.classes) != len(self.probabilities) or len(self.classes) < 2:
            raise ValueError("ClassificationResult: one probability per class, at least two classes")
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError(
                f"ClassificationResult.probabilities must be in [0, 1], got {self.probabilities}"
            )
        _check_text(self.model_name, "ClassificationResult.model_name")
        _check_text(self.model_version, "ClassificationResult.model_version")
        if self.finding_site is not None:
            _check_code(self.finding_site, "ClassificationResult.finding_site")
        if self.absent is not None:
            _check_code(self.absent, "ClassificationResult.absent")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True, slots=True)
class OutputUIDs:
    """Identifiers of one job's outputs, all derived by the caller from the job key.

    ``key`` is the job's idempotency key (a non-identifying string such as a hash of
    study, pipeline, version and input fingerprint); the FHIR encoder derives its
    resource ids from it, so a retried job produces the same ids.
    """

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    key: str

    def __post_init__(self) -> None:
        for name in ("seg_series", "seg_instance", "sr_series", "sr_instance"):
            check_uid(getattr(self, name), f"OutputUIDs.{name}")
        uids = [self.seg_series, self.seg_instance, self.sr_series, self.sr_instance]
        if len(set(uids)) != len(uids):
            raise ValueError("OutputUIDs must be four distinct UIDs")
        _check_text(self.key, "OutputUIDs.key", max_len=256)


@dataclass(frozen=True, slots=True)
class StudyRef:
    """The study the results belong to, as the FHIR report refers to it.

    ``patient_id`` is written into FHIR (as a logical reference) but never into ``repr``.
    ``patient_id_system`` is the FHIR identifier system (URI) of the patient ID, when known.
    """

    study_instance_uid: str
    patient_id: str = field(repr=False)
    accession_number: str | None = field(default=None, repr=False)
    study_date: dt.date | dt.datetime | None = None
    patient_id_system: str | None = None

    def __post_init__(self) -> None:
        check_uid(self.study_instance_uid, "StudyRef.study_instance_uid")
        if not isinstance(self.patient_id, str) or not self.patient_id.strip():
            raise ValueError("StudyRef.patient_id must be a non-empty string")
        if self.accession_number is not None and (
            not isinstance(self.accession_number, str) or not self.accession_number.strip()
        ):
            raise ValueError("StudyRef.accession_number must be a non-empty string or None")
        if self.study_date is not None and not isinstance(self.study_date, dt.date):
            raise TypeError("StudyRef.study_date must be a date, a datetime or None")
        if self.patient_id_system is not None:
            try:
                check_identifier_system(self.patient_id_system)
            except ValueError as e:
                raise ValueError(f"StudyRef.patient_id_system: {e}") from None

    @classmethod
    def from_dataset(cls, ds: Dataset, patient_id_system: str | None = None) -> StudyRef:
        """Build from any instance of the study (StudyDate/StudyTime become ``study_date``)."""
        date_value = str(ds.get("StudyDate") or "")
        time_value = str(ds.get("StudyTime") or "")
        study_date: dt.date | dt.datetime | None = None
        if len(date_value) == 8 and date_value.isdigit():
            day = dt.date(int(date_value[:4]), int(date_value[4:6]), int(date_value[6:8]))
            study_date = day
            digits = time_value.split(".")[0]
            if len(digits) >= 4 and digits.isdigit():
                study_date = dt.datetime(
                    day.year,
                    day.month,
                    day.day,
                    int(digits[:2]),
                    int(digits[2:4]),
                    int(digits[4:6]) if len(digits) >= 6 else 0,
                )
        accession = str(ds.get("AccessionNumber") or "").strip() or None
        return cls(
            study_instance_uid=str(ds.StudyInstanceUID),
            patient_id=str(ds.get("PatientID") or ""),
            accession_number=accession,
            study_date=study_date,
            patient_id_system=patient_id_system,
        )
