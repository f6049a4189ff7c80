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


def build_audit(
    job: Job,
    events: Sequence[Mapping[str, Any]],
    delivery: Mapping[str, Any] | None,
    pipeline: PipelineConfig | None = None,
    hl7: Sequence[Mapping[str, Any]] = (),
    superseded_by: str | None = None,
) -> dict[str, Any]:
    """The audit record; ``pipeline`` is the current configuration of the job's pipeline, if any."""
    outputs = job.outputs
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
            "supersedes": job.input.supersedes,
            "superseded_by": superseded_by,
        },
        "study": {"StudyInstanceUID": job.study_uid, "ID": job.orthanc_study_id},
        "series": {
            role: {
                "SeriesInstanceUID": r.series_uid,
                "ID": r.series_id,
                "SeriesDescription": r.series_description,
                "instances": len(r.instances),
                "why": r.reason,
            }
            for role, r in job.input.roles.items()
        },
        "pipeline": {
            "name": job.pipeline,
            "version": job.pipeline_version,
            "algorithm": pipeline.algorithm_name if pipeline is not None else None,
            "fingerprint": job.fingerprint,
        },
        "model": None if outputs is None else outputs.model.to_json(),
        # seg and sr are always named (None until stored); further output kinds as they are stored
        "outputs": {"seg": None, "sr": None}
        | (
            {}
            if outputs is None
            else {
                kind: [x.to_json() for x in s] if isinstance(s, tuple) else s.to_json()
                for kind, s in outputs.stored.items()
            }
        ),
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
        "hl7": [
            {
                "destination": d.get("destination"),
                "state": d.get("state"),
                "attempts": d.get("attempts"),
                "queued": iso(d.get("queued")),
                "delivered": iso(d.get("delivered_at")),
                "last_error": d.get("last_error"),
            }
            for d in hl7
        ],
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
