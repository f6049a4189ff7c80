"""More ways in: studies sent by DICOM C-STORE (dcmtk's storescu) and by DICOMweb STOW-RS are
processed like REST uploads (real Orthanc + real Triton)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from devstack.stack import OrthancServer

from ..conftest import CT_B40
from .conftest import copy_as_new_study, series_by_modality, wait_job_done

pytestmark = pytest.mark.integration


def _assert_processed(orthanc: OrthancServer, uid: str) -> None:
    with httpx.Client(base_url=orthanc.url, timeout=60) as c:
        job = wait_job_done(c, uid, timeout=120, orthanc=orthanc)
        assert job["state"] == "succeeded", job["error"]
        assert job["pipeline"] == "ct-lung" and job["series"]["ct"]["instances"] == 30
        sid = job["study"]["ID"]
        assert len(series_by_modality(c, sid, "SEG")) == 1
        assert len(series_by_modality(c, sid, "SR")) == 1


def test_c_store_with_storescu(orthanc: OrthancServer, tmp_path: Path) -> None:
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk's storescu is missing (Debian package dcmtk, installed with Orthanc)"
    uid, files = copy_as_new_study(CT_B40, tmp_path / "cstore")
    r = subprocess.run(
        [storescu, "-aet", "TEST_SCU", "-aec", "ORTHANC_AI", "127.0.0.1", str(orthanc.dicom_port),
         *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_processed(orthanc, uid)


def test_stow_rs(orthanc: OrthancServer, tmp_path: Path) -> None:
    uid, files = copy_as_new_study(CT_B40, tmp_path / "stow")
    boundary = f"orthanc-ai-{uuid.uuid4().hex}"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
            for f in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    r = httpx.post(f"{orthanc.url}/dicom-web/studies", content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    stored = r.json()["00081199"]["Value"]  # ReferencedSOPSequence: one item per stored instance
    assert len(stored) == len(files)
    assert not r.json().get("00081198", {}).get("Value"), r.text  # FailedSOPSequence: empty
    _assert_processed(orthanc, uid)
