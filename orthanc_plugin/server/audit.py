"""The audit record of one job (``GET /ai/jobs/{id}/audit``): what ran on which data, what came out,
where it went, and when each step happened.

Built from the job store (the job row and its append-only event history) and the FHIR outbox;
nothing here is about a patient beyond the study's UIDs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from orthanc_plugin.core.config import PipelineConfig
from orthanc_plugin.jobs.store import Job
from orthanc_plugin.orthanc_rest import forwarding

AUDIT_VERSION = 1


def iso(ts: float | None) -> str | None:
    """A UNIX time as ISO 8601 UTC (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _output(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, Mapping):
        return None
    return {
        "SOPInstanceUID": entry.get("SOPInstanceUID"),
        "SeriesInstanceUID": entry.get("SeriesInstanceUID"),
        "ID": entry.get("ID"),
        "ParentSeries": entry.get("ParentSeries"),
    }


def build_audit(
    job: Job,
    events: Sequence[Mapping[str, Any]],
    delivery: Mapping[str, Any] | None,
    pipeline: PipelineConfig | None = None,
) -> dict[str, Any]:
    """The audit record; ``pipeline`` is the current configuration of the job's pipeline, if any."""
    outputs = job.outputs or {}
    model = outputs.get("model") if isinstance(outputs.get("model"), Mapping) else None
    fwd = forwarding.status_from_events(events)
    return {
        "audit_version": AUDIT_VERSION,
        "job": {
            "id": job.id,
            "state": job.state,
            "attempts": job.attempts,
            "error": job.error,
            "created": iso(job.created),
            "started": iso(job.started),
            "finished": iso(job.finished),
        },
        "study": {"StudyInstanceUID": job.study_uid, "ID": job.orthanc_study_id},
        "series": {
            role: {
                "SeriesInstanceUID": r.get("series_uid"),
                "ID": r.get("series_id"),
                "SeriesDescription": r.get("series_description"),
                "instances": len(r.get("instances", [])),
                "why": r.get("reason"),
            }
            for role, r in (job.input.get("roles") or {}).items()
        },
        "pipeline": {
            "name": job.pipeline,
            "version": job.pipeline_version,
            "algorithm": pipeline.algorithm_name if pipeline is not None else None,
            "fingerprint": job.fingerprint,
        },
        "model": None if model is None else {"name": model.get("name"), "version": model.get("version")},
        "outputs": {"seg": _output(outputs.get("seg")), "sr": _output(outputs.get("sr"))},
        "fhir": None
        if delivery is None
        else {
            "destination": delivery.get("destination"),
            "state": delivery.get("state"),
            "attempts": delivery.get("attempts"),
            "queued": iso(delivery.get("queued")),
            "delivered": iso(delivery.get("delivered_at")),
            "last_error": delivery.get("last_error"),
        },
        "forwarding": None
        if fwd is None
        else {
            "state": fwd["state"],
            "destinations": [
                {
                    **d,
                    "delivered": iso(d.get("delivered")),
                    "first_attempt": iso(d.get("first_attempt")),
                    "last_attempt": iso(d.get("last_attempt")),
                }
                for d in fwd["destinations"]
            ],
        },
        "events": [
            {"time": iso(e.get("ts")), "kind": e.get("kind"), "detail": e.get("detail")} for e in events
        ],
    }
