"""HL7 ORU^R01 delivery to a real MLLP listener (hl7apy's server in its own process).

The listener is down while five jobs finish: their messages wait in the outbox and are retried;
once it is up each arrives exactly once, with the job's MSH-10. A listener that answers AE leaves
the delivery failed with its text in the job.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from devstack.stack import OrthancServer, free_port
from devstack.triton_server import TritonServer

from ..conftest import CT_B40
from .conftest import client, copy_as_new_study, make_orthanc, shipped_pipelines, upload_folder, wait_for

pytestmark = pytest.mark.integration
LISTENER = Path(__file__).with_name("mllp_listener.py")


class Listener:
    def __init__(self, port: int, mode: str, record: Path) -> None:
        self.port, self.record = port, record
        self.proc = subprocess.Popen([sys.executable, str(LISTENER), str(port), mode, str(record)])
        wait_for(f"the MLLP listener on port {port}", self._accepts, timeout=30, period=0.1)

    def _accepts(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the MLLP listener exited with {self.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def received(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ris_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def hl7_orthanc(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, ris_port: int
) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("hl7")
    ct_lung = next(p for p in shipped_pipelines() if p["name"] == "ct-lung")
    ct_lung["outputs"] = {"seg": True, "sr": True, "fhir": False, "hl7_oru": True, "series_number": 9901}
    destinations = [
        {"name": "ris", "host": "127.0.0.1", "port": ris_port, "receiving_application": "RIS",
         "receiving_facility": "RADIOLOGY", "timeout_seconds": 5},
    ]  # fmt: skip
    server = make_orthanc(
        tmp, triton.grpc_port, [ct_lung],
        extra_env={"ORTHANC_AI_HL7_DESTINATIONS": json.dumps(destinations), "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2"},
    )  # fmt: skip
    server.start(timeout=60)
    yield server
    server.stop()


def _jobs_of(api: httpx.Client, uids: list[str]) -> list[dict[str, Any]]:
    out = []
    for uid in uids:
        jobs = api.get("/ai/jobs", params={"study": uid}).json()
        if len(jobs) != 1:
            return []
        out.append(api.get(f"/ai/jobs/{jobs[0]['id']}").json())
    return out


def test_oru_waits_while_the_ris_is_down_then_arrives_once_per_job(
    hl7_orthanc: OrthancServer, ris_port: int, tmp_path: Path
) -> None:
    uids = []
    with client(hl7_orthanc.url, timeout=120) as api:
        for n in range(5):  # a burst of five studies while the RIS is down
            uid, _ = copy_as_new_study(CT_B40, tmp_path / f"study{n}")
            upload_folder(api, tmp_path / f"study{n}")
            uids.append(uid)

        def all_failing() -> list[dict[str, Any]] | None:
            jobs = _jobs_of(api, uids)
            done = len(jobs) == 5 and all(j["state"] == "succeeded" for j in jobs)
            if done and all(j["hl7"] and j["hl7"][0]["state"] == "failing" for j in jobs):
                return jobs
            failed = [j for j in jobs if j["state"] == "failed"]
            assert not failed, failed[0]["error"]
            return None

        jobs = wait_for(
            "five jobs whose ORU cannot reach the RIS", all_failing, timeout=600, orthanc=hl7_orthanc
        )
        assert all("cannot reach ris" in j["hl7"][0]["last_error"] for j in jobs)
        listener = Listener(ris_port, "AA", tmp_path / "received.jsonl")
        try:
            wait_for(
                "every ORU delivered",
                lambda: all(j["hl7"][0]["state"] == "delivered" for j in _jobs_of(api, uids)),
                timeout=120, orthanc=hl7_orthanc,
            )  # fmt: skip
            received = listener.received()
        finally:
            listener.stop()
        jobs = _jobs_of(api, uids)
    ids = sorted(r["control_id"] for r in received)
    assert ids == sorted(j["id"] for j in jobs), "each job's ORU exactly once, MSH-10 = the job's id"
    for r in received:
        assert r["valid"]
        m = parse_message(r["message"], validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        assert m.validate() and m.msh.msh_12.value == "2.5"
        order = m.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
        assert order.OBR.obr_25.value == "P"
        job = next(j for j in jobs if j["id"] == r["control_id"])
        volumes = [o.OBX for o in order.ORU_R01_OBSERVATION if o.OBX.obx_2.value == "NM"]
        expected = [f"{x['volume_ml']:.2f}" for x in job["outputs"]["measurements"]]
        assert [v.obx_5.to_er7() for v in volumes] == expected
        assert order.ORU_R01_OBSERVATION[0].OBX.obx_5.to_er7() == job["study"]["StudyInstanceUID"]
        assert any(e["kind"] == "hl7_delivered" for e in job["events"])


def test_an_ae_answer_fails_the_delivery_with_the_receivers_text(
    hl7_orthanc: OrthancServer, ris_port: int, tmp_path: Path
) -> None:
    listener = Listener(ris_port, "AE", tmp_path / "received.jsonl")
    try:
        with client(hl7_orthanc.url, timeout=120) as api:
            uid, _ = copy_as_new_study(CT_B40, tmp_path / "study")
            upload_folder(api, tmp_path / "study")

            def failed() -> dict[str, Any] | None:
                jobs = _jobs_of(api, [uid])
                if jobs and jobs[0]["hl7"] and jobs[0]["hl7"][0]["state"] == "failed":
                    return jobs[0]
                return None

            job = wait_for("the ORU refused with AE", failed, timeout=300, orthanc=hl7_orthanc)
            audit = api.get(f"/ai/jobs/{job['id']}/audit").json()
    finally:
        listener.stop()
    assert "Patient not found in RIS worklist" in job["hl7"][0]["last_error"]
    assert "(AE)" in job["hl7"][0]["last_error"]
    assert any(e["kind"] == "hl7_failed" and "Patient not found" in e["detail"] for e in job["events"])
    assert audit["hl7"][0]["state"] == "failed"
    assert len(listener.received()) == 1, "an AE is final: the message is not sent again"
