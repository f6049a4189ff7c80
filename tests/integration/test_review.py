"""The review loop end to end: real Orthanc (authentication on), Triton, workers, and Medplum's
FHIR engine as the EHR behind a switch that takes it down and up.

One study of the demo CT is processed; then a reviewer accepts, rejects and accepts again while
the EHR is down (each update arrives once, in order, when it is back), an unauthorised user is
refused, a repeated review is recorded once; then a SEG revised by a script (highdicom, from our
SEG, part of the left lung erased on several slices) is stored through STOW-RS, twice: one edit,
Dice < 1 for the left lung and 1 for the right, a verified SR that names its predecessors, and
one DiagnosticReport on Medplum, amended, with the smaller volume.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from devstack.medplum_server import MedplumServer
from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import CT_B40, require_data
from .conftest import reviewer_stack, study_uid, upload_folder, wait_for, wait_job_done

pytestmark = pytest.mark.integration

PASSWORDS = {name: secrets.token_urlsafe(16) for name in ("admin", "rad", "clerk", "worker")}
URI = "urn:ietf:rfc:3986"


class SwitchedEhr:
    """An HTTP front of the Medplum server that answers 503 while ``down`` is set, and keeps
    the transaction Bundles it passed on (with Medplum's answer status) in order."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.down = threading.Event()
        self.passed: list[tuple[int, dict[str, Any]]] = []
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if outer.down.is_set():
                    outer.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                r = httpx.request(
                    self.command, outer.target + self.path, content=body, headers=headers, timeout=60
                )
                if self.command == "POST":
                    outer.passed.append((r.status_code, json.loads(body)))
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/fhir+json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> SwitchedEhr:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ehr(medplum: MedplumServer) -> Iterator[SwitchedEhr]:
    with SwitchedEhr(medplum.url) as switch:
        yield switch


@pytest.fixture(scope="module")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, ehr: SwitchedEhr
) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("orthanc-review")
    server = reviewer_stack(tmp, triton.grpc_port, ehr.url, PASSWORDS)
    server.start(timeout=60)
    yield server
    server.stop()


def client(server: OrthancServer, user: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=(user, PASSWORDS[user]), timeout=60)


@pytest.fixture(scope="module")
def processed(orthanc: OrthancServer, medplum: MedplumServer) -> dict[str, Any]:
    """The demo CT processed, its preliminary report on Medplum."""
    require_data(CT_B40)
    with client(orthanc, "admin") as api:
        sid = upload_folder(api, CT_B40)
        uid = study_uid(api, sid)
        job = wait_job_done(api, uid, orthanc=orthanc)
        assert job["state"] == "succeeded", job["error"]

        def delivered() -> bool:
            return (api.get(f"/ai/jobs/{job['id']}").json()["delivery"] or {}).get("state") == "delivered"

        wait_for("the preliminary report on Medplum", delivered, 60, orthanc=orthanc)
    (report,) = medplum.search("DiagnosticReport")
    assert report["status"] == "preliminary"
    return job | {"study_id": sid, "study_uid": uid}


def reviews_of(api: httpx.Client, jid: str) -> list[dict[str, Any]]:
    return list(api.get(f"/ai/jobs/{jid}/reviews").json())


def instance_tags(api: httpx.Client, orthanc_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(api.get(f"/instances/{orthanc_id}/file").content))


def test_accept_and_reject_reach_the_ehr_once_each_in_order_after_an_outage(
    orthanc: OrthancServer, processed: dict[str, Any], ehr: SwitchedEhr, medplum: MedplumServer
) -> None:
    jid = processed["id"]
    with client(orthanc, "clerk") as clerk:
        r = clerk.post(f"/ai/jobs/{jid}/review", json={"decision": "accept"})
        assert r.status_code == 403 and r.json()["required"] == "reviewer"
    with client(orthanc, "admin") as admin:  # an admin is not a reviewer either
        assert admin.post(f"/ai/jobs/{jid}/review", json={"decision": "accept"}).status_code == 403
    before = len(ehr.passed)
    ehr.down.set()
    with client(orthanc, "rad") as rad:
        assert rad.post(f"/ai/jobs/{jid}/review", json={"decision": "reject"}).status_code == 400  # no reason
        first = rad.post(f"/ai/jobs/{jid}/review", json={"decision": "accept"})
        assert first.status_code == 202 and first.json()["review"]["n"] == 1
        again = rad.post(f"/ai/jobs/{jid}/review", json={"decision": "accept"})
        assert again.status_code == 200 and again.json()["created"] is False
        reject = rad.post(f"/ai/jobs/{jid}/review", json={"decision": "reject", "reason": "lungs swapped"})
        assert reject.status_code == 202
        assert rad.post(f"/ai/jobs/{jid}/review", json={"decision": "accept"}).json()["review"]["n"] == 3

        def all_applied_and_waiting() -> list[dict[str, Any]] | None:
            trail = reviews_of(rad, jid)
            done = len(trail) == 3 and all(r["applied"] for r in trail)
            return trail if done and trail[0]["delivery"]["state"] == "failing" else None

        trail = wait_for(
            "three reviews applied while the EHR is down", all_applied_and_waiting, 120, orthanc=orthanc
        )
        assert ehr.refused > 0 and len(ehr.passed) == before  # nothing got through
        ehr.down.clear()

        def all_delivered() -> list[dict[str, Any]] | None:
            t = reviews_of(rad, jid)
            return t if all((r["delivery"] or {}).get("state") == "delivered" for r in t) else None

        trail = wait_for("the three updates delivered", all_delivered, 120, orthanc=orthanc)
        # Once each, in order.
        statuses = [
            next(
                e["resource"]["status"]
                for e in b["entry"]
                if e["resource"]["resourceType"] == "DiagnosticReport"
            )
            for status, b in ehr.passed[before:]
        ]
        assert statuses == ["final", "entered-in-error", "final"]
        assert all(status == 200 for status, _ in ehr.passed[before:])
        assert trail[0]["delivery"]["attempts"] > 1  # it was tried while the EHR was down

        # Orthanc: the AI's SR unchanged, three verified versions, each naming its predecessors.
        job = rad.get(f"/ai/jobs/{jid}").json()
        assert job["review"]["state"] == "accepted"
        ai_sr = instance_tags(rad, job["outputs"]["stored"]["sr"]["ID"])
        assert ai_sr.VerificationFlag == "UNVERIFIED"
        versions = [instance_tags(rad, r["result"]["sr"]["ID"]) for r in trail]
        assert len({v.SOPInstanceUID for v in versions}) == 3
        for i, v in enumerate(versions):
            assert v.VerificationFlag == "VERIFIED" and v.SeriesInstanceUID == ai_sr.SeriesInstanceUID
            (observer,) = v.VerifyingObserverSequence
            assert str(observer.VerifyingObserverName) == "rad" and observer.VerifyingOrganization
            preds = {
                ref.ReferencedSOPInstanceUID
                for s in v.PredecessorDocumentsSequence
                for series in s.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence
            }
            assert ai_sr.SOPInstanceUID in preds
            if i:
                assert versions[i - 1].SOPInstanceUID in preds
        assert "lungs swapped" in versions[1].ContentSequence[-1].TextValue
        assert "must not be used" in versions[1].ContentSequence[-1].TextValue
        # The trail is in the job's history and audit; the filter finds it.
        kinds = [e["kind"] for e in job["events"]]
        assert kinds.count("review_recorded") == 3 and kinds.count("review_applied") == 3
        assert jid in [j["id"] for j in rad.get("/ai/jobs", params={"review": "accepted"}).json()]
        assert jid not in [j["id"] for j in rad.get("/ai/jobs", params={"review": "pending"}).json()]

    (report,) = medplum.search("DiagnosticReport")
    assert report["status"] == "final" and report["resultsInterpreter"] == [{"display": "rad"}]
    assert all(o["status"] == "final" for o in medplum.search("Observation"))


def revised_seg(
    api: httpx.Client, job: dict[str, Any], erase_slices: int = 6
) -> tuple[pydicom.Dataset, float]:
    """Our SEG with the left lung's lateral half erased on ``erase_slices`` slices, as a reviewer's
    workstation would store it; returns it and the erased volume in mL."""
    ai_seg = instance_tags(api, job["outputs"]["stored"]["seg"]["ID"])
    (role,) = job["series"].values()
    series = api.get(f"/series/{role['series_id']}").json()
    sources = [instance_tags(api, i) for i in series["Instances"]]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    seg = hd.seg.Segmentation.from_dataset(ai_seg)
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in ai_seg.SegmentSequence}
    stack = seg.get_pixels_by_source_instance(
        [str(d.SOPInstanceUID) for d in sources],
        segment_numbers=sorted(numbers.values()),
        combine_segments=True,
    )
    left = numbers["Left lung"]
    on = [z for z in range(stack.shape[0]) if (stack[z] == left).sum() > 200]
    assert len(on) >= erase_slices
    erased = 0
    for z in on[len(on) // 2 - erase_slices // 2 :][:erase_slices]:
        cols = np.nonzero((stack[z] == left).any(axis=0))[0]
        half = (stack[z] == left) & (np.arange(stack.shape[2]) >= (cols.min() + cols.max()) // 2)[None, :]
        erased += int(half.sum())
        stack[z][half] = 0
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=int(s.SegmentNumber),
            segment_label=str(s.SegmentLabel),
            segmented_property_category=hd.sr.CodedConcept.from_dataset(
                s.SegmentedPropertyCategoryCodeSequence[0]
            ),
            segmented_property_type=hd.sr.CodedConcept.from_dataset(s.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for s in ai_seg.SegmentSequence
    ]
    revised = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Reviewer workstation",
        manufacturer_model_name="scripted edit", software_versions="1", device_serial_number="1",
        content_creator_name="rad", series_description="Lungs (edited)",
    )  # fmt: skip
    spacing = [float(x) for x in sources[0].PixelSpacing]
    thickness = abs(float(sources[1].ImagePositionPatient[2]) - float(sources[0].ImagePositionPatient[2]))
    return revised, erased * spacing[0] * spacing[1] * thickness / 1000.0


def stow(api: httpx.Client, ds: pydicom.Dataset) -> None:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    boundary = "reviewboundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buf.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = api.post(
        "/dicom-web/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert r.status_code == 200, r.text


def test_a_revised_seg_is_an_edit_with_agreement_a_verified_sr_and_an_amended_report(
    orthanc: OrthancServer, processed: dict[str, Any], ehr: SwitchedEhr, medplum: MedplumServer
) -> None:
    jid = processed["id"]
    with client(orthanc, "rad") as rad:
        job = rad.get(f"/ai/jobs/{jid}").json()
        n_before = len(reviews_of(rad, jid))
        revised, erased_ml = revised_seg(rad, job)
        stow(rad, revised)

        def edit_delivered() -> dict[str, Any] | None:
            trail = reviews_of(rad, jid)
            last = trail[-1] if trail else {}
            ok = last.get("decision") == "edit" and (last.get("delivery") or {}).get("state") == "delivered"
            return last if ok else None

        edit = wait_for("the edit applied and delivered", edit_delivered, 180, orthanc=orthanc)
        assert edit["revised_seg"] == revised.SOPInstanceUID and edit["n"] == n_before + 1
        by_segment = {a["segment"]: a for a in edit["result"]["agreement"]}
        assert by_segment["Left lung"]["dice"] < 1.0 and by_segment["Left lung"]["slices_touched"] == 6
        assert by_segment["Right lung"]["dice"] == 1.0 and by_segment["Right lung"]["slices_touched"] == 0
        assert by_segment["Left lung"]["volume_diff_ml"] == pytest.approx(-erased_ml, rel=0.02)
        new_left = next(m["volume_ml"] for m in edit["result"]["measurements"] if m["segment"] == "Left lung")
        old_left = next(m["volume_ml"] for m in job["outputs"]["measurements"] if m["segment"] == "Left lung")
        assert new_left == pytest.approx(old_left - erased_ml, rel=0.02)

        sr = instance_tags(rad, edit["result"]["sr"]["ID"])
        assert sr.VerificationFlag == "VERIFIED"
        assert job["outputs"]["stored"]["sr"]["SOPInstanceUID"] in edit["result"]["sr"]["predecessors"]
        evidence = {
            ref.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert revised.SOPInstanceUID in evidence  # the SR is measured on the edited SEG
        assert rad.get(f"/ai/jobs/{jid}").json()["review"]["state"] == "edited"

        # Stored again: recorded once. Wait until the intake has handled the study's next stable event.
        stored_at = int(rad.get("/changes", params={"last": ""}).json()["Last"])
        stow(rad, revised)

        def evaluated_again() -> bool:
            changes = rad.get("/changes", params={"since": stored_at, "limit": 1000}).json()["Changes"]
            stable = [
                c["Seq"]
                for c in changes
                if c["ChangeType"] == "StableStudy" and c["ID"] == processed["study_id"]
            ]
            handled = (rad.get("/ai/health").json().get("intake") or {}).get("last_change") or 0
            return bool(stable) and handled >= stable[0]

        wait_for("the study routed again after the second store", evaluated_again, 60, orthanc=orthanc)
        assert len(reviews_of(rad, jid)) == n_before + 1
        # The revised SEG started no inference job.
        assert len(rad.get("/ai/jobs", params={"study": processed["study_uid"]}).json()) == 1

    (report,) = medplum.search("DiagnosticReport")
    assert report["status"] == "amended"
    observations = {o["code"]["text"]: o for o in medplum.search("Observation")}
    assert len(observations) == len(report["result"])
    assert observations["Left lung volume"]["status"] == "amended"
    assert observations["Left lung volume"]["valueQuantity"]["value"] == pytest.approx(new_left, abs=0.01)
    assert observations["Left lung volume"]["valueQuantity"]["value"] < old_left
