"""Security on real Orthanc 1.10.1 + real Triton: with Orthanc authentication on, every /ai/ route
needs a registered user, state-changing routes need an admin (OrthancAI.AdminUsers), and the
workers reach Orthanc's REST API as their own user with a password from the environment."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import CT_B40, require_data
from .conftest import series_by_modality, study_uid, upload_folder, wait_for, wait_job_done

pytestmark = pytest.mark.integration

# Passwords made for this run only; Orthanc and the workers get them through the environment.
PASSWORDS = {name: secrets.token_urlsafe(16) for name in ("admin", "viewer", "worker")}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("orthanc-secured")
    server = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=1, stable_age=2, lease_seconds=8, log_file=tmp / "orthanc.log",
        extra_env={
            "ORTHANC_AI_AUTH": "true",
            "ORTHANC_AI_USERS": json.dumps(PASSWORDS),
            "ORTHANC_AI_ADMINS": json.dumps(["admin"]),
            "ORTHANC_AI_WORKER_USER": "worker",
            "ORTHANC_AI_WORKER_PASSWORD": PASSWORDS["worker"],
        },
        http_auth=("admin", PASSWORDS["admin"]),
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()


def _client(server: OrthancServer, user: str | None) -> httpx.Client:
    auth = (user, PASSWORDS[user]) if user else None
    return httpx.Client(base_url=server.url, auth=auth, timeout=60)


@pytest.fixture(scope="module")
def processed(secured: OrthancServer) -> dict[str, Any]:
    """A study uploaded by the admin, processed end to end by the authenticated workers."""
    require_data(CT_B40)
    with _client(secured, "admin") as c:
        sid = upload_folder(c, CT_B40)
        uid = study_uid(c, sid)
        job = wait_job_done(c, uid, timeout=120, orthanc=secured)
    return {"study_id": sid, "study_uid": uid, "job": job}


def test_unauthenticated_requests_are_refused(secured: OrthancServer) -> None:
    with _client(secured, None) as anon:
        for method, path in [("GET", "/ai/jobs"), ("GET", "/ai/health"), ("POST", "/ai/routes/reload")]:
            r = anon.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Basic")
        assert anon.get("/system").status_code == 401  # Orthanc's own routes as well
    with httpx.Client(base_url=secured.url, auth=("viewer", "wrong"), timeout=10) as bad:
        assert bad.get("/ai/jobs").status_code == 401


def test_workers_process_a_study_as_their_own_user(secured: OrthancServer, processed: dict) -> None:
    job = processed["job"]
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    with _client(secured, "viewer") as c:
        assert len(series_by_modality(c, processed["study_id"], "SEG")) == 1
        assert len(series_by_modality(c, processed["study_id"], "SR")) == 1


def test_viewer_reads_but_cannot_change_state(secured: OrthancServer, processed: dict) -> None:
    jid = processed["job"]["id"]
    with _client(secured, "viewer") as viewer:
        r = viewer.get("/ai/jobs")
        assert r.status_code == 200 and jid in {j["id"] for j in r.json()}
        assert viewer.get(f"/ai/jobs/{jid}").status_code == 200
        assert viewer.get("/ai/pipelines").status_code == 200
        for path in (f"/ai/jobs/{jid}/retry", f"/ai/jobs/{jid}/cancel", "/ai/routes/reload",
                     f"/ai/studies/{processed['study_id']}/run"):  # fmt: skip
            r = viewer.post(path)
            assert r.status_code == 403, (path, r.status_code, r.text)
            err = r.json()["error"]
            assert "viewer" in err and "admin" in err and path in err
        after = viewer.get(f"/ai/jobs/{jid}").json()
        assert after["state"] == "succeeded" and after["attempts"] == 1  # nothing changed


def test_admin_can_retry(secured: OrthancServer, processed: dict) -> None:
    jid = processed["job"]["id"]
    with _client(secured, "admin") as admin:
        r = admin.post(f"/ai/jobs/{jid}/retry")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "queued"
        job = wait_job_done(admin, processed["study_uid"], timeout=120, orthanc=secured)
        assert job["state"] == "succeeded", job["error"]
        assert job["finished"] > processed["job"]["finished"]  # it ran again
        assert any(e["detail"] == "retry requested" for e in job["events"] if e["kind"] == "queued")
        # The retried job replaced its outputs: still one SEG and one SR.
        assert len(series_by_modality(admin, processed["study_id"], "SEG")) == 1


def test_no_password_in_logs(secured: OrthancServer, processed: dict) -> None:
    assert secured.log_file is not None
    logs = [secured.log_file, *Path(secured.storage.parent / "log").rglob("*")]
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
    assert text, "no logs found"
    for password in PASSWORDS.values():
        assert password not in text


def test_worker_credentials_come_from_the_environment(secured: OrthancServer) -> None:
    settings = wait_for(
        "worker settings", lambda: next(secured.storage.parent.rglob("worker-settings.json"), None)
    )
    text = Path(settings).read_text()
    assert '"OrthancUsername": "worker"' in text and "ORTHANC_AI_WORKER_PASSWORD" in text
    assert PASSWORDS["worker"] not in text
