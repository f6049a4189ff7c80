"""A reviewer corrects the AI's lung segmentation in OHIF 3.13 and stores it; the loop closes.

Real Orthanc (authentication on, ``rad`` the one reviewer), Triton, a worker, Medplum's FHIR
engine as the third-party EHR, the viewer proxy of ``devstack.viewer``, and headless Debian
Chromium driven by ``ohif_edit.mjs``: the study opens in OHIF's segmentation mode, the AI's SEG is
loaded, OHIF's Eraser removes the lateral part of the left lung on four slices (mouse strokes on
the viewport, the wheel between slices) and OHIF stores the result with its own action (Export >
DICOM SEG > Save: a STOW-RS through the proxy, with the browser's login). Then, within bounded
waits: the job is ``edited`` by ``rad`` (the HTTP user of the STOW-RS, not a DICOM attribute),
Dice < 1 for the left lung on exactly the slices erased and 1.0 for the right, a VERIFIED SR that
names the AI's SR, and on Medplum one DiagnosticReport, ``amended``, with the smaller volume.
The same SEG stored again is one edit; the same edit stored by a user who is not a reviewer is
refused, even when its ContentCreatorName names the reviewer. Screenshots: test-artifacts/ohif-edit-*.png.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from devstack.medplum_server import MedplumServer
from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer
from devstack.viewer import DEFAULT_DIST, ViewerServer

from ..conftest import CT_B40, require_data
from .browser import require_browser, run_check
from .conftest import (
    last_change,
    reviewer_stack,
    study_uid,
    upload_folder,
    wait_for,
    wait_intake_handled_stable,
    wait_job_done,
)

pytestmark = pytest.mark.integration

EDIT_SCRIPT = Path(__file__).with_name("ohif_edit.mjs")
PASSWORDS = {name: secrets.token_urlsafe(16) for name in ("admin", "rad", "clerk", "worker")}
SLICES = 4
AI_SEG = "AI orthanc-ai ct-lung segmentation"


@pytest.fixture(scope="module")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, medplum: MedplumServer
) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("orthanc-ohif-edit")
    server = reviewer_stack(tmp, triton.grpc_port, medplum.url, PASSWORDS)
    server.start(timeout=60)
    yield server
    server.stop()


def client(server: OrthancServer, user: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=(user, PASSWORDS[user]), timeout=60)


def reviews_of(api: httpx.Client, jid: str) -> list[dict[str, Any]]:
    return list(api.get(f"/ai/jobs/{jid}/reviews").json())


def stow_through(viewer: ViewerServer, user: str, dicom: bytes) -> httpx.Response:
    """A STOW-RS as the viewer's page sends it: through the proxy, from its origin, logged in."""
    boundary = "ohifeditboundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + dicom
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return httpx.post(
        f"{viewer.url}/dicom-web/studies", content=body, auth=(user, PASSWORDS[user]), timeout=60,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Origin": viewer.url,
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def edited(orthanc: OrthancServer, medplum: MedplumServer, artifacts: Path) -> Iterator[dict[str, Any]]:
    """The demo CT processed and its preliminary report on Medplum; then the edit in OHIF."""
    require_browser("OHIF edit test", [] if (DEFAULT_DIST / "index.html").is_file() else [str(DEFAULT_DIST)])
    require_data(CT_B40)
    with client(orthanc, "admin") as admin:
        sid = upload_folder(admin, CT_B40)
        uid = study_uid(admin, sid)
        job = wait_job_done(admin, uid, orthanc=orthanc)
        assert job["state"] == "succeeded", job["error"]

        def delivered() -> bool:
            return (admin.get(f"/ai/jobs/{job['id']}").json()["delivery"] or {}).get("state") == "delivered"

        wait_for("the preliminary report on Medplum", delivered, 90, orthanc=orthanc)
    (report,) = medplum.search("DiagnosticReport")
    assert report["status"] == "preliminary"
    for old in artifacts.glob("ohif-edit-*"):
        old.unlink()
    with ViewerServer(orthanc.url, free_port()) as viewer:
        browser = run_check(
            EDIT_SCRIPT,
            [
                "--url", f"{viewer.url}/segmentation?StudyInstanceUIDs={uid}",
                "--seg", AI_SEG, "--segment", "Left lung", "--slices", str(SLICES),
                "--user", "rad", "--password", PASSWORDS["rad"], "--timeout", "120000",
            ],
            artifacts,
            "ohif-edit-report.json",
            timeout=480,
        )  # fmt: skip
        yield {"job": job, "study_id": sid, "study_uid": uid, "browser": browser, "viewer": viewer}


def _failure(report: dict[str, Any]) -> str:
    console = "\n".join(f"  [{m['type']}] {m['text'][:400]}" for m in report["console"][-15:])
    return (
        f"OHIF edit failed at step '{report['step']}': {report['error']}\n"
        f"screenshots: {report['screenshots']}\nHTTP errors: {report['httpErrors'][-5:]}\n"
        f"last console errors/warnings:\n{console}"
    )


def test_the_eraser_changed_one_lung_on_the_slices_stroked_and_ohif_stored_it(edited: dict[str, Any]) -> None:
    browser = edited["browser"]
    assert browser["ok"], _failure(browser)
    assert not browser["errorBoundary"], f"OHIF caught a crash: {json.dumps(browser['errorBoundary'])}"
    left = str(browser["segmentIndex"])
    right = next(k for k in browser["before"] if k != left)
    changed = [
        z
        for z, (b, a) in enumerate(zip(browser["before"][left], browser["after"][left], strict=True))
        if a < b
    ]
    assert len(changed) == SLICES, f"the eraser changed slices {changed}, strokes: {browser['strokes']}"
    assert browser["after"][right] == browser["before"][right], "the eraser touched the right lung"
    assert browser["stow"]["status"] == 200 and len(browser["stow"]["sopInstanceUIDs"]) == 1, browser["stow"]


def test_the_stored_edit_is_credited_to_the_logged_in_reviewer_with_agreement_a_verified_sr_and_an_amended_report(
    orthanc: OrthancServer, edited: dict[str, Any], medplum: MedplumServer
) -> None:
    browser = edited["browser"]
    assert browser["ok"], _failure(browser)
    (seg_uid,) = browser["stow"]["sopInstanceUIDs"]
    job = edited["job"]
    jid = job["id"]
    with client(orthanc, "admin") as admin:

        def edit_delivered() -> dict[str, Any] | None:
            trail = reviews_of(admin, jid)
            last = trail[-1] if trail else {}
            if last.get("apply_state") == "failed":
                pytest.fail(f"the edit could not be applied: {last.get('error')}")
            refused = [
                e for e in admin.get(f"/ai/jobs/{jid}").json()["events"] if e["kind"] == "review_refused"
            ]
            if refused:
                pytest.fail(f"the edit was not taken as a review: {refused[-1]['detail']}")
            ok = last.get("decision") == "edit" and (last.get("delivery") or {}).get("state") == "delivered"
            return last if ok else None

        edit = wait_for("the OHIF edit applied and delivered", edit_delivered, 240, orthanc=orthanc)
        assert edit["revised_seg"] == seg_uid
        assert edit["reviewer"] == "rad", f"credited to {edit['reviewer']!r}, not the user who stored it"
        by_segment = {a["segment"]: a for a in edit["result"]["agreement"]}
        left, right = by_segment["Left lung"], by_segment["Right lung"]
        assert left["dice"] < 1.0 and left["slices_touched"] == SLICES, left
        assert left["volume_diff_ml"] < 0, left
        assert right["dice"] == 1.0 and right["slices_touched"] == 0 and right["volume_diff_ml"] == 0, right
        new_left = next(m["volume_ml"] for m in edit["result"]["measurements"] if m["segment"] == "Left lung")
        old_left = next(m["volume_ml"] for m in job["outputs"]["measurements"] if m["segment"] == "Left lung")
        assert new_left == pytest.approx(old_left + left["volume_diff_ml"], abs=0.02)

        sr = pydicom.dcmread(io.BytesIO(admin.get(f"/instances/{edit['result']['sr']['ID']}/file").content))
        assert sr.VerificationFlag == "VERIFIED"
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "rad"
        predecessors = {
            ref.ReferencedSOPInstanceUID
            for s in sr.PredecessorDocumentsSequence
            for series in s.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert job["outputs"]["stored"]["sr"]["SOPInstanceUID"] in predecessors
        assert admin.get(f"/ai/jobs/{jid}").json()["review"]["state"] == "edited"

    (report,) = medplum.search("DiagnosticReport")
    assert report["status"] == "amended"
    observations = {o["code"]["text"]: o for o in medplum.search("Observation")}
    assert observations["Left lung volume"]["status"] == "amended"
    assert observations["Left lung volume"]["valueQuantity"]["value"] == pytest.approx(new_left, abs=0.01)
    assert observations["Left lung volume"]["valueQuantity"]["value"] < old_left


def test_the_same_edit_stored_again_is_one_edit_and_a_non_reviewers_copy_is_refused(
    orthanc: OrthancServer, edited: dict[str, Any]
) -> None:
    browser = edited["browser"]
    assert browser["ok"], _failure(browser)
    (seg_uid,) = browser["stow"]["sopInstanceUIDs"]
    jid = edited["job"]["id"]
    viewer: ViewerServer = edited["viewer"]
    with client(orthanc, "admin") as admin:
        wait_for(
            "the OHIF edit recorded",
            lambda: any(r["revised_seg"] == seg_uid for r in reviews_of(admin, jid)),
            240,
            orthanc=orthanc,
        )
        (found,) = admin.post(
            "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": seg_uid}}
        ).json()
        dicom = admin.get(f"/instances/{found}/file").content
        n_before = len(reviews_of(admin, jid))

        # The same SEG arrives again (OHIF's Save pressed twice): still one edit.
        after = last_change(admin)
        assert stow_through(viewer, "rad", dicom).status_code == 200
        wait_intake_handled_stable(admin, edited["study_id"], after, orthanc=orthanc)
        assert len(reviews_of(admin, jid)) == n_before

        # A copy stored by a user who is not a reviewer, claiming the reviewer as its creator.
        copy = pydicom.dcmread(io.BytesIO(dicom))
        copy.SOPInstanceUID = generate_uid()
        copy.ContentCreatorName = "rad"
        buf = io.BytesIO()
        copy.save_as(buf, enforce_file_format=True)
        after = last_change(admin)
        assert stow_through(viewer, "clerk", buf.getvalue()).status_code == 200
        wait_intake_handled_stable(admin, edited["study_id"], after, orthanc=orthanc)
        assert len(reviews_of(admin, jid)) == n_before, "a non-reviewer's SEG counted as a review"
        events = admin.get(f"/ai/jobs/{jid}").json()["events"]
        refused = [e for e in events if e["kind"] == "review_refused"]
        assert refused and "clerk" in refused[-1]["detail"], events[-5:]
        # It stays an ordinary stored object, and started no inference job.
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": str(copy.SOPInstanceUID)}}
        assert len(admin.post("/tools/find", json=query).json()) == 1
        assert len(admin.get("/ai/jobs", params={"study": edited["study_uid"]}).json()) == 1
