"""Wiring inside Orthanc: configuration, callbacks, REST routes, worker supervision.

Only light work happens here (Orthanc's Python plugin shares one GIL with every Python
route); volumes, inference and encoding run in the worker processes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import orthanc  # provided by Orthanc's Python plugin

from orthanc_plugin.core.config import (
    PipelineConfig,
    Settings,
    load_pipelines,
    load_settings,
    settings_to_json,
)
from orthanc_plugin.core.logs import add_plugin_log_file
from orthanc_plugin.core.paths import INSTALL_ROOT
from orthanc_plugin.core.tls import triton_tls_options
from orthanc_plugin.intake.changes import Intake
from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient
from orthanc_plugin.orthanc_rest.forwarding import reforward
from orthanc_plugin.orthanc_rest.labels import StudyLabels
from orthanc_plugin.server.api import Api, TextAnswer, internal_error
from orthanc_plugin.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from orthanc_plugin.server.metrics import render_metrics
from orthanc_plugin.server.stow_users import StowUsers, method_name
from orthanc_plugin.worker.supervisor import Supervisor

log = logging.getLogger("orthanc_ai")
UI_DIR = Path(__file__).resolve().parent / "ui"
UI_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Orthanc Explorer 1.10 (jQuery Mobile): an "AI jobs" button beside "Jobs" on the home page.
EXPLORER_JS = """
$('#lookup').live('pagebeforecreate', function() {
  if ($('#orthanc-ai-jobs').length) return;
  var link = $('<a>').attr({ id: 'orthanc-ai-jobs', href: '../ai/ui/index.html', 'data-role': 'button',
    'data-icon': 'grid', 'data-ajax': 'false', rel: 'external' }).text('AI jobs');
  $('#lookup div[data-role="header"] .ui-btn-right').first().append(link);
});
"""
# Orthanc hands /ai/ui and /ai/ui/ to the plugin as the same URI, so a redirect cannot tell them
# apart; this page sends the browser on to index.html relative to wherever it really is.
UI_ENTRY = (
    '<!DOCTYPE html><meta charset="utf-8"><title>Orthanc AI</title>'
    "<script>location.replace(location.pathname.replace(/\\/*$/, '/') + 'index.html')</script>"
    "<noscript>The AI admin page needs JavaScript: open /ai/ui/index.html</noscript>"
)


#: third-party files the admin page loads, under /ai/ui/vendor/: installed by scripts/install.sh
#: (npm ci in ui/vendor, from its committed lock file), never committed themselves
VENDOR_FILES = {"chart.umd.js": UI_DIR / "vendor" / "node_modules" / "chart.js" / "dist" / "chart.umd.min.js"}


def ui_file(rel: str) -> tuple[bytes, str] | None:
    """(content, MIME type) of a file of the admin page under ``UI_DIR``, else None (never outside it)."""
    rel = rel.lstrip("/")
    if rel.startswith("vendor/") and rel[len("vendor/") :] in VENDOR_FILES:
        vendor = VENDOR_FILES[rel[len("vendor/") :]]
        return (vendor.read_bytes(), UI_TYPES[".js"]) if vendor.is_file() else None
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9]+)", rel):  # one plain file name, no "..", no "/"
        return None
    path = UI_DIR / rel
    mime = UI_TYPES.get(path.suffix)
    if mime is None or not path.is_file():
        return None
    return path.read_bytes(), mime


_send_status_form: int | None = None  # 3: plugin 4.x (status, body, length); 2: plugin 5+ (status, body)


def send_http_status(output: Any, status: int, data: str) -> None:
    """Answer a non-200 status with ``data`` as body on every Python plugin version.

    Plugin 4.x takes ``SendHttpStatus(status, body, length)``, plugin 5.0 ``(status, body)``; the
    wrong form raises TypeError before anything is sent, so the first answer finds out which
    one this Orthanc has (no content type can be set through this call).
    """
    global _send_status_form
    if _send_status_form != 2:
        try:
            output.SendHttpStatus(status, data, len(data.encode("utf-8")))
            _send_status_form = 3
            return
        except TypeError:
            if _send_status_form == 3:
                raise
    output.SendHttpStatus(status, data)
    _send_status_form = 2


class _OrthancLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = f"[orthanc-ai] {record.name}: {self.format(record)}"
        if record.levelno >= logging.ERROR:
            orthanc.LogError(msg)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(msg)
        else:
            orthanc.LogInfo(msg)


def _rest_get(path: str) -> Any:
    try:
        return json.loads(orthanc.RestApiGet(path))
    except orthanc.OrthancException as e:
        if e.args and e.args[0] == orthanc.ErrorCode.UNKNOWN_RESOURCE:
            raise LookupError(path) from None
        raise


def _rest_put(path: str) -> None:
    orthanc.RestApiPut(path, b"")


def _rest_delete(path: str) -> None:
    orthanc.RestApiDelete(path)


def basic_credentials(headers: dict[str, Any]) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header (keys lower-case), else None."""
    value = str(headers.get("authorization") or "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None


def authenticate(headers: dict[str, Any], users: dict[str, str]) -> str | None:
    """The user whose Basic credentials match ``users`` (Orthanc's RegisteredUsers), else None.

    Orthanc has already checked the password before a plugin route runs (checked on 1.10.1);
    this check is kept so the API never trusts a header it has not verified.
    """
    creds = basic_credentials(headers)
    if creds is None or creds[0] not in users:
        return None
    expected = str(users[creds[0]]).encode("utf-8")
    return creds[0] if hmac.compare_digest(creds[1].encode("utf-8"), expected) else None


class Plugin:
    def __init__(self) -> None:
        config = json.loads(orthanc.GetConfiguration())
        self.settings: Settings = load_settings(config, "Orthanc configuration (OrthancAI)")
        self.authentication = bool(config.get("AuthenticationEnabled", False))
        users = config.get("RegisteredUsers") or {}
        self.users: dict[str, str] = (
            {str(k): str(v) for k, v in users.items()} if isinstance(users, dict) else {}
        )
        assert self.settings.job_store is not None
        # Our own records as JSON lines beside the workers' logs (Orthanc's log keeps a copy).
        add_plugin_log_file(self.settings.log_dir or self.settings.job_store.parent / "logs")
        if self.settings.admin_users is not None and not self.authentication:
            log.warning("OrthancAI.AdminUsers is ignored: Orthanc authentication is off")
        self.pipelines: list[PipelineConfig] = load_pipelines(self.settings.pipelines_file)
        assert self.settings.job_store is not None
        database = self.settings.database()  # the SQLite file, or PostgreSQL when scaled out
        self.store = JobStore(database)
        self.outbox = Outbox(database)  # health reads the delivery backlog
        # AI state as study labels where this Orthanc has them (found out in start()).
        self.labels = StudyLabels(_rest_get, _rest_put, _rest_delete)
        self._labels_store = JobStore(database)
        self._labels_lock = threading.Lock()
        stable_age = float(config.get("StableAge", 60))
        delay = self.settings.catch_up_delay_seconds
        self.intake = Intake(
            _rest_get,
            JobStore(database),  # the intake thread gets its own connection
            lambda: self.pipelines,
            max_attempts=self.settings.max_attempts,
            catch_up_delay_s=stable_age if delay < 0 else delay,
            series_quiet_s=self.settings.series_quiet_seconds,
            # Several Orthancs can share a PostgreSQL index: change numbers may then appear out
            # of order. A SQLite index has one writer and its gaps are deleted resources.
            wait_for_gaps=bool((config.get("PostgreSQL") or {}).get("EnableIndex", False)),
            # A revised SEG counts as a review only from a reviewer (the API's rule).
            may_review=lambda user: self.api.may_review(user),
            authentication=self.authentication,
            on_queued=self._label_study,
        )
        self.api = Api(
            JobStore(database),
            self.intake,
            lambda: self.pipelines,
            self.health,
            self.reload_pipelines,
            authentication=self.authentication,
            admin_users=self.settings.admin_users,
            reviewer_users=self.settings.reviewer_users,
            forward=self.forward_job,
            viewer_url=(self.settings.viewer_url or "").strip().rstrip("/") or None,
            changed=self._label_study,
        )
        self._api_lock = threading.Lock()
        # Who stores by STOW-RS (a viewer's corrected SEG): only with authentication, where
        # Orthanc has checked the credentials the filter reads.
        self.stow_users: StowUsers | None = None
        if self.authentication:
            self._stow_store = JobStore(database)
            self._stow_lock = threading.Lock()
            dicomweb_root = str((config.get("DicomWeb") or {}).get("Root") or "/dicom-web/")
            self.stow_users = StowUsers(
                lambda headers: authenticate({str(k).lower(): v for k, v in headers.items()}, self.users),
                self._record_stow_user,
                dicomweb_root,
            )
        work_dir = self.settings.job_store.parent
        work_dir.mkdir(parents=True, exist_ok=True)  # the SQLite store made it; PostgreSQL does not
        settings_file = work_dir / "worker-settings.json"
        settings_file.write_text(settings_to_json(self.settings))
        python = (
            self.settings.worker_python
            or Path(os.environ.get("ORTHANC_AI_VENV", INSTALL_ROOT / ".venv")) / "bin/python"
        )
        self.supervisor = Supervisor(
            python, settings_file, self.settings.workers, database,
            self.settings.log_dir or work_dir / "logs",
        )  # fmt: skip
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self._triton: Any = None

    # ------------------------------------------------------------------ lifecycle

    def on_change(self, change_type: int, level: int, resource: str) -> None:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            self.intake.wake.set()
        elif change_type in (orthanc.ChangeType.NEW_INSTANCE, orthanc.ChangeType.NEW_SERIES):
            if self.settings.series_quiet_seconds > 0:
                self.intake.wake.set()  # per-series start: the intake notes when each series was last fed
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            self.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.shutdown()

    def _record_stow_user(self, key: str, user: str) -> None:
        with self._stow_lock:
            self._stow_store.set_kv(key, user)

    def http_filter(self, uri: str, **request: Any) -> bool:
        """Orthanc's incoming-request filter: notes the user of a STOW-RS; never refuses."""
        if self.stow_users is not None:
            try:
                self.stow_users.on_request(
                    uri, method_name(request.get("method", "")), request.get("headers") or {}
                )
            except Exception:  # noqa: BLE001 - a failure here must not refuse the request
                log.exception("noting the user of %s failed", uri)
        return True

    def on_stored(self, dicom: Any, instance_id: str) -> None:
        """Orthanc's stored-instance callback: records who stored it by STOW-RS."""
        if self.stow_users is not None:
            try:
                self.stow_users.on_stored(instance_id)
            except Exception:  # noqa: BLE001 - the instance is stored; the credit falls back
                log.exception("recording who stored instance %s failed", instance_id)

    def _label_study(self, job: Any) -> None:
        """The study's AI label after its job was queued, retried or cancelled here."""
        with self._labels_lock:
            self.labels.sync(self._labels_store, job.study_uid, job.orthanc_study_id)

    def start(self) -> None:
        if self.labels.detect():
            log.warning("study labels: on (%s)", ", ".join(self.labels.status()["labels"]))
        else:
            log.warning("study labels: skipped: %s", self.labels.reason)
        self.supervisor.start()
        for name, target in (("intake", lambda: self.intake.run(self.stop)), ("supervisor", self._supervise)):
            t = threading.Thread(target=target, name=f"orthanc-ai-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        log.warning(
            "started: %d pipeline(s) [%s], %d worker(s), job store %s",
            len(self.pipelines), ", ".join(p.name for p in self.pipelines), self.settings.workers,
            self.settings.database(),
        )  # fmt: skip

    def _supervise(self) -> None:
        self.supervisor.run(self.stop)

    def shutdown(self) -> None:
        # Threads left running at ORTHANC_STOPPED hang Orthanc's shutdown: stop and join them.
        self.stop.set()
        self.intake.wake.set()
        for t in self.threads:
            t.join(timeout=10)
        self.supervisor.stop()
        log.warning("stopped")

    def reload_pipelines(self) -> list[PipelineConfig]:
        """Re-read the pipelines file; on error the running rules stay and the error is raised.

        Workers read the file when they start; the supervisor restarts them so they see it too.
        """
        pipelines = load_pipelines(self.settings.pipelines_file)
        self.pipelines = pipelines
        self.supervisor.restart_all()
        log.warning("pipelines reloaded: %s", ", ".join(f"{p.name} {p.version}" for p in pipelines))
        return pipelines

    def forward_job(self, jid: str, everything: bool) -> dict[str, Any]:
        """``POST /ai/jobs/{id}/forward``: Orthanc sends the job's SEG/SR again (see forwarding.py).

        Goes through Orthanc's REST API over HTTP like the workers (not the SDK, which would hold
        the GIL for as long as the C-STORE or STOW-RS takes).
        """
        s = self.settings
        password = os.environ.get(s.orthanc_password_env) if s.orthanc_password_env else None
        client = OrthancClient(
            s.orthanc_url, s.orthanc_username, password, timeout_s=s.forward_timeout_seconds + 10
        )
        try:
            return reforward(client, self.api.store, self.api.store.get(jid), self.pipelines, s, everything)
        finally:
            client.close()

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        from orthanc_plugin.inference.triton import TritonClient

        if self._triton is None:
            self._triton = TritonClient(
                self.settings.triton_url, use_shared_memory=False, timeout_s=3,
                **triton_tls_options(self.settings),
            )  # fmt: skip
        try:
            triton_ok = bool(self._triton.is_ready())
        except Exception:
            triton_ok = False
        workers = self.supervisor.status()
        alive = sum(1 for w in workers if w["alive"])
        queue = self.store.counts()
        ok = triton_ok and alive == len(workers)
        return {
            "ok": ok,
            "triton": {"url": self.settings.triton_url, "ready": triton_ok},
            "workers": {"expected": len(workers), "alive": alive, "detail": workers},
            "queue": queue,
            "fhir_backlog": self.outbox.backlog(),
            "intake": {
                "last_change": self.intake.position,
                # per-series start: the quiet time, and the series being received right now
                "series_quiet_seconds": self.intake.series_quiet_s,
                "series_receiving": self.intake.receiving,
            },
            "labels": self.labels.status(),
        }

    # ------------------------------------------------------------------ REST

    def rest(self, output: Any, uri: str, **request: Any) -> None:
        method = str(request.get("method", "GET"))
        query = {str(k): str(v) for k, v in (request.get("get") or {}).items()}
        body = request.get("body") or b""
        path = uri[len("/ai") :] or "/"
        user: str | None = None
        if self.authentication:
            user = authenticate(request.get("headers") or {}, self.users)
            if user is None:  # never log the header: it carries the password
                output.SendUnauthorized("orthanc-ai")
                return
        if method == "GET" and (path == "/ui" or path.startswith("/ui/") or path.rstrip("/") == "/metrics"):
            self._serve_extra(output, path)
            return
        with self._api_lock:  # one sqlite connection serves the API
            try:
                headers = {str(k).lower(): str(v) for k, v in (request.get("headers") or {}).items()}
                status, payload = self.api.handle(method, path.rstrip("/") or "/", query, body, user, headers)
            except Exception:  # noqa: BLE001 - Api.handle answers its own errors; this is the last net
                status, payload = internal_error(f"{method} /ai{path}")
        if status == 200 and isinstance(payload, TextAnswer):
            output.AnswerBuffer(payload.body.encode("utf-8"), payload.content_type)
            return
        data = json.dumps(payload, indent=2, default=str)  # ASCII: len() is the byte length
        if status == 200:
            output.AnswerBuffer(data, "application/json")
        elif status == 405:
            # Orthanc refuses 401/405 through SendHttpStatus (it drops the connection instead).
            output.SendMethodNotAllowed(",".join(payload.get("allowed") or ["GET"]))
        else:
            send_http_status(output, status, data)

    def _serve_extra(self, output: Any, path: str) -> None:
        """GET /ai/ui[/...] (the admin page's static files) and /ai/metrics (Prometheus)."""
        if path.rstrip("/") == "/metrics":
            with self._api_lock:
                text = render_metrics(
                    self.api.store, self.api.outbox, self.health(), reviews=self.api.reviews
                )
            output.AnswerBuffer(text.encode("utf-8"), METRICS_CONTENT_TYPE)
            return
        if path.rstrip("/") == "/ui":
            output.AnswerBuffer(UI_ENTRY, UI_TYPES[".html"])
            return
        found = ui_file(path[len("/ui/") :])
        if found is None:
            send_http_status(output, 404, json.dumps({"error": f"no such file: /ai{path}"}))
            return
        output.AnswerBuffer(found[0], found[1])


_plugin: Plugin | None = None


def register() -> None:
    """Called by the entry script that Orthanc loads."""
    global _plugin
    handler = _OrthancLogHandler()
    logging.getLogger("orthanc_ai").addHandler(handler)
    logging.getLogger("orthanc_ai").setLevel(logging.INFO)
    try:
        _plugin = Plugin()
    except Exception:
        # An exception while the script loads kills Orthanc with only the class name logged.
        orthanc.LogError("[orthanc-ai] cannot start:\n" + traceback.format_exc())
        sys.stderr.flush()
        raise
    orthanc.RegisterOnChangeCallback(_plugin.on_change)
    orthanc.RegisterRestCallback("/ai/(.*)", _plugin.rest)
    orthanc.RegisterRestCallback("/ai", _plugin.rest)
    if _plugin.stow_users is not None:
        orthanc.RegisterIncomingHttpRequestFilter(_plugin.http_filter)
        orthanc.RegisterOnStoredInstanceCallback(_plugin.on_stored)
    orthanc.ExtendOrthancExplorer(EXPLORER_JS)
