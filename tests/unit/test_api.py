"""The /ai/ REST handler without Orthanc: routing of requests, status codes, error bodies."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthanc_plugin.core.config import ConfigError, load_pipelines
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.server.api import Api

from .test_intake import FakeOrthanc, make_intake

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path):
    pipelines = load_pipelines(ROOT / "config" / "pipelines.yaml")
    orthanc = FakeOrthanc()
    orthanc.add_study("s1", ["B70f", "B40f"])
    store = JobStore(tmp_path / "jobs.sqlite")
    intake = make_intake(orthanc, store, pipelines)
    state = {"reload_error": None}

    def reload():
        if state["reload_error"]:
            raise ConfigError(state["reload_error"])
        return pipelines

    a = Api(store, intake, lambda: pipelines, lambda: {"ok": False, "triton": {"ready": False}}, reload)
    a.state = state  # type: ignore[attr-defined]
    return a


def test_run_then_read_retry_cancel(api):
    status, body = api.handle("POST", "/studies/s1/run", {}, b'{"pipeline": "ct-lung"}')
    assert status == 200 and body[0]["queued"] and body[0]["job"]["state"] == "queued"
    jid = body[0]["job"]["id"]
    assert "soft-tissue" in body[0]["job"]["series"]["ct"]["reason"]
    assert api.handle("GET", "/jobs", {"state": "queued"}, b"")[1][0]["id"] == jid
    status, job = api.handle("GET", f"/jobs/{jid}", {}, b"")
    assert status == 200 and job["events"][0]["kind"] == "queued" and job["series"]["ct"]["instances"] == 30
    changed: list[tuple[str, str]] = []
    api.changed = lambda job: changed.append((job.id, job.state))  # the plugin updates the study label
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"")[0] == 409  # still queued
    assert api.handle("POST", f"/jobs/{jid}/cancel", {}, b"")[1]["state"] == "cancelled"
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"")[1]["state"] == "queued"
    assert changed == [(jid, "cancelled"), (jid, "queued")]


def test_errors_are_json_with_status(api):
    assert api.handle("GET", "/jobs/00000000000000000000", {}, b"")[0] == 404
    assert api.handle("GET", "/nope", {}, b"")[0] == 404
    assert api.handle("DELETE", "/jobs", {}, b"")[0] == 405
    assert api.handle("POST", "/studies/s1/run", {}, b"not json")[0] == 400
    assert api.handle("POST", "/studies/s1/run", {}, b'{"pipeline": "nope"}')[0] == 404
    assert api.handle("POST", "/studies/unknown/run", {}, b"")[0] == 404
    assert api.handle("GET", "/health", {}, b"")[0] == 503


def test_dry_run_both_forms(api):
    status, body = api.handle("POST", "/routes/dry-run", {}, b'{"study": "s1"}')
    assert status == 200 and body[0]["matched"] and body[0]["roles"][0]["series"]["ID"] == "s1-B40f"
    assert api.handle("GET", "/studies/s1/dry-run", {}, b"")[1] == body
    assert api.handle("POST", "/routes/dry-run", {}, b"{}")[0] == 400


def test_reload_reports_config_errors(api):
    assert api.handle("POST", "/routes/reload", {}, b"")[0] == 200
    api.state["reload_error"] = "config/pipelines.yaml: key 'pipelines.0.version': field required"
    status, body = api.handle("POST", "/routes/reload", {}, b"")
    assert status == 400 and "pipelines.0.version" in body["error"]


def _queued_job(api) -> str:
    return str(api.handle("POST", "/studies/s1/run", {}, b'{"pipeline": "ct-lung"}')[1][0]["job"]["id"])


def test_state_changing_routes_need_an_admin(api):
    jid = _queued_job(api)
    api.authentication, api.admin_users = True, ["admin"]
    for method, path, body in [
        ("POST", f"/jobs/{jid}/retry", b""),
        ("POST", f"/jobs/{jid}/cancel", b""),
        ("POST", "/studies/s1/run", b""),
        ("POST", "/routes/reload", b""),
    ]:
        for user in ("viewer", None):
            status, out = api.handle(method, path, {}, body, user=user)
            assert status == 403, (method, path, user)
            assert "admin" in out["error"] and f"/ai{path}" in out["error"] and out["user"] == user
    # Refused requests changed nothing.
    assert api.handle("GET", f"/jobs/{jid}", {}, b"", user="viewer")[1]["state"] == "queued"
    # Reading stays open to every authenticated user, including the read-only POST dry-run.
    for method, path, body in [
        ("GET", "/jobs", b""),
        ("GET", f"/jobs/{jid}", b""),
        ("GET", "/pipelines", b""),
        ("GET", "/studies/s1/dry-run", b""),
        ("POST", "/routes/dry-run", b'{"study": "s1"}'),
        ("GET", "/deliveries", b""),
        ("GET", "/fhir/DiagnosticReport", b""),
    ]:
        assert api.handle(method, path, {}, body, user="viewer")[0] == 200, path
    assert api.handle("GET", "/health", {}, b"", user="viewer")[0] == 503  # not 403
    # The admin may; unknown routes and wrong methods keep their own answers.
    assert api.handle("POST", f"/jobs/{jid}/cancel", {}, b"", user="admin")[1]["state"] == "cancelled"
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"", user="admin")[1]["state"] == "queued"
    assert api.handle("POST", "/routes/reload", {}, b"", user="admin")[0] == 200
    assert api.handle("POST", "/nope", {}, b"", user="viewer")[0] == 404
    status, out = api.handle("DELETE", "/jobs", {}, b"", user="viewer")
    assert status == 405 and out["allowed"] == ["GET"]


def test_admin_list_semantics(api):
    jid = _queued_job(api)
    # Authentication off (the local stack): nobody is identified and everything is allowed.
    api.authentication, api.admin_users = False, ["admin"]
    assert api.may_change_state(None)
    assert api.handle("POST", f"/jobs/{jid}/cancel", {}, b"")[0] == 200
    # Authentication on without a list: every authenticated user may change state.
    api.authentication, api.admin_users = True, None
    assert api.may_change_state("viewer")
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"", user="viewer")[0] == 200
    # An empty list: nobody may.
    api.admin_users = []
    assert not api.may_change_state("admin")
    assert api.handle("POST", f"/jobs/{jid}/cancel", {}, b"", user="admin")[0] == 403


def test_which_routes_change_state(api):
    from orthanc_plugin.server.api import changes_state

    writes = {(p, v) for p, v, _ in api._routes() if changes_state(p, v)}
    assert writes == {
        (r"/jobs/([0-9a-f]+)/retry", "POST"),
        (r"/jobs/([0-9a-f]+)/cancel", "POST"),
        (r"/jobs/([0-9a-f]+)/forward", "POST"),
        (r"/studies/([0-9A-Za-z._-]+)/run", "POST"),
        (r"/routes/reload", "POST"),
    }
    assert not changes_state(r"/routes/dry-run", "POST")
    assert changes_state(r"/models", "POST")  # a new route is admin-only unless marked read-only


def test_admin_users_setting(tmp_path):
    from orthanc_plugin.core.config import load_settings

    base = {"PipelinesFile": str(ROOT / "config" / "pipelines.yaml"), "JobStore": str(tmp_path / "j.sqlite")}
    s = load_settings({"OrthancAI": base})
    assert s.admin_users is None and s.orthanc_username is None
    s = load_settings({"OrthancAI": base | {"AdminUsers": ["admin"], "OrthancUsername": ""}})
    assert s.admin_users == ["admin"] and s.orthanc_username is None  # empty user: no authentication
    with pytest.raises(ConfigError, match="AdminUsers"):
        load_settings({"OrthancAI": base | {"AdminUsers": "admin"}})
