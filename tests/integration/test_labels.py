"""AI state as Orthanc study labels, on whichever Orthanc this machine has.

Orthanc 1.12+ (Debian 13): a processed study carries ``ai-done`` (and no other AI label) and is
found through ``/tools/find`` with ``"Labels"``. Orthanc 1.10 (Debian 12) has no labels: the
plugin says so in ``/ai/health`` and its log, with the reason, and sets none. CI runs this file
on both releases (the Debian 13 part in scripts/trixie.sh), so neither branch goes untested.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devstack.stack import OrthancServer

from ..conftest import CT_B40
from .conftest import copy_as_new_study, wait_for, wait_job_done

pytestmark = pytest.mark.integration

AI_LABELS = {"ai-queued", "ai-done", "ai-failed"}


def _upload(api: httpx.Client, files: list[Path]) -> str:
    study = ""
    for f in files:
        r = api.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        study = r.json()["ParentStudy"]
    return study


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def test_processed_study_is_labelled_where_orthanc_has_labels(orthanc: OrthancServer, tmp_path: Path) -> None:
    with httpx.Client(base_url=orthanc.url, timeout=60) as api:
        system = api.get("/system").json()
        health = api.get("/ai/health").json()
        uid, files = copy_as_new_study(CT_B40, tmp_path / "study")
        study_id = _upload(api, files)
        job = wait_job_done(api, uid, orthanc=orthanc)
        assert job["state"] == "succeeded", job["error"]
        log = orthanc.log_file.read_text(errors="replace") if orthanc.log_file else ""

        if system.get("HasLabels") is True:
            assert health["labels"]["enabled"] is True, health["labels"]
            assert "study labels: on" in log

            # The worker labels the study right after it records the job's end.
            def labelled_done() -> set[str] | None:
                labels = set(api.get(f"/studies/{study_id}/labels").json())
                return labels if labels & AI_LABELS == {"ai-done"} else None

            wait_for(f"study {study_id} labelled ai-done only", labelled_done, timeout=30, period=0.2)
            found = api.post(
                "/tools/find",
                json={"Level": "Study", "Query": {}, "Labels": ["ai-done"], "LabelsConstraint": "All"},
            ).json()
            assert study_id in found
            queued = api.post(
                "/tools/find", json={"Level": "Study", "Query": {}, "Labels": ["ai-queued"]}
            ).json()
            assert study_id not in queued
            # A retry through the API labels the study ai-queued before it answers; done again later.
            assert api.post(f"/ai/jobs/{job['id']}/retry").status_code == 200
            assert set(api.get(f"/studies/{study_id}/labels").json()) & AI_LABELS == {"ai-queued"}
            wait_for(f"study {study_id} labelled ai-done again", labelled_done, timeout=120, period=0.2)
        else:
            # No labels here: stated, not silent.
            assert _version(str(system.get("Version", "0"))) < (1, 12), (
                f"Orthanc {system.get('Version')} should have labels but /system has no HasLabels"
            )
            assert health["labels"]["enabled"] is False
            assert "no study labels" in health["labels"]["reason"]
            assert "study labels: skipped: Orthanc" in log and "no study labels" in log
            assert api.get(f"/studies/{study_id}/labels").status_code == 404  # no such route on 1.10
