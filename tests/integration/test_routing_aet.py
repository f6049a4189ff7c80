"""Study-level routing on the calling AE title, on the real Orthanc: a pipeline with
``study_where: {CallingAETitle: {equals: CT_SCANNER_1}}`` runs on a study sent by C-STORE
(dcmtk's storescu) from CT_SCANNER_1, not on the same images sent from another AE title, and the
dry-run says why. About 15 s on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import OrthancServer
from devstack.triton_server import TritonServer

from ..conftest import CT_B40
from .conftest import copy_as_new_study, make_orthanc, shipped_pipelines, wait_for, wait_job_done

pytestmark = pytest.mark.integration

SCANNER = "CT_SCANNER_1"


@pytest.fixture(scope="module")
def orthanc_aet(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[OrthancServer]:
    pipelines = shipped_pipelines()
    for p in pipelines:
        p["study_where"] = {"CallingAETitle": {"equals": SCANNER}}
    server = make_orthanc(tmp_path_factory.mktemp("routing-aet"), triton.grpc_port, pipelines)
    server.start(timeout=60)
    yield server
    server.stop()


def _new_study(dest: Path) -> tuple[str, list[Path]]:
    return copy_as_new_study(CT_B40, dest)


def _storescu(orthanc: OrthancServer, aet: str, files: list[Path]) -> None:
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk's storescu is missing (Debian package dcmtk)"
    r = subprocess.run(
        [storescu, "-aet", aet, "-aec", "ORTHANC_AI", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _study_id(c: httpx.Client, uid: str) -> str:
    found = c.post("/tools/lookup", content=uid).json()
    assert found and found[0]["Type"] == "Study", found
    return str(found[0]["ID"])


def _dry_run(c: httpx.Client, study_id: str) -> dict[str, Any]:
    decisions = c.get(f"/ai/studies/{study_id}/dry-run").json()
    return next(d for d in decisions if d["pipeline"] == "ct-lung")


def test_calling_ae_title_decides(orthanc_aet: OrthancServer, tmp_path: Path) -> None:
    other_uid, other_files = _new_study(tmp_path / "other")
    scanner_uid, scanner_files = _new_study(tmp_path / "scanner")
    # The other sender first: by the time the scanner's job is done, its study has long been
    # stable and routed (StableAge 1 s), so "no job" below is a decision, not a delay.
    _storescu(orthanc_aet, "OTHER_SCU", other_files)
    _storescu(orthanc_aet, SCANNER, scanner_files)
    with httpx.Client(base_url=orthanc_aet.url, timeout=60) as c:
        job = wait_job_done(c, scanner_uid, timeout=180, orthanc=orthanc_aet)
        assert job["state"] == "succeeded", job["error"]
        assert c.get("/ai/jobs", params={"study": other_uid}).json() == []

        yes = _dry_run(c, _study_id(c, scanner_uid))
        assert yes["matched"] is True
        assert yes["study"] == [f"holds: CallingAETitle is '{SCANNER}' (equals '{SCANNER}')"]
        no = _dry_run(c, _study_id(c, other_uid))
        assert no["matched"] is False
        assert "CallingAETitle is 'OTHER_SCU', rule wants 'CT_SCANNER_1'" in no["reason"]
        assert no["study"] == ["fails: CallingAETitle is 'OTHER_SCU', rule wants 'CT_SCANNER_1'"]
        # The study stays without a job however long we wait for the intake to look again.
        wait_for(
            "the intake to have read the change log past the other study",
            lambda: c.get("/ai/health").json()["queue"]["queued"] == 0,
            timeout=30,
        )
        assert c.get("/ai/jobs", params={"study": other_uid}).json() == []


def test_rest_upload_has_no_calling_ae_title(orthanc_aet: OrthancServer, tmp_path: Path) -> None:
    uid, files = _new_study(tmp_path / "rest")
    with httpx.Client(base_url=orthanc_aet.url, timeout=60) as c:
        sid = ""
        for f in files:
            r = c.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            sid = r.json()["ParentStudy"]
        decision = _dry_run(c, sid)
        assert decision["matched"] is False
        assert "CallingAETitle is missing" in decision["reason"]
        assert decision["study"] == ["fails: CallingAETitle is missing"]
