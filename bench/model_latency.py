# SPDX-License-Identifier: AGPL-3.0-or-later
"""Latency of each served model through Triton, CPU here, GPU wherever Triton has one.

Sends one request per model of the input shape its config.pbtxt declares (random data, batch 1)
with our client (gRPC, binary tensors, shared memory when Triton is local) and prints the
median and spread of ``--runs`` timed requests after one warm-up. Without ``--url`` it starts
its own tritonserver (the wheel's, CPU) on the project's model repository; with ``--url`` it
measures a Triton that is already running, e.g. NVIDIA's container on a GPU started with
``--model-config-name=gpu`` (ONNX Runtime + TensorRT FP16) or ``=trt`` (plans from
scripts/build_tensorrt.sh):

    .venv/bin/python bench/model_latency.py                      # CPU, own Triton
    .venv/bin/python bench/model_latency.py --url gpu-host:8001 --label "H100, TensorRT FP16"
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from record import record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.stack import free_port  # noqa: E402
from devstack.triton_server import TritonServer  # noqa: E402
from orthanc_plugin.inference.triton import TritonClient  # noqa: E402

MODELS = ("ct_lung", "lung_attenuation", "mr_brain")


def measure(client: TritonClient, name: str, runs: int) -> dict[str, object]:
    info = client.model_info(name)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in info.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        feeds[spec.name] = rng.random(shape, dtype=np.float32)
    outputs = [o.name for o in info.outputs]
    timeout = 1800.0
    client.infer(name, feeds, outputs, timeout_s=timeout)  # warm-up (engine build, allocation)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        client.infer(name, feeds, outputs, timeout_s=timeout)
        times.append(time.perf_counter() - t0)
    shape = "+".join("x".join(map(str, a.shape[1:])) for a in feeds.values())
    return {"model": name, "version": info.version, "input": shape, "runs": runs, "times": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="gRPC address of a running Triton (default: start one here, CPU)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--runs", type=int, default=5, help="timed requests per model (mr_brain: 1 on CPU)")
    ap.add_argument("--label", default="", help="what serves the models, for the table (e.g. the GPU)")
    args = ap.parse_args()

    server = None
    url = args.url
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
        server = TritonServer(
            ROOT / "triton_models", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            log_file=tmp / "triton.log", backend_root=tmp / "backends",
        )  # fmt: skip
        server.start(timeout=180)
        url = f"127.0.0.1:{server.grpc_port}"
    label = (
        args.label
        or f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), Triton wheel"
    )
    client = TritonClient(url)
    try:
        rows = []
        for name in args.models:
            runs = min(args.runs, 1) if name == "mr_brain" and args.url is None else args.runs
            rows.append(measure(client, name, runs))
    finally:
        client.close()
        if server is not None:
            server.stop()

    print(f"\nModel latency through Triton, one request, batch 1 — {label}")
    print(
        f"{'model':<18}{'version':>8}  {'input':<30}{'runs':>5}{'median ms':>12}{'min ms':>10}{'max ms':>10}"
    )
    for r in rows:
        t = [x * 1000 for x in r["times"]]  # type: ignore[union-attr]
        print(
            f"{r['model']:<18}{r['version']:>8}  {r['input']:<30}{r['runs']:>5}"
            f"{statistics.median(t):>12.1f}{min(t):>10.1f}{max(t):>10.1f}"
        )
    record(
        "model_latency" if args.url is None else "model_latency_remote",
        {f"{r['model']}_median_ms": statistics.median([x * 1000 for x in r["times"]]) for r in rows},  # type: ignore[union-attr]
        {"served_by": label, "runs": {str(r["model"]): r["runs"] for r in rows}},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
