"""The ORU^R01 (HL7 v2.5) of one job's results, built and validated with hl7apy.

One message per destination (MSH-3 to MSH-6 name the sender and the receiver):

- MSH-10, the Message Control ID, is derived from the job (:func:`core.uids.message_control_id`):
  every send of one result carries the same id, so a receiver that drops messages whose MSH-10 it
  has already accepted files each result once, even when our ACK was lost and we sent it again.
- PID from the DICOM patient: PID-3 PatientID (issuer from IssuerOfPatientID), PID-5 the name
  (DICOM family^given^middle^prefix^suffix as XPN family^given^middle^suffix^prefix), PID-7, PID-8.
- OBR: OBR-3 and OBR-18 the accession number, OBR-4 "Diagnostic imaging study" (LOINC 18748-4),
  OBR-7 the study date and time, OBR-25 result status P (preliminary: not reviewed).
- OBX: the Study Instance UID (DCM 110180), one NM per measurement (SNOMED CT 118565006 Volume,
  the segment as the alternate identifier, unit mL in UCUM), per classification the finding (CE)
  and its probability (NM, UCUM "1") with the operating point in the reference range, and the
  algorithm's identity as text. Every OBX-11 is P.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from pydicom import Dataset

from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.config import Hl7Destination
from orthanc_plugin.core.results import AlgorithmInfo, ClassificationResult, SegmentSpec, VolumeMeasurement

VERSION = "2.5"
#: SNOMED CT 118565006 |Volume (property)|.
VOLUME = ("118565006", "Volume", "SCT")
STUDY_UID = ("110180", "Study Instance UID", "DCM")
ALGORITHM = ("111001", "Algorithm Name", "DCM")
#: Local coding system of our own identifiers (HL7 table 0396: "99" + a site code).
LOCAL = "99OAI"
_SCHEMES = {"SCT": "SCT", "DCM": "DCM", "LN": "LN", "UCUM": "UCUM"}


class Hl7Error(ValueError):
    """The results cannot be made into a valid ORU^R01; the message says which part."""


def escape(text: object) -> str:
    """``text`` with HL7's delimiters escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) and line breaks as spaces."""
    out = []
    for ch in str(text or ""):
        out.append({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}.get(ch, ch))
    return re.sub(r"[\r\n]+", " ", "".join(out)).strip()


def _ce(code: Code) -> str:
    return f"{escape(code.value)}^{escape(code.meaning)}^{_SCHEMES.get(code.scheme, code.scheme)}"


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _xpn(name: object) -> str:
    parts = (str(name or "").split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def build_oru(
    source: Dataset,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    destination: Hl7Destination,
    *,
    control_id: str,
    observed: dt.datetime,
    classifications: Sequence[ClassificationResult] = (),
) -> str:
    """The ER7 text (segments separated by carriage returns) of the ORU^R01 for ``destination``."""
    if not control_id or len(control_id) > 20:
        raise Hl7Error(f"MSH-10 must be 1 to 20 characters, got {control_id!r}")
    if observed.tzinfo is None:
        raise Hl7Error("the observation time must carry a time zone")
    try:
        return _build(
            source, segments, measurements, algorithm, destination, control_id, observed, classifications
        )
    except HL7apyException as e:
        raise Hl7Error(f"the ORU^R01 is not valid HL7 {VERSION}: {e}") from None


def _build(
    source: Dataset,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    d: Hl7Destination,
    control_id: str,
    observed: dt.datetime,
    classifications: Sequence[ClassificationResult],
) -> str:
    m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = m.msh
    msh.msh_3 = escape(d.sending_application)
    if d.sending_facility:
        msh.msh_4 = escape(d.sending_facility)
    msh.msh_5 = escape(d.receiving_application)
    if d.receiving_facility:
        msh.msh_6 = escape(d.receiving_facility)
    msh.msh_7 = _ts(observed)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_15 = "AL"  # accept acknowledgement: always (original mode: the ACK is the answer)
    msh.msh_18 = "UNICODE UTF-8"

    result = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    patient_id = escape(source.get("PatientID"))
    if not patient_id:
        raise Hl7Error("the source images have no PatientID: PID-3 would be empty")
    issuer = escape(source.get("IssuerOfPatientID"))
    pid.pid_3 = f"{patient_id}^^^{issuer}" if issuer else patient_id
    name = _xpn(source.get("PatientName"))
    if name:
        pid.pid_5 = name
    birth = str(source.get("PatientBirthDate") or "")
    if re.fullmatch(r"\d{8}", birth):
        pid.pid_7 = birth
    sex = str(source.get("PatientSex") or "").upper()
    if sex in ("M", "F", "O"):
        pid.pid_8 = sex

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    accession = escape(source.get("AccessionNumber"))
    if accession:
        obr.obr_3 = accession
        obr.obr_18 = accession
    obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    study_date = str(source.get("StudyDate") or "")
    if re.fullmatch(r"\d{8}", study_date):
        time_ = re.sub(r"\D", "", str(source.get("StudyTime") or "").split(".")[0])[:6]
        obr.obr_7 = study_date + (time_ if len(time_) in (2, 4, 6) else "")
    obr.obr_22 = _ts(observed)
    obr.obr_25 = "P"

    n = 0

    def obx(value_type: str, ident: str, value: str, units: str = "", ref_range: str = "") -> None:
        nonlocal n
        n += 1
        seg = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        seg.obx_1 = str(n)
        seg.obx_2 = value_type
        seg.obx_3 = ident
        seg.obx_5 = value
        if units:
            seg.obx_6 = units
        if ref_range:
            seg.obx_7 = ref_range
        seg.obx_11 = "P"
        seg.obx_14 = _ts(observed)

    obx("ST", "^".join(STUDY_UID), escape(source.get("StudyInstanceUID")))
    by_label = {s.label: s for s in segments}
    for meas in measurements:
        spec = by_label.get(meas.segment_label)
        if spec is None:
            raise Hl7Error(f"measurement of label {meas.segment_label} has no segment")
        ident = "^".join([*VOLUME, escape(spec.tracking_id), escape(f"{spec.name} volume"), LOCAL])
        obx("NM", ident, f"{meas.volume_ml:.2f}", "mL^milliliter^UCUM")
    for c in classifications:
        value = c.finding if c.positive else (c.absent or Code("2667000", "SCT", "Absent"))
        obx("CE", f"{escape(c.tracking_id)}^{escape(c.name)}^{LOCAL}", _ce(value))
        obx(
            "NM",
            f"{escape(c.tracking_id)}-probability^{escape(c.name)} probability^{LOCAL}",
            f"{c.probability:.4f}",
            "1^probability^UCUM",
            ref_range=f"<{c.threshold:.4f}",
        )
    obx(
        "ST",
        "^".join(ALGORITHM),
        escape(
            f"{algorithm.name} {algorithm.version}, model {algorithm.model_name} {algorithm.model_version}; "
            "AI result, unverified"
        ),
    )
    if not m.validate():
        raise Hl7Error("hl7apy did not validate the ORU^R01")
    return str(m.to_er7())
