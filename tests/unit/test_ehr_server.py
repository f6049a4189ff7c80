"""The test EHR: transactions with conditional create, references, search, validation, auth."""

from __future__ import annotations

import copy
import datetime as dt
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient; the project uses httpx, which still works.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from devstack.ehr_server import create_app
from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.results import AlgorithmInfo, OutputUIDs, SegmentSpec, StudyRef, VolumeMeasurement
from orthanc_plugin.fhir.report import URI_SYSTEM, as_update, build_diagnostic_report

FHIR = "application/fhir+json"
LUNG = SegmentSpec(
    1,
    "Right lung",
    Code("91723000", "SCT", "Anatomical Structure"),
    Code("3341006", "SCT", "Right lung"),
    None,
    (255, 0, 0),
    "lung-right",
)
ALGORITHM = AlgorithmInfo(name="lung-seg", version="1.0.0", model_name="ct_lung", model_version="1")
# Synthetic study: made-up UIDs and identifiers, no real patient.
STUDY_UID = "2.25.1000001"


def report_bundle(key: str = "job-a", study_uid: str = STUDY_UID, patient: str = "PAT-1") -> dict[str, Any]:
    study = StudyRef(study_instance_uid=study_uid, patient_id=patient, patient_id_system="urn:example:mrn")
    ids = OutputUIDs("2.25.1", "2.25.2", "2.25.3", "2.25.4", key=key)
    return build_diagnostic_report(
        study, [LUNG], [VolumeMeasurement(1, 2500.0)], ALGORITHM, ids, dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    )


def our_identifier(bundle: dict[str, Any], kind: str) -> str:
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == kind]
    (value,) = [i["value"] for i in entry["resource"]["identifier"] if i["system"] == URI_SYSTEM]
    return str(value)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app()) as c:
        yield c


def search(client: TestClient, path: str, **params: str) -> list[dict[str, Any]]:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "searchset" and body["total"] == len(body.get("entry", []))
    return [e["resource"] for e in body["entry"]]


def test_transaction_twice_creates_one_set(client: TestClient) -> None:
    bundle = report_bundle()
    first = client.post("/", json=bundle, headers={"Content-Type": FHIR})
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 3
    again = client.post("/", json=bundle).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 3
    # The same locations: the second delivery pointed at what the first created.
    assert [e["response"]["location"] for e in again["entry"]] == [
        e["response"]["location"] for e in answer["entry"]
    ]
    stats = client.get("/_stats").json()
    assert stats["resources"] == {"Device": 1, "DiagnosticReport": 1, "Observation": 1}
    assert stats["transactions"] == 2 and stats["conditional_matches"] == 3
    # A second job of the same algorithm shares the Device, adds its own report.
    client.post("/", json=report_bundle("job-b")).raise_for_status()
    assert client.get("/_stats").json()["resources"] == {"Device": 1, "DiagnosticReport": 2, "Observation": 2}


def test_references_resolve_to_server_ids(client: TestClient) -> None:
    bundle = report_bundle()
    answer = client.post("/", json=bundle).json()
    report_loc = answer["entry"][-1]["response"]["location"]
    rtype, rid = report_loc.split("/")[:2]
    report = client.get(f"/{rtype}/{rid}").json()
    assert report["id"] == rid and report["meta"]["versionId"] == "1"
    (obs_ref,) = [r["reference"] for r in report["result"]]
    assert obs_ref.startswith("Observation/")
    assert '"reference": "urn:uuid' not in json.dumps(report)
    obs = client.get(f"/{obs_ref}")
    assert obs.status_code == 200
    device = client.get(f"/{obs.json()['device']['reference']}")
    assert device.status_code == 200 and device.json()["resourceType"] == "Device"
    assert client.get("/DiagnosticReport/does-not-exist").status_code == 404


def test_search_by_identifier_subject_and_study(client: TestClient) -> None:
    a, b = report_bundle("job-a"), report_bundle("job-b", study_uid="2.25.2000002", patient="PAT-2")
    client.post("/", json=a).raise_for_status()
    client.post("/", json=b).raise_for_status()
    ident = our_identifier(a, "DiagnosticReport")
    (found,) = search(client, "/DiagnosticReport", identifier=f"{URI_SYSTEM}|{ident}")
    assert any(i["value"] == ident for i in found["identifier"])
    assert len(search(client, "/DiagnosticReport", identifier=ident)) == 1  # value alone: any system
    assert search(client, "/DiagnosticReport", identifier=f"urn:other|{ident}") == []
    assert len(search(client, "/DiagnosticReport", identifier=f"{URI_SYSTEM}|")) == 2
    assert len(search(client, "/DiagnosticReport", **{"subject:identifier": "urn:example:mrn|PAT-2"})) == 1
    assert len(search(client, "/Observation", **{"patient:identifier": "PAT-1"})) == 1
    for study in (STUDY_UID, f"urn:oid:{STUDY_UID}", f"urn:dicom:uid|urn:oid:{STUDY_UID}"):
        (r,) = search(client, "/DiagnosticReport", study=study)
        assert r["id"] == found["id"]
    assert len(search(client, "/DiagnosticReport", study=f"{STUDY_UID},2.25.2000002")) == 2
    assert search(client, "/DiagnosticReport", study="2.25.999") == []
    assert len(search(client, "/DiagnosticReport", _count="1")) == 1
    bad = client.get("/DiagnosticReport", params={"code": "x"})
    assert bad.status_code == 400 and "not supported" in bad.json()["issue"][0]["diagnostics"]


def test_invalid_resource_is_400_and_nothing_is_stored(client: TestClient) -> None:
    bundle = report_bundle()
    broken = copy.deepcopy(bundle)
    broken["entry"][-1]["resource"]["status"] = 42  # not a code
    r = client.post("/", json=broken)
    assert r.status_code == 400
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2]" in outcome["issue"][0]["diagnostics"] and "status" in r.text
    assert client.get("/_stats").json()["resources"] == {}  # all or nothing
    dangling = copy.deepcopy(bundle)
    dangling["entry"].pop(0)  # the Device the Observation refers to
    r = client.post("/", json=dangling)
    assert r.status_code == 400 and "points at no entry" in r.text
    assert client.post("/", json={"resourceType": "Bundle", "type": "batch"}).status_code == 400
    unknown = {"resource": {"resourceType": "NotAType"}, "request": {"method": "POST", "url": "NotAType"}}
    r = client.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [unknown]})
    assert r.status_code == 400 and "NotAType" in r.text
    assert client.post("/", content=b"not json", headers={"Content-Type": FHIR}).status_code == 400
    assert client.post("/", content=b"<xml/>", headers={"Content-Type": "application/xml"}).status_code == 415
    r = client.post("/Observation", json={"resourceType": "Observation", "status": "final"})
    assert r.status_code == 400 and "code" in r.text  # Observation.code is required


def test_create_and_conditional_create(client: TestClient) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:example:mrn", "value": "P9"}]}
    headers = {"If-None-Exist": "identifier=urn:example:mrn|P9"}
    first = client.post("/Patient", json=patient, headers=headers)
    assert first.status_code == 201 and first.headers["location"].endswith("/_history/1")
    pid = first.json()["id"]
    again = client.post("/Patient", json=patient, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == pid
    client.post("/Patient", json=patient)  # unconditional: a second one
    dup = client.post("/Patient", json=patient, headers=headers)
    assert dup.status_code == 412  # the condition is now ambiguous
    assert client.post("/Patient", json={"resourceType": "Device"}).status_code == 400
    assert client.post("/NotAType", json={"resourceType": "NotAType"}).status_code == 404


def test_token_required(tmp_path: Path) -> None:
    with TestClient(create_app(token="s3cret")) as c:
        assert c.get("/metadata").status_code == 200  # the capability statement stays open
        r = c.post("/", json=report_bundle())
        assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.post("/", json=report_bundle(), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/_stats").status_code == 401
        ok = c.post("/", json=report_bundle(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_data_file_keeps_resources_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "ehr.jsonl"
    with TestClient(create_app(data_file=data)) as c:
        c.post("/", json=report_bundle()).raise_for_status()
    with open(data, "a") as f:
        f.write('{"resourceType": "Patient", "id": "torn')  # a crash mid-write
    with TestClient(create_app(data_file=data)) as c:
        assert c.get("/_stats").json()["resources"] == {"Device": 1, "DiagnosticReport": 1, "Observation": 1}
        answer = c.post("/", json=report_bundle()).json()
        assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK"] * 3


def test_capability_statement_is_valid() -> None:
    with TestClient(create_app()) as c:
        body = c.get("/metadata").json()
    assert CapabilityStatement.model_validate(body).fhirVersion == "4.0.1"


def test_a_superseding_report_updates_the_same_resources(client: TestClient) -> None:
    client.post("/", json=report_bundle()).raise_for_status()
    (report,) = search(client, "/DiagnosticReport")
    newer = as_update(report_bundle())
    for entry in newer["entry"]:
        if entry["resource"]["resourceType"] == "Observation":
            entry["resource"]["valueQuantity"]["value"] = 1234.5
    answer = client.post("/", json=newer).json()
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK"] * 3
    (updated,) = search(client, "/DiagnosticReport")
    assert updated["id"] == report["id"] and updated["meta"]["versionId"] == "2"
    (obs,) = search(client, "/Observation")
    assert obs["valueQuantity"]["value"] == 1234.5 and obs["meta"]["versionId"] == "2"
    assert client.get(f"/{updated['result'][0]['reference']}").json()["id"] == obs["id"]
    assert client.get("/_stats").json()["resources"] == {"Device": 1, "DiagnosticReport": 1, "Observation": 1}
    # An update whose resource does not exist yet creates it (the first report never arrived).
    fresh = as_update(report_bundle("job-c"))
    answer = client.post("/", json=fresh).json()
    assert [e["response"]["status"] for e in answer["entry"]][1:] == ["201 Created"] * 2
