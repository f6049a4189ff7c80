"""Results -> FHIR transaction Bundle (R4, or R5 by configuration): Device, Observations,
DiagnosticReport.

The bundle is a plain JSON dict, checked against the models of ``fhir.resources`` for its
release: ``fhir.resources.R4B`` for R4 (R4B leaves DiagnosticReport, Observation and Device
as in R4) and the top-level package, which is R5, for R5. The two differ, for what is
written here, in the Device (``deviceName`` became ``name`` with other name types, ``type``
became a list) and in ``DiagnosticReport.imagingStudy``, which R5 calls ``study``.

Idempotency: every resource has an identifier ``urn:ietf:rfc:3986 | urn:uuid:<uuid>``
whose uuid is derived from the job key (the Device's from the algorithm identity), and
is POSTed with ``ifNoneExist`` on that identifier, so a re-delivered bundle creates
nothing new. Each entry's ``fullUrl``, which in-bundle references use, is another uuid
derived from the identifier's (:func:`entry_uuid`), never the identifier's value: a server
may rewrite every string equal to a ``fullUrl`` into the new ``Type/id`` (Medplum does,
identifier values included), and the conditional create would then never match again.

The patient and the study are referenced logically, by identifier: the EHR resolves
them, this module never needs their server ids.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import html
import uuid
from collections.abc import Sequence
from typing import Any

from orthanc_plugin.core.codes import (
    ABSENT,
    MILLILITER_FHIR,
    NO_UNITS,
    PARTIAL_COVERAGE_TEXT,
    PRESENT,
    PROBABILITY,
    RADIOMICS_PANEL,
    THRESHOLD_VALUE,
    VOLUME,
    Code,
    ibsi_feature,
)
from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    OutputUIDs,
    SegmentFeatures,
    SegmentSpec,
    StudyRef,
    VolumeMeasurement,
)

#: Identifier system whose values are URIs; ours are ``urn:uuid:`` values (RFC 4122).
URI_SYSTEM = "urn:ietf:rfc:3986"
#: Identifier system for DICOM UIDs, values ``urn:oid:<uid>`` (FHIR ImagingStudy.identifier).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: Namespace of all uuids derived here (uuid5 of a fixed name, so it never changes).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:orthanc-ai:fhir")
#: The FHIR releases a bundle can be written in (``FhirVersion`` in the settings).
FHIR_VERSIONS = ("R4", "R5")

#: LOINC 18748-4 "Diagnostic imaging study": the LOINC Document Ontology code for an
#: imaging report of any modality and region, which is what a generic pipeline can claim.
#: A pipeline that knows its procedure should pass a procedure-specific code from the
#: LOINC/RSNA Radiology Playbook instead, via ``report_code``.
DIAGNOSTIC_IMAGING_STUDY = Code("18748-4", "LN", "Diagnostic imaging study")
#: HL7 v2 table 0074 "Diagnostic Service Section ID", RAD = Radiology.
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
#: FHIR Observation category "imaging".
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
#: HL7 v2 table 0203 identifier type ACSN: the accession number names the order.
ACCESSION = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
_ANATOMICAL_STRUCTURE = ("91723000", "SCT")  # CID 7150 category whose types are body sites


def resource_uuid(*parts: str) -> str:
    """Deterministic uuid (as a string) for the resource named by ``parts``."""
    return str(uuid.uuid5(NAMESPACE, "/".join(parts)))


def entry_uuid(resource_id: str) -> str:
    """The uuid of the ``fullUrl`` of the entry whose resource has the identifier uuid
    ``resource_id``: derived from it, and distinct from it."""
    return resource_uuid("fullUrl", resource_id)


def device_uuid(algorithm: AlgorithmInfo) -> str:
    """The algorithm's Device uuid: one Device per algorithm and model version."""
    return resource_uuid(
        "Device",
        algorithm.manufacturer,
        algorithm.name,
        algorithm.version,
        algorithm.model_name,
        algorithm.model_version,
    )


def build_diagnostic_report(
    study: StudyRef,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    ids: OutputUIDs | None = None,
    issued: dt.datetime | None = None,
    conclusion: str | None = None,
    *,
    report_id: str | None = None,
    report_code: Code = DIAGNOSTIC_IMAGING_STUDY,
    fhir_version: str = "R4",
    classifications: Sequence[ClassificationResult] = (),
    features: Sequence[SegmentFeatures] = (),
    presented_pdf: bytes | None = None,
) -> dict[str, Any]:
    """FHIR transaction Bundle reporting ``measurements`` for ``study``.

    ``features`` (radiomics per segment) become one Observation per segment whose components
    are the features, coded in the private IBSI feature scheme (``core.codes.IBSI_SYSTEM``).
    ``presented_pdf``: the PDF summary, attached to the report as ``presentedForm``.

    Resource ids derive from ``ids.key`` (then the report also names the SR's SOP Instance
    UID) or from ``report_id`` (a UUID, used as the report's own id); give at least one.
    ``issued`` is required and must carry a time zone (FHIR ``instant``). ``fhir_version``
    is ``"R4"`` or ``"R5"``; the resource ids are the same in both. Raises ``ValueError``
    for inconsistent input and if the result is not valid FHIR of that release.
    """
    check_fhir_version(fhir_version)
    if not isinstance(study, StudyRef):
        raise TypeError("study must be a StudyRef")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError("algorithm must be an AlgorithmInfo")
    if ids is not None and not isinstance(ids, OutputUIDs):
        raise TypeError("ids must be an OutputUIDs")
    if report_id is not None:
        try:
            report_id = str(uuid.UUID(report_id))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"report_id must be a UUID, got {report_id!r}") from exc
        seed = report_id
    elif ids is not None:
        seed = ids.key
    else:
        raise ValueError("give ids or report_id: the resource ids derive from them")
    if not isinstance(issued, dt.datetime) or issued.utcoffset() is None:
        raise ValueError("issued must be a datetime with a time zone (FHIR instant)")
    if conclusion is not None and (not isinstance(conclusion, str) or not conclusion.strip()):
        raise ValueError("conclusion must be a non-empty string or None")
    by_label = {s.label: s for s in segments}
    if len(by_label) != len(segments):
        raise ValueError("segments repeat a label")
    if not measurements:
        raise ValueError("measurements is empty: there is nothing to report")
    labels = [m.segment_label for m in measurements]
    if len(set(labels)) != len(labels):
        raise ValueError("two measurements for one label")
    for label in labels:
        if label not in by_label:
            raise ValueError(f"measurement for label {label} has no segment")

    subject = _patient_reference(study)
    imaging_study = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.study_instance_uid}"},
    }
    effective = _effective(study.study_date)
    issued_text = _instant(issued)

    device_id = device_uuid(algorithm)
    entries = [_entry("Device", device_id, _device(algorithm, device_id, fhir_version))]
    observation_refs = []
    rows = []
    for m in sorted(measurements, key=lambda m: m.segment_label):
        spec = by_label[m.segment_label]
        obs_id = resource_uuid(seed, "Observation", spec.tracking_id)
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [_identifier(obs_id)],
            "status": "preliminary",
            "category": [{"coding": [IMAGING]}],
            "code": {"coding": [VOLUME.to_fhir()], "text": f"{spec.name} volume"},
            "subject": subject,
            **effective,
            "issued": issued_text,
            "valueQuantity": {
                "value": round(m.volume_ml, 3),
                "unit": MILLILITER_FHIR.value,
                "system": MILLILITER_FHIR.system_uri,
                "code": MILLILITER_FHIR.value,
            },
            "device": _reference(device_id),
            "derivedFrom": [imaging_study],
        }
        site = _body_site(spec)
        if site is not None:
            observation["bodySite"] = {"coding": [site.to_fhir()], "text": site.meaning}
        if m.partial:
            observation["note"] = [{"text": f"{spec.name}: {PARTIAL_COVERAGE_TEXT}"}]
        rows.append(
            (
                f"{spec.name} volume",
                f"{round(m.volume_ml, 1)} mL" + (" (partial coverage)" if m.partial else ""),
            )
        )
        observation = _with_text(observation, _observation_narrative(*rows[-1], algorithm))
        entries.append(_entry("Observation", obs_id, observation))
        observation_refs.append(_reference(obs_id) | {"display": f"{spec.name} volume"})
    for f in sorted(features, key=lambda f: f.segment_label):
        spec = by_label[f.segment_label]
        obs_id = resource_uuid(seed, "Observation", spec.tracking_id, "radiomics")
        radiomics: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [_identifier(obs_id)],
            "status": "preliminary",
            "category": [{"coding": [IMAGING]}],
            "code": {"coding": [RADIOMICS_PANEL.to_fhir()], "text": f"{spec.name} radiomics features (IBSI)"},
            "subject": subject,
            **effective,
            "issued": issued_text,
            "device": _reference(device_id),
            "derivedFrom": [imaging_study],
            "component": [
                {
                    "code": {"coding": [ibsi_feature(v.id, v.name).to_fhir()], "text": v.name},
                    "valueQuantity": {
                        "value": float(f"{v.value:.6g}"),
                        "unit": v.unit,
                        "system": "http://unitsofmeasure.org",
                        "code": v.unit,
                    },
                }
                for v in f.finite()
            ],
        }
        site = _body_site(spec)
        if site is not None:
            radiomics["bodySite"] = {"coding": [site.to_fhir()], "text": site.meaning}
        count = len(radiomics["component"])
        radiomics = _with_text(
            radiomics, _observation_narrative(f"{spec.name} radiomics", f"{count} IBSI features", algorithm)
        )
        entries.append(_entry("Observation", obs_id, radiomics))
        observation_refs.append(_reference(obs_id) | {"display": f"{spec.name} radiomics"})
    for c in classifications:
        obs_id = resource_uuid(seed, "Observation", c.tracking_id)
        verdict = "present" if c.positive else "absent"
        rows.append((c.name, f"{verdict} (probability {c.probability:.2f}, threshold {c.threshold:.2f})"))
        observation = _classification(c, obs_id, subject, effective, issued_text, device_id, imaging_study)
        observation = _with_text(observation, _observation_narrative(*rows[-1], algorithm))
        entries.append(_entry("Observation", obs_id, observation))
        observation_refs.append(_reference(obs_id) | {"display": c.name})

    report_uuid = report_id if report_id is not None else resource_uuid(seed, "DiagnosticReport")
    identifiers: list[dict[str, Any]] = [_identifier(report_uuid)]
    if ids is not None:
        # The DICOM SR that carries the same results, for traceability in the EHR.
        identifiers.append(
            {
                "use": "secondary",
                "type": {"text": "DICOM SR SOP Instance UID"},
                "system": DICOM_UID_SYSTEM,
                "value": f"urn:oid:{ids.sr_instance}",
            }
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "text": {"status": "generated", "div": _narrative(algorithm, rows)},
        "identifier": identifiers,
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [report_code.to_fhir()], "text": f"AI {algorithm.name} report"},
        "subject": subject,
        **effective,
        "issued": issued_text,
        "result": observation_refs,
        # The same logical reference; R5 renamed the element (it may also name a GenomicStudy).
        ("imagingStudy" if fhir_version == "R4" else "study"): [imaging_study],
    }
    if study.accession_number is not None:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {"type": {"coding": [ACCESSION]}, "value": study.accession_number},
            }
        ]
    if conclusion is not None:
        report["conclusion"] = conclusion
    if presented_pdf is not None:
        if not presented_pdf.startswith(b"%PDF-"):
            raise ValueError("presented_pdf must be a PDF document")
        report["presentedForm"] = [
            {
                "contentType": "application/pdf",
                "language": "en",
                "data": base64.b64encode(presented_pdf).decode("ascii"),
                "title": f"AI {algorithm.name} summary",
                "size": len(presented_pdf),
                "hash": base64.b64encode(hashlib.sha1(presented_pdf).digest()).decode("ascii"),
            }
        ]
    entries.append(_entry("DiagnosticReport", report_uuid, report))

    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate_bundle(bundle, fhir_version)
    return bundle


def check_fhir_version(fhir_version: str) -> str:
    """Return ``fhir_version`` if it is one of :data:`FHIR_VERSIONS`, else raise ``ValueError``."""
    if fhir_version not in FHIR_VERSIONS:
        raise ValueError(f"fhir_version must be one of {', '.join(FHIR_VERSIONS)}, got {fhir_version!r}")
    return fhir_version


def validate_bundle(bundle: dict[str, Any], fhir_version: str = "R4") -> None:
    """Raise ``ValueError`` unless ``bundle`` validates as a Bundle of ``fhir_version``
    (``"R4"`` or ``"R5"``), resources included.

    This checks structure and datatypes; code values and reference targets are fixed by
    this module rather than checked.
    """
    from pydantic import ValidationError

    model: Any
    if check_fhir_version(fhir_version) == "R5":
        from fhir.resources.bundle import Bundle as R5Bundle  # the top-level package is R5

        model = R5Bundle
    else:
        from fhir.resources.R4B.bundle import Bundle as R4Bundle

        model = R4Bundle
    try:
        model.model_validate(bundle)
    except ValidationError as exc:
        raise ValueError(f"not a valid FHIR {fhir_version} bundle: {exc}") from exc


def report_summary(bundle: dict[str, Any]) -> dict[str, Any]:
    """Short view of a bundle made here (R4 or R5): report id, status, conclusion, observations.

    ``observations`` lists ``{"name", "value", "unit"}`` in report order.
    """
    resources = {e.get("fullUrl"): e.get("resource", {}) for e in bundle.get("entry", [])}
    reports = [r for r in resources.values() if r.get("resourceType") == "DiagnosticReport"]
    if len(reports) != 1:
        raise ValueError(f"bundle has {len(reports)} DiagnosticReports, expected 1")
    report = reports[0]
    ours = [i for i in report.get("identifier", []) if i.get("system") == URI_SYSTEM]
    observations = []
    for ref in report.get("result", []):
        obs = resources.get(ref.get("reference"), {})
        quantity = obs.get("valueQuantity", {})
        observations.append(
            {
                "name": obs.get("code", {}).get("text") or ref.get("display"),
                "value": quantity.get("value"),
                "unit": quantity.get("unit"),
            }
        )
    return {
        "id": ours[0]["value"] if ours else None,
        "status": report.get("status"),
        "conclusion": report.get("conclusion"),
        "observations": observations,
    }


def _identifier(resource_id: str) -> dict[str, str]:
    return {"system": URI_SYSTEM, "value": f"urn:uuid:{resource_id}"}


def _reference(resource_id: str) -> dict[str, str]:
    """In-bundle reference to the entry whose resource has the identifier uuid ``resource_id``."""
    return {"reference": f"urn:uuid:{entry_uuid(resource_id)}"}


def _entry(resource_type: str, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A conditional-create entry: the server skips it if the identifier exists already."""
    return {
        "fullUrl": f"urn:uuid:{entry_uuid(resource_id)}",
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource_type,
            "ifNoneExist": f"identifier={URI_SYSTEM}|urn:uuid:{resource_id}",
        },
    }


def as_update(bundle: dict[str, Any]) -> dict[str, Any]:
    """The same bundle with every entry but the Device as a conditional update on its identifier
    (``PUT DiagnosticReport?identifier=...``): a superseding job's report replaces the resources
    the superseded job's report created (same identifiers, same server ids), never adds a second
    report. The Device stays a conditional create."""
    out = copy.deepcopy(bundle)
    for entry in out.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Device":
            continue
        ours = [i["value"] for i in resource.get("identifier", []) if i.get("system") == URI_SYSTEM]
        if ours:
            entry["request"] = {"method": "PUT", "url": f"{kind}?identifier={URI_SYSTEM}|{ours[0]}"}
    return out


def withdraw_missing(bundle: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``bundle`` (a superseding job's, see :func:`as_update`) plus every Observation of the
    superseded job's ``previous`` bundle that it no longer has, updated to ``entered-in-error``:
    the EHR keeps no measurement of the earlier result that the current one does not make (a
    segment found before the late images and not after). Each goes as a conditional update on
    its identifier and names the current bundle's Device."""
    out = copy.deepcopy(bundle)
    entries = out.get("entry", [])
    kept = {_our_identifier(e["resource"]) for e in entries}
    device = next((e["fullUrl"] for e in entries if e["resource"]["resourceType"] == "Device"), None)
    for entry in previous.get("entry", []):
        resource = entry["resource"]
        ours = _our_identifier(resource)
        if resource["resourceType"] != "Observation" or ours is None or ours in kept:
            continue
        withdrawn = copy.deepcopy(resource)
        withdrawn["status"] = "entered-in-error"
        if device is not None and "device" in withdrawn:
            withdrawn["device"] = {"reference": device}
        else:
            withdrawn.pop("device", None)
        name = withdrawn.get("code", {}).get("text", "measurement")
        withdrawn["text"] = {
            "status": "generated",
            "div": _div(f"<p>{html.escape(name)}: withdrawn, the AI result was recomputed without it.</p>"),
        }
        entries.append(
            {
                "fullUrl": entry["fullUrl"],
                "resource": withdrawn,
                "request": {"method": "PUT", "url": f"Observation?identifier={URI_SYSTEM}|{ours}"},
            }
        )
        kept.add(ours)
    out["entry"] = entries
    return out


def _our_identifier(resource: dict[str, Any]) -> str | None:
    ours = [i["value"] for i in resource.get("identifier", []) if i.get("system") == URI_SYSTEM]
    return str(ours[0]) if ours else None


def _device(algorithm: AlgorithmInfo, device_id: str, fhir_version: str) -> dict[str, Any]:
    kind = {"coding": [algorithm.family.to_fhir()], "text": "AI algorithm"}
    versions = [
        {"type": {"text": "algorithm version"}, "value": algorithm.version},
        {"type": {"text": "model version"}, "value": algorithm.model_version},
    ]
    text = {"status": "generated", "div": _div(f"<p>AI algorithm {html.escape(_who(algorithm))}.</p>")}
    if fhir_version == "R4":
        return {
            "resourceType": "Device",
            "text": text,
            "identifier": [_identifier(device_id)],
            "status": "active",
            "manufacturer": algorithm.manufacturer,
            "deviceName": [
                {"name": algorithm.name, "type": "manufacturer-name"},
                {"name": algorithm.model_name, "type": "model-name"},
            ],
            "modelNumber": algorithm.model_name,
            "type": kind,
            "version": versions,
        }
    # R5 (device-nametype): "registered-name" is the manufacturer-assigned name, which R4
    # called "manufacturer-name"; R5 has no "model-name" type, the model is modelNumber.
    return {
        "resourceType": "Device",
        "text": text,
        "identifier": [_identifier(device_id)],
        "displayName": algorithm.name,
        "status": "active",
        "manufacturer": algorithm.manufacturer,
        "name": [{"value": algorithm.name, "type": "registered-name", "display": True}],
        "modelNumber": algorithm.model_name,
        "type": [kind],
        "version": versions,
    }


def _patient_reference(study: StudyRef) -> dict[str, Any]:
    identifier: dict[str, str] = {}
    if study.patient_id_system is not None:
        identifier["system"] = study.patient_id_system
    identifier["value"] = study.patient_id
    return {"type": "Patient", "identifier": identifier}


def _body_site(spec: SegmentSpec) -> Code | None:
    """Where the finding is: the anatomic region, else the type when it is an anatomical structure."""
    if spec.anatomic_region is not None:
        return spec.anatomic_region
    if (spec.category.value, spec.category.scheme) == _ANATOMICAL_STRUCTURE:
        return spec.type
    return None


def _effective(when: dt.date | dt.datetime | None) -> dict[str, str]:
    """``effectiveDateTime`` from the study date/time; a time needs a zone in FHIR, so a
    naive DICOM date/time (the usual case) is given as a date only."""
    if when is None:
        return {}
    if isinstance(when, dt.datetime):
        if when.utcoffset() is not None:
            return {"effectiveDateTime": when.isoformat(timespec="seconds")}
        when = when.date()
    return {"effectiveDateTime": when.isoformat()}


def _instant(when: dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def _who(algorithm: AlgorithmInfo) -> str:
    return f"{algorithm.name} {algorithm.version} (model {algorithm.model_name} {algorithm.model_version})"


def _div(body: str) -> str:
    return f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'


def _narrative(algorithm: AlgorithmInfo, rows: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<li>{html.escape(name)}: {html.escape(value)}</li>" for name, value in rows)
    return _div(
        f"<p>Preliminary, unverified results of the AI algorithm {html.escape(_who(algorithm))}.</p>"
        f"<ul>{items}</ul>"
    )


def _with_text(resource: dict[str, Any], text: dict[str, str]) -> dict[str, Any]:
    """``resource`` with its narrative ``text`` right after ``resourceType``, where FHIR puts it."""
    return {"resourceType": resource["resourceType"], "text": text} | {
        k: v for k, v in resource.items() if k != "resourceType"
    }


def _observation_narrative(name: str, value: str, algorithm: AlgorithmInfo) -> dict[str, str]:
    """FHIR best practice (dom-6): a resource carries a human-readable narrative."""
    return {
        "status": "generated",
        "div": _div(
            f"<p>{html.escape(name)}: {html.escape(value)}</p>"
            f"<p>Preliminary, unverified result of the AI algorithm {html.escape(_who(algorithm))}.</p>"
        ),
    }


#: HL7 v3 ObservationInterpretation: POS/NEG for a finding judged present/absent.
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _ratio(value: float) -> dict[str, Any]:
    return {
        "value": round(value, 4),
        "unit": NO_UNITS.value,
        "system": NO_UNITS.system_uri,
        "code": NO_UNITS.value,
    }


def _classification(
    c: ClassificationResult,
    obs_id: str,
    subject: dict[str, Any],
    effective: dict[str, str],
    issued: str,
    device_id: str,
    imaging_study: dict[str, Any],
) -> dict[str, Any]:
    """Observation: the finding present/absent at the operating point, with its probability."""
    value = PRESENT if c.positive else (c.absent or ABSENT)
    interpretation = ("POS", "Positive") if c.positive else ("NEG", "Negative")
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [_identifier(obs_id)],
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [c.finding.to_fhir()], "text": c.name},
        "subject": subject,
        **effective,
        "issued": issued,
        "valueCodeableConcept": {"coding": [value.to_fhir()], "text": value.meaning},
        "interpretation": [
            {"coding": [{"system": _INTERPRETATION, "code": interpretation[0], "display": interpretation[1]}]}
        ],
        "method": {
            "text": f"model {c.model_name} version {c.model_version}; positive when the probability of "
            f"the positive class is at least the operating point {c.threshold:.4g}"
        },
        "device": _reference(device_id),
        "derivedFrom": [imaging_study],
        "component": [
            {
                "code": {"coding": [PROBABILITY.to_fhir()], "text": "Probability"},
                "valueQuantity": _ratio(c.probability),
            },
            {
                "code": {
                    "coding": [THRESHOLD_VALUE.to_fhir()],
                    "text": "Decision threshold (operating point)",
                },
                "valueQuantity": _ratio(c.threshold),
            },
        ],
    }
    if c.finding_site is not None:
        observation["bodySite"] = {"coding": [c.finding_site.to_fhir()], "text": c.finding_site.meaning}
    if c.validated_for:
        observation["note"] = [{"text": c.validated_for}]
    return observation
