"""AI state as Orthanc study labels: ``ai-queued``, ``ai-done``, ``ai-failed``, and the review's
``ai-reviewed`` or ``ai-rejected``.

Orthanc 1.12 (with a database that supports labels) can label studies; staff filter by label in
Orthanc Explorer 2 and through REST (``POST /tools/find`` with ``"Labels"``). The label of a
study follows its jobs (all pipelines together): ``ai-failed`` when one of them failed,
``ai-queued`` while one is queued or running, ``ai-done`` when all finished well; none when they
were all cancelled. The plugin sets ``ai-queued`` when it queues a job, the workers set the
others as jobs change state.

Whether labels exist is found out at run time from ``GET /system`` (``"HasLabels": true``), not
from the version number. Where it is absent (Orthanc 1.10) the step is skipped and the reason is
stated once in the log and in ``/ai/health``. A label that cannot be set never fails a job.

Works through three small functions (GET as JSON, PUT, DELETE of a REST path), so the plugin
(Orthanc's SDK) and the workers (HTTP) share it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError

log = logging.getLogger("orthanc_ai.labels")

QUEUED = "ai-queued"
DONE = "ai-done"
FAILED = "ai-failed"
MANAGED = (QUEUED, DONE, FAILED)


def label_for(states: Iterable[str]) -> str | None:
    """The AI label of a study whose jobs are in ``states``."""
    states = set(states)
    if "failed" in states:
        return FAILED
    if states & {"queued", "running"}:
        return QUEUED
    if "succeeded" in states:
        return DONE
    return None


class StudyLabels:
    def __init__(
        self,
        get_json: Callable[[str], Any],
        put: Callable[[str], None],
        delete: Callable[[str], None],
    ) -> None:
        self._get_json = get_json
        self._put = put
        self._delete = delete
        self.enabled: bool | None = None  # None: not detected yet
        self.reason = "not checked yet"

    def detect(self) -> bool:
        """Ask Orthanc whether it has labels; sets ``enabled`` and ``reason``."""
        try:
            system = self._get_json("/system")
        except Exception as e:  # noqa: BLE001 - asked again at the next sync
            self.enabled, self.reason = None, f"cannot read /system: {e}"
            return False
        if isinstance(system, dict) and system.get("HasLabels") is True:
            self.enabled, self.reason = True, "Orthanc has study labels (/system HasLabels)"
        else:
            version = system.get("Version", "?") if isinstance(system, dict) else "?"
            self.enabled = False
            self.reason = (
                f"Orthanc {version} has no study labels (/system does not report HasLabels: true; "
                "labels need Orthanc 1.12 or later with a database that supports them): "
                f"studies are not labelled {', '.join(MANAGED)}"
            )
        return self.enabled

    def status(self) -> dict[str, Any]:
        return {"enabled": bool(self.enabled), "labels": list(MANAGED), "reason": self.reason}

    def sync(self, store: JobStore, study_uid: str, orthanc_study_id: str) -> str | None:
        """Set the study's AI label from its jobs' states now; returns the label (None: none/skipped).

        The plugin (a job queued) and a worker (a job ended) may sync the same study at once: after
        setting a label the states are read again, and the label set again if they changed
        meanwhile, so the last one to finish always leaves the label of the latest states.
        """
        if self.enabled is None:
            self.detect()
        if not self.enabled or not orthanc_study_id:
            return None
        try:
            wanted = self._wanted(store, study_uid, orthanc_study_id)
            for _ in range(3):
                self._apply(orthanc_study_id, wanted)
                again = self._wanted(store, study_uid, orthanc_study_id)
                if again == wanted:
                    break
                wanted = again
            return wanted
        except Exception as e:  # noqa: BLE001 - a label is a convenience; the job's state is the truth
            log.warning("study %s: AI label not updated: %s", orthanc_study_id, e)
            return None

    @staticmethod
    def _wanted(store: JobStore, study_uid: str, orthanc_study_id: str) -> str | None:
        jobs = store.list_jobs(study_uid=study_uid)
        return label_for(j.state for j in jobs if j.orthanc_study_id == orthanc_study_id)

    def _apply(self, orthanc_study_id: str, wanted: str | None) -> None:
        current = set(self._get_json(f"/studies/{orthanc_study_id}/labels") or [])
        for label in MANAGED:
            if label != wanted and label in current:
                self._delete(f"/studies/{orthanc_study_id}/labels/{label}")
        if wanted is not None and wanted not in current:
            self._put(f"/studies/{orthanc_study_id}/labels/{wanted}")


# --------------------------------------------------------------------------- review labels

REVIEWED, REJECTED = "ai-reviewed", "ai-rejected"


def label_review(orthanc: OrthancClient, study_id: str, decision: str) -> bool:
    """Set the study's review label (the latest review decides: the other one is removed);
    False where this Orthanc has no labels (1.10 answers 404 and is left alone)."""
    keep, drop = (REJECTED, REVIEWED) if decision == "reject" else (REVIEWED, REJECTED)
    try:
        orthanc.request("PUT", f"/studies/{study_id}/labels/{keep}", f"label study {keep}", content=b"")
    except OrthancError as e:
        if e.status in (400, 404, 405):
            log.debug("study labels are not supported by this Orthanc (HTTP %s)", e.status)
            return False
        raise
    with contextlib.suppress(OrthancError):
        orthanc.request("DELETE", f"/studies/{study_id}/labels/{drop}", f"unlabel study {drop}")
    return True
