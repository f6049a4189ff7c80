"""REST API under ``/ai/``: pure request -> (status, JSON) handling, wired to Orthanc by plugin.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orthanc_plugin.core.config import PipelineConfig
from orthanc_plugin.fhir.read_api import FhirReports
from orthanc_plugin.intake.changes import Intake, StudyGone
from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.store import Job, JobStateError, JobStore
from orthanc_plugin.orthanc_rest import forwarding
from orthanc_plugin.server.audit import build_audit

Response = tuple[int, Any]


def job_json(
    job: Job,
    detail: bool = False,
    events: list[dict[str, Any]] | None = None,
    delivery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "pipeline": job.pipeline,
        "pipeline_version": job.pipeline_version,
        "study": {"StudyInstanceUID": job.study_uid, "ID": job.orthanc_study_id},
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "stage": job.stage,
        "error": job.error,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "duration_s": round(job.finished - job.started, 3) if job.finished and job.started else None,
        "series": {
            role: {k: v for k, v in r.items() if k != "instances"}
            | {"instances": len(r.get("instances", []))}
            for role, r in job.input.get("roles", {}).items()
        },
        "timings": job.timings,
        "outputs": job.outputs,
        "delivery": delivery,
    }
    if detail:
        out["key"] = {"fingerprint": job.fingerprint}
        out["fhir"] = job.fhir
        out["events"] = events or []
        out["lease"] = {"owner": job.lease_owner, "expires": job.lease_expires}
    return out


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ValueError('body must be JSON, e.g. {"pipeline": "ct-lung"}') from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def pipeline_json(p: PipelineConfig) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "enabled": p.enabled,
        "priority": p.priority,
        "description": p.description,
        "algorithm": p.algorithm_name,
        "model": {"name": p.model.name, "version": p.model.version or "latest"},
        "inputs": [r.role for r in p.inputs],
        "segments": [s.name for s in p.segments],
    }


# Authorisation: when Orthanc authentication is on and OrthancAI.AdminUsers lists users, only
# they may call routes that change state: every method but GET, except the POSTs listed here,
# which only read. New routes are thus admin-only unless marked read-only on purpose.
READ_ONLY_POSTS: frozenset[str] = frozenset({r"/routes/dry-run"})


def changes_state(pattern: str, method: str) -> bool:
    """Whether a route (pattern relative to /ai, method) changes state: retry, cancel, run, reload..."""
    return method != "GET" and not (method == "POST" and pattern in READ_ONLY_POSTS)


@dataclass
class Api:
    store: JobStore
    intake: Intake
    pipelines: Callable[[], list[PipelineConfig]]
    health: Callable[[], dict[str, Any]]
    reload: Callable[[], list[PipelineConfig]] | None = None
    # Authorisation of state-changing routes (see ``may_change_state``): set by plugin.py from
    # Orthanc's "AuthenticationEnabled" and the OrthancAI "AdminUsers" list.
    authentication: bool = False
    admin_users: list[str] | None = None
    # POST /ai/jobs/{id}/forward: (job id, every destination?) -> new forwarding status (plugin.py).
    forward: Callable[[str, bool], dict[str, Any]] | None = None
    # Called with a job after a retry or cancel through the API (plugin.py: the study's label).
    changed: Callable[[Job], None] | None = None

    def __post_init__(self) -> None:
        self.reports = FhirReports(self.store.path)
        self.outbox = Outbox(self.store.path)

    def _job(self, job: Job, detail: bool = False) -> dict[str, Any]:
        events = self.store.events(job.id) if detail else None
        out = job_json(job, detail, events, self.outbox.status_for_job(job.id))
        if events is not None:
            # The current state of forwarding (attempts made after the job ended included).
            out["forwarding"] = forwarding.status_from_events(events)
        return out

    def may_change_state(self, user: str | None) -> bool:
        """Without authentication anyone reaching Orthanc may; with it, an admin user (or any user
        when no ``AdminUsers`` list is configured)."""
        if not self.authentication or self.admin_users is None:
            return True
        return user is not None and user in self.admin_users

    def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes, user: str | None = None
    ) -> Response:
        """Dispatch one request; ``path`` is relative to ``/ai`` (e.g. ``/jobs/abc``).

        ``user`` is the authenticated Orthanc user (None when authentication is off).
        """
        try:
            for pattern, verb, fn in self._routes():
                m = re.fullmatch(pattern, path)
                if m and verb == method:
                    if changes_state(pattern, verb) and not self.may_change_state(user):
                        return 403, {
                            "error": f"forbidden: user {user!r} may not {method} /ai{path}; "
                            "routes that change state need an admin user (OrthancAI.AdminUsers)",
                            "user": user,
                            "required": "admin",
                        }
                    return fn(query, body, *m.groups())
            allowed = sorted({v for p, v, _ in self._routes() if re.fullmatch(p, path)})
            if allowed:
                return 405, {"error": f"method {method} not allowed on /ai{path}", "allowed": allowed}
            return 404, {"error": f"no such route: /ai{path}"}
        except KeyError as e:
            return 404, {"error": f"not found: {e.args[0]}"}
        except JobStateError as e:
            return 409, {"error": str(e)}
        except ValueError as e:
            return 400, {"error": str(e)}

    def _routes(self) -> list[tuple[str, str, Callable[..., Response]]]:
        return [
            (r"/jobs", "GET", self.list_jobs),
            (r"/jobs/([0-9a-f]+)", "GET", self.get_job),
            (r"/jobs/([0-9a-f]+)/retry", "POST", self.retry_job),
            (r"/jobs/([0-9a-f]+)/cancel", "POST", self.cancel_job),
            (r"/jobs/([0-9a-f]+)/audit", "GET", self.job_audit),
            (r"/jobs/([0-9a-f]+)/forward", "POST", self.forward_job),
            (r"/studies/([0-9A-Za-z._-]+)/run", "POST", self.run_study),
            (r"/studies/([0-9A-Za-z._-]+)/dry-run", "GET", self.dry_run),
            (r"/routes/dry-run", "POST", self.dry_run_body),
            (r"/routes/reload", "POST", self.reload_routes),
            (r"/pipelines", "GET", self.list_pipelines),
            (r"/health", "GET", self.get_health),
            (r"/fhir/DiagnosticReport", "GET", self.search_reports),
            (r"/fhir/(DiagnosticReport|Observation|Device)/([0-9A-Fa-f-]+)", "GET", self.read_fhir),
            (r"/deliveries", "GET", self.list_deliveries),
        ]

    def list_jobs(self, query: Mapping[str, str], body: bytes) -> Response:
        limit = int(query.get("limit", "200"))
        jobs = self.store.list_jobs(query.get("state") or None, query.get("study") or None, limit)
        return 200, [self._job(j) for j in jobs]

    def get_job(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        return 200, self._job(self.store.get(jid), detail=True)

    def retry_job(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        return 200, self._job(self._changed(self.store.retry(jid)))

    def cancel_job(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        return 200, self._job(self._changed(self.store.cancel(jid)))

    def _changed(self, job: Job) -> Job:
        if self.changed is not None:
            self.changed(job)
        return job

    def job_audit(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        job = self.store.get(jid)
        pipeline = next((p for p in self.pipelines() if p.name == job.pipeline), None)
        return 200, build_audit(job, self.store.events(jid), self.outbox.status_for_job(jid), pipeline)

    def forward_job(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        """Send a succeeded job's SEG/SR again to its destinations (those not delivered yet, or all
        with ``{"all": true}``); one attempt each, answered when done."""
        if self.forward is None:
            return 501, {"error": "forwarding is not available"}
        data = _json_object(body) if body.strip() else {}
        everything = data.get("all", False)
        if not isinstance(everything, bool):
            raise ValueError('"all" must be true or false')
        self.store.get(jid)  # 404 for an unknown job
        return 200, self.forward(jid, everything)

    def search_reports(self, query: Mapping[str, str], body: bytes) -> Response:
        return 200, self.reports.search(query)

    def read_fhir(self, query: Mapping[str, str], body: bytes, resource_type: str, rid: str) -> Response:
        return 200, self.reports.read(resource_type, rid)

    def list_deliveries(self, query: Mapping[str, str], body: bytes) -> Response:
        limit = int(query.get("limit", "200"))
        return 200, self.outbox.list(query.get("state") or None, limit=limit)

    def run_study(self, query: Mapping[str, str], body: bytes, study_id: str) -> Response:
        only: str | None = None
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                raise ValueError('body must be JSON, e.g. {"pipeline": "ct-lung"}') from None
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object")
            only = data.get("pipeline")
            if only is not None and only not in {p.name for p in self.pipelines()}:
                raise KeyError(f"pipeline {only}")
        try:
            results = self.intake.evaluate(study_id, only=only, rerun=True)
        except StudyGone:
            raise KeyError(f"study {study_id}") from None
        return 200, [
            {
                "pipeline": r.decision.pipeline,
                "matched": r.decision.matched,
                "reason": r.decision.reason,
                "job": job_json(r.job) if r.job else None,
                "queued": r.created,
            }
            for r in results
        ]

    def dry_run(self, query: Mapping[str, str], body: bytes, study_id: str) -> Response:
        try:
            decisions = self.intake.dry_run(study_id)
        except StudyGone:
            raise KeyError(f"study {study_id}") from None
        return 200, [d.to_json() for d in decisions]

    def dry_run_body(self, query: Mapping[str, str], body: bytes) -> Response:
        data = _json_object(body)
        study = data.get("study")
        if not isinstance(study, str) or not study:
            raise ValueError('body must name the Orthanc study id: {"study": "<orthanc-study-id>"}')
        return self.dry_run(query, b"", study)

    def reload_routes(self, query: Mapping[str, str], body: bytes) -> Response:
        if self.reload is None:
            return 501, {"error": "reloading is not available"}
        pipelines = self.reload()  # raises ConfigError (a ValueError): the old rules stay in force
        return 200, {"reloaded": True, "pipelines": [pipeline_json(p) for p in pipelines]}

    def list_pipelines(self, query: Mapping[str, str], body: bytes) -> Response:
        return 200, [pipeline_json(p) for p in self.pipelines()]

    def get_health(self, query: Mapping[str, str], body: bytes) -> Response:
        h = self.health()
        return (200 if h.get("ok") else 503), h
