# SPDX-License-Identifier: AGPL-3.0-or-later
"""The admin page /ai/ui/, the Orthanc Explorer button to it, and /ai/metrics, on real Orthanc + Triton.

Headless Debian Chromium is driven by ``admin_ui_check.mjs`` (playwright-core): the page lists the
processed job as succeeded, Retry sends it through the queue again to success, a refused action
shows the API's error, the pipelines and health panels are filled, and Orthanc Explorer's home
page carries an "AI jobs" button that opens the page. ``test-artifacts/admin-ui.png`` is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer

from ..conftest import CT_B40, require_data
from .browser import require_browser, run_check
from .conftest import study_uid, upload_as_new_study, wait_job_done

pytestmark = pytest.mark.integration

CHECK_SCRIPT = Path(__file__).with_name("admin_ui_check.mjs")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


@pytest.fixture(scope="module")
def processed(orthanc: OrthancServer) -> dict[str, Any]:
    """The chest CT (as a study of this test's own) processed once."""
    require_data(CT_B40)
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        uid = study_uid(c, upload_as_new_study(c, CT_B40))
        job = wait_job_done(c, uid, orthanc=orthanc)
    assert job["state"] == "succeeded", f"the AI job did not succeed: {job['error']}"
    # The worker recorded the acquisition that model monitoring compares (docs/monitoring.md).
    acquisition = job["outputs"]["acquisition"]
    assert acquisition["manufacturer"] == "SIEMENS" and acquisition["kernel"] == "B40f", acquisition
    assert acquisition["slice_thickness_mm"] == 8.0 and acquisition["age_band"], acquisition
    return job


@pytest.fixture(scope="module")
def browser_report(orthanc: OrthancServer, processed: dict[str, Any], artifacts: Path) -> dict[str, Any]:
    require_browser("admin page test")
    for name in (
        "admin-ui.png",
        "admin-ui-before-retry.png",
        "admin-ui-explorer.png",
        "admin-ui-failure.png",
    ):
        (artifacts / name).unlink(missing_ok=True)
    report = run_check(
        CHECK_SCRIPT, ["--base", orthanc.url, "--job", processed["id"]], artifacts, "admin-ui-report.json"
    )
    assert report["ok"], (
        f"admin page check failed at step '{report['step']}': {report['error']}\n"
        f"screenshots: {report['screenshots']}\nconsole: {report['console'][-10:]}"
    )
    return report


def test_admin_page_lists_the_job_and_retries_it(
    browser_report: dict[str, Any], processed: dict[str, Any]
) -> None:
    r = browser_report
    assert r["url"].endswith("/ai/ui/index.html"), r["url"]
    before = r["before"]
    assert before["state"] == "succeeded" and before["pipeline"] == processed["pipeline"], before
    assert processed["study"]["StudyInstanceUID"] in before["cells"][2]
    assert {s["name"] for s in before["stages"] if s["done"]} >= {"fetch", "inference", "store"}, before[
        "stages"
    ]
    assert before["retryDisabled"] is False and before["cancelDisabled"] is True
    # Retry: the row went back through the queue (queued and/or running) and succeeded again.
    states = r["states"]
    assert states[-1] == "succeeded" and {"queued", "running"} & set(states), states
    assert r["after"]["state"] == "succeeded", r["after"]
    assert "retry done" in r["message"], r["message"]
    # A refused action shows the API's own error (cancelling a finished job: HTTP 409).
    assert "HTTP 409" in r["refusal"] and "already succeeded" in r["refusal"], r["refusal"]
    assert not [c for c in r["console"] if c["type"] == "pageerror"], r["console"]
    assert r["foreignRequests"] == [], f"the page must work offline: {r['foreignRequests']}"


def test_admin_page_shows_pipelines_and_health(
    browser_report: dict[str, Any], processed: dict[str, Any]
) -> None:
    rows = {row[0]: row for row in browser_report["pipelines"]}
    assert processed["pipeline"] in rows, rows
    model = processed["outputs"]["model"]
    row = rows[processed["pipeline"]]
    assert row[1] == processed["pipeline_version"] and row[3] == model["name"], row
    assert row[5].startswith(str(model["version"])), f"model version of the last job not shown: {row}"
    health = browser_report["health"]
    assert browser_report["healthReady"] == "true", health
    assert re.search(r"workers\s+1 / 1 alive", health) and "FHIR backlog" in health, health


def test_orthanc_explorer_links_to_the_admin_page(
    browser_report: dict[str, Any], orthanc: OrthancServer
) -> None:
    link = browser_report["explorerLink"]
    assert link["text"] == "AI jobs" and link["href"].endswith("/ai/ui/index.html"), link
    assert browser_report["explorerLinkOpens"].endswith("/ai/ui/index.html")
    js = httpx.get(f"{orthanc.url}/plugins/explorer.js", timeout=10).text
    assert "orthanc-ai-jobs" in js


def test_static_files_types_and_no_traversal(orthanc: OrthancServer) -> None:
    with httpx.Client(base_url=orthanc.url, timeout=10) as c:
        for path, mime in [("/ai/ui/index.html", "text/html"), ("/ai/ui/app.js", "text/javascript"),
                           ("/ai/ui/style.css", "text/css"), ("/ai/ui", "text/html")]:  # fmt: skip
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(mime), (path, r.headers)
        for path in [
            "/ai/ui/nothing.js",
            "/ai/ui/%2e%2e/plugin.py",
            "/ai/ui/..%2fplugin.py",
            "/ai/ui/x/../../api.py",
        ]:
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text[:200])
            assert "import" not in r.text


def test_metrics_are_exposed_through_orthanc(orthanc: OrthancServer, processed: dict[str, Any]) -> None:
    r = httpx.get(f"{orthanc.url}/ai/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    samples: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        samples[m[1] + (m[2] or "")] = float(m[3])
    p = processed["pipeline"]
    assert samples['orthanc_ai_jobs{state="succeeded"}'] >= 1
    assert samples[f'orthanc_ai_inference_seconds_count{{pipeline="{p}"}}'] >= 1
    assert samples[f'orthanc_ai_job_stage_seconds_count{{pipeline="{p}",stage="inference"}}'] >= 1
    assert samples["orthanc_ai_triton_ready"] == 1 and samples["orthanc_ai_workers_alive"] == 1
    assert "orthanc_ai_fhir_backlog" in samples
    assert processed["study"]["StudyInstanceUID"] not in r.text
