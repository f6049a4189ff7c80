"""Throughput: N studies posted at once, processed with 1, 2 and 4 workers, each exactly once.

Each study is a copy of a real chest CT series with new UIDs (derived, in a temporary folder).
For every worker count a fresh Triton + Orthanc is started; the table gives studies per hour
(from the first upload to the last job finished), queue wait and job duration medians, and
checks that every study got exactly one SEG and one SR.

    .venv/bin/python bench/throughput.py [--studies 50] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.derive import copy_study, sorted_slices
from devstack.stack import OrthancServer, free_port  # noqa: E402
from devstack.triton_server import TritonServer  # noqa: E402


def post_folder(url: str, folder: Path) -> str:
    with httpx.Client(base_url=url, timeout=120) as c:
        study = ""
        for f in sorted(folder.glob("*.dcm")):
            r = c.post("/instances", content=f.read_bytes())
            r.raise_for_status()
            study = r.json()["ParentStudy"]
        return study


def _get(c: httpx.Client, path: str, params: dict[str, str] | None = None) -> Any:
    """GET JSON, once more on a fresh connection if Orthanc closed the kept-alive one (its
    idle timeout is about as long as the poll interval)."""
    try:
        return c.get(path, params=params).json()
    except httpx.RemoteProtocolError:
        return c.get(path, params=params).json()


def run(workers: int, studies: list[Path], tmp: Path, timeout_s: float) -> dict[str, float | int | str]:
    triton = TritonServer(
        Path(os.environ.get("ORTHANC_AI_MODEL_REPO", ROOT / "triton_models")),
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp / f"triton-{workers}.log", backend_root=tmp / "backends",
    ).start(timeout=120)  # fmt: skip
    orthanc = OrthancServer(
        tmp / f"storage-{workers}", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
        workers=workers, stable_age=2, log_file=tmp / f"orthanc-{workers}.log",
    ).start(timeout=60)  # fmt: skip
    try:
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(lambda f: post_folder(orthanc.url, f), studies))
        uploaded = time.time() - t0
        with httpx.Client(base_url=orthanc.url, timeout=60) as c:
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                jobs = _get(c, "/ai/jobs", {"limit": "10000"})
                if len(jobs) >= len(studies) and all(j["state"] in ("succeeded", "failed") for j in jobs):
                    break
                time.sleep(1)
            else:
                raise SystemExit(f"{workers} worker(s): not finished within {timeout_s:.0f} s")
            elapsed = max(j["finished"] for j in jobs) - t0
            failed = [j for j in jobs if j["state"] != "succeeded"]
            waits = [j["started"] - j["created"] for j in jobs if j["started"]]
            durations = [j["duration_s"] for j in jobs if j["duration_s"]]
            once = 0
            for sid in ids:
                mods = [s["MainDicomTags"].get("Modality") for s in _get(c, f"/studies/{sid}/series")]
                once += mods.count("SEG") == 1 and mods.count("SR") == 1
            retried = sum(1 for j in jobs if j["attempts"] > 1)
    finally:
        orthanc.stop()
        triton.stop()
    return {
        "workers": workers,
        "studies": len(studies),
        "upload_s": round(uploaded, 1),
        "elapsed_s": round(elapsed, 1),
        "per_hour": round(len(studies) / elapsed * 3600),
        "wait_median_s": round(statistics.median(waits), 1),
        "job_median_s": round(statistics.median(durations), 2),
        "failed": len(failed),
        "retried": retried,
        "exactly_once": f"{once}/{len(studies)}",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--series", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "A0002-B40f")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as name:
        tmp = Path(name)
        slices = sorted_slices(args.series)
        studies = [
            copy_study(slices, tmp / "studies" / f"{i:03d}", f"bench-throughput-{i}")
            for i in range(args.studies)
        ]
        rows = [run(w, studies, tmp, args.timeout) for w in args.workers]
    print(f"machine: {describe(machine())}")
    print(
        f"studies: {args.studies} copies of {args.series.name} ({len(slices)} slices each, new UIDs), posted at once\n"
    )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    record(
        "throughput",
        {f"studies_per_hour_{r['workers']}_workers": float(r["per_hour"]) for r in rows},
        {"studies": args.studies, "series": args.series.name, "rows": rows},
    )
    return (
        0
        if all(r["failed"] == 0 and r["exactly_once"] == f"{r['studies']}/{r['studies']}" for r in rows)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
