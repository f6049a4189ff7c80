"""Scale-out on PostgreSQL: two Orthancs sharing one index and one DICOM folder, plus a worker
started on its own with the worker-host command, all on one job store in PostgreSQL.

A burst of distinct studies, uploaded alternately to the two Orthancs, must each be done exactly
once (one job, one SEG, one SR) although both plugins read the same change log; the jobs must
be shared out between the workers of the Orthanc and the worker host; both Orthancs must show
every result. Real PostgreSQL (Debian binaries), real Orthanc + PostgreSQL index plugin, real
tritonserver. About 60-90 s on 2 cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from devstack.common import log_tail
from devstack.derive import copy_study, sorted_slices
from devstack.postgres_server import PostgresServer
from devstack.stack import ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.jobs.store import JobStore

from ..conftest import CT_A0001, require_data
from .conftest import TERMINAL, series_by_modality, upload_folder, wait_for
from .pg_fixtures import PASSWORD_ENV, postgres  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

STUDIES = 10
SLICES = slice(17, 47)  # 30 contiguous slices through the lungs: small, still a real chest CT
RUN = uuid.uuid4().hex[:12]  # new UIDs on every run
REMOTE_OWNER = "worker-host:1"
# The worker host reads the database password from this variable (the command's default).
DB_PASSWORD_ENV = "ORTHANC_AI_DATABASE_PASSWORD"


@pytest.fixture
def cluster(
    tmp_path: Path,
    triton: TritonServer,
    postgres: PostgresServer,  # noqa: F811 - fixture
) -> Iterator[tuple[list[OrthancServer], subprocess.Popen[bytes], str]]:
    # Only the CT lung pipeline: one job, one SEG and one SR per study, whatever else the
    # project's pipelines file enables.
    config = yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text(
        yaml.safe_dump({"pipelines": [p for p in config["pipelines"] if p["name"] == "ct-lung"]})
    )
    index_url = postgres.create_database("orthanc_index")
    jobs_url = postgres.create_database("orthanc_ai_jobs")
    shared_dicom = tmp_path / "dicom-files"
    orthancs = [
        OrthancServer(
            tmp_path / f"orthanc{i}" / "storage",
            http_port=free_port(),
            dicom_port=free_port(),
            triton_grpc_port=triton.grpc_port,
            workers=workers,
            stable_age=2,
            lease_seconds=10,
            log_file=tmp_path / f"orthanc{i}" / "orthanc.log",
            dicom_storage=shared_dicom,
            index_database=index_url,
            job_database=jobs_url,
            database_password=postgres.password,
            extra_env={"ORTHANC_AI_PIPELINES": str(pipelines)},
        )  # fmt: skip
        # One worker in the first Orthanc, none in the second: the worker host does the rest.
        for i, workers in enumerate((1, 0))
    ]
    started: list[OrthancServer] = []
    remote: subprocess.Popen[bytes] | None = None
    try:
        for o in orthancs:  # one after the other: the first creates the index's tables
            started.append(o.start(timeout=60))
        remote_log = open(tmp_path / "worker-host.log", "ab")  # noqa: SIM115 - closed below
        remote = subprocess.Popen(
            [
                sys.executable, "-m", "orthanc_plugin", "worker",
                "--orthanc-url", orthancs[1].url,
                "--triton-url", f"127.0.0.1:{triton.grpc_port}",
                "--triton-shared-memory", "off",  # as on another host
                "--database-url", jobs_url,
                "--pipelines", str(pipelines),
                "--lease-seconds", "10",
                "--owner", REMOTE_OWNER,
            ],
            env={**os.environ, DB_PASSWORD_ENV: postgres.password, "PYTHONPATH": str(ROOT)},
            stdout=remote_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(tmp_path),
        )  # fmt: skip
        remote_log.close()
        yield orthancs, remote, jobs_url
    finally:
        if remote is not None and remote.poll() is None:
            remote.send_signal(signal.SIGTERM)
            try:
                remote.wait(30)
            except subprocess.TimeoutExpired:
                remote.kill()
                remote.wait()
        for o in started:
            o.stop()


def test_a_burst_is_shared_out_and_each_study_done_once(
    tmp_path: Path,
    cluster: tuple[list[OrthancServer], subprocess.Popen[bytes], str],
    postgres: PostgresServer,  # noqa: F811 - fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_data(CT_A0001)
    orthancs, remote, jobs_url = cluster
    slices = sorted_slices(CT_A0001)[SLICES]
    folders = [
        copy_study(slices, tmp_path / "studies" / f"s{i}", f"scale-out-{RUN}-{i}") for i in range(STUDIES)
    ]
    t0 = time.monotonic()

    # The burst: two uploaders at once, each study to one Orthanc, alternately.
    study_ids: dict[int, str] = {}
    errors: list[BaseException] = []

    def upload(which: int) -> None:
        try:
            with httpx.Client(base_url=orthancs[which].url, timeout=60) as c:
                for i in range(which, STUDIES, 2):
                    study_ids[i] = upload_folder(c, folders[i])
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    uploaders = [threading.Thread(target=upload, args=(w,)) for w in (0, 1)]
    for t in uploaders:
        t.start()
    for t in uploaders:
        t.join(120)
    assert not errors, errors
    assert len(study_ids) == STUDIES

    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    store = JobStore(postgres.target("orthanc_ai_jobs", PASSWORD_ENV))
    try:

        def all_done() -> bool:
            assert remote.poll() is None, (
                f"the worker host exited with {remote.returncode}:\n{log_tail(tmp_path / 'worker-host.log', 40)}"
            )
            jobs = store.list_jobs(limit=1000)
            return len(jobs) >= STUDIES and all(j.state in TERMINAL for j in jobs)

        wait_for("every study's job to finish", all_done, timeout=240, period=1, orthanc=orthancs[0])
        elapsed = time.monotonic() - t0
        # Storing the SEG/SR makes each study unstable again: give both intakes the time to see
        # the second StableStudy and (not) route it again.
        time.sleep(orthancs[0].stable_age + 4)

        jobs = store.list_jobs(limit=1000)
        with httpx.Client(timeout=30) as c:
            uids = {
                i: c.get(f"{orthancs[0].url}/studies/{sid}").json()["MainDicomTags"]["StudyInstanceUID"]
                for i, sid in study_ids.items()
            }
        by_study = Counter(j.study_uid for j in jobs)
        assert sorted(by_study.values()) == [1] * STUDIES and set(by_study) == set(uids.values()), by_study
        failed = {j.study_uid: j.error for j in jobs if j.state != "succeeded"}
        assert not failed, failed
        assert store.counts() == {
            "queued": 0,
            "running": 0,
            "succeeded": STUDIES,
            "failed": 0,
            "cancelled": 0,
        }

        owners: Counter[str] = Counter()
        for j in jobs:
            events = store.events(j.id)
            assert [e["kind"] for e in events].count("queued") == 1, events  # enqueued once, by one intake
            claims = [m.group(1) for e in events if (m := re.match(r"claimed by (.+)$", e["detail"]))]
            owners[claims[-1]] += 1
        # Shared out: the worker host and the first Orthanc's worker both ran jobs.
        assert owners[REMOTE_OWNER] >= 1 and len(owners) >= 2, owners

        # One index: each Orthanc shows every study with exactly one SEG and one SR.
        for o in orthancs:
            with httpx.Client(base_url=o.url, timeout=30) as c:
                for sid in study_ids.values():
                    assert len(series_by_modality(c, sid, "SEG")) == 1, (o.url, sid)
                    assert len(series_by_modality(c, sid, "SR")) == 1, (o.url, sid)
                listed = c.get("/ai/jobs", params={"limit": 1000}).json()
                assert {j["id"] for j in listed} >= {j.id for j in jobs}
        print(
            f"\n{STUDIES} studies done in {elapsed:.1f} s after upload; jobs per worker: {dict(owners)}",
            file=sys.stderr,
        )
    finally:
        store.close()
