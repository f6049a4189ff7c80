"""REST API under ``/ai/``: pure request -> (status, JSON) handling, wired to Orthanc by plugin.py."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from orthanc_plugin.core.config import ConfigError, PipelineConfig
from orthanc_plugin.core.errors import BadRequest, NotFound
from orthanc_plugin.fhir.read_api import FhirReports
from orthanc_plugin.intake.changes import Intake, StudyGone
from orthanc_plugin.jobs.outbox import HL7, Outbox
from orthanc_plugin.jobs.reviews import Review, Reviews, outbox_key
from orthanc_plugin.jobs.store import Job, JobStateError, JobStore
from orthanc_plugin.monitoring.report import (
    RECENT_JOBS,
    REFERENCE_JOBS,
    load_records,
    model_report,
    models_summary,
)
from orthanc_plugin.orthanc_rest import forwarding
from orthanc_plugin.server.audit import build_audit

Response = tuple[int, Any]


@dataclass(frozen=True)
class TextAnswer:
    """A 200 answer that is not JSON (the CSV export): its body and content type."""

    body: str
    content_type: str


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
        "priority": job.priority,
        "urgent": job.input.urgent,
        # supersession (a late image changed the job's series): the job this one replaces; the
        # one that replaces it is added by the API (``superseded_by``)
        "supersedes": job.input.supersedes,
        "deferred_until": job.not_before if job.state == "queued" and job.not_before > job.created else None,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "stage": job.stage,
        "error": job.error,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "duration_s": round(job.finished - job.started, 3) if job.finished and job.started else None,
        "series": {
            role: r.to_json() | {"instances": len(r.instances)} for role, r in job.input.roles.items()
        },
        "timings": job.timings,
        "outputs": job.outputs.to_json() if job.outputs is not None else {},
        "delivery": delivery,
    }
    if detail:
        out["key"] = {"fingerprint": job.fingerprint}
        out["fhir"] = job.fhir
        out["events"] = events or []
        out["lease"] = {"owner": job.lease_owner, "expires": job.lease_expires}
    return out


MAX_LIMIT = 10_000
log = logging.getLogger("orthanc_ai.api")


def query_limit(query: Mapping[str, str], default: int = 200) -> int:
    """``?limit=N``: a whole number from 1 to MAX_LIMIT."""
    text = query.get("limit", str(default))
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text[:20]!r}")
    return int(text)


def internal_error(what: str) -> Response:
    """A 500 whose body holds only an error id; the log holds the id with the traceback."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("internal error %s in %s", error_id, what)
    return 500, {
        "error": "internal error; the Orthanc log has the details under this id",
        "error_id": error_id,
    }


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest('body must be JSON, e.g. {"pipeline": "ct-lung"}') from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
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
# Routes a reviewer (OrthancAI.ReviewerUsers) calls instead of an admin.
REVIEW_ROUTES: frozenset[str] = frozenset({r"/jobs/([0-9a-f]+)/review"})
#: Who reviewed when Orthanc authentication is off (nobody is known).
ANONYMOUS_REVIEWER = "anonymous"


def cross_site(headers: Mapping[str, str]) -> str | None:
    """Why a request comes from another site (None when it does not, or is not from a browser).

    A web page on another site can make a logged-in browser send a POST here (the browser adds
    the saved credentials). Browsers say where a request comes from: ``Sec-Fetch-Site``, then
    ``Origin``, then ``Referer``; each is compared with the ``Host`` the request was sent to.
    Clients that are not browsers (scripts, curl) send none of them and are not affected.
    """
    host = headers.get("host", "").strip().lower()
    fetch_site = headers.get("sec-fetch-site", "").strip().lower()
    if fetch_site in ("cross-site", "same-site"):
        return f"the browser marks the request as {fetch_site}"
    for name in ("origin", "referer"):
        value = headers.get(name, "").strip()
        if not value:
            continue
        if value == "null":
            return f"{name.capitalize()} is null (a sandboxed or file page)"
        source = urlsplit(value).netloc.lower()
        if not host or source != host:
            return f"{name.capitalize()} {source or value!r} is not this server ({host or 'no Host header'})"
        return None
    return None


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
    # Who may review (accept, reject): with authentication on, only the users listed here.
    reviewer_users: list[str] | None = None
    # POST /ai/jobs/{id}/forward: (job id, every destination?) -> new forwarding status (plugin.py).
    forward: Callable[[str, bool], dict[str, Any]] | None = None
    # The OHIF viewer's base URL (OrthancAI.ViewerUrl) the admin page links studies to; None: no link.
    viewer_url: str | None = None
    # Called with a job after a retry or cancel through the API (plugin.py: the study's label).
    changed: Callable[[Job], None] | None = None

    def __post_init__(self) -> None:
        self.reports = FhirReports(self.store.path)
        self.outbox = Outbox(self.store.path)
        self.hl7_outbox = Outbox(self.store.path, table=HL7)
        self.reviews = Reviews(self.store.path)

    def _job(self, job: Job, detail: bool = False) -> dict[str, Any]:
        events = self.store.events(job.id) if detail else None
        out = job_json(job, detail, events, self.outbox.status_for_job(job.id))
        out["superseded_by"] = self.store.superseded_by(job.id)
        # HL7 ORU deliveries, one per destination ([] when the pipeline sends none).
        out["hl7"] = self.hl7_outbox.statuses_for_job(job.id)
        if job.state == "succeeded":
            trail = self.reviews.for_job(job.id)
            out["review"] = self._review_json(trail[-1]) if trail else {"state": "pending"}
            if detail:
                out["reviews"] = [self._review_json(r) for r in trail]
        if events is not None:
            # The current state of forwarding (attempts made after the job ended included).
            out["forwarding"] = forwarding.status_from_events(events)
        return out

    def _review_json(self, r: Review) -> dict[str, Any]:
        return r.to_json() | {"delivery": self.outbox.status_for_job(outbox_key(r.job_id, r.n))}

    def may_review(self, user: str | None) -> bool:
        """Without authentication anyone reaching Orthanc may; with it, only ``ReviewerUsers``."""
        if not self.authentication:
            return True
        return user is not None and user in (self.reviewer_users or [])

    def may_change_state(self, user: str | None) -> bool:
        """Without authentication anyone reaching Orthanc may; with it, an admin user (or any user
        when no ``AdminUsers`` list is configured)."""
        if not self.authentication or self.admin_users is None:
            return True
        return user is not None and user in self.admin_users

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Dispatch one request; ``path`` is relative to ``/ai`` (e.g. ``/jobs/abc``).

        ``user`` is the authenticated Orthanc user (None when authentication is off); ``headers``
        the request's headers, names in lower case.
        """
        try:
            for pattern, verb, fn in self._routes():
                m = re.fullmatch(pattern, path)
                if m and verb == method:
                    refused = cross_site(headers or {}) if changes_state(pattern, verb) else None
                    if refused is not None:
                        return 403, {
                            "error": f"forbidden: {refused}; state-changing routes accept only same-origin requests"
                        }
                    if pattern in REVIEW_ROUTES:
                        if not self.may_review(user):
                            return 403, {
                                "error": f"forbidden: user {user!r} may not review; reviewers are listed in"
                                " OrthancAI.ReviewerUsers",
                                "user": user,
                                "required": "reviewer",
                            }
                        return fn(query, body, *m.groups(), user=user)
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
        except NotFound as e:
            return 404, {"error": f"not found: {e}"}
        except JobStateError as e:
            return 409, {"error": str(e)}
        except (BadRequest, ConfigError) as e:
            return 400, {"error": str(e)}
        except Exception:  # noqa: BLE001 - a bug: logged with its id, the caller sees only the id
            return internal_error(f"{method} /ai{path}")

    def _routes(self) -> list[tuple[str, str, Callable[..., Response]]]:
        return [
            (r"/jobs", "GET", self.list_jobs),
            (r"/jobs/([0-9a-f]+)", "GET", self.get_job),
            (r"/jobs/([0-9a-f]+)/retry", "POST", self.retry_job),
            (r"/jobs/([0-9a-f]+)/cancel", "POST", self.cancel_job),
            (r"/jobs/([0-9a-f]+)/audit", "GET", self.job_audit),
            (r"/jobs/([0-9a-f]+)/forward", "POST", self.forward_job),
            (r"/jobs/([0-9a-f]+)/features", "GET", self.job_features),
            (r"/jobs/([0-9a-f]+)/review", "POST", self.review_job),
            (r"/jobs/([0-9a-f]+)/reviews", "GET", self.job_reviews),
            (r"/studies/([0-9A-Za-z._-]+)/run", "POST", self.run_study),
            (r"/studies/([0-9A-Za-z._-]+)/dry-run", "GET", self.dry_run),
            (r"/routes/dry-run", "POST", self.dry_run_body),
            (r"/routes/reload", "POST", self.reload_routes),
            (r"/pipelines", "GET", self.list_pipelines),
            (r"/health", "GET", self.get_health),
            (r"/fhir/DiagnosticReport", "GET", self.search_reports),
            (r"/fhir/(DiagnosticReport|Observation|Device)/([0-9A-Fa-f-]+)", "GET", self.read_fhir),
            (r"/deliveries", "GET", self.list_deliveries),
            (r"/models", "GET", self.list_models),
            (r"/models/([0-9A-Za-z._-]+)/monitoring", "GET", self.model_monitoring),
            (r"/viewer", "GET", self.get_viewer),
        ]

    def list_models(self, query: Mapping[str, str], body: bytes) -> Response:
        """Every model that produced succeeded jobs, with the job count of each version."""
        return 200, models_summary(load_records(self.store, self.reviews))

    def model_monitoring(self, query: Mapping[str, str], body: bytes, name: str) -> Response:
        """Reviews, edits and drift of a model per version (docs/monitoring.md); ``?reference=N``
        and ``?recent=M`` size the windows in jobs."""
        sizes = {}
        for key, default in (("reference", REFERENCE_JOBS), ("recent", RECENT_JOBS)):
            text = query.get(key, str(default))
            if not text.isdigit() or not 2 <= int(text) <= MAX_LIMIT:
                raise BadRequest(
                    f"{key} must be a whole number of jobs from 2 to {MAX_LIMIT}, got {text[:20]!r}"
                )
            sizes[key] = int(text)
        report = model_report(
            load_records(self.store, self.reviews), name, sizes["reference"], sizes["recent"]
        )
        if not report["versions"] and name not in {p.model.name for p in self.pipelines()}:
            raise NotFound(f"model {name}: no pipeline uses it and no job ran it")
        return 200, report

    def get_viewer(self, query: Mapping[str, str], body: bytes) -> Response:
        """Where the admin page opens a study: OHIF's segmentation mode under ``url``
        (``/segmentation?StudyInstanceUIDs=``, where the AI SEG can be corrected and saved)."""
        return 200, {"url": self.viewer_url}

    def list_jobs(self, query: Mapping[str, str], body: bytes) -> Response:
        limit = query_limit(query)
        review = query.get("review") or None
        jobs = self.store.list_jobs(
            query.get("state") or None, query.get("study") or None, limit, review=review,
            # The review queue is worked oldest first.
            oldest_first=review == "pending",
        )  # fmt: skip
        return 200, [self._job(j) for j in jobs]

    def review_job(
        self, query: Mapping[str, str], body: bytes, jid: str, user: str | None = None
    ) -> Response:
        """``{"decision": "accept"|"reject", "reason": ...}``; edits arrive as revised SEGs."""
        data = _json_object(body)
        decision = data.get("decision")
        if decision not in ("accept", "reject"):
            raise BadRequest(
                'decision must be "accept" or "reject" (an edit is a revised SEG stored from the viewer)'
            )
        reason = data.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("reason must be a string")
        reviewer = user if self.authentication else ANONYMOUS_REVIEWER
        assert reviewer is not None
        review, created = self.reviews.record(jid, decision, reviewer, "api", reason)
        return (202 if created else 200), {
            "created": created,
            "review": self._review_json(review),
            "job": self._job(self.store.get(jid)),
        }

    def job_reviews(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        self.store.get(jid)
        return 200, [self._review_json(r) for r in self.reviews.for_job(jid)]

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
        return 200, build_audit(
            job, self.store.events(jid), self.outbox.status_for_job(jid), pipeline,
            hl7=self.hl7_outbox.statuses_for_job(jid), superseded_by=self.store.superseded_by(jid),
        )  # fmt: skip

    def job_features(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        """The job's radiomics features for research export: JSON, or CSV with ``?format=csv``
        (one row per segment and feature: job, study, pipeline, segment, label, feature, name,
        unit, value). No patient identifiers are in either."""
        job = self.store.get(jid)
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest(f"format must be json or csv, got {fmt!r}")
        features = job.outputs.features if job.outputs is not None else None
        if features is None:
            raise NotFound(
                f"job {jid} has no radiomics features (state {job.state}; the pipeline's outputs.radiomics "
                "must be set and the job succeeded)"
            )
        if fmt == "json":
            return 200, {"job": job.id, "pipeline": job.pipeline, **features.to_json()}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["job", "pipeline", "segment", "label", "feature", "name", "unit", "value"])
        for seg in features.segments:
            for fid, value in seg.values.items():
                d = features.definitions.get(fid, {})
                writer.writerow(
                    [job.id, job.pipeline, seg.segment, seg.label, fid, d.get("name", ""), d.get("unit", ""),
                     "" if value is None else repr(value)]
                )  # fmt: skip
        return 200, TextAnswer(buffer.getvalue(), "text/csv")

    def forward_job(self, query: Mapping[str, str], body: bytes, jid: str) -> Response:
        """Send a succeeded job's SEG/SR again to its destinations (those not delivered yet, or all
        with ``{"all": true}``); one attempt each, answered when done."""
        if self.forward is None:
            return 501, {"error": "forwarding is not available"}
        data = _json_object(body) if body.strip() else {}
        everything = data.get("all", False)
        if not isinstance(everything, bool):
            raise BadRequest('"all" must be true or false')
        self.store.get(jid)  # 404 for an unknown job
        return 200, self.forward(jid, everything)

    def search_reports(self, query: Mapping[str, str], body: bytes) -> Response:
        return 200, self.reports.search(query)

    def read_fhir(self, query: Mapping[str, str], body: bytes, resource_type: str, rid: str) -> Response:
        return 200, self.reports.read(resource_type, rid)

    def list_deliveries(self, query: Mapping[str, str], body: bytes) -> Response:
        limit = query_limit(query)
        return 200, self.outbox.list(query.get("state") or None, limit=limit)

    def run_study(self, query: Mapping[str, str], body: bytes, study_id: str) -> Response:
        only: str | None = None
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                raise BadRequest('body must be JSON, e.g. {"pipeline": "ct-lung"}') from None
            if not isinstance(data, dict):
                raise BadRequest("body must be a JSON object")
            only = data.get("pipeline")
            if only is not None and only not in {p.name for p in self.pipelines()}:
                raise NotFound(f"pipeline {only}")
        try:
            results = self.intake.evaluate(study_id, only=only, rerun=True)
        except StudyGone:
            raise NotFound(f"study {study_id}") from None
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
            raise NotFound(f"study {study_id}") from None
        return 200, [d.to_json() for d in decisions]

    def dry_run_body(self, query: Mapping[str, str], body: bytes) -> Response:
        data = _json_object(body)
        study = data.get("study")
        if not isinstance(study, str) or not study:
            raise BadRequest('body must name the Orthanc study id: {"study": "<orthanc-study-id>"}')
        return self.dry_run(query, b"", study)

    def reload_routes(self, query: Mapping[str, str], body: bytes) -> Response:
        if self.reload is None:
            return 501, {"error": "reloading is not available"}
        pipelines = self.reload()  # raises ConfigError (answered 400): the old rules stay in force
        return 200, {"reloaded": True, "pipelines": [pipeline_json(p) for p in pipelines]}

    def list_pipelines(self, query: Mapping[str, str], body: bytes) -> Response:
        return 200, [pipeline_json(p) for p in self.pipelines()]

    def get_health(self, query: Mapping[str, str], body: bytes) -> Response:
        h = self.health()
        return (200 if h.get("ok") else 503), h
