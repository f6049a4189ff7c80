"""Deliver the outbox's FHIR transaction Bundles to the EHR.

:class:`FhirDeliveryClient` POSTs one Bundle to the FHIR base URL and sorts the answer into
delivered / transient fault / refused credentials / refused content. :class:`DeliveryLoop`
runs in a background thread of every worker process: it claims outbox rows, delivers them
and records the outcome, so deliveries survive restarts and EHR outages.

Logs name jobs, HTTP statuses and outcome kinds only: never the token, never the content of
a bundle or of the EHR's answer (both may carry patient data). The EHR's diagnostics go into
the outbox row, which only admins read through ``/ai/jobs/{id}``.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orthanc_plugin.core.config import Settings
from orthanc_plugin.core.tls import fhir_tls
from orthanc_plugin.jobs.database import DatabaseTarget
from orthanc_plugin.jobs.outbox import Delivery, FailureKind, Outbox, deliver_until

log = logging.getLogger("orthanc_ai.delivery")

#: The mime type of the bundles we send, per FHIR release (fhir_report builds R4 or R5, as
#: FhirVersion says); the fhirVersion parameter lets the EHR check which one it gets.
FHIR_MIME_TYPES = {
    "R4": "application/fhir+json; fhirVersion=4.0",
    "R5": "application/fhir+json; fhirVersion=5.0",
}
FHIR_JSON = FHIR_MIME_TYPES["R4"]
_MAX_DIAGNOSTICS = 600


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one POST. ``kind`` is None on success, else why it failed."""

    kind: FailureKind | None
    message: str
    http_status: int | None = None
    retry_after_s: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.kind is None


class FhirDeliveryClient:
    """POSTs transaction Bundles to one FHIR base URL, with an optional bearer token.

    ``token_source`` names where the token came from (e.g. the environment variable), for
    error messages only. Redirects are not followed: the Authorization header must not go
    to a URL nobody configured. ``fhir_version`` (``"R4"`` or ``"R5"``) is the release of the
    bundles, named in the Content-Type and Accept headers.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        verify: bool | str | Path | ssl.SSLContext = True,
        timeout_s: float = 30.0,
        token_source: str | None = None,
        transport: httpx.BaseTransport | None = None,
        fhir_version: str = "R4",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        mime = FHIR_MIME_TYPES.get(fhir_version)
        if mime is None:
            raise ValueError(
                f"fhir_version must be one of {', '.join(FHIR_MIME_TYPES)}, got {fhir_version!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_source = token_source
        self.timeout_s = timeout_s
        self.fhir_version = fhir_version
        headers = {"Content-Type": mime, "Accept": mime}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            headers=headers,
            verify=_tls(verify),
            timeout=timeout_s,
            follow_redirects=False,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirDeliveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deliver(self, bundle: dict[str, Any]) -> DeliveryResult:
        """POST ``bundle`` (a transaction) to the base URL and classify the answer."""
        try:
            r = self._http.post(self.base_url + "/", json=bundle)
        except httpx.TimeoutException:
            return DeliveryResult(
                "retry", f"no answer from the EHR at {self.base_url} within {self.timeout_s:g} s"
            )
        except httpx.ConnectError as e:
            return DeliveryResult("retry", f"cannot connect to the EHR at {self.base_url}: {_reason(e)}")
        except httpx.HTTPError as e:
            return DeliveryResult("retry", f"HTTP error talking to the EHR at {self.base_url}: {_reason(e)}")
        return self.classify(r.status_code, _json(r), r.headers, len(bundle.get("entry", [])), bundle)

    def classify(
        self,
        status: int,
        body: Any,
        headers: Mapping[str, str],
        n_entries: int,
        bundle: dict[str, Any] | None = None,
    ) -> DeliveryResult:
        """Sort an HTTP answer to a transaction POST into success or a failure kind."""
        diagnostics = _diagnostics(body)
        detail = f": {diagnostics}" if diagnostics else ""
        if 200 <= status < 300:
            return _check_transaction_response(status, body, n_entries, bundle)
        if status in (401, 403):
            return DeliveryResult("auth", self._auth_message(status) + detail, status)
        if status in (408, 429) or status >= 500:
            return DeliveryResult(
                "retry",
                f"the EHR is unavailable (HTTP {status}){detail}",
                status,
                retry_after_s=_retry_after(headers.get("retry-after")),
            )
        if 300 <= status < 400:
            where = headers.get("location", "?")
            return DeliveryResult(
                "rejected",
                f"the EHR redirects (HTTP {status}) to {where}: set FhirBaseUrl to the final base URL",
                status,
            )
        return DeliveryResult("rejected", f"the EHR rejected the report (HTTP {status}){detail}", status)

    def _auth_message(self, status: int) -> str:
        source = f"the variable {self.token_source}" if self.token_source else "FhirTokenEnv"
        if self.token is None and self.token_source is None:
            return (
                f"the EHR requires authentication (HTTP {status}) but no token is configured:"
                " set FhirTokenEnv to the name of an environment variable that holds the bearer token"
            )
        if not self.token:
            return f"the EHR requires authentication (HTTP {status}); no token was sent because {source} is empty"
        if status == 401:
            return f"the EHR refused the token (HTTP 401): check {source}"
        return (
            f"the EHR does not allow this token to write reports (HTTP 403): check the token's permissions"
            f" (from {source})"
        )


def _tls(verify: bool | str | Path | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    return ssl.create_default_context(cafile=str(verify))


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text[:300]


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: an HTTP date would need the server's clock to agree with ours.
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _diagnostics(body: Any) -> str:
    """The human-readable part of an OperationOutcome, shortened."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue", []) or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            parts.append(str(text))
    joined = "; ".join(parts)
    return joined if len(joined) <= _MAX_DIAGNOSTICS else joined[: _MAX_DIAGNOSTICS - 3] + "..."


def _check_transaction_response(
    status: int, body: Any, n_entries: int, bundle: dict[str, Any] | None
) -> DeliveryResult:
    """A 2xx must carry a transaction-response with one 2xx entry per request entry."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return DeliveryResult(
            "rejected",
            f"the EHR answered HTTP {status} without a transaction-response Bundle: is FhirBaseUrl the FHIR base?",
            status,
        )
    if body.get("type") != "transaction-response":
        return DeliveryResult(
            "rejected",
            f"the EHR answered a Bundle of type {body.get('type')!r}, not transaction-response",
            status,
        )
    entries = body.get("entry") or []
    if len(entries) != n_entries:
        return DeliveryResult(
            "rejected",
            f"the EHR's transaction-response has {len(entries)} entries for {n_entries} requests",
            status,
        )
    requests = (bundle or {}).get("entry") or [{}] * n_entries
    summary_entries = []
    report = None
    for i, (entry, sent) in enumerate(zip(entries, requests, strict=True)):
        response = (entry or {}).get("response") or {}
        entry_status = str(response.get("status", ""))
        if entry_status[:1] != "2":
            return DeliveryResult(
                "rejected",
                f"entry {i} of the transaction was not accepted (status {entry_status or 'missing'})",
                status,
            )
        location = response.get("location")
        summary_entries.append({"status": entry_status, "location": location})
        if (sent.get("resource") or {}).get("resourceType") == "DiagnosticReport":
            report = location
    return DeliveryResult(
        None,
        "delivered",
        status,
        summary={"http_status": status, "report": report, "entries": summary_entries},
    )


# --------------------------------------------------------------------------- the loop


class DeliveryLoop:
    """Claims outbox rows for ``settings.fhir_base_url`` and delivers them, until stopped.

    The token is read from the environment at each attempt (``settings.fhir_token_env``),
    so the process's current environment always applies.
    """

    def __init__(
        self,
        outbox_path: DatabaseTarget,
        settings: Settings,
        owner: str,
        poll_s: float = 1.0,
        environ: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if settings.fhir_base_url is None:
            raise ValueError("FhirBaseUrl is not set: there is nowhere to deliver to")
        self.settings = settings
        self.base_url = settings.fhir_base_url
        self.owner = f"{owner}/delivery"
        self.poll_s = poll_s
        self.environ = os.environ if environ is None else environ
        max_backoff = settings.delivery_max_backoff_seconds
        self.outbox = Outbox(outbox_path, first_backoff_s=min(1.0, max_backoff), max_backoff_s=max_backoff)
        # Long enough that a POST still in flight is never sent twice at once: two concurrent
        # conditional creates of one identifier can both create on many servers.
        self.lease_s = 4 * settings.fhir_timeout_seconds + 30
        self._transport = transport  # tests only: an in-process EHR
        self._client: FhirDeliveryClient | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.outbox.close()

    def _token(self) -> tuple[str | None, str | None]:
        """(token, error): the error when the named variable does not exist."""
        name = self.settings.fhir_token_env
        if name is None:
            return None, None
        value = self.environ.get(name)
        if value is None:
            return None, (
                f"FhirTokenEnv names the environment variable {name}, but it is not set in the worker's"
                " environment: set it and restart Orthanc"
            )
        return value, None

    def _client_for(self, token: str | None) -> FhirDeliveryClient:
        if self._client is None or self._client.token != token:
            if self._client is not None:
                self._client.close()
            verify = fhir_tls(self.settings)  # CA and, for mutual TLS, our client certificate
            self._client = FhirDeliveryClient(
                self.base_url,
                token,
                verify,
                self.settings.fhir_timeout_seconds,
                token_source=self.settings.fhir_token_env,
                transport=self._transport,
                # The outbox holds bundles built under the current FhirVersion; rows queued
                # before a change of it go out labelled with the new one.
                fhir_version=self.settings.fhir_version,
            )
        return self._client

    def run_once(self) -> bool:
        """Claim and attempt one delivery; False when nothing was due."""
        d = self.outbox.claim(self.owner, self.lease_s, destination=self.base_url)
        if d is None:
            return False
        self.attempt(d)
        return True

    def attempt(self, d: Delivery) -> DeliveryResult:
        token, problem = self._token()
        if problem is not None:
            result = DeliveryResult("auth", problem)
        else:
            try:
                result = self._client_for(token).deliver(d.bundle)
            except Exception as e:  # noqa: BLE001 - a bug must not stop deliveries of other jobs
                log.exception("job %s: delivery attempt %d crashed", d.job_id, d.attempts)
                result = DeliveryResult("retry", f"internal error: {type(e).__name__}")
        if result.ok:
            if self.outbox.delivered(d, result.summary):
                log.info("job %s: FHIR report delivered (HTTP %s)", d.job_id, result.http_status)
            else:
                log.info("job %s: delivered, but the outbox row changed meanwhile", d.job_id)
            return result
        assert result.kind is not None
        delay = self.outbox.failed_attempt(
            d, result.message, result.kind, result.http_status, result.retry_after_s
        )
        # Only network faults are described in the log: that text is ours; a refusal may quote
        # the EHR's diagnostics, which can name the patient.
        log.warning(
            "job %s: FHIR delivery attempt %d failed (%s%s%s); %s",
            d.job_id,
            d.attempts,
            result.kind,
            f", HTTP {result.http_status}" if result.http_status else "",
            f": {result.message}" if result.kind == "retry" and result.http_status is None else "",
            f"next try in {delay:.0f} s" if delay is not None else "row changed meanwhile",
        )
        return result

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Deliver until ``stop`` is set; idle polls every ``poll_s`` seconds or when ``wake`` is set."""
        log.info("FHIR delivery to %s started (%s)", self.base_url, self.owner)
        try:
            deliver_until(stop, self.run_once, self.poll_s, log, "FHIR delivery", wake)
        finally:
            self.close()
            log.info("FHIR delivery stopped (%s)", self.owner)


def start_delivery_thread(
    settings: Settings,
    owner: str,
    stop: threading.Event,
    poll_s: float = 1.0,
    wake: threading.Event | None = None,
) -> threading.Thread | None:
    """Start a :class:`DeliveryLoop` in a daemon thread; None when no FhirBaseUrl is set. Setting
    ``wake`` makes an idle loop look at the outbox at once (a job just succeeded)."""
    if settings.fhir_base_url is None:
        return None
    loop = DeliveryLoop(settings.database(), settings, owner, poll_s=poll_s)
    t = threading.Thread(target=loop.run, args=(stop, wake), name="fhir-delivery", daemon=True)
    t.start()
    return t
