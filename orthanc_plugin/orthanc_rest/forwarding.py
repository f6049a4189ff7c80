"""Forwarding: once a job's SEG and SR are stored, Orthanc sends them on to other destinations.

A pipeline lists its destinations in ``outputs.forward`` by the names Orthanc knows them
under: ``{modality: PACS2}`` (an entry of ``DicomModalities``, sent by C-STORE through
``POST /modalities/{name}/store``) or ``{dicomweb: archive}`` (an entry of ``DicomWeb.Servers``,
sent by STOW-RS through ``POST /dicom-web/servers/{name}/stow``). Orthanc does the sending, so
its own TLS, credentials and AE title settings for those peers apply.

Each attempt is appended to the job's history (event kind ``forward``, detail a JSON object),
so the state of every destination can be read back from the job store whichever process made
the attempt. A destination that stays unreachable does not fail the job: the results are safe
in Orthanc, the failure is visible in the job, its audit record and the metrics, and
``POST /ai/jobs/{id}/forward`` tries again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from orthanc_plugin.core.config import ForwardDestination, PipelineConfig, Settings
from orthanc_plugin.jobs.store import Job, JobStateError, JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError

log = logging.getLogger("orthanc_ai.forwarding")

EVENT_KIND = "forward"


class ForwardError(RuntimeError):
    """One attempt to send to one destination failed; ``retryable`` when trying again may help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def send_once(
    orthanc: OrthancClient, dest: ForwardDestination, instance_ids: Sequence[str], timeout_s: float
) -> None:
    """Ask Orthanc to send ``instance_ids`` to ``dest`` and wait for the outcome; raises ForwardError."""
    if dest.modality is not None:
        path = f"/modalities/{dest.modality}/store"
        body: dict[str, Any] = {
            "Resources": list(instance_ids),
            "Synchronous": True,
            "Timeout": int(timeout_s),
        }
        what = f"send the results to DICOM modality '{dest.modality}' (C-STORE)"
    else:
        path = f"/dicom-web/servers/{dest.dicomweb}/stow"
        body = {"Resources": list(instance_ids), "Synchronous": True}
        what = f"send the results to DICOMweb server '{dest.dicomweb}' (STOW-RS)"
    try:
        # One POST to Orthanc's own REST API; Orthanc talks to the destination.
        r = orthanc.request("POST", path, what, json=body, timeout=timeout_s + 10)
    except OrthancError as e:
        if e.status == 404:
            kind = "DicomModalities" if dest.modality is not None else "DicomWeb.Servers"
            raise ForwardError(
                f"{e}; is '{dest.name}' configured in Orthanc's {kind}?", retryable=False
            ) from None
        raise ForwardError(str(e), retryable=e.status is None or e.status >= 500) from None
    try:
        answer = r.json() if r.content else {}
    except ValueError:
        answer = {}
    failed = answer.get("FailedInstancesCount") if isinstance(answer, dict) else None
    if isinstance(failed, int) and failed > 0:
        raise ForwardError(f"{dest.label} refused {failed} of {len(instance_ids)} instance(s)")


def _event(store: JobStore, job_id: str, detail: dict[str, Any]) -> None:
    store.add_event(job_id, EVENT_KIND, json.dumps(detail, sort_keys=True))


def forward(
    orthanc: OrthancClient,
    store: JobStore,
    job_id: str,
    destinations: Sequence[ForwardDestination],
    instance_ids: Sequence[str],
    settings: Settings,
    *,
    study_uid: str | None = None,
    attempts: int | None = None,
    via: str = "worker",
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """Send the stored outputs (Orthanc ids ``instance_ids``) to every destination, with retries; never raises for a destination.

    Returns the forwarding summary kept in the job's ``outputs`` (None without destinations).
    """
    if not destinations:
        return None
    ids = list(instance_ids)
    tries = attempts if attempts is not None else settings.forward_attempts
    extra = {"job_id": job_id, "study_uid": study_uid}
    results = []
    for dest in destinations:
        result: dict[str, Any] = {
            "destination": dest.label, "kind": dest.kind, "name": dest.name, "state": "failed",
            "attempts": 0, "error": None, "delivered": None, "instances": ids,
        }  # fmt: skip
        for attempt in range(1, tries + 1):
            result["attempts"] = attempt
            t0 = time.perf_counter()
            try:
                if not ids:
                    raise ForwardError("the job has no stored SEG or SR to send", retryable=False)
                send_once(orthanc, dest, ids, settings.forward_timeout_seconds)
            except Exception as e:  # noqa: BLE001 - a forwarding fault must never fail the job
                retryable = e.retryable if isinstance(e, ForwardError) else True
                error = str(e) if isinstance(e, ForwardError) else f"{type(e).__name__}: {e}"
                result["error"] = error
                last = attempt == tries or not retryable
                _event(store, job_id, {
                    "destination": dest.label, "attempt": attempt, "of": tries, "ok": False,
                    "error": error, "final": last, "via": via,
                })  # fmt: skip
                log.warning(
                    "forward to %s: attempt %d of %d failed: %s",
                    dest.label,
                    attempt,
                    tries,
                    error,
                    extra=extra,
                )
                if last:
                    break
                sleep(settings.forward_backoff_seconds * 2 ** (attempt - 1))
                continue
            result.update(state="delivered", error=None, delivered=time.time())
            _event(store, job_id, {
                "destination": dest.label, "attempt": attempt, "of": tries, "ok": True,
                "instances": len(ids), "seconds": round(time.perf_counter() - t0, 3), "via": via,
            })  # fmt: skip
            log.info(
                "forward to %s: %d instance(s) sent (attempt %d)", dest.label, len(ids), attempt, extra=extra
            )
            break
        results.append(result)
    return {"state": _overall(r["state"] for r in results), "destinations": results}


def _overall(states: Iterable[str]) -> str:
    states = list(states)
    if not states:
        return "none"
    return "delivered" if all(s == "delivered" for s in states) else "failed"


def status_from_events(events: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Current forwarding state of a job, per destination, from its ``forward`` events (None if none).

    The latest attempt of a destination decides its state; ``attempts`` counts every attempt
    recorded for it (job reruns and ``POST /ai/jobs/{id}/forward`` included).
    """
    per: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") != EVENT_KIND:
            continue
        try:
            d = json.loads(str(e.get("detail") or "{}"))
        except ValueError:
            continue
        label = str(d.get("destination", "?"))
        entry = per.setdefault(
            label, {"destination": label, "state": "failed", "attempts": 0, "error": None,
                    "delivered": None, "first_attempt": e.get("ts"), "last_attempt": None},
        )  # fmt: skip
        entry["attempts"] += 1
        entry["last_attempt"] = e.get("ts")
        if d.get("ok"):
            entry.update(state="delivered", error=None, delivered=e.get("ts"))
        else:
            entry.update(state="failed" if d.get("final", True) else "retrying", error=d.get("error"))
    if not per:
        return None
    return {"state": _overall(v["state"] for v in per.values()), "destinations": list(per.values())}


def reforward(
    orthanc: OrthancClient,
    store: JobStore,
    job: Job,
    pipelines: Sequence[PipelineConfig],
    settings: Settings,
    everything: bool = False,
) -> dict[str, Any]:
    """``POST /ai/jobs/{id}/forward``: one more attempt for each destination not yet delivered
    (every destination with ``everything``), recorded like the worker's. Returns the new status."""
    if job.state != "succeeded":
        raise JobStateError(f"job {job.id} is {job.state}; only a succeeded job has results to forward")
    pipeline = next((p for p in pipelines if p.name == job.pipeline), None)
    if pipeline is None:
        raise JobStateError(
            f"pipeline '{job.pipeline}' is no longer configured: its destinations are unknown"
        )
    destinations = list(pipeline.outputs.forward)
    if not destinations:
        raise JobStateError(f"pipeline '{job.pipeline}' has no forward destinations (outputs.forward)")
    if not everything:
        status = status_from_events(store.events(job.id)) or {"destinations": []}
        done = {d["destination"] for d in status["destinations"] if d["state"] == "delivered"}
        destinations = [d for d in destinations if d.label not in done]
        if not destinations:
            raise JobStateError(
                f'job {job.id}: every destination already has the results; send {{"all": true}} to send again'
            )
    # The API answers while it waits: one attempt per destination, no backoff sleeps.
    attempt = forward(
        orthanc,
        store,
        job.id,
        destinations,
        job.outputs.instance_ids() if job.outputs is not None else [],
        settings,
        study_uid=job.study_uid,
        attempts=1,
        via="api",
    )
    return {"job": job.id, "attempt": attempt, "forwarding": status_from_events(store.events(job.id))}
