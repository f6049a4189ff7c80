"""The /ai/ REST handler without Orthanc: routing of requests, status codes, error bodies."""

from __future__ import annotations

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import ConfigError, load_pipelines
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.server.api import Api

from .test_intake import FakeOrthanc, make_intake


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
        (r"/jobs/([0-9a-f]+)/review", "POST"),  # a reviewer's, not an admin's (REVIEW_ROUTES)
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


@pytest.mark.parametrize("limit", ["-1", "0", "10001", "99999999999999999999", "abc", "1e3", ""])
def test_a_limit_out_of_range_is_a_bad_request(api, limit):
    for route in ("/jobs", "/deliveries"):
        status, body = api.handle("GET", route, {"limit": limit}, b"")
        assert status == 400 and "limit must be a whole number from 1 to 10000" in body["error"], (
            route,
            body,
        )
    assert api.handle("GET", "/jobs", {"limit": "10000"}, b"")[0] == 200


def test_a_bug_is_a_500_with_an_error_id_and_no_internals(api, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("secret-internal-detail")  # a stray KeyError is a bug, not a 404

    monkeypatch.setattr(api.store, "list_jobs", broken)
    status, body = api.handle("GET", "/jobs", {}, b"")
    assert status == 500 and set(body) == {"error", "error_id"}
    assert "secret-internal-detail" not in str(body) and "KeyError" not in str(body)
    assert body["error_id"] in caplog.text and "secret-internal-detail" in caplog.text


def test_unknown_job_and_unknown_state_name_what_is_missing(api):
    status, body = api.handle("GET", "/jobs/00000000000000000000", {}, b"")
    assert status == 404 and body["error"] == "not found: job 00000000000000000000"
    status, body = api.handle("GET", "/jobs", {"state": "sleeping"}, b"")
    assert status == 400 and "unknown state 'sleeping'" in body["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "pacs.example:8042", "origin": "https://evil.example"},
        {"host": "pacs.example:8042", "origin": "null"},
        {"host": "pacs.example:8042", "referer": "https://evil.example/page.html"},
        {"host": "pacs.example:8042", "sec-fetch-site": "cross-site", "origin": "http://pacs.example:8042"},
        {"host": "pacs.example:8042", "origin": "http://pacs.example:8042.evil.example"},
    ],
)
def test_a_cross_site_request_cannot_change_state(api, headers):
    status, body = api.handle("POST", "/studies/s1/run", {}, b"", None, headers)
    assert status == 403 and "same-origin" in body["error"], body
    assert api.handle("GET", "/jobs", {}, b"", None, headers)[0] == 200  # reading stays possible
    assert api.handle("GET", "/jobs", {}, b"")[1] == []  # nothing was queued


@pytest.mark.parametrize(
    "headers",
    [
        {},  # not a browser: scripts and curl send no Origin
        {"host": "pacs.example:8042", "origin": "http://pacs.example:8042"},
        {"host": "PACS.example:8042", "referer": "http://pacs.example:8042/ai/ui/"},
        {"host": "pacs.example:8042", "sec-fetch-site": "same-origin", "origin": "http://pacs.example:8042"},
    ],
)
def test_same_origin_and_non_browser_requests_change_state(api, headers):
    status, body = api.handle("POST", "/studies/s1/run", {}, b'{"pipeline": "ct-lung"}', None, headers)
    assert status == 200 and body[0]["queued"], body


def test_only_reviewers_may_review_and_a_repeat_is_not_recorded(api):
    from .jobs_helpers import NO_INPUT, outputs

    job, _ = api.store.enqueue("k-review", "1.2.3", "s1", "ct-lung", "1.0.0", "fp", NO_INPUT)
    assert api.store.claim("w", 30) is not None
    assert api.store.succeed(job.id, "w", outputs(seg="1.2", sr="1.3"), None)
    api.authentication, api.admin_users, api.reviewer_users = True, ["admin"], ["rad"]
    body = b'{"decision": "accept"}'
    for user in ("clerk", "admin", None):
        status, answer = api.handle("POST", f"/jobs/{job.id}/review", {}, body, user=user)
        assert status == 403 and answer["required"] == "reviewer", user
    status, answer = api.handle("POST", f"/jobs/{job.id}/review", {}, body, user="rad")
    assert (
        status == 202
        and answer["review"]["reviewer"] == "rad"
        and answer["job"]["review"]["state"] == "accepted"
    )
    status, answer = api.handle("POST", f"/jobs/{job.id}/review", {}, body, user="rad")
    assert status == 200 and answer["created"] is False
    status, answer = api.handle("POST", f"/jobs/{job.id}/review", {}, b'{"decision": "reject"}', user="rad")
    assert status == 400 and "reason" in answer["error"]
    status, answer = api.handle(
        "POST", f"/jobs/{job.id}/review", {}, body, user="rad", headers={"sec-fetch-site": "cross-site"}
    )
    assert status == 403 and "same-origin" in answer["error"]
    status, jobs = api.handle("GET", "/jobs", {"review": "accepted"}, b"")
    assert [j["id"] for j in jobs] == [job.id]
    assert api.handle("GET", "/jobs", {"review": "maybe"}, b"")[0] == 400
