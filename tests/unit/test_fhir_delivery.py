"""Delivery client and loop against the in-process test EHR; the /ai/fhir read side."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from devstack.ehr_server import create_app
from orthanc_plugin.core.config import Settings
from orthanc_plugin.core.errors import BadRequest, NotFound
from orthanc_plugin.fhir.delivery import DeliveryLoop, FhirDeliveryClient, start_delivery_thread
from orthanc_plugin.fhir.read_api import FhirReports
from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.store import JobStore

from .jobs_helpers import NO_INPUT, outputs
from .test_ehr_server import STUDY_UID, report_bundle

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

URL = "http://ehr.test/fhir"


class Ehr:
    """The test EHR in process, reachable through an httpx transport; can be 'down'."""

    def __init__(self, token: str | None = None) -> None:
        self.client = TestClient(create_app(token=token))
        self.down = False
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        path = request.url.path.removeprefix("/fhir") or "/"
        r = self.client.request(request.method, path, content=request.content, headers=dict(request.headers))
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def stats(self, token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return dict(self.client.get("/_stats", headers=headers).json())


def settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings.model_validate(
        {
            "PipelinesFile": "pipelines.yaml",
            "JobStore": str(tmp_path / "jobs.sqlite"),
            "FhirBaseUrl": URL,
            "DeliveryMaxBackoffSeconds": 2,
            **extra,
        }
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    o = Outbox(tmp_path / "jobs.sqlite")
    yield o
    o.close()


def test_empty_base_url_means_no_delivery(tmp_path: Path) -> None:
    s = settings(tmp_path, FhirBaseUrl="")
    assert s.fhir_base_url is None
    assert start_delivery_thread(s, "w", threading.Event()) is None
    with pytest.raises(ValueError, match="FhirBaseUrl"):
        DeliveryLoop(tmp_path / "jobs.sqlite", s, "w")


def test_delivers_once_even_when_sent_twice(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr()
    with FhirDeliveryClient(URL, transport=ehr.transport) as client:
        first = client.deliver(report_bundle())
        again = client.deliver(report_bundle())
    assert first.ok and again.ok and first.http_status == 200
    assert first.summary["report"].startswith("DiagnosticReport/")
    assert first.summary["report"] == again.summary["report"]
    assert [e["status"] for e in again.summary["entries"]] == ["200 OK"] * 3
    assert ehr.stats()["resources"]["DiagnosticReport"] == 1
    sent = ehr.requests[0]
    assert (
        sent.headers["content-type"].startswith("application/fhir+json")
        and "authorization" not in sent.headers
    )


def test_outage_then_recovery_delivers_each_once(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr()
    loop = DeliveryLoop(tmp_path / "jobs.sqlite", settings(tmp_path), "w1", transport=ehr.transport)
    for key in ("job-a", "job-b", "job-c"):
        outbox.enqueue(key, report_bundle(key), URL)
    ehr.down = True
    while loop.run_once():
        pass
    for key in ("job-a", "job-b", "job-c"):
        st = outbox.status_for_job(key)
        assert st["state"] == "failing" and st["attempts"] == 1
        assert st["last_error"] == f"cannot connect to the EHR at {URL}: [Errno 111] Connection refused"
    ehr.down = False
    outbox._db.execute("UPDATE fhir_outbox SET not_before=0 WHERE job_id='job-a'")  # its backoff passed
    assert loop.run_once()
    # One success wakes the rest: no waiting out their backoff.
    assert loop.run_once() and loop.run_once() and not loop.run_once()
    assert ehr.stats()["resources"] == {"Device": 1, "DiagnosticReport": 3, "Observation": 3}
    assert all(outbox.status_for_job(k)["state"] == "delivered" for k in ("job-a", "job-b", "job-c"))
    loop.close()


def test_bad_token_is_a_clear_error_until_fixed(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr(token="right")
    env = {"FHIR_TOKEN": "wrong"}
    s = settings(tmp_path, FhirTokenEnv="FHIR_TOKEN")
    loop = DeliveryLoop(tmp_path / "jobs.sqlite", s, "w1", environ=env, transport=ehr.transport)
    outbox.enqueue("job-a", report_bundle(), URL)
    assert loop.run_once()
    st = outbox.status_for_job("job-a")
    assert st["state"] == "failing" and st["last_http_status"] == 401 and st["last_error_kind"] == "auth"
    assert st["last_error"].startswith("the EHR refused the token (HTTP 401): check the variable FHIR_TOKEN")
    assert ehr.requests[-1].headers["authorization"] == "Bearer wrong"
    assert st["next_attempt"] == pytest.approx(st["last_attempt"] + 2, abs=0.5)  # the cap at once
    env["FHIR_TOKEN"] = "right"  # the admin fixed it
    outbox._db.execute("UPDATE fhir_outbox SET not_before=0")
    assert loop.run_once()
    assert outbox.status_for_job("job-a")["state"] == "delivered"
    assert ehr.stats("right")["resources"]["DiagnosticReport"] == 1
    loop.close()


def test_missing_token_variable_is_named(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr()
    s = settings(tmp_path, FhirTokenEnv="FHIR_TOKEN")
    loop = DeliveryLoop(tmp_path / "jobs.sqlite", s, "w1", environ={}, transport=ehr.transport)
    outbox.enqueue("job-a", report_bundle(), URL)
    assert loop.run_once()
    st = outbox.status_for_job("job-a")
    assert st["state"] == "failing" and "FHIR_TOKEN" in st["last_error"] and "not set" in st["last_error"]
    assert ehr.requests == []  # nothing sent without the configured token
    loop.close()


def test_no_token_configured_but_required(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr(token="right")
    loop = DeliveryLoop(tmp_path / "jobs.sqlite", settings(tmp_path), "w1", transport=ehr.transport)
    outbox.enqueue("job-a", report_bundle(), URL)
    loop.run_once()
    assert "no token is configured: set FhirTokenEnv" in outbox.status_for_job("job-a")["last_error"]
    loop.close()


def test_rejected_content_carries_the_diagnostics(tmp_path: Path, outbox: Outbox) -> None:
    ehr = Ehr()
    loop = DeliveryLoop(tmp_path / "jobs.sqlite", settings(tmp_path), "w1", transport=ehr.transport)
    bad = report_bundle()
    bad["entry"][-1]["resource"]["status"] = 42  # not a code
    outbox.enqueue("job-a", bad, URL)
    loop.run_once()
    st = outbox.status_for_job("job-a")
    assert st["last_error_kind"] == "rejected" and st["last_http_status"] == 400
    assert st["last_error"].startswith("the EHR rejected the report (HTTP 400): Bundle.entry[2]")
    loop.close()


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "text"),
    [
        (503, None, {"retry-after": "7"}, "retry", "unavailable (HTTP 503)"),
        (429, None, {}, "retry", "HTTP 429"),
        (403, None, {}, "auth", "permissions"),
        (302, None, {"location": "https://login.example/"}, "rejected", "set FhirBaseUrl"),
        (200, {"resourceType": "Patient"}, {}, "rejected", "without a transaction-response"),
        (
            200,
            {"resourceType": "Bundle", "type": "batch-response"},
            {},
            "rejected",
            "not transaction-response",
        ),
        (
            200,
            {"resourceType": "Bundle", "type": "transaction-response", "entry": []},
            {},
            "rejected",
            "0 entries",
        ),
        (
            200,
            {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [{"response": {"status": "400"}}],
            },
            {},
            "rejected",
            "entry 0",
        ),
    ],
)
def test_classification(status: int, body: Any, headers: dict[str, str], kind: str, text: str) -> None:
    client = FhirDeliveryClient(URL, token="t", token_source="the variable T")
    result = client.classify(status, body, headers, n_entries=1)
    client.close()
    assert result.kind == kind and text in result.message and result.http_status == status
    if status == 503:
        assert result.retry_after_s == 7


def test_unreachable_ehr_is_retryable() -> None:
    with FhirDeliveryClient("http://127.0.0.1:9", timeout_s=2) as client:
        result = client.deliver(report_bundle())
    assert result.kind == "retry" and result.message.startswith(
        "cannot connect to the EHR at http://127.0.0.1:9"
    )


def test_delivery_thread_stops(tmp_path: Path, outbox: Outbox) -> None:
    stop = threading.Event()
    t = start_delivery_thread(settings(tmp_path, FhirBaseUrl="http://127.0.0.1:9"), "w1", stop, poll_s=0.05)
    assert t is not None and t.is_alive()
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_reports_read_side(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.enqueue("key-a", STUDY_UID, "oid", "ct-lung", "1", "fp", NO_INPUT)
    claimed = store.claim("w", 30)
    assert claimed is not None
    bundle = report_bundle("job-a")
    assert store.succeed(job.id, "w", outputs(), bundle)
    reports = FhirReports(store.path)
    for study in (STUDY_UID, f"urn:oid:{STUDY_UID}", f"urn:dicom:uid|urn:oid:{STUDY_UID}"):
        found = reports.search({"study": study})
        assert found["total"] == 1
    Bundle.model_validate(found)  # a valid R4 searchset, resources included
    report = found["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["id"]
    assert reports.search({"study": "2.25.42"})["total"] == 0
    assert reports.search({})["total"] == 1
    assert reports.read("DiagnosticReport", report["id"]) == report
    (obs_ref,) = [r["reference"] for r in report["result"]]
    obs = reports.read(*obs_ref.split("/"))
    assert obs["resourceType"] == "Observation"
    device = reports.read(*obs["device"]["reference"].split("/"))
    assert device["resourceType"] == "Device"
    for bad in ({"study": "not a uid"}, {"study": "urn:other|1.2"}, {"patient": "x"}, {"_count": "x"}):
        with pytest.raises(BadRequest):
            reports.search(bad)
    for missing in (("DiagnosticReport", "0" * 8 + "-0000-0000-0000-" + "0" * 12), ("Patient", report["id"])):
        with pytest.raises(NotFound):
            reports.read(*missing)
    with pytest.raises(NotFound):
        reports.read("DiagnosticReport", "not-a-uuid")
    reports.close()
    store.close()
