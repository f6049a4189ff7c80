"""FHIR DiagnosticReport bundle, R4 and R5: validity (fhir.resources R4B and R5), references,
idempotency."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.diagnosticreport import DiagnosticReport as R5DiagnosticReport
from fhir.resources.observation import Observation as R5Observation
from fhir.resources.R4B.bundle import Bundle

from orthanc_plugin.core.config import Settings
from orthanc_plugin.core.results import OutputUIDs, StudyRef, VolumeMeasurement, patient_id_system
from orthanc_plugin.fhir.report import (
    DICOM_UID_SYSTEM,
    URI_SYSTEM,
    as_update,
    build_diagnostic_report,
    device_uuid,
    entry_uuid,
    report_summary,
    validate_bundle,
    withdraw_missing,
)

# The same segments and algorithm as the SEG/SR tests: one synthetic result across all encoders.
from .test_seg import ALGORITHM, LUNG, SEGMENTS

EXAMPLES = Path(__file__).resolve().parents[2] / "fhir" / "examples"
EXAMPLE = EXAMPLES / "ct-lung-diagnosticreport.json"
EXAMPLE_R5 = EXAMPLES / "ct-lung-diagnosticreport-r5.json"

MEASUREMENTS = (VolumeMeasurement(1, 4321.987), VolumeMeasurement(2, 1.25))
# Synthetic study: made-up UIDs and identifiers, no real patient.
STUDY = StudyRef(
    study_instance_uid="2.25.123456789012345678901234567890",
    patient_id="EXAMPLE-PATIENT-0001",
    accession_number="EXAMPLE-ACC-0001",
    study_date=dt.date(2024, 1, 15),
    # 2.999: the OID arc set aside for examples (ITU-T X.660).
    patient_id_system="urn:oid:2.999.1",
)
IDS = OutputUIDs("2.25.11", "2.25.12", "2.25.21", "2.25.22", key="example-job-key")
ISSUED = dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)


def example_bundle(fhir_version: str = "R4") -> dict[str, Any]:
    return build_diagnostic_report(
        STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, ISSUED, fhir_version=fhir_version
    )


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return example_bundle()


@pytest.fixture(scope="module")
def r5_bundle() -> dict[str, Any]:
    return example_bundle("R5")


def test_validates_as_r4_transaction(bundle: dict[str, Any]) -> None:
    parsed = Bundle.model_validate(bundle)
    assert parsed.type == "transaction"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Device", "Observation", "Observation", "DiagnosticReport"]


@pytest.mark.parametrize("kind", ["bundle", "r5_bundle"])
def test_entries_are_conditional_creates(kind: str, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue(kind)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        (ours,) = [i for i in resource["identifier"] if i["system"] == URI_SYSTEM]
        # Distinct values: a server that rewrites every string equal to a fullUrl into the new
        # Type/id (Medplum) would otherwise rewrite the identifier, and ifNoneExist never match.
        assert entry["fullUrl"] == f"urn:uuid:{entry_uuid(ours['value'].removeprefix('urn:uuid:'))}"
        assert entry["fullUrl"].startswith("urn:uuid:") and entry["fullUrl"] != ours["value"]
        assert entry["fullUrl"] not in json.dumps(resource)  # nothing in the resource equals it
        assert entry["request"] == {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={URI_SYSTEM}|{ours['value']}",
        }
        assert "id" not in resource  # the server assigns ids


def test_references_resolve_inside_the_bundle(bundle: dict[str, Any]) -> None:
    full_urls = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    (device,) = resources(bundle, "Device")
    (report,) = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    assert [full_urls[r["reference"]] for r in report["result"]] == ["Observation", "Observation"]
    device_url = f"urn:uuid:{entry_uuid(device_uuid(ALGORITHM))}"
    assert full_urls[device_url] == "Device"
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY.study_instance_uid}"},
    }
    patient_ref = {"type": "Patient", "identifier": {"system": "urn:oid:2.999.1", "value": STUDY.patient_id}}
    assert report["imagingStudy"] == [study_ref]
    assert report["subject"] == patient_ref
    for obs in observations:
        assert obs["device"] == {"reference": device_url}
        assert obs["derivedFrom"] == [study_ref]
        assert obs["subject"] == patient_ref
    assert device["deviceName"][0] == {"name": "lung-seg", "type": "manufacturer-name"}
    assert {v["value"] for v in device["version"]} == {"1.2.0", "3"}


def test_report_content(bundle: dict[str, Any]) -> None:
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    assert report["effectiveDateTime"] == "2024-01-15"
    assert report["issued"] == "2024-01-15T10:30:00.000+00:00"
    assert report["basedOn"][0]["identifier"]["value"] == "EXAMPLE-ACC-0001"
    assert {"system": DICOM_UID_SYSTEM, "value": "urn:oid:2.25.22"}.items() <= report["identifier"][1].items()
    assert "conclusion" not in report
    assert "EXAMPLE-PATIENT" not in report["text"]["div"]


def test_observations(bundle: dict[str, Any]) -> None:
    lung, nodule = resources(bundle, "Observation")
    for obs in (lung, nodule):
        assert obs["status"] == "preliminary"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert obs["code"]["coding"][0] == {
            "system": "http://snomed.info/sct",
            "code": "118565006",
            "display": "Volume",
        }
    assert lung["valueQuantity"] == {
        "value": 4321.987,
        "unit": "mL",
        "system": "http://unitsofmeasure.org",
        "code": "mL",
    }
    assert nodule["valueQuantity"]["value"] == 1.25
    assert lung["bodySite"]["coding"][0]["code"] == LUNG.value  # an anatomical structure is its own site
    assert nodule["bodySite"]["coding"][0]["code"] == LUNG.value  # the nodule's anatomic region
    assert lung["code"]["text"] == "Lung volume"


def test_same_job_same_bundle_other_job_other_ids(bundle: dict[str, Any]) -> None:
    assert example_bundle() == bundle
    other = build_diagnostic_report(
        STUDY,
        SEGMENTS,
        MEASUREMENTS,
        ALGORITHM,
        OutputUIDs("2.25.1", "2.25.2", "2.25.3", "2.25.4", "other"),
        ISSUED,
    )
    urls = [e["fullUrl"] for e in bundle["entry"]]
    other_urls = [e["fullUrl"] for e in other["entry"]]
    assert urls[0] == other_urls[0]  # the same algorithm is one Device
    assert not set(urls[1:]) & set(other_urls[1:])


def test_report_id_instead_of_output_uids() -> None:
    report_id = "6f1c3d2e-0a4b-4c5d-8e9f-0123456789ab"
    bundle = build_diagnostic_report(
        STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, report_id=report_id, issued=ISSUED
    )
    validate_bundle(bundle)
    assert bundle["entry"][-1]["resource"]["identifier"] == [
        {"system": URI_SYSTEM, "value": f"urn:uuid:{report_id}"}
    ]
    assert bundle["entry"][-1]["fullUrl"] == f"urn:uuid:{entry_uuid(report_id)}"
    with pytest.raises(ValueError, match="ids or report_id"):
        build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, issued=ISSUED)
    with pytest.raises(ValueError, match="UUID"):
        build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, report_id="nope", issued=ISSUED)


def test_summary(bundle: dict[str, Any]) -> None:
    with_conclusion = build_diagnostic_report(
        STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, ISSUED, conclusion="AI volumetry, not yet read."
    )
    summary = report_summary(with_conclusion)
    assert summary == {
        "id": bundle["entry"][-1]["resource"]["identifier"][0]["value"],
        "status": "preliminary",
        "conclusion": "AI volumetry, not yet read.",
        "observations": [
            {"name": "Lung volume", "value": 4321.987, "unit": "mL"},
            {"name": "Nodule volume", "value": 1.25, "unit": "mL"},
        ],
    }


def test_study_time_with_zone_is_kept() -> None:
    study = StudyRef(
        "2.25.5", "P", study_date=dt.datetime(2024, 1, 15, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    )
    (report,) = resources(
        build_diagnostic_report(study, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, ISSUED), "DiagnosticReport"
    )
    assert report["effectiveDateTime"] == "2024-01-15T08:00:00+01:00"
    naive = StudyRef("2.25.5", "P", study_date=dt.datetime(2024, 1, 15, 8, 0))
    (report,) = resources(
        build_diagnostic_report(naive, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, ISSUED), "DiagnosticReport"
    )
    assert report["effectiveDateTime"] == "2024-01-15"  # FHIR needs a zone with a time


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="no segment"):
        build_diagnostic_report(STUDY, SEGMENTS[:1], MEASUREMENTS, ALGORITHM, IDS, ISSUED)
    with pytest.raises(ValueError, match="empty"):
        build_diagnostic_report(STUDY, SEGMENTS, (), ALGORITHM, IDS, ISSUED)
    broken = example_bundle()
    broken["entry"][1]["resource"]["valueQuantity"]["value"] = "a lot"
    with pytest.raises(ValueError, match="not a valid FHIR R4 bundle"):
        validate_bundle(broken)


def test_study_ref_from_the_ct_and_never_in_repr(ct_b40: list[pydicom.Dataset]) -> None:
    study = StudyRef.from_dataset(ct_b40[0])
    assert study.study_instance_uid == ct_b40[0].StudyInstanceUID
    assert study.patient_id == ct_b40[0].PatientID
    assert study.study_date == dt.datetime(2007, 4, 25, 17, 33, 33)
    assert study.accession_number is None  # empty in the file
    assert study.patient_id not in repr(study)
    with pytest.raises(ValueError, match="patient_id"):
        StudyRef("2.25.1", "")


@pytest.mark.parametrize(("kind", "example"), [("bundle", EXAMPLE), ("r5_bundle", EXAMPLE_R5)])
def test_example_file_is_what_the_code_makes(
    kind: str, example: Path, request: pytest.FixtureRequest
) -> None:
    text = json.dumps(request.getfixturevalue(kind), indent=2, ensure_ascii=False) + "\n"
    if os.environ.get("ORTHANC_AI_WRITE_EXAMPLES") == "1":
        example.parent.mkdir(parents=True, exist_ok=True)
        example.write_text(text, encoding="utf-8")
    assert example.read_text(encoding="utf-8") == text, (
        f"{example} is stale: rerun with ORTHANC_AI_WRITE_EXAMPLES=1"
    )


# --- R5 -------------------------------------------------------------------------------------


def test_validates_as_r5_transaction(r5_bundle: dict[str, Any]) -> None:
    parsed = R5Bundle.model_validate(r5_bundle)
    assert parsed.type == "transaction"
    kinds = [e["resource"]["resourceType"] for e in r5_bundle["entry"]]
    assert kinds == ["Device", "Observation", "Observation", "DiagnosticReport"]
    with pytest.raises(ValueError, match="not a valid FHIR R4 bundle"):
        validate_bundle(r5_bundle, "R4")  # really R5-shaped, not R4 that R5 happens to accept
    with pytest.raises(ValueError, match="not a valid FHIR R5 bundle"):
        validate_bundle(example_bundle("R4"), "R5")


def test_r5_keeps_the_ids_and_the_content_of_r4(bundle: dict[str, Any], r5_bundle: dict[str, Any]) -> None:
    assert [e["fullUrl"] for e in r5_bundle["entry"]] == [e["fullUrl"] for e in bundle["entry"]]
    assert [e["request"] for e in r5_bundle["entry"]] == [e["request"] for e in bundle["entry"]]
    assert resources(r5_bundle, "Observation") == resources(bundle, "Observation")
    (r4_report,) = resources(bundle, "DiagnosticReport")
    (r5_report,) = resources(r5_bundle, "DiagnosticReport")
    assert {k: v for k, v in r5_report.items() if k != "study"} == {
        k: v for k, v in r4_report.items() if k != "imagingStudy"
    }
    assert report_summary(r5_bundle) == report_summary(bundle)


def test_r5_references(r5_bundle: dict[str, Any]) -> None:
    full_urls = {e["fullUrl"]: e["resource"]["resourceType"] for e in r5_bundle["entry"]}
    (device,) = resources(r5_bundle, "Device")
    (report,) = resources(r5_bundle, "DiagnosticReport")
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY.study_instance_uid}"},
    }
    assert report["study"] == [study_ref]
    assert "imagingStudy" not in report
    assert [full_urls[r["reference"]] for r in report["result"]] == ["Observation", "Observation"]
    device_url = f"urn:uuid:{entry_uuid(device_uuid(ALGORITHM))}"
    assert full_urls[device_url] == "Device"
    for obs in resources(r5_bundle, "Observation"):
        assert obs["device"] == {"reference": device_url}
        assert obs["derivedFrom"] == [study_ref]
    assert "deviceName" not in device
    assert device["name"] == [{"value": "lung-seg", "type": "registered-name", "display": True}]
    assert device["displayName"] == "lung-seg"
    assert device["modelNumber"] == "lung_unet"
    assert device["type"][0]["coding"][0]["code"] == "123110"
    assert {v["value"] for v in device["version"]} == {"1.2.0", "3"}


def _target(ref: dict[str, Any], full_urls: dict[str, str]) -> str:
    return ref["type"] if "type" in ref else full_urls[ref["reference"]]


@pytest.mark.parametrize(
    ("model", "kind", "fields"),
    [
        (R5DiagnosticReport, "DiagnosticReport", ("subject", "basedOn", "result", "study")),
        (R5Observation, "Observation", ("subject", "device", "derivedFrom")),
    ],
)
def test_r5_reference_targets_are_allowed_by_the_r5_models(
    r5_bundle: dict[str, Any], model: Any, kind: str, fields: tuple[str, ...]
) -> None:
    # fhir.resources checks the structure but not which resource type a Reference points to;
    # its models list the allowed targets, so check ours against them.
    full_urls = {e["fullUrl"]: e["resource"]["resourceType"] for e in r5_bundle["entry"]}
    for resource in resources(r5_bundle, kind):
        for field in fields:
            allowed = model.model_fields[field].json_schema_extra["enum_reference_types"]
            value = resource[field]
            for ref in value if isinstance(value, list) else [value]:
                assert _target(ref, full_urls) in allowed, (kind, field, ref, allowed)


def test_unknown_fhir_version_is_refused() -> None:
    with pytest.raises(ValueError, match="fhir_version must be one of R4, R5"):
        example_bundle("R4B")
    with pytest.raises(ValueError, match="fhir_version must be one of R4, R5"):
        validate_bundle(example_bundle(), "r5")


@pytest.mark.parametrize("kind", ["bundle", "r5_bundle"])
def test_every_resource_has_a_generated_narrative(kind: str, request: pytest.FixtureRequest) -> None:
    # FHIR dom-6 (best practice): a resource should have a narrative; ours say what the values are.
    bundle = request.getfixturevalue(kind)
    for entry in bundle["entry"]:
        text = entry["resource"]["text"]
        assert text["status"] == "generated"
        assert text["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">') and text["div"].endswith(
            "</div>"
        )
        assert "EXAMPLE-PATIENT" not in text["div"]
    lung, nodule = resources(bundle, "Observation")
    assert "<p>Lung volume: 4322.0 mL</p>" in lung["text"]["div"]
    assert "<p>Nodule volume: 1.2 mL</p>" in nodule["text"]["div"]
    (report,) = resources(bundle, "DiagnosticReport")
    assert "<li>Lung volume: 4322.0 mL</li><li>Nodule volume: 1.2 mL</li>" in report["text"]["div"]
    (device,) = resources(bundle, "Device")
    assert "lung-seg" in device["text"]["div"]


def test_narrative_escapes_markup() -> None:
    algorithm = dataclasses.replace(ALGORITHM, name="seg <b>&</b>")
    bundle = build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, algorithm, IDS, ISSUED)
    for entry in bundle["entry"]:
        assert "seg &lt;b&gt;&amp;&lt;/b&gt;" in entry["resource"]["text"]["div"]


def _ds(**tags: Any) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientID = "EXAMPLE-PATIENT-0001"
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def _qualifier(entity: str, kind: str) -> list[pydicom.Dataset]:
    item = pydicom.Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = entity, kind
    return [item]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({}, "urn:oid:2.999.1"),  # no issuer: the configured default
        ({"IssuerOfPatientID": "HOSP-A"}, "urn:oid:2.999.7"),  # the configured issuer map
        ({"IssuerOfPatientID": "2.999.42"}, "urn:oid:2.999.42"),  # an OID names itself
        ({"IssuerOfPatientID": "https://ids.example.org/mrn"}, "https://ids.example.org/mrn"),
        ({"IssuerOfPatientID": "OTHER HOSPITAL"}, None),  # unknown issuer: not the local system
        ({"IssuerOfPatientIDQualifiersSequence": _qualifier("2.999.5", "ISO")}, "urn:oid:2.999.5"),
        (
            {
                "IssuerOfPatientID": "HOSP-A",
                "IssuerOfPatientIDQualifiersSequence": _qualifier("2.999.5", "ISO"),
            },
            "urn:oid:2.999.5",
        ),
        (
            {"IssuerOfPatientIDQualifiersSequence": _qualifier("https://ids.example.org/p", "URI")},
            "https://ids.example.org/p",
        ),
        ({"IssuerOfPatientIDQualifiersSequence": _qualifier("ids.example.org", "DNS")}, "urn:oid:2.999.1"),
    ],
)
def test_patient_id_system_from_the_issuer(tags: dict[str, Any], expected: str | None) -> None:
    ds = _ds(**tags)
    assert patient_id_system(ds, "urn:oid:2.999.1", {"HOSP-A": "urn:oid:2.999.7"}) == expected
    study = StudyRef.from_dataset(_ds(StudyInstanceUID="2.25.5", **tags), expected)
    bundle = build_diagnostic_report(study, SEGMENTS, MEASUREMENTS, ALGORITHM, IDS, ISSUED)
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["subject"]["identifier"].get("system") == expected


def test_patient_id_system_settings_are_validated(tmp_path: Path) -> None:
    base = {"PipelinesFile": "p.yaml", "JobStore": str(tmp_path / "j.sqlite")}
    s = Settings.model_validate(
        base | {"PatientIdSystem": "urn:oid:2.999.1", "PatientIdIssuerSystems": {"HOSP-A": "urn:oid:2.999.7"}}
    )
    assert s.patient_id_system == "urn:oid:2.999.1" and s.patient_id_issuer_systems == {
        "HOSP-A": "urn:oid:2.999.7"
    }
    assert Settings.model_validate(base | {"PatientIdSystem": ""}).patient_id_system is None
    for bad in ({"PatientIdSystem": "HOSP-A"}, {"PatientIdSystem": "urn:oid:1.2.x"}):
        with pytest.raises(ValueError, match="absolute URI|OID"):
            Settings.model_validate(base | bad)
    with pytest.raises(ValueError, match="issuer 'HOSP-A'"):
        Settings.model_validate(base | {"PatientIdIssuerSystems": {"HOSP-A": "not a uri"}})
    with pytest.raises(ValueError, match="StudyRef.patient_id_system"):
        StudyRef("2.25.5", "P", patient_id_system="mrn")


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
def test_a_measurement_the_superseding_result_lacks_is_withdrawn(fhir_version: str) -> None:
    """A late image changed the result and one segment is no longer found: its Observation is
    updated to entered-in-error; the others are updated in place, none is sent twice."""
    previous = as_update(example_bundle(fhir_version))
    current = as_update(
        build_diagnostic_report(
            STUDY, SEGMENTS, MEASUREMENTS[:1], ALGORITHM, IDS, ISSUED, fhir_version=fhir_version
        )
    )
    out = withdraw_missing(current, previous)
    validate_bundle(out, fhir_version)
    assert out["entry"][: len(current["entry"])] == current["entry"]  # the current result, unchanged
    (extra,) = out["entry"][len(current["entry"]) :]
    (gone,) = [
        e for e in previous["entry"] if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["identifier"] not in [c["resource"].get("identifier") for c in current["entry"]]
    ]  # fmt: skip
    assert extra["fullUrl"] == gone["fullUrl"]
    assert extra["resource"]["identifier"] == gone["resource"]["identifier"]
    assert extra["resource"]["status"] == "entered-in-error"
    assert extra["request"] == {
        "method": "PUT",
        "url": f"Observation?identifier={URI_SYSTEM}|{gone['resource']['identifier'][0]['value']}",
    }
    (device,) = [e["fullUrl"] for e in out["entry"] if e["resource"]["resourceType"] == "Device"]
    assert extra["resource"]["device"] == {"reference": device}
    assert "withdrawn" in extra["resource"]["text"]["div"]
    # Nothing to withdraw when the result keeps its measurements; applying it twice adds nothing.
    assert withdraw_missing(previous, previous) == previous
    assert withdraw_missing(out, previous) == out
