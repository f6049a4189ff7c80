"""Fault injection on the real stack: processes killed mid-burst, the EHR down, Orthanc refusing a store.

Every test starts its own Triton, Orthanc (with its workers) and EHR (FHIR) server on free ports
in temporary folders, because it kills them; the session fixtures are left alone. The
random moments come from a seeded RNG (``ORTHANC_AI_FAULT_SEED``), so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.derive import copy_study, sorted_slices
from devstack.stack import ROOT, OrthancServer, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.core.uids import derived_uid

from ..conftest import CT_B40, require_data
from .conftest import TERMINAL, series_by_modality, wait_for
from .test_fhir_delivery import ORTHANC_TOKEN, EhrProcess, our_id, reports_with

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("ORTHANC_AI_FAULT_SEED", "1729"))
NORMAL_CONFIG = ROOT / "config" / "orthanc.json"
#: One nonce per module run: the derived UIDs differ from any earlier run's.
RUN = uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def triton_f(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("faults-triton")
    server = TritonServer(
        ROOT / "triton_models",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp / "triton.log", backend_root=tmp / "backends",
    )  # fmt: skip
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def ehr(tmp_path: Path) -> Iterator[EhrProcess]:
    """An EHR of the test's own, so that its counts are the test's alone."""
    server = EhrProcess(free_port(), tmp_path / "ehr.jsonl", tmp_path / "ehr.log")
    server.start(ORTHANC_TOKEN)
    yield server
    server.stop()


@pytest.fixture
def make_orthanc(tmp_path: Path, triton_f: TritonServer) -> Iterator[Callable[..., OrthancServer]]:
    started: list[OrthancServer] = []

    def make(
        workers: int = 1,
        lease_seconds: float = 8,
        stable_age: int = 1,
        extra_env: dict[str, str] | None = None,
        config_file: Path = NORMAL_CONFIG,
    ) -> OrthancServer:
        tmp = tmp_path / "orthanc"
        server = OrthancServer(
            tmp / "storage", http_port=free_port(), dicom_port=free_port(),
            triton_grpc_port=triton_f.grpc_port, workers=workers, stable_age=stable_age,
            lease_seconds=lease_seconds, log_file=tmp / "orthanc.log", config_file=config_file,
            extra_env=extra_env or {},
        )  # fmt: skip
        started.append(server)
        return server.start(timeout=60)

    yield make
    for s in started:
        s.stop()


def make_studies(tmp: Path, n: int, name: str) -> list[tuple[str, list[bytes]]]:
    """``n`` copies of A0002-B40f (30 slices) as new studies: [(StudyInstanceUID, files' bytes)]."""
    require_data(CT_B40)
    slices = sorted_slices(CT_B40)
    out = []
    for i in range(n):
        tag = f"faults-{RUN}-{name}-{i}"
        folder = copy_study(slices, tmp / f"{name}-{i:02d}", tag)
        out.append((derived_uid(tag, "study"), [f.read_bytes() for f in sorted(folder.glob("*.dcm"))]))
    return out


def post_all(
    url: str,
    files: list[bytes],
    deadline: float,
    resent: list[int] | None = None,
    stored: list[int] | None = None,
) -> None:
    """POST every file until Orthanc took it; connection errors (Orthanc killed) are retried.

    Re-sending is idempotent: same SOPInstanceUID, and Orthanc runs with OverwriteInstances.
    """
    with httpx.Client(base_url=url, timeout=30) as c:
        for data in files:
            while True:
                try:
                    r = c.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
                    if r.status_code == 200:
                        if stored is not None:
                            stored.append(1)
                        break
                    assert r.status_code >= 500, f"Orthanc refused an upload: {r.status_code} {r.text[:200]}"
                except httpx.HTTPError:
                    pass
                if resent is not None:
                    resent.append(1)
                if time.time() > deadline:
                    raise TimeoutError(f"could not upload to {url} before the deadline")
                time.sleep(0.25)


def lookup_study(api: httpx.Client, uid: str) -> str | None:
    for hit in api.post("/tools/lookup", content=uid.encode()).json():
        if hit["Type"] == "Study":
            return str(hit["ID"])
    return None


def get_json(api: httpx.Client, path: str, **params: Any) -> Any:
    """GET that tolerates Orthanc being restarted under our feet (None while it is down)."""
    try:
        r = api.get(path, params=params)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def all_jobs(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/ai/jobs", params={"limit": "1000"}).json())


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for its new parent to reap does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def worker_log_lines(server: OrthancServer, text: str) -> int:
    """How many lines of the server's worker logs contain ``text``."""
    return sum(
        line.count(text)
        for f in (server.storage.parent / "log").glob("worker-*.log")
        for line in f.read_text(errors="replace").splitlines()
    )


def assert_one_seg_one_sr(api: httpx.Client, uid: str) -> None:
    sid = lookup_study(api, uid)
    assert sid is not None, f"study {uid} is not in Orthanc"
    segs, srs = series_by_modality(api, sid, "SEG"), series_by_modality(api, sid, "SR")
    assert [len(s["Instances"]) for s in segs] == [1], f"study {uid}: SEG series {segs}"
    assert [len(s["Instances"]) for s in srs] == [1], f"study {uid}: SR series {srs}"
    (ct,) = series_by_modality(api, sid, "CT")
    assert len(ct["Instances"]) == 30


def orthanc_log(server: OrthancServer) -> str:
    parts = []
    for f in (server.log_file, *sorted((server.storage.parent / "log").glob("worker-*.log"))):
        if f is not None and f.is_file():
            lines = f.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
    return "\n".join(parts)


# --------------------------------------------------------------------------- 1. burst with kills


def test_burst_with_kills_every_study_once(
    make_orthanc: Callable[..., OrthancServer], triton_f: TritonServer, ehr: EhrProcess, tmp_path: Path
) -> None:
    # 30 studies (900 instances of 512 x 512): both workers stay busy through every fault.
    n = 30
    started = time.time()
    rng = random.Random(SEED)
    studies = make_studies(tmp_path / "data", n, "burst")
    orthanc = make_orthanc(
        workers=2, lease_seconds=6, stable_age=1,
        extra_env={
            "ORTHANC_AI_FHIR_URL": ehr.url,
            "ORTHANC_AI_FHIR_TOKEN": ORTHANC_TOKEN,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2",
        },
    )  # fmt: skip
    api = httpx.Client(base_url=orthanc.url, timeout=30)
    deadline = time.time() + 300
    resent: list[int] = []
    stored: list[int] = []
    errors: list[BaseException] = []

    def upload(files: list[bytes]) -> None:
        try:
            post_all(orthanc.url, files, deadline, resent, stored)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(files,), daemon=True) for _, files in studies]
    for t in threads:
        t.start()
    faults: list[str] = []

    def running_owner() -> tuple[str, str] | None:
        """(lease owner, job id) of a job in the middle of its run."""
        jobs = get_json(api, "/ai/jobs", state="running") or []
        for j in jobs:
            d = get_json(api, f"/ai/jobs/{j['id']}")
            if d and d["lease"]["owner"] and d["stage"] not in ("store", "done"):
                return str(d["lease"]["owner"]), str(d["id"])
        return None

    # Fault 1: Orthanc SIGKILLed while the uploads run (they must be re-sent), then started again
    # on the same storage; its workers notice their parent is gone and the new Orthanc starts new ones.
    after = rng.randint(n * 30 // 6, n * 30 // 2)
    wait_for(f"{after} instances uploaded", lambda: len(stored) >= after, timeout=60, period=0.01)
    orphans = [w["pid"] for w in api.get("/ai/health").json()["workers"]["detail"]]
    orthanc.kill()
    faults.append("orthanc SIGKILL")
    # The dead Orthanc's workers notice it is gone and exit by themselves (a new Orthanc starts
    # its own): none may go on taking jobs beside the new ones.
    wait_for(
        f"the dead Orthanc's workers {orphans} to exit",
        lambda: not any(process_alive(pid) for pid in orphans), timeout=60, period=0.2,
    )  # fmt: skip
    time.sleep(rng.uniform(0.5, 2.0))
    orthanc.start(timeout=60)
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    assert not errors, errors
    # Fault 2: a worker SIGKILLed while it holds a job.
    time.sleep(rng.uniform(0.5, 3.0))
    owner, killed_job = wait_for("a running job", running_owner, timeout=60, period=0.2, orthanc=orthanc)
    pid = int(owner.rsplit(":", 1)[1])
    health = api.get("/ai/health").json()
    assert pid in [w["pid"] for w in health["workers"]["detail"]], (owner, health)
    os.kill(pid, signal.SIGKILL)
    faults.append(f"worker {pid} SIGKILL")
    # Fault 3: Triton SIGKILLed while a job runs, then started again on the same ports. (A SIGTERM,
    # a graceful stop, fails the jobs that ask Triton during its shutdown: see
    # test_triton_graceful_stop_errors_are_retryable below.)
    time.sleep(rng.uniform(0.5, 3.0))
    wait_for("a running job", running_owner, timeout=60, period=0.2, orthanc=orthanc)
    assert triton_f.pid is not None
    os.killpg(triton_f.pid, signal.SIGKILL)
    triton_f.stop(timeout=15)
    faults.append("triton SIGKILL")
    time.sleep(rng.uniform(0.2, 1.0))
    triton_f.start(timeout=120)

    # A kill can lose an upload Orthanc had not acknowledged: check every study is complete.
    for uid, files in studies:
        sid = lookup_study(api, uid)
        count = len(api.get(f"/studies/{sid}/instances").json()) if sid else 0
        if count != len(files):
            post_all(orthanc.url, files, deadline, resent)

    uids = {uid for uid, _ in studies}
    print(f"seed {SEED}: faults {faults}; {len(resent)} upload attempt(s) re-sent")
    assert resent, "the Orthanc kill was meant to interrupt the uploads"

    def settled() -> list[dict[str, Any]] | None:
        jobs = get_json(api, "/ai/jobs", limit="1000")
        if not jobs:
            return None
        mine = [j for j in jobs if j["study"]["StudyInstanceUID"] in uids and not j["superseded_by"]]
        done = {j["study"]["StudyInstanceUID"] for j in mine if j["state"] in TERMINAL}
        if done != uids or any(j["state"] not in TERMINAL for j in mine):
            return None
        health = get_json(api, "/ai/health")
        return mine if health and health["fhir_backlog"] == 0 else None

    jobs = wait_for(
        f"all {n} jobs finished and delivered (faults: {faults})",
        settled, timeout=max(1.0, deadline - time.time()), period=1.0, orthanc=orthanc,
    )  # fmt: skip
    detail = [api.get(f"/ai/jobs/{j['id']}").json() for j in jobs]
    summary = {j["id"]: (j["state"], j["attempts"], j["error"]) for j in detail}
    # A series seen complete while its upload was still under way (an upload thread starved of CPU
    # for longer than the quiet time, or an instance re-sent after the Orthanc kill) gets a job
    # that the complete series' job supersedes: such jobs are left out above (superseded_by), and
    # the study must still hold one SEG and one SR and the EHR one report. A second *current* job
    # for a study would be a duplicate: say so with the instance counts of each job.
    by_study: dict[str, list[dict[str, Any]]] = {}
    for j in detail:
        by_study.setdefault(j["study"]["StudyInstanceUID"], []).append(j)
    repeated = {
        uid: [
            (j["id"], j["state"], {r: s.get("instances") for r, s in (j.get("series") or {}).items()})
            for j in js
        ]
        for uid, js in by_study.items()
        if len(js) > 1
    }
    assert len(detail) == n, (
        f"one job per study expected; studies with several jobs (id, state, instances per role): {repeated}"
    )
    assert all(j["state"] == "succeeded" for j in detail), (
        f"faults {faults}: {summary}\n{orthanc_log(orthanc)}"
    )
    for uid in uids:
        assert_one_seg_one_sr(api, uid)
    # The job records show the faults were survived by retrying, not by luck: the job whose
    # worker was killed went back to the queue and succeeded on a later attempt, or, when its
    # series changed meanwhile (an instance re-sent after the Orthanc kill), was superseded by
    # the job that holds the study's one result (checked above) and stored nothing itself.
    killed = api.get(f"/ai/jobs/{killed_job}").json()
    assert any(e["kind"] == "requeued" for e in killed["events"]), killed["events"]
    if killed["superseded_by"] is None:
        assert killed["state"] == "succeeded" and killed["attempts"] >= 2, killed["events"]
    else:
        assert killed["state"] in ("cancelled", "succeeded"), killed
        assert any(j["study"]["StudyInstanceUID"] == killed["study"]["StudyInstanceUID"] for j in detail)
    # Every report reached the EHR exactly once.
    for j in detail:
        assert j["delivery"]["state"] == "delivered", j["delivery"]
        assert len(reports_with(ehr, our_id(j))) == 1, j["id"]
        assert len(ehr.search("/DiagnosticReport", study=j["study"]["StudyInstanceUID"])) == 1
    stats = ehr.get("/_stats")["resources"]
    # per study: a volume and a panel of radiomics features per lung
    assert stats["DiagnosticReport"] == n and stats["Observation"] == 4 * n, stats
    assert api.get("/ai/health").json()["queue"]["running"] == 0
    retried = sum(j["attempts"] > 1 or any(e["kind"] == "requeued" for e in j["events"]) for j in detail)
    print(f"burst of {n}: {retried} job(s) retried or requeued, {time.time() - started:.0f} s in all")
    api.close()


def test_workers_take_no_job_while_triton_is_down(
    make_orthanc: Callable[..., OrthancServer], triton_f: TritonServer, tmp_path: Path
) -> None:
    """A job queued while Triton is down stays queued, no attempt spent, and runs once Triton is back."""
    ((uid, files),) = make_studies(tmp_path / "data", 1, "triton-down")
    orthanc = make_orthanc()
    api = httpx.Client(base_url=orthanc.url, timeout=30)
    refusal = "is not ready; not taking jobs"
    triton_f.stop(timeout=15)
    try:
        wait_for(
            "a worker to notice Triton is gone", lambda: worker_log_lines(orthanc, refusal) > 0, timeout=60
        )
        post_all(orthanc.url, files, time.time() + 120)
        job = wait_for(
            "the job queued", lambda: (get_json(api, "/ai/jobs", study=uid) or [None])[0], timeout=60
        )
        # the workers looked at Triton again after the job was queued, and left the job alone
        seen = worker_log_lines(orthanc, refusal)
        wait_for("another look at Triton", lambda: worker_log_lines(orthanc, refusal) > seen, timeout=30)
        waiting = api.get(f"/ai/jobs/{job['id']}").json()
        assert waiting["state"] == "queued" and waiting["attempts"] == 0, waiting
    finally:
        triton_f.start(timeout=120)
    done = wait_for(
        "the job to run once Triton is back",
        lambda: (lambda j: j if j["state"] in TERMINAL else None)(api.get(f"/ai/jobs/{job['id']}").json()),
        timeout=120, orthanc=orthanc,
    )  # fmt: skip
    assert done["state"] == "succeeded" and done["attempts"] == 1, (done["state"], done["error"])
    api.close()


# --------------------------------------------------------------------------- 2. EHR down


def test_fhir_down_during_burst_then_all_arrive_once(
    make_orthanc: Callable[..., OrthancServer], ehr: EhrProcess, tmp_path: Path
) -> None:
    n = 6
    studies = make_studies(tmp_path / "data", n, "ehr-down")
    orthanc = make_orthanc(
        workers=2, lease_seconds=8, stable_age=1,
        extra_env={
            "ORTHANC_AI_FHIR_URL": ehr.url,
            "ORTHANC_AI_FHIR_TOKEN": ORTHANC_TOKEN,
            "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "1",
        },
    )  # fmt: skip
    api = httpx.Client(base_url=orthanc.url, timeout=30)
    deadline = time.time() + 180
    threads = [
        threading.Thread(target=post_all, args=(orthanc.url, files, deadline), daemon=True)
        for _, files in studies
    ]
    for t in threads:
        t.start()
    uids = {uid for uid, _ in studies}

    def mine(state: str) -> list[dict[str, Any]]:
        """This burst's jobs in ``state``, those superseded by a later job of their study left out."""
        return [
            j
            for j in all_jobs(api)
            if j["study"]["StudyInstanceUID"] in uids and j["state"] == state and not j["superseded_by"]
        ]

    # The EHR goes down once the first report is on its way, while the rest are being computed.
    wait_for("a first job to succeed", lambda: mine("succeeded"), timeout=120, orthanc=orthanc)
    ehr.stop()
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    jobs = wait_for(
        f"all {n} jobs succeeded", lambda: len(s := mine("succeeded")) == n and s,
        timeout=max(1.0, deadline - time.time()), orthanc=orthanc,
    )  # fmt: skip
    failing = [j for j in jobs if (j["delivery"] or {}).get("state") != "delivered"]
    assert failing, "the EHR went down too late: every report was delivered before"
    wait_for(
        "a failed delivery attempt",
        lambda: any((api.get(f"/ai/jobs/{j['id']}").json()["delivery"] or {}).get("last_error") for j in failing),
        timeout=30, orthanc=orthanc,
    )  # fmt: skip
    wait_for(
        "a held-back report retried while the EHR is down",
        lambda: any((api.get(f"/ai/jobs/{j['id']}").json()["delivery"] or {}).get("attempts", 0) >= 2 for j in failing),
        timeout=30, orthanc=orthanc,
    )  # fmt: skip
    assert api.get("/ai/health").json()["fhir_backlog"] >= len(failing)
    ehr.start(ORTHANC_TOKEN)
    wait_for(
        "every report delivered", lambda: api.get("/ai/health").json()["fhir_backlog"] == 0,
        timeout=60, orthanc=orthanc,
    )  # fmt: skip
    for j in jobs:
        d = api.get(f"/ai/jobs/{j['id']}").json()
        assert d["delivery"]["state"] == "delivered"
        assert len(reports_with(ehr, our_id(d))) == 1, d["id"]
    # The reports held back were retried, not lost: at least one needed more than one attempt.
    assert any(api.get(f"/ai/jobs/{j['id']}").json()["delivery"]["attempts"] > 1 for j in failing)
    stats = ehr.get("/_stats")["resources"]
    assert stats["DiagnosticReport"] == n and stats["Observation"] == 4 * n, stats
    api.close()


# --------------------------------------------------------------------------- Triton stopped gracefully


def test_triton_graceful_stop_errors_are_retryable(triton_f: TritonServer) -> None:
    """Ask Triton for the model, as a worker does, from SIGTERM until it has exited: every error is retryable.

    Triton unloads its models before closing its endpoints; a worker asking in that window
    must get a retryable error, or a routine Triton restart fails its jobs for good.
    """
    from orthanc_plugin.inference.triton import InferenceError, TritonClient

    client = TritonClient(triton_f.grpc_url, use_shared_memory=False, timeout_s=5)
    assert client.model_info("ct_lung").name == "ct_lung"
    permanent: list[str] = []
    retryable: list[str] = []
    assert triton_f.pid is not None
    os.kill(triton_f.pid, signal.SIGTERM)
    end = time.time() + 30
    try:
        while triton_f.is_running() and time.time() < end:
            try:
                client.model_info("ct_lung")
            except InferenceError as e:
                (retryable if e.retryable else permanent).append(str(e))
            time.sleep(0.05)
    finally:
        client.close()
        triton_f.stop(timeout=15)
        triton_f.start(timeout=120)
    assert retryable or permanent, "Triton exited before it could be asked anything"
    assert permanent == [], permanent[:3]


# --------------------------------------------------------------------------- 3. Orthanc refuses a store

REFUSE_LUA = """
-- Written by tests/integration/test_faults.py: Orthanc refuses our SEG of one study and our SR of another.
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.StudyInstanceUID == '{seg_study}' and dicom.Modality == 'SEG' then
    return false
  end
  if dicom.StudyInstanceUID == '{sr_study}' and dicom.Modality == 'SR' then
    return false
  end
  return true
end
"""


def config_with_lua(tmp: Path, lua: str) -> Path:
    """config/orthanc.json plus a LuaScripts entry (textual edit: the file has comments and ${VAR}s)."""
    script = tmp / "refuse.lua"
    script.write_text(lua)
    text = NORMAL_CONFIG.read_text()
    brace = text.index("{")
    config = tmp / "orthanc-refuse.json"
    config.write_text(text[: brace + 1] + f'\n  "LuaScripts": ["{script}"],' + text[brace + 1 :])
    return config


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory, triton_f: TritonServer) -> Iterator[dict[str, Any]]:
    """Two studies processed while Orthanc refuses the SEG of the first and the SR of the second.

    Orthanc 1.10.1 has no "MaximumStorageMode": "Reject" (a full storage recycles, it does not
    refuse), so the refusal is a Lua ReceivedInstanceFilter. Its answer to the REST upload is
    HTTP 200 with "Status": "FilteredOut" (checked by hand on 1.10.1), not a 4xx.
    """
    tmp = tmp_path_factory.mktemp("faults-refused")
    (seg_uid, seg_files), (sr_uid, sr_files) = make_studies(tmp / "data", 2, "refused")
    lua = REFUSE_LUA.replace("{seg_study}", seg_uid).replace("{sr_study}", sr_uid)
    orthanc = OrthancServer(
        tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton_f.grpc_port,
        workers=1, stable_age=1, lease_seconds=8, log_file=tmp / "orthanc.log",
        config_file=config_with_lua(tmp, lua),
    )  # fmt: skip
    orthanc.start(timeout=60)
    api = httpx.Client(base_url=orthanc.url, timeout=30)
    deadline = time.time() + 60
    post_all(orthanc.url, seg_files, deadline)
    post_all(orthanc.url, sr_files, deadline)

    def finished(uid: str) -> dict[str, Any] | None:
        jobs = api.get("/ai/jobs", params={"study": uid}).json()
        if jobs and all(j["state"] in TERMINAL for j in jobs):
            return dict(api.get(f"/ai/jobs/{jobs[0]['id']}").json())
        return None

    out: dict[str, Any] = {"orthanc": orthanc, "api": api}
    for name, uid in (("seg", seg_uid), ("sr", sr_uid)):
        job = wait_for(f"the job of study {uid}", lambda uid=uid: finished(uid), timeout=120, orthanc=orthanc)
        sid = lookup_study(api, uid)
        assert sid is not None
        out[name] = {
            "uid": uid,
            "job": job,
            "jobs": len(api.get("/ai/jobs", params={"study": uid}).json()),
            "SEG": series_by_modality(api, sid, "SEG"),
            "SR": series_by_modality(api, sid, "SR"),
        }
    yield out
    api.close()
    orthanc.stop()


def test_orthanc_refuses_seg_store_job_fails_clearly(refused: dict[str, Any]) -> None:
    seg = refused["seg"]
    job = seg["job"]
    assert job["state"] == "failed", (job["state"], job["outputs"])
    # An admin reads which store was refused, by whom, and with what status.
    assert "Orthanc refused to store the SEG instance: Status FilteredOut" in job["error"], job["error"]
    # A refusal is not transient: failed at once, no attempt burnt on retrying it.
    assert job["attempts"] == 1, job["events"]
    assert not any(e["kind"] == "requeued" for e in job["events"]), job["events"]
    assert seg["SEG"] == [] and seg["SR"] == [], "nothing is stored when the SEG is refused"
    assert seg["jobs"] == 1


def test_orthanc_refuses_sr_store_leaves_nothing_partial(refused: dict[str, Any]) -> None:
    sr = refused["sr"]
    job = sr["job"]
    assert job["state"] == "failed", (job["state"], job["outputs"])
    assert "Orthanc refused to store the SR instance: Status FilteredOut" in job["error"], job["error"]
    assert job["attempts"] == 1, job["events"]
    assert sr["SR"] == []
    assert sr["SEG"] == [], "a SEG without its SR was left in the study"


def test_orthanc_refuses_store_then_retry_succeeds(refused: dict[str, Any]) -> None:
    """Runs after the two above (file order): the refusal is removed, a retry writes SEG and SR once."""
    orthanc: OrthancServer = refused["orthanc"]
    api: httpx.Client = refused["api"]
    # One job per study, whatever the refusal left (checked by the two tests above).
    assert refused["seg"]["jobs"] == refused["sr"]["jobs"] == 1
    # Orthanc restarted with the normal configuration, same storage.
    orthanc.stop()
    orthanc.config_file = NORMAL_CONFIG
    orthanc.start(timeout=60)
    for case in (refused["seg"], refused["sr"]):
        r = api.post(f"/ai/jobs/{case['job']['id']}/retry")
        assert r.status_code == 200, r.text
    for case in (refused["seg"], refused["sr"]):
        done = wait_for(
            f"the retried job of {case['uid']}",
            lambda c=case: (j := api.get(f"/ai/jobs/{c['job']['id']}").json())["state"] in TERMINAL and j,
            timeout=120, orthanc=orthanc,
        )  # fmt: skip
        assert done["state"] == "succeeded", done["error"]
        assert done["attempts"] == 1
        assert_one_seg_one_sr(api, case["uid"])
        assert len(api.get("/ai/jobs", params={"study": case["uid"]}).json()) == 1
