"""How fast the worker gets a series out of Orthanc: HTTP client, threads, parsing.

Starts its own Orthanc (no worker, no Triton), uploads one series (``--slices N`` derives an
N-slice series from it by resampling along z), then times, median of ``--runs``:

* the files' bytes with httpx (the client the rest of OrthancClient uses) and with the
  http.client reader OrthancClient uses for instance files, 2 and 4 threads;
* ``OrthancClient.read_instances`` (download + pydicom parse, what the worker's fetch stage
  does) with 1, 2 and 4 threads;
* pydicom parsing the same files from the local disk (the floor without any HTTP).

    .venv/bin/python bench/fetch_transport.py [--study ../shared/data/ct/A0001-5mm] [--slices 320] [--runs 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.stack import OrthancServer, free_port  # noqa: E402
from orthanc_plugin.orthanc_rest.client import OrthancClient  # noqa: E402


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm")
    p.add_argument("--slices", type=int, default=0, help="derive a series of this many slices first")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        folder = args.study
        if args.slices:
            from devstack.derive import resample_z, sorted_slices

            folder = resample_z(
                sorted_slices(folder), args.slices, tmp / "derived", f"bench-fetch-{args.slices}"
            )
        files = sorted(folder.glob("*.dcm"))
        size = sum(f.stat().st_size for f in files) / 1e6
        orthanc = OrthancServer(
            tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=free_port(),
            workers=0, stable_age=3600, log_file=tmp / "orthanc.log",
        ).start(timeout=60)  # fmt: skip
        try:
            # Orthanc gzips when asked (httpx asks by default): the worker asks for identity.
            identity = {"Accept-Encoding": "identity"}
            with httpx.Client(base_url=orthanc.url, timeout=60, headers=identity) as plain:
                ids = [plain.post("/instances", content=f.read_bytes()).json()["ID"] for f in files]
                client = OrthancClient(orthanc.url)

                def httpx_bytes(n: int) -> Callable[[], object]:
                    return lambda: list(
                        ThreadPoolExecutor(n).map(lambda i: plain.get(f"/instances/{i}/file").content, ids)
                    )

                def reader_bytes(n: int) -> Callable[[], object]:
                    return lambda: list(ThreadPoolExecutor(n).map(client.instance_file, ids))

                rows = [
                    ("bytes, httpx, 2 threads", httpx_bytes(2)),
                    ("bytes, httpx, 4 threads", httpx_bytes(4)),
                    ("bytes, http.client reader, 2 threads", reader_bytes(2)),
                    ("bytes, http.client reader, 4 threads", reader_bytes(4)),
                    *(
                        (
                            f"read_instances (bytes + parse), {n} thread(s)",
                            (lambda n=n: client.read_instances(ids, n)),
                        )
                        for n in (1, 2, 4)
                    ),
                    ("parse from local disk, no HTTP", lambda: [pydicom.dcmread(f) for f in files]),
                ]
                results = [(name, *timed(fn, args.runs)) for name, fn in rows]
                client.close()
        finally:
            orthanc.stop()
    print(f"machine: {describe(machine())}")
    print(
        f"series: {len(files)} instances, {size:.0f} MB, from {args.study}{' (derived)' if args.slices else ''}"
    )
    print(f"median of {args.runs} runs after a warm-up\n")
    print(f"| {'what':<44} | median s | min s |")
    print(f"|{'-' * 46}|---------:|------:|")
    for name, med, low in results:
        print(f"| {name:<44} | {med:8.3f} | {low:5.3f} |")
    record(
        f"fetch_transport_{len(files)}_slices",
        {f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_median_s": med for name, med, _ in results},
        {"instances": len(files), "megabytes": round(size, 1), "runs": args.runs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
