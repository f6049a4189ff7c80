# SPDX-License-Identifier: AGPL-3.0-or-later
"""How much does the trip through Triton cost compared with ONNX Runtime in-process?

Starts its own tritonserver (wheel binary, CPU stand-in onnxruntime backend) on free ports
with a temporary model repository, then times one request of ``--shape`` float32 through:
in-process ONNX Runtime, Triton gRPC (binary tensors), Triton HTTP (binary tensors) and
Triton gRPC with system shared memory. Prints the median of ``--runs`` timed runs after
``--warmup`` untimed ones, and the ratio to in-process.

    .venv/bin/python bench/triton_transport.py                  # generated conv model
    .venv/bin/python bench/triton_transport.py --model triton_models/ct_lung/1/model.onnx
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from record import record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.small_models import conv_segmentation_onnx, free_ports  # noqa: E402
from devstack.triton_server import TritonServer  # noqa: E402
from orthanc_plugin.inference.triton import TritonClient  # noqa: E402

DEFAULT_REAL_MODEL = ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"
_ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64"}


def _timed(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _write_repository(
    repository: Path, name: str, model: bytes, session: ort.InferenceSession
) -> tuple[str, str]:
    """config.pbtxt derived from the ONNX graph (batch axis dynamic -> max_batch_size 4)."""
    graph_in, graph_out = session.get_inputs()[0], session.get_outputs()[0]
    batched = not isinstance(graph_in.shape[0], int)

    def dims(node: Any) -> str:
        shape = list(node.shape)[1:] if batched else list(node.shape)
        return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)

    config = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {4 if batched else 0}",
        f'input [ {{ name: "{graph_in.name}" data_type: {_ORT_TO_TRITON[graph_in.type]} '
        f"dims: [ {dims(graph_in)} ] }} ]",
        f'output [ {{ name: "{graph_out.name}" data_type: {_ORT_TO_TRITON[graph_out.type]} '
        f"dims: [ {dims(graph_out)} ] }} ]",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
    ]
    if batched:
        config.append("dynamic_batching { }")
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text("\n".join(config) + "\n")
    (repository / name / "1" / "model.onnx").write_bytes(model)
    return graph_in.name, graph_out.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="ONNX file (default: ct_lung if built, else generated)"
    )
    parser.add_argument("--shape", default="1,1,64,128,128", help="input shape, batch first")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--hidden", type=int, default=8, help="channels of the generated model's hidden layer"
    )
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.shape.split(","))
    model_path: Path | None = args.model or (DEFAULT_REAL_MODEL if DEFAULT_REAL_MODEL.is_file() else None)
    if model_path is not None:
        model = model_path.read_bytes()
        label = str(model_path)
    else:
        model = conv_segmentation_onnx(shape[2:], in_channels=shape[1], hidden=args.hidden)
        label = f"generated Conv3d(1->{args.hidden},k3)-ReLU-Conv3d({args.hidden}->3,k3)-Softmax"

    cpus = len(os.sched_getaffinity(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpus
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        repository = Path(tmp) / "models"
        in_name, out_name = _write_repository(repository, "bench", model, session)
        expected = session.run([out_name], {in_name: x})[0]
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(
            repository,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            log_file=Path(tmp) / "triton.log",
            backend_root=Path(tmp) / "backends",
        )
        results: dict[str, list[float]] = {}
        with server:
            results["in-process ONNX Runtime"] = _timed(
                lambda: session.run([out_name], {in_name: x}), args.runs, args.warmup
            )

            with TritonClient(server.grpc_url, use_shared_memory=False, timeout_s=300) as grpc:
                got = grpc.infer("bench", {in_name: x}, [out_name])[out_name]
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
                results["Triton gRPC, binary"] = _timed(
                    lambda: grpc.infer("bench", {in_name: x}, [out_name]), args.runs, args.warmup
                )

            http = httpclient.InferenceServerClient(
                server.http_url, connection_timeout=300, network_timeout=300
            )

            def http_call() -> Any:
                tensor = httpclient.InferInput(in_name, list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                output = httpclient.InferRequestedOutput(out_name, binary_data=True)
                return http.infer("bench", [tensor], outputs=[output]).as_numpy(out_name)

            np.testing.assert_allclose(http_call(), expected, rtol=1e-4, atol=1e-5)
            results["Triton HTTP, binary"] = _timed(http_call, args.runs, args.warmup)
            http.close()

            with TritonClient(server.grpc_url, use_shared_memory=True, timeout_s=300) as shm:
                got = shm.infer("bench", {in_name: x}, [out_name])[out_name]
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
                assert shm.shared_memory_active, "shared memory was refused"
                results["Triton gRPC + system shm"] = _timed(
                    lambda: shm.infer("bench", {in_name: x}, [out_name]), args.runs, args.warmup
                )

    out_shape = tuple(expected.shape)
    print(f"model: {label}")
    print(
        f"input {list(shape)} float32 ({x.nbytes / 2**20:.1f} MiB), output {list(out_shape)} "
        f"({expected.nbytes / 2**20:.1f} MiB); {cpus} CPU(s); "
        f"median of {args.runs} runs after {args.warmup} warm-up"
    )
    base = statistics.median(results["in-process ONNX Runtime"])
    print()
    print(f"| {'transport':<26} | {'median ms':>9} | {'min ms':>8} | {'vs in-process':>13} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 15}|")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"| {name:<26} | {median:9.1f} | {min(times):8.1f} | {median / base:12.2f}x |")
    key = {name: re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") for name in results}
    figures = {f"{key[n]}_median_ms": statistics.median(t) for n, t in results.items()}
    figures |= {f"{key[n]}_vs_in_process": statistics.median(t) / base for n, t in results.items()}
    record("triton_transport", figures, {"model": label, "input_shape": list(shape), "runs": args.runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
