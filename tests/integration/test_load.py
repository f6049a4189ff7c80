"""Load: 200 studies queued while the REST API and DICOMweb keep answering.

Its own Orthanc (one worker, as ``make up`` starts it) on the session's Triton. 200 small
studies derived from ``A0001-5mm`` (every third slice: 22 slices 15 mm apart, averaged to
128 x 128, new UIDs) are posted by 4 threads; from the first upload until the measuring window
closes, one client asks in turn ``/ai/jobs?state=queued``, ``/studies``, ``/ai/health``, QIDO
``/dicom-web/studies`` (pages of 101 and of 25 studies) and the WADO-RS metadata of one study,
and records every latency. The medians and 95th percentiles (during the uploads, and while the
jobs are queued and processed) are printed and written to ``test-artifacts/load.json``; the
bound is generous (median under 1 s), there only to catch a collapse. Then every job still
queued or running is cancelled through the API: cancelling must work, no job may stay stuck,
no job may be lost. About 70 s on the 2-core machine.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from devstack.stack import OrthancServer
from devstack.triton_server import TritonServer
from orthanc_plugin.core.uids import derived_uid

from .conftest import TERMINAL, client, make_orthanc, wait_for
from .corpus import RUN, downsampled_ct, encode

pytestmark = pytest.mark.integration

N_STUDIES = 200
PIPELINE = "ct-lung"
#: How long the latencies are sampled once every study is uploaded and queued.
QUEUED_WINDOW_S = 30.0
COLLAPSE_MEDIAN_S = 1.0


def _template() -> tuple[Dataset, ...]:
    return downsampled_ct(every=3, factor=4, description="derived load test series")


def make_study(i: int) -> tuple[str, list[bytes]]:
    tag = f"load-{RUN}-{i}"
    study, series = derived_uid(tag, "study"), derived_uid(tag, "series")
    files = []
    for k, template in enumerate(_template()):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = derived_uid(tag, f"sop-{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(encode(ds))
    return study, files


@pytest.fixture(scope="module")
def loaded_orthanc(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[OrthancServer]:
    tmp = tmp_path_factory.mktemp("load")
    server = make_orthanc(tmp, triton.grpc_port, stable_age=2)
    server.start(timeout=60)
    yield server
    server.stop()


class Sampler(threading.Thread):
    """One client asking every endpoint in turn, as a user or a viewer would; records latencies."""

    def __init__(self, url: str, wado_study: str) -> None:
        super().__init__(daemon=True, name="latency-sampler")
        self.url = url
        self.phase = "uploading"
        self.stop = threading.Event()
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.errors: list[str] = []
        self.endpoints = {
            "REST /ai/jobs?state=queued": ("/ai/jobs", {"state": "queued"}),
            "REST /studies": ("/studies", {}),
            "REST /ai/health": ("/ai/health", {}),
            # OHIF's study list asks for pages of 101; 25 is a short worklist page.
            "DICOMweb QIDO /dicom-web/studies?limit=101": ("/dicom-web/studies", {"limit": "101"}),
            "DICOMweb QIDO /dicom-web/studies?limit=25": ("/dicom-web/studies", {"limit": "25"}),
            "DICOMweb WADO-RS study metadata": (f"/dicom-web/studies/{wado_study}/metadata", {}),
        }

    def run(self) -> None:
        with client(self.url, timeout=30) as api:
            while not self.stop.is_set():
                for name, (path, params) in self.endpoints.items():
                    phase = self.phase
                    t0 = time.perf_counter()
                    try:
                        r = api.get(path, params=params)
                        ok = r.status_code == 200 or (name == "REST /ai/health" and r.status_code == 503)
                        if not ok:
                            self.errors.append(f"{name}: HTTP {r.status_code} {r.text[:120]}")
                    except httpx.HTTPError as e:
                        self.errors.append(f"{name}: {type(e).__name__} {e}")
                        continue
                    self.samples[phase][name].append(time.perf_counter() - t0)
                self.stop.wait(0.1)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for phase, by_name in self.samples.items():
            out[phase] = {}
            for name, xs in by_name.items():
                xs = sorted(xs)
                out[phase][name] = {
                    "n": len(xs),
                    "median_ms": round(statistics.median(xs) * 1000, 1),
                    "p95_ms": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))] * 1000, 1),
                    "max_ms": round(xs[-1] * 1000, 1),
                }
        return out


def test_200_studies_queued_while_rest_and_dicomweb_answer(
    loaded_orthanc: OrthancServer, artifacts: Path
) -> None:
    t0 = time.time()
    studies = [make_study(i) for i in range(N_STUDIES)]
    uids = {uid for uid, _ in studies}
    generated = time.time() - t0
    api = client(loaded_orthanc.url, timeout=60)
    # The WADO-RS study is the first one, uploaded before sampling starts.
    first_uid, first_files = studies[0]
    for data in first_files:
        assert api.post("/instances", content=data).status_code == 200
    sampler = Sampler(loaded_orthanc.url, first_uid)
    sampler.start()

    def upload(files: list[bytes]) -> None:
        with client(loaded_orthanc.url, timeout=60) as c:
            for data in files:
                r = c.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
                assert r.status_code == 200, r.text[:200]

    t_up = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(upload, [files for _, files in studies[1:]]))
    uploaded = time.time() - t_up
    sampler.phase = "queued"
    window_end = time.time() + QUEUED_WINDOW_S

    def mine() -> list[dict[str, Any]]:
        jobs = api.get("/ai/jobs", params={"limit": "1000"}).json()
        return [j for j in jobs if j["study"]["StudyInstanceUID"] in uids and j["pipeline"] == PIPELINE]

    # Nothing lost: every study becomes a job (routed once stable).
    wait_for(
        f"{N_STUDIES} jobs", lambda: len(j := mine()) == N_STUDIES and j, timeout=120, orthanc=loaded_orthanc
    )
    time.sleep(max(0.0, window_end - time.time()))
    sampler.stop.set()
    sampler.join(30)
    jobs = mine()
    states = {s: sum(j["state"] == s for j in jobs) for s in ("queued", "running", "succeeded", "failed")}
    summary = sampler.summary()

    # Cancel what is left, through the API: the queue must empty and nothing may stay stuck.
    t_cancel = time.time()
    cancelled = 0
    for j in jobs:
        if j["state"] in ("queued", "running"):
            r = api.post(f"/ai/jobs/{j['id']}/cancel")
            # A job may finish between listing and cancelling: 409 then, and it is terminal.
            assert r.status_code in (200, 409), r.text
            if r.status_code == 200:
                assert r.json()["state"] == "cancelled", r.json()
                cancelled += 1

    def settled() -> list[dict[str, Any]] | None:
        now = mine()
        return now if all(j["state"] in TERMINAL for j in now) else None

    final = wait_for("every job finished or cancelled", settled, timeout=60, orthanc=loaded_orthanc)
    cancel_s = time.time() - t_cancel
    health = api.get("/ai/health").json()
    counts = {s: sum(j["state"] == s for j in final) for s in TERMINAL}

    report = {
        "studies": N_STUDIES,
        "instances_per_study": len(first_files),
        "workers": 1,
        "generated_s": round(generated, 1),
        "upload_s": round(uploaded, 1),
        "states_when_measured": states,
        "latency": summary,
        "cancelled": cancelled,
        "cancel_to_idle_s": round(cancel_s, 1),
        "final": counts,
        "errors": sampler.errors[:20],
        "total_s": round(time.time() - t0, 1),
    }
    (artifacts / "load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert not sampler.errors, sampler.errors[:5]
    for phase in ("uploading", "queued"):
        assert set(summary.get(phase, {})) == set(sampler.endpoints), (phase, summary.get(phase))
        for name, s in summary[phase].items():
            assert s["n"] >= 5, (phase, name, s)
            assert s["median_ms"] < COLLAPSE_MEDIAN_S * 1000, f"{name} collapsed while {phase}: {s}"
    # Every study became exactly one job, and each ended: done before the cancel, or cancelled.
    assert len(final) == N_STUDIES
    assert counts["failed"] == 0, [j["error"] for j in final if j["state"] == "failed"][:3]
    assert counts["succeeded"] + counts["cancelled"] == N_STUDIES, counts
    assert counts["succeeded"] >= 1 and counts["cancelled"] >= 1, counts
    assert health["queue"].get("queued", 0) == 0 and health["queue"].get("running", 0) == 0, health
    assert health["workers"]["alive"] == health["workers"]["expected"], health
    api.close()
