# SPDX-License-Identifier: AGPL-3.0-or-later
"""Prometheus metrics for ``GET /ai/metrics``: text exposition format 0.0.4, built from the job store.

Everything is read from SQLite when scraped, so the numbers are the same whichever process did
the work (the workers write the store, Orthanc serves the page):

* ``orthanc_ai_jobs{state}``: jobs per state now (queue depth);
* ``orthanc_ai_job_stage_seconds{pipeline,stage}`` and ``orthanc_ai_inference_seconds{pipeline}``:
  summaries over the stage timings of the last ``WINDOW_JOBS`` finished jobs (succeeded or failed,
  most recently finished first); ``inference`` is the Triton request (model call) alone;
* ``orthanc_ai_job_failures_total{pipeline,reason}``: jobs that ended failed, counted from the
  append-only audit events, with a short reason class derived from the error text;
* ``orthanc_ai_fhir_backlog``, ``orthanc_ai_workers_alive``/``_expected``, ``orthanc_ai_triton_ready``;
* model monitoring per ``model`` and ``version`` (``monitoring.report``, docs/monitoring.md):
  ``orthanc_ai_model_jobs{review}``, ``orthanc_ai_model_review_seconds``,
  ``orthanc_ai_model_edit_dice``, ``orthanc_ai_model_edit_volume_diff_percent`` (summaries),
  ``orthanc_ai_model_input_psi{attribute}``, ``orthanc_ai_model_output_ks{measurement}`` and
  ``orthanc_ai_model_drift_alert{kind,check}`` (1 while the recent window departs).

Labels never carry error text, UIDs or anything about a patient: only state, pipeline and stage
names from the configuration, model names and versions, segment and attribute names, and the
fixed reason classes of ``failure_reason``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import STATES, JobStore
from orthanc_plugin.monitoring.report import (
    RECENT_JOBS,
    REFERENCE_JOBS,
    JobRecord,
    by_version,
    drift_report,
    load_records,
    review_values,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WINDOW_JOBS = 1000
QUANTILES = (0.5, 0.9, 0.99)

# (reason, pattern on the error text); the first match wins. Worker messages (worker.py) start
# with these prefixes; the lease/exit wordings come from jobstore.py and supervisor.py.
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("input_not_usable", re.compile(r"^input not usable\b", re.I)),
    ("inference_failed", re.compile(r"^inference failed\b", re.I)),
    ("orthanc_refused", re.compile(r"^Orthanc refused\b")),
    ("orthanc_unreachable", re.compile(r"^Orthanc unreachable\b")),
    ("worker_lost", re.compile(r"^worker lost\b|^lease of .* expired|^worker \d+ .*exited", re.I)),
    ("pipeline_not_configured", re.compile(r"^pipeline '.*' is not configured", re.I)),
    ("internal", re.compile(r"^internal error\b", re.I)),
)
REASONS = tuple(r for r, _ in _REASONS) + ("other",)


def failure_reason(error: str | None) -> str:
    """A fixed short class for an error text (never the text itself)."""
    text = (error or "").strip()
    for reason, pattern in _REASONS:
        if pattern.search(text):
            return reason
    return "other"


def escape_label(value: str) -> str:
    """Escape a label value per the text format: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (NaN when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def summary(self, name: str, values: Iterable[float], **labels: str) -> None:
        ordered = sorted(values)
        for q in QUANTILES:
            self.sample(name, _quantile(ordered, q), **labels, quantile=_num(q))
        self.sample(f"{name}_sum", round(sum(ordered), 4), **labels)
        self.sample(f"{name}_count", len(ordered), **labels)


def _stage_timings(store: JobStore, window: int) -> dict[tuple[str, str], list[float]]:
    """{(pipeline, stage): [seconds...]} over the last ``window`` finished jobs."""
    rows = store._db.execute(
        "SELECT pipeline, timings FROM jobs WHERE state IN ('succeeded','failed') AND finished IS NOT NULL"
        " ORDER BY finished DESC LIMIT ?",
        (window,),
    ).fetchall()
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        try:
            timings = json.loads(r["timings"] or "{}")
        except ValueError:
            continue
        if not isinstance(timings, dict):
            continue
        for stage, seconds in timings.items():
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
                out[(str(r["pipeline"]), str(stage))].append(float(seconds))
    return out


def _failures(store: JobStore) -> dict[tuple[str, str], int]:
    """{(pipeline, reason): n} of every transition to 'failed' in the audit log (monotonic)."""
    rows = store._db.execute(
        "SELECT j.pipeline AS pipeline, e.detail AS detail FROM job_events e JOIN jobs j ON j.id = e.job_id"
        " WHERE e.kind = 'failed'"
    ).fetchall()
    out: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        out[(str(r["pipeline"]), failure_reason(r["detail"]))] += 1
    return out


def _forwarding(store: JobStore) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
    """({(pipeline, destination, result): attempts}, {(pipeline, destination): jobs whose latest
    attempt to that destination failed}) from the ``forward`` events (see forwarding.py)."""
    rows = store._db.execute(
        "SELECT j.pipeline AS pipeline, e.job_id AS job_id, e.detail AS detail FROM job_events e"
        " JOIN jobs j ON j.id = e.job_id WHERE e.kind = 'forward' ORDER BY e.seq"
    ).fetchall()
    attempts: dict[tuple[str, str, str], int] = defaultdict(int)
    latest: dict[tuple[str, str, str], bool] = {}
    for r in rows:
        try:
            detail = json.loads(r["detail"] or "{}")
        except ValueError:
            continue
        if not isinstance(detail, dict):
            continue
        dest, ok = str(detail.get("destination", "?")), bool(detail.get("ok"))
        attempts[(str(r["pipeline"]), dest, "ok" if ok else "failed")] += 1
        latest[(str(r["pipeline"]), dest, str(r["job_id"]))] = ok
    failing: dict[tuple[str, str], int] = defaultdict(int)
    for (pipeline, dest, _), ok in latest.items():
        failing[(pipeline, dest)] += 0 if ok else 1
    return attempts, failing


def _monitoring(w: _Writer, records: list[JobRecord]) -> None:
    groups = by_version(records)
    stats = {key: review_values(recs) for key, recs in groups.items()}
    drift = {key: drift_report(recs, REFERENCE_JOBS, RECENT_JOBS) for key, recs in groups.items()}
    w.family(
        "orthanc_ai_model_jobs",
        "gauge",
        "Succeeded AI jobs per model version by their latest review (accepted, edited, rejected, unreviewed).",
    )
    for (model, version), st in stats.items():
        for review, n in st.counts.items():
            w.sample("orthanc_ai_model_jobs", n, model=model, version=version, review=review)
    for family, key, what in (
        (
            "orthanc_ai_model_review_seconds",
            "review_seconds",
            "Seconds from a job's end to its latest review.",
        ),
        ("orthanc_ai_model_edit_dice", "edit_dice", "Dice of the AI segment and the reviewer's edit."),
        (
            "orthanc_ai_model_edit_volume_diff_percent",
            "edit_volume_diff_pct",
            "Volume change of an edited segment, edited minus AI, in % of the AI's volume.",
        ),
    ):
        w.family(family, "summary", what + " Per model version.")
        for (model, version), st in stats.items():
            w.summary(family, getattr(st, key), model=model, version=version)
    window = f"last {RECENT_JOBS} jobs against the first {REFERENCE_JOBS} of the version"
    for family, items_key, label, what in (
        (
            "orthanc_ai_model_input_psi",
            "input_drift",
            "attribute",
            f"Population stability index of an input attribute, {window} (alert above 0.25).",
        ),
        (
            "orthanc_ai_model_output_ks",
            "output_drift",
            "measurement",
            f"Kolmogorov-Smirnov distance of a measurement's distribution, {window} (alert when p < 0.01).",
        ),
    ):
        w.family(family, "gauge", what)
        for (model, version), d in drift.items():
            for x in d[items_key]:
                w.sample(family, x["statistic"], model=model, version=version, **{label: x[label]})
    w.family(
        "orthanc_ai_model_drift_alert",
        "gauge",
        "1 while the recent window of a model version departs from its reference (kind input or output), else 0.",
    )
    for (model, version), d in drift.items():
        for kind, name_key, items in (
            ("input", "attribute", d["input_drift"]),
            ("output", "measurement", d["output_drift"]),
        ):
            for x in items:
                w.sample(
                    "orthanc_ai_model_drift_alert", 1 if x["state"] == "alert" else 0,
                    model=model, version=version, kind=kind, check=x[name_key],
                )  # fmt: skip


def render_metrics(
    store: JobStore,
    outbox: Outbox | None,
    health: dict[str, Any] | None,
    window: int = WINDOW_JOBS,
    reviews: Reviews | None = None,
) -> str:
    """The whole exposition text (ends with a newline)."""
    w = _Writer()

    w.family("orthanc_ai_jobs", "gauge", "AI jobs per state now (queued = queue depth).")
    counts = store.counts()
    for state in STATES:
        w.sample("orthanc_ai_jobs", counts.get(state, 0), state=state)

    w.family(
        "orthanc_ai_jobs_waiting",
        "gauge",
        "Queued AI jobs by kind: urgent (priority above 0), routine, deferred (until a pipeline's window).",
    )
    for kind, n in store.waiting().items():
        w.sample("orthanc_ai_jobs_waiting", n, kind=kind)

    timings = _stage_timings(store, window)
    w.family(
        "orthanc_ai_job_stage_seconds",
        "summary",
        f"Seconds per job stage and pipeline over the last {window} finished jobs (stage total: whole job).",
    )
    for (pipeline, stage), values in sorted(timings.items()):
        w.summary("orthanc_ai_job_stage_seconds", values, pipeline=pipeline, stage=stage)

    w.family(
        "orthanc_ai_inference_seconds",
        "summary",
        f"Seconds per Triton inference request per pipeline over the last {window} finished jobs.",
    )
    for (pipeline, stage), values in sorted(timings.items()):
        if stage == "inference":
            w.summary("orthanc_ai_inference_seconds", values, pipeline=pipeline)

    w.family(
        "orthanc_ai_job_failures_total",
        "counter",
        "AI jobs that ended failed, per pipeline and reason class (" + ", ".join(REASONS) + ").",
    )
    for (pipeline, reason), n in sorted(_failures(store).items()):
        w.sample("orthanc_ai_job_failures_total", n, pipeline=pipeline, reason=reason)

    attempts, failing = _forwarding(store)
    w.family(
        "orthanc_ai_forward_attempts_total",
        "counter",
        "Attempts to forward SEG/SR to a destination (modality:NAME / dicomweb:NAME), by result (ok, failed).",
    )
    for (pipeline, dest, result), n in sorted(attempts.items()):
        w.sample("orthanc_ai_forward_attempts_total", n, pipeline=pipeline, destination=dest, result=result)
    w.family(
        "orthanc_ai_forward_failing",
        "gauge",
        "Jobs whose latest attempt to forward to a destination failed (retry: POST /ai/jobs/{id}/forward).",
    )
    for (pipeline, dest), n in sorted(failing.items()):
        w.sample("orthanc_ai_forward_failing", n, pipeline=pipeline, destination=dest)

    backlog: float | None = None
    if outbox is not None:
        backlog = outbox.backlog()
    elif health is not None and isinstance(health.get("fhir_backlog"), (int, float)):
        backlog = float(health["fhir_backlog"])
    if backlog is not None:
        w.family("orthanc_ai_fhir_backlog", "gauge", "FHIR report bundles waiting for delivery.")
        w.sample("orthanc_ai_fhir_backlog", backlog)

    if health is not None:
        workers = health.get("workers") or {}
        w.family("orthanc_ai_workers_alive", "gauge", "Worker processes alive now.")
        w.sample("orthanc_ai_workers_alive", float(workers.get("alive") or 0))
        w.family("orthanc_ai_workers_expected", "gauge", "Worker processes configured.")
        w.sample("orthanc_ai_workers_expected", float(workers.get("expected") or 0))
        triton = health.get("triton") or {}
        w.family("orthanc_ai_triton_ready", "gauge", "1 when Triton answered ready at this scrape, else 0.")
        w.sample("orthanc_ai_triton_ready", 1 if triton.get("ready") else 0)

    own = reviews is None
    reviews = reviews or Reviews(store.path)
    try:
        _monitoring(w, load_records(store, reviews))
    finally:
        if own:
            reviews.close()

    return "\n".join(w.lines) + "\n"
