# SPDX-License-Identifier: AGPL-3.0-or-later
"""The admin page's Models view (Chart.js charts of reviews, edits and drift) and Review view
(pending jobs oldest first, Accept / Reject with a reason, a link that opens the study in OHIF),
in headless Chromium on a real Orthanc with the plugin and the real OHIF viewer proxy.

The job store is filled before Orthanc starts with 45 succeeded jobs of ``ct_lung`` written
through the store's and the reviews' own functions (``tests/monitoring_jobs.py``): 30 from one
scanner, then 15 from another whose volumes come out larger, so the recent window drifts; 24 of
them reviewed (accepted, edited with an agreement, rejected). No worker runs (``Workers: 0``):
reviews recorded by the page stay queued, which is all this test needs.
Screenshots: ``test-artifacts/models-ui.png``, ``review-ui.png``, ``review-ui-ohif.png``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer, free_port
from devstack.viewer import DEFAULT_DIST, ViewerServer
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import JobStore

from ..monitoring_jobs import GE, SIEMENS, Spec, write_jobs
from .browser import require_browser, run_check
from .conftest import make_orthanc

pytestmark = pytest.mark.integration

CHECK_SCRIPT = Path(__file__).with_name("monitoring_ui_check.mjs")
MODEL = "ct_lung"


def specs() -> list[Spec]:
    rng = random.Random(13)
    out = [Spec(SIEMENS, {"nodule": rng.lognormvariate(2.3, 0.25)}) for _ in range(30)]
    out += [Spec(GE, {"nodule": 1.6 * rng.lognormvariate(2.3, 0.25)}) for _ in range(15)]
    for i, s in enumerate(out):
        kind = i % 15
        if kind < 5:
            s.decision, s.review_after_s = "accept", 1800 + 900 * kind
        elif kind < 9:
            s.decision, s.review_after_s = "edit", 7200 + 1800 * kind
            s.agreement = {
                "nodule": (round(0.95 - 0.05 * (kind - 5) - 0.01 * (i // 15), 3), (-1) ** i * 4.0 * kind)
            }
        elif kind < 10:
            s.decision, s.review_after_s = "reject", 20000
    return out


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OrthancServer, ViewerServer, list[str]]]:
    if not (DEFAULT_DIST / "index.html").is_file():
        pytest.fail(f"OHIF is not installed at {DEFAULT_DIST}: run scripts/install_viewer.sh")
    tmp = tmp_path_factory.mktemp("monitoring-ui")
    db = tmp / "storage" / "orthanc-ai" / "jobs.sqlite"
    db.parent.mkdir(parents=True)
    store, reviews = JobStore(db), Reviews(db)
    ids = write_jobs(store, reviews, specs())
    reviews.close()
    store.close()
    viewer_port = free_port()
    # No Triton: nothing runs here (no workers); health reports it not ready, which the views ignore.
    orthanc = make_orthanc(
        tmp, free_port(), workers=0, extra_env={"ORTHANC_AI_VIEWER_URL": f"http://127.0.0.1:{viewer_port}"}
    )
    orthanc.start(timeout=60)
    viewer = ViewerServer(orthanc.url, viewer_port)
    try:
        viewer.start()
        yield orthanc, viewer, ids
    finally:
        viewer.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def report(stack: tuple[OrthancServer, ViewerServer, list[str]], artifacts: Path) -> dict[str, Any]:
    require_browser("admin page's Review and Models views")
    for name in ("models-ui.png", "review-ui.png", "review-ui-ohif.png"):
        (artifacts / name).unlink(missing_ok=True)
    r = run_check(
        CHECK_SCRIPT, ["--base", stack[0].url, "--model", MODEL], artifacts, "monitoring-ui-report.json"
    )
    assert r["ok"], (
        f"check failed at step '{r['step']}': {r['error']}\nscreenshots: {r['screenshots']}\n"
        f"console: {r['console'][-10:]}"
    )
    assert not [c for c in r["console"] if c["type"] == "pageerror"], r["console"]
    assert r["foreignRequests"] == [], f"the admin page must work offline: {r['foreignRequests']}"
    return r


def test_models_view_draws_the_charts_and_shows_the_drift_alert(
    report: dict[str, Any], artifacts: Path
) -> None:
    m = report["models"]
    assert m["chartJs"] and m["chartJs"].startswith("4."), m["chartJs"]
    assert m["jobsPanelsShown"] == 0, "the Jobs view's health/pipelines/jobs panels show on the Models view"
    assert m["versions"] == [{"version": "1", "alert": "true", "state": "alert"}], m["versions"]
    charts = {c["title"]: c for c in m["charts"]}
    # every chart was drawn by Chart.js on its canvas (non-blank pixels), none is a placeholder
    assert all(c["type"] == "bar" and c["inked"] > 500 for c in m["charts"]), [
        (c["title"], c["inked"]) for c in m["charts"]
    ]
    reviews = charts["Reviews"]
    assert reviews["labels"] == ["accepted", "edited", "rejected", "unreviewed"]
    assert reviews["datasets"][0]["data"] == [15, 12, 3, 15], reviews
    assert sum(charts["Edits: Dice of AI and edited segment"]["datasets"][0]["data"]) == 12
    assert sum(charts["Time to review (hours)"]["datasets"][0]["data"]) == 30
    manufacturer = charts["Input: manufacturer"]
    assert "ALERT" in manufacturer["caption"] and manufacturer["labels"] == ["GE MEDICAL SYSTEMS", "SIEMENS"]
    ref, recent = (d["data"] for d in manufacturer["datasets"])
    # reference: the first 22 jobs (one scanner); recent: the last 23, 15 of them from the other
    assert ref == [0, 1] and recent[0] == pytest.approx(15 / 23), manufacturer
    assert "ALERT" in charts["Output: nodule volume_ml"]["caption"], charts["Output: nodule volume_ml"]
    assert (artifacts / "models-ui.png").stat().st_size > 20_000


def test_review_view_lists_pending_jobs_oldest_first_and_records_decisions(
    report: dict[str, Any], stack: tuple[OrthancServer, ViewerServer, list[str]]
) -> None:
    orthanc, viewer, ids = stack
    before = report["reviewBefore"]
    with httpx.Client(base_url=orthanc.url, timeout=30) as c:
        pending = c.get("/ai/jobs", params={"review": "pending", "limit": 500}).json()
        jobs = {j["id"]: j for j in c.get("/ai/jobs", params={"limit": 500}).json()}
        # the page's order: oldest finished first, every pending job, as the API lists them
        unreviewed = [i for i, s in zip(ids, specs(), strict=True) if s.decision is None]
        assert [r["id"] for r in before] == unreviewed
        assert [r["id"] for r in report["reviewAfter"]] == unreviewed[2:] == [j["id"] for j in pending]
        first, second = before[0]["id"], before[1]["id"]
        uid = jobs[first]["study"]["StudyInstanceUID"]
        assert (
            before[0]["href"]
            == f"{viewer.url}/segmentation?StudyInstanceUIDs={uid}"
            == report["viewerOpened"]
        )
        assert "nodule" in before[0]["cells"][3] and "mL" in before[0]["cells"][3]
        assert "accepted" in report["acceptMessage"]
        assert "HTTP 400" in report["refusal"] and "needs a reason" in report["refusal"], report["refusal"]
        assert report["stillPending"] is True
        assert "rejected" in report["rejectMessage"]
        assert c.get(f"/ai/jobs/{first}").json()["review"]["state"] == "accepted"
        rejected = c.get(f"/ai/jobs/{second}").json()["review"]
        assert (
            rejected["state"] == "rejected"
            and rejected["reason"] == "segmentation leaks into the mediastinum"
        )


def test_monitoring_json_and_metrics_through_orthanc(
    stack: tuple[OrthancServer, ViewerServer, list[str]],
) -> None:
    orthanc = stack[0]
    with httpx.Client(base_url=orthanc.url, timeout=30) as c:
        body = c.get(f"/ai/models/{MODEL}/monitoring").json()
        (v,) = body["versions"]
        assert v["drift"]["alert"] and body["alert"]
        text = c.get("/ai/metrics").text
    assert (
        f'orthanc_ai_model_drift_alert{{model="{MODEL}",version="1",kind="input",check="manufacturer"}} 1'
        in text
    )
    assert f'orthanc_ai_model_edit_dice_count{{model="{MODEL}",version="1"}} 12' in text
