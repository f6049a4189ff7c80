"""Bad input on the real stack: the job fails with a reason an admin understands, nothing is written."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from devstack.stack import OrthancServer
from orthanc_plugin.core.uids import derived_uid

from ..conftest import CT_B40, require_data
from .conftest import series_by_modality, study_uid, upload_folder, wait_job_done

pytestmark = pytest.mark.integration


def copy_with_new_uids(src: Path, dst: Path, tag: str, drop_middle: bool = False) -> Path:
    """The series with fresh Study/Series/SOP UIDs (a new study), optionally one slice missing."""
    dst.mkdir(parents=True)
    files = sorted(src.glob("*.dcm"))
    slices = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*(np.asarray(slices[0].ImageOrientationPatient, float).reshape(2, 3)))
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    if drop_middle:
        del slices[len(slices) // 2]
    study, series = derived_uid(tag, "study"), derived_uid(tag, "series")
    for i, ds in enumerate(slices):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = derived_uid(tag, f"sop-{i}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f"{i:03d}.dcm", enforce_file_format=True)
    return dst


def test_missing_slice_fails_clearly_and_writes_nothing(orthanc: OrthancServer, tmp_path: Path) -> None:
    require_data(CT_B40)
    folder = copy_with_new_uids(CT_B40, tmp_path / "gap", "bad-input-missing-slice", drop_middle=True)
    with httpx.Client(base_url=orthanc.url, timeout=60) as api:
        sid = upload_folder(api, folder)
        job = wait_job_done(api, study_uid(api, sid), orthanc=orthanc)
        assert job["state"] == "failed"
        assert job["error"].startswith("input not usable: role 'ct': a slice is probably missing"), job[
            "error"
        ]
        assert "gap of 16.00 mm" in job["error"] and "usual gap is 8.00 mm" in job["error"]
        assert job["attempts"] == 1, "bad input must not be retried"
        assert series_by_modality(api, sid, "SEG") == [] and series_by_modality(api, sid, "SR") == []
        assert len(series_by_modality(api, sid, "CT")[0]["Instances"]) == 29  # the study is untouched
        assert api.get("/system").status_code == 200
        health = api.get("/ai/health").json()
        assert health["workers"]["alive"] == health["workers"]["expected"]
