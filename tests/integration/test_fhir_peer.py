"""Deliveries to an FHIR server we did not write: Medplum's transaction engine (devstack/fhir_peer).

Exactly once there too: re-delivering a job's bundle creates nothing new, whether sent again
by the delivery client or by the whole stack (real Orthanc and Triton processing the demo CT).
A missing node or Medplum install fails these tests (scripts/install_fhir_peer.sh), never skips.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.medplum_server import MedplumServer, missing
from devstack.stack import OrthancServer
from devstack.triton_server import TritonServer
from orthanc_plugin.core.results import OutputUIDs
from orthanc_plugin.fhir.delivery import FhirDeliveryClient
from orthanc_plugin.fhir.report import URI_SYSTEM, as_update, build_diagnostic_report, withdraw_missing

from ..conftest import CT_B40, require_data
from ..unit.test_fhir_report import ALGORITHM, ISSUED, MEASUREMENTS, SEGMENTS, STUDY
from .conftest import make_orthanc, study_uid, upload_folder, wait_for, wait_job_done

pytestmark = pytest.mark.integration

PATIENT_SYSTEM = "urn:oid:2.999.1"  # 2.999: the OID arc for examples


@pytest.fixture
def medplum(tmp_path: Path) -> Iterator[MedplumServer]:
    if missing():
        pytest.fail(
            f"the Medplum FHIR server is not installed: {missing()}; run scripts/install_fhir_peer.sh"
        )
    with MedplumServer(log_file=tmp_path / "medplum.log") as server:
        yield server


def ours(resource: dict[str, Any]) -> str:
    (value,) = [i["value"] for i in resource["identifier"] if i["system"] == URI_SYSTEM]
    return str(value)


def job_bundle(key: str) -> dict[str, Any]:
    uids = OutputUIDs("2.25.11", "2.25.12", "2.25.21", "2.25.22", key=key)
    return build_diagnostic_report(STUDY, SEGMENTS, MEASUREMENTS, ALGORITHM, uids, ISSUED)


def test_redelivered_bundle_creates_each_resource_once(medplum: MedplumServer) -> None:
    bundle = job_bundle("job-a")
    sent = json.dumps(bundle)
    results = []
    with FhirDeliveryClient(medplum.url) as client:
        for _ in range(3):
            results.append(client.deliver(bundle))
    assert json.dumps(bundle) == sent  # the outbox's bundle is sent unchanged each time
    assert all(r.ok for r in results), [r.message for r in results]
    assert [e["status"] for e in results[0].summary["entries"]] == ["201"] * 4
    for again in results[1:]:
        assert [e["status"] for e in again.summary["entries"]] == ["200"] * 4
        assert again.summary["report"] == results[0].summary["report"]

    # Counted on the server: one of each, whatever their identifiers.
    devices = medplum.search("Device")
    reports = medplum.search("DiagnosticReport")
    observations = medplum.search("Observation")
    assert (len(devices), len(reports), len(observations)) == (1, 1, len(MEASUREMENTS))
    # The identifiers arrived as we sent them (not rewritten), so the next ifNoneExist matches.
    sent_ids = {e["resource"]["resourceType"] + " " + ours(e["resource"]) for e in bundle["entry"]}
    stored_ids = {r["resourceType"] + " " + ours(r) for r in devices + reports + observations}
    assert stored_ids == sent_ids
    (report,) = reports
    for entry in bundle["entry"]:
        (found,) = medplum.search(
            entry["resource"]["resourceType"], identifier=f"{URI_SYSTEM}|{ours(entry['resource'])}"
        )
    # In-bundle references became server references that resolve.
    assert sorted(medplum.read(ref["reference"])["id"] for ref in report["result"]) == sorted(
        o["id"] for o in observations
    )
    for obs in observations:
        assert medplum.read(obs["device"]["reference"])["id"] == devices[0]["id"]
    assert report["subject"]["identifier"] == {"system": PATIENT_SYSTEM, "value": STUDY.patient_id}
    assert report["text"]["status"] == "generated"

    # Another job of the same model: its own report and observations, the same Device.
    with FhirDeliveryClient(medplum.url) as client:
        assert client.deliver(job_bundle("job-b")).ok
    assert len(medplum.search("Device")) == 1
    assert len(medplum.search("DiagnosticReport")) == 2
    assert len(medplum.search("Observation")) == 2 * len(MEASUREMENTS)


def test_a_superseding_report_updates_in_place_and_withdraws_what_it_lost(medplum: MedplumServer) -> None:
    """The bundle of a job superseded by a late image, on Medplum: the report and its
    observations are updated (new versions, the same server ids), and the observation of a segment
    the new result no longer has is withdrawn (entered-in-error), not left as a current value."""
    first = job_bundle("job-a")
    uids = OutputUIDs("2.25.11", "2.25.12", "2.25.21", "2.25.22", key="job-a")
    fewer = [dataclasses.replace(MEASUREMENTS[0], volume_ml=MEASUREMENTS[0].volume_ml + 10.0)]
    second = withdraw_missing(
        as_update(build_diagnostic_report(STUDY, SEGMENTS, fewer, ALGORITHM, uids, ISSUED)), first
    )
    with FhirDeliveryClient(medplum.url) as client:
        assert client.deliver(first).ok
        before = {ours(o): o for o in medplum.search("Observation")}
        (report_before,) = medplum.search("DiagnosticReport")
        result = client.deliver(second)
        assert result.ok, result.message
        assert client.deliver(second).ok  # delivered again after a lost answer: nothing changes
    after = {ours(o): o for o in medplum.search("Observation")}
    (report,) = medplum.search("DiagnosticReport")
    assert (
        report["id"] == report_before["id"]
        and report["meta"]["versionId"] != report_before["meta"]["versionId"]
    )
    assert after.keys() == before.keys() and len(after) == len(MEASUREMENTS)
    assert all(after[k]["id"] == before[k]["id"] for k in after)  # updated, not created anew
    kept = {
        ours(e["resource"]) for e in second["entry"][:-1] if e["resource"]["resourceType"] == "Observation"
    }
    (lost,) = after.keys() - kept
    assert after[lost]["status"] == "entered-in-error"
    (value,) = [after[k]["valueQuantity"]["value"] for k in kept]
    assert value == round(fewer[0].volume_ml, 3) and after[next(iter(kept))]["status"] == "preliminary"
    assert [medplum.read(r["reference"])["id"] for r in report["result"]] == [after[k]["id"] for k in kept]
    assert len(medplum.search("Device")) == 1


@pytest.fixture
def orthanc_to_medplum(
    tmp_path: Path, triton: TritonServer, medplum: MedplumServer
) -> Iterator[OrthancServer]:
    server = make_orthanc(
        tmp_path,
        triton.grpc_port,
        stable_age=2,
        extra_env={
            "ORTHANC_AI_FHIR_URL": medplum.url,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2",
            "ORTHANC_AI_PATIENT_ID_SYSTEM": PATIENT_SYSTEM,
        },
    )
    server.start(timeout=60)
    yield server
    server.stop()


def test_demo_ct_report_reaches_medplum_once(
    orthanc_to_medplum: OrthancServer, medplum: MedplumServer
) -> None:
    require_data(CT_B40)
    orthanc = orthanc_to_medplum
    with httpx.Client(base_url=orthanc.url, timeout=60) as api:
        uid = study_uid(api, upload_folder(api, CT_B40))
        job = wait_job_done(api, uid, orthanc=orthanc)
        assert job["state"] == "succeeded", job["error"]

        def delivered() -> dict[str, Any] | None:
            d = api.get(f"/ai/jobs/{job['id']}").json()["delivery"] or {}
            return d if d.get("state") == "delivered" else None

        first = wait_for(f"delivery of job {job['id']}", delivered, 60, orthanc=orthanc)
        assert first["attempts"] == 1 and first["destination"] == medplum.url
        # The job runs again (same key, same bundle): delivered a second time, nothing new.
        assert api.post(f"/ai/jobs/{job['id']}/retry").status_code == 200

        def redelivered() -> dict[str, Any] | None:
            d = delivered()
            return d if d is not None and d["delivered_at"] > first["delivered_at"] else None

        again = wait_for(f"re-delivery of job {job['id']}", redelivered, 240, orthanc=orthanc)
        assert again["response"]["report"] == first["response"]["report"]
        # Every conditional create matched what the first delivery made.
        assert [e["status"] for e in again["response"]["entries"]] == ["200"] * len(job["fhir"]["entry"])

    n_obs = sum(1 for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "Observation")
    (report,) = medplum.search("DiagnosticReport")
    assert len(medplum.search("Device")) == 1 and len(medplum.search("Observation")) == n_obs == len(
        report["result"]
    )
    (sent,) = [
        e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    assert ours(report) == ours(sent)
    assert report["subject"]["identifier"]["system"] == PATIENT_SYSTEM  # the demo CT names no issuer
    (by_study,) = medplum.search("DiagnosticReport", **{"identifier": f"{URI_SYSTEM}|{ours(sent)}"})
    assert by_study["id"] == report["id"]
