"""The /ai/ REST handler without Orthanc: routing of requests, status codes, error bodies."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthanc_plugin.api import Api
from orthanc_plugin.config import ConfigError, load_pipelines
from orthanc_plugin.jobstore import JobStore

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
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"")[0] == 409  # still queued
    assert api.handle("POST", f"/jobs/{jid}/cancel", {}, b"")[1]["state"] == "cancelled"
    assert api.handle("POST", f"/jobs/{jid}/retry", {}, b"")[1]["state"] == "queued"


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
