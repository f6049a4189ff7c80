# SPDX-License-Identifier: AGPL-3.0-or-later
"""Integration tests against a real ``tritonserver`` (from the nvidia-pytriton wheel) serving
tiny ONNX models through the CPU stand-in ``onnxruntime`` backend."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from devstack.common import ROOT as PROJECT_ROOT
from devstack.small_models import conv_segmentation_onnx, free_ports, write_onnx_model
from devstack.triton_server import TritonServer, TritonServerError, find_tritonserver
from orthanc_plugin.inference import triton as inference
from orthanc_plugin.inference.triton import InferenceError, TritonClient

pytestmark = pytest.mark.integration


SPATIAL = (4, 8, 8)
IN_DIMS = (1, *SPATIAL)
OUT_DIMS = (3, *SPATIAL)


def _require_tritonserver() -> None:
    try:
        find_tritonserver()
    except TritonServerError as exc:
        pytest.skip(str(exc))


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _reference(model: bytes, x: np.ndarray) -> np.ndarray:
    result: np.ndarray = _session(model).run(None, {"image": x})[0]
    return result


def _image(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *IN_DIMS), dtype=np.float32)


class Stack:
    def __init__(self, server: TritonServer, repository: Path, models: dict[str, bytes]) -> None:
        self.server = server
        self.repository = repository
        self.models = models

    def raw_client(self) -> Any:
        return grpcclient.InferenceServerClient(self.server.grpc_url)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _require_tritonserver()
    root = tmp_path_factory.mktemp("triton")
    repository = root / "models"
    models = {
        "tiny": conv_segmentation_onnx(SPATIAL, seed=1),
        "versioned": conv_segmentation_onnx(SPATIAL, seed=2),
    }
    # A long queue delay makes concurrent requests land in one batch deterministically.
    write_onnx_model(repository, "tiny", 1, models["tiny"], IN_DIMS, OUT_DIMS, max_batch_size=4)
    (repository / "tiny" / "config.pbtxt").write_text(
        (repository / "tiny" / "config.pbtxt")
        .read_text()
        .replace("max_queue_delay_microseconds: 2000", "max_queue_delay_microseconds: 300000")
    )
    write_onnx_model(repository, "versioned", 1, models["versioned"], IN_DIMS, OUT_DIMS)
    write_onnx_model(
        repository,
        "nobatch",
        1,
        models["tiny"],
        (1, *IN_DIMS),
        (1, *OUT_DIMS),
        max_batch_size=0,
        dynamic_batching=False,
        parameters={"intra_op_thread_count": "1"},
    )
    # Any spatial size: outputs cannot be sized up front, so they come back on the socket.
    models["anysize"] = conv_segmentation_onnx(("d", "h", "w"), seed=3)
    write_onnx_model(repository, "anysize", 1, models["anysize"], (1, -1, -1, -1), (3, -1, -1, -1))
    http, grpc, metrics = free_ports(3)
    server = TritonServer(
        repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        log_file=root / "triton.log",
        model_control="explicit",
        backend_root=root / "backends",
    )
    server.start(timeout=60)
    try:
        yield Stack(server, repository, models)
    finally:
        server.stop()


@pytest.fixture()
def client(stack: Stack, request: pytest.FixtureRequest) -> Iterator[TritonClient]:
    use_shm = getattr(request, "param", None)
    with TritonClient(stack.server.grpc_url, use_shared_memory=use_shm, timeout_s=30) as c:
        yield c


# -- server ----------------------------------------------------------------------------------------


def test_server_is_ready_and_local_only(stack: Stack, client: TritonClient) -> None:
    assert stack.server.is_ready()
    assert client.is_ready()
    assert stack.server.pid is not None
    command = " ".join(stack.server.command())
    assert "--http-address=127.0.0.1" in command and "--grpc-address=127.0.0.1" in command


def test_server_runs_niced_as_the_tritonserver_process(stack: Stack) -> None:
    """Niceness 10 by default, and the pid is tritonserver's own (``nice`` execs it).

    Checked on the main thread and the gRPC/HTTP threads it starts; Triton itself sets the model
    instance threads' priority from the model config (0 by default), as it did before.
    """
    pid = stack.server.pid
    assert pid is not None
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "tritonserver"
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    assert os.getpriority(os.PRIO_PROCESS, pid) == expected
    nice = [  # field 19 of /proc/PID/task/TID/stat is the thread's nice value
        int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    assert nice.count(expected) > len(nice) // 2, nice


def test_model_info(client: TritonClient) -> None:
    info = client.model_info("tiny")
    assert info.name == "tiny"
    assert info.version == "1"
    assert info.platform == "onnxruntime_onnx"
    assert info.backend == "onnxruntime"
    assert info.max_batch_size == 4
    assert info.input("image").shape == (-1, *IN_DIMS)
    assert info.input("image").dtype == np.float32
    assert info.output("probabilities").shape == (-1, *OUT_DIMS)
    assert info.output("probabilities").datatype == "FP32"


# -- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [True, False], indirect=True, ids=["shm", "binary-grpc"])
def test_infer_matches_in_process_onnxruntime(stack: Stack, client: TritonClient) -> None:
    for batch in (1, 2):
        x = _image(batch, seed=batch)
        out = client.infer("tiny", {"image": x}, ["probabilities"])
        assert out["probabilities"].shape == (batch, *OUT_DIMS)
        np.testing.assert_allclose(
            out["probabilities"], _reference(stack.models["tiny"], x), rtol=1e-5, atol=1e-6
        )
    # Regions are reused; a bigger batch grows them.
    x = _image(4, seed=4)
    out = client.infer("tiny", {"image": x}, ["probabilities"])
    np.testing.assert_allclose(
        out["probabilities"], _reference(stack.models["tiny"], x), rtol=1e-5, atol=1e-6
    )
    assert client.shared_memory_active is (client.use_shared_memory is True)


def _regions(stack: Stack) -> set[str]:
    status = stack.raw_client().get_system_shared_memory_status(as_json=True)
    return set(status.get("regions", {}))


def test_shared_memory_is_registered_and_released(stack: Stack) -> None:
    before = _regions(stack)
    with TritonClient(stack.server.grpc_url) as client:
        assert client.use_shared_memory  # auto: server on 127.0.0.1
        client.infer("tiny", {"image": _image(1)}, ["probabilities"])
        ours = _regions(stack) - before
        assert len(ours) == 2 and all(name.startswith("orthanc-ai-") for name in ours)  # input + output
        # Triton has mapped them; their names are already gone from /dev/shm.
        assert not list(Path("/dev/shm").glob(f"orthanc_ai_*_{os.getpid()}_*"))
    assert not _regions(stack) & ours


def test_regions_are_unregistered_from_a_server_slow_to_answer(stack: Stack) -> None:
    """A Triton that answers late (stopped for 7 s here, starved of CPU in real life) still gets
    the regions unregistered when the client closes; a 5 s deadline used to leave them behind."""
    pid = stack.server.pid
    assert pid is not None
    before = _regions(stack)
    client = TritonClient(stack.server.grpc_url)
    client.infer("tiny", {"image": _image(1)}, ["probabilities"])
    ours = _regions(stack) - before
    assert len(ours) == 2
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(7.0, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started >= 6.0  # it did wait for the stopped server
    finally:
        resume.join()
    assert not _regions(stack) & ours


def test_regions_of_a_killed_process_are_unregistered(stack: Stack) -> None:
    script = (
        "import os, signal, numpy as np\n"
        "from orthanc_plugin.inference.triton import TritonClient\n"
        f"c = TritonClient('{stack.server.grpc_url}')\n"
        "c.infer('tiny', {'image': np.zeros((1, 1, 4, 8, 8), np.float32)}, ['probabilities'])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    before = _regions(stack)
    crashed = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, timeout=60
    )
    assert crashed.returncode == -9, crashed.stderr
    leaked = _regions(stack) - before
    assert len(leaked) == 2
    with TritonClient(stack.server.grpc_url) as client:  # the next client of this host cleans up
        client.infer("tiny", {"image": _image(1)}, ["probabilities"])
        assert not _regions(stack) & leaked


def test_variable_output_shape_comes_back_without_shm(stack: Stack, client: TritonClient) -> None:
    x = np.random.default_rng(7).random((1, 1, 3, 6, 5), dtype=np.float32)
    out = client.infer("anysize", {"image": x}, ["probabilities"])
    assert out["probabilities"].shape == (1, 3, 3, 6, 5)
    np.testing.assert_allclose(
        out["probabilities"], _reference(stack.models["anysize"], x), rtol=1e-5, atol=1e-6
    )


def test_concurrent_requests_are_batched_and_split_back(stack: Stack) -> None:
    raw = stack.raw_client()

    def counts() -> tuple[int, int]:
        stats = raw.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    batches = [1, 2, 1]
    xs = [_image(b, seed=10 + i) for i, b in enumerate(batches)]
    with TritonClient(stack.server.grpc_url) as client:

        def concurrently() -> dict[int, np.ndarray]:
            results: dict[int, np.ndarray] = {}
            errors: list[BaseException] = []

            def run(i: int) -> None:
                try:
                    results[i] = client.infer("tiny", {"image": xs[i]}, ["probabilities"])["probabilities"]
                except BaseException as exc:  # collected for the assertion below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert not errors
            return results

        concurrently()  # first round: each thread gets its own shared memory regions registered
        before = counts()
        results = concurrently()  # second round: regions reused, requests arrive together
        # Triton updates its statistics after the responses are sent: give it a moment.
        deadline = time.monotonic() + 10
        after = counts()
        while after[0] - before[0] < sum(batches) and time.monotonic() < deadline:
            time.sleep(0.05)
            after = counts()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], _reference(stack.models["tiny"], x), rtol=1e-5, atol=1e-6)
    assert after[0] - before[0] == sum(batches)
    assert after[1] - before[1] < len(batches), "the dynamic batcher should have merged requests"


def test_model_without_batching(stack: Stack, client: TritonClient) -> None:
    info = client.model_info("nobatch")
    assert info.max_batch_size == 0
    assert info.input("image").shape == (1, *IN_DIMS)
    x = _image(1, seed=3)
    out = client.infer("nobatch", {"image": x}, ["probabilities"])
    np.testing.assert_allclose(
        out["probabilities"], _reference(stack.models["tiny"], x), rtol=1e-5, atol=1e-6
    )


# -- errors ----------------------------------------------------------------------------------------


def test_wrong_shape_gives_clear_error(client: TritonClient) -> None:
    with pytest.raises(InferenceError) as caught:
        client.infer("tiny", {"image": np.zeros((1, 1, 4, 8, 9), np.float32)}, ["probabilities"])
    message = str(caught.value)
    assert "input 'image'" in message and "'tiny'" in message
    assert "[1, 1, 4, 8, 9]" in message and "[-1, 1, 4, 8, 8]" in message
    assert not caught.value.retryable


def test_wrong_dtype_and_batch_give_clear_errors(client: TritonClient) -> None:
    with pytest.raises(InferenceError, match=r"must be FP32 \(float32\); got float64"):
        client.infer("tiny", {"image": np.zeros((1, *IN_DIMS), np.float64)}, ["probabilities"])
    with pytest.raises(InferenceError, match="batch of 5; the model accepts 1 to 4"):
        client.infer("tiny", {"image": np.zeros((5, *IN_DIMS), np.float32)}, ["probabilities"])
    with pytest.raises(InferenceError, match="has outputs"):
        client.infer("tiny", {"image": _image(1)}, ["logits"])


def test_server_side_shape_check(stack: Stack) -> None:
    """Triton itself rejects a wrong shape before it reaches the backend; the raw message is clear too."""
    raw = stack.raw_client()
    bad = grpcclient.InferInput("image", [1, 1, 4, 8, 9], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 4, 8, 9), np.float32))
    with pytest.raises(InferenceServerException, match="unexpected shape for input 'image'"):
        raw.infer("tiny", [bad])


def test_unknown_model(client: TritonClient) -> None:
    with pytest.raises(InferenceError, match="model 'nope' is not available on Triton at 127.0.0.1:"):
        client.model_info("nope")


def test_server_unreachable() -> None:
    (port,) = free_ports(1)
    with TritonClient(f"127.0.0.1:{port}", timeout_s=5) as client:
        assert not client.is_ready()
        with pytest.raises(InferenceError) as caught:
            client.infer("tiny", {"image": _image(1)}, ["probabilities"])
    assert f"unreachable at 127.0.0.1:{port}" in str(caught.value)
    assert caught.value.retryable


def test_refused_shared_memory_falls_back_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regions created outside /dev/shm cannot be opened by Triton, as with a remote server.
    monkeypatch.setattr(inference, "_SHM_DIR", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="orthanc_plugin.inference.triton")
    with TritonClient(stack.server.grpc_url, use_shared_memory=True) as client:
        for seed in (1, 2):
            x = _image(1, seed=seed)
            out = client.infer("tiny", {"image": x}, ["probabilities"])
            np.testing.assert_allclose(
                out["probabilities"], _reference(stack.models["tiny"], x), rtol=1e-5, atol=1e-6
            )
        assert not client.shared_memory_active
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1
    assert not list(tmp_path.iterdir())


# -- model versions and loading --------------------------------------------------------------------


def test_load_version_2_explicitly(stack: Stack, client: TritonClient) -> None:
    assert client.model_info("versioned").version == "1"
    v2 = conv_segmentation_onnx(SPATIAL, seed=22)
    write_onnx_model(stack.repository, "versioned", 2, v2, IN_DIMS, OUT_DIMS)
    stack.raw_client().load_model("versioned")  # repository API: reload picks up version 2
    info = client.model_info("versioned")
    assert info.version == "2"
    assert info.ready_versions == ("2",)  # default version policy: latest 1
    x = _image(2, seed=5)
    out = client.infer("versioned", {"image": x}, ["probabilities"], version="2")
    np.testing.assert_allclose(out["probabilities"], _reference(v2, x), rtol=1e-5, atol=1e-6)
    out = client.infer("versioned", {"image": x}, ["probabilities"])
    np.testing.assert_allclose(out["probabilities"], _reference(v2, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceError, match="model 'versioned' version 1 is not ready on Triton"):
        client.model_info("versioned", "1")


def test_config_mismatch_fails_load_with_readable_reason(stack: Stack) -> None:
    write_onnx_model(
        stack.repository, "mismatch", 1, stack.models["tiny"], (1, 4, 8, 9), OUT_DIMS, dynamic_batching=False
    )
    with pytest.raises(InferenceServerException) as caught:
        stack.raw_client().load_model("mismatch")
    message = str(caught.value)
    assert "input 'image'" in message and "ONNX graph" in message


def test_client_survives_server_restart(tmp_path: Path) -> None:
    _require_tritonserver()
    repository = tmp_path / "models"
    model = conv_segmentation_onnx(SPATIAL, seed=4)
    write_onnx_model(repository, "tiny", 1, model, IN_DIMS, OUT_DIMS)
    http, grpc, metrics = free_ports(3)

    def server() -> TritonServer:
        return TritonServer(
            repository,
            http,
            grpc,
            metrics,
            log_file=tmp_path / "triton.log",
            backend_root=tmp_path / "backends",
        )

    x = _image(1, seed=9)
    with TritonClient(f"127.0.0.1:{grpc}", timeout_s=30) as client:
        with server():
            client.infer("tiny", {"image": x}, ["probabilities"])
        with pytest.raises(InferenceError, match="unreachable"):
            client.infer("tiny", {"image": x}, ["probabilities"])
        with server():  # the new server knows none of the client's regions: re-registered
            deadline = time.monotonic() + 10  # the channel reconnects within its backoff (<= 2 s)
            while not client.is_ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            out = client.infer("tiny", {"image": x}, ["probabilities"])
            assert client.shared_memory_active
    np.testing.assert_allclose(out["probabilities"], _reference(model, x), rtol=1e-5, atol=1e-6)


# -- command line ----------------------------------------------------------------------------------


def test_cli_start_status_stop(tmp_path: Path) -> None:
    _require_tritonserver()
    repository = tmp_path / "models"
    write_onnx_model(repository, "tiny", 1, conv_segmentation_onnx(SPATIAL), IN_DIMS, OUT_DIMS)
    http, grpc, metrics = free_ports(3)
    pid_file = tmp_path / "triton.pid"
    common = [
        "--pid-file",
        str(pid_file),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    cli = [sys.executable, "-m", "devstack.triton_server"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args, *common], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=90
        )

    started = run(
        "start",
        "--model-repository",
        str(repository),
        "--log-file",
        str(tmp_path / "log" / "triton.log"),
        "--backend-root",
        str(tmp_path / "backends"),
    )
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        assert started.returncode == 0, started.stderr
        assert pid is not None
        assert run("status").returncode == 0
        with TritonClient(f"127.0.0.1:{grpc}") as client:
            assert client.model_info("tiny").version == "1"
        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not pid_file.exists()
        assert run("status").returncode == 3
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists()
    finally:
        if pid is not None and Path(f"/proc/{pid}").exists():
            subprocess.run(["kill", "-9", str(pid)], check=False)


# -- the shipped model, through Triton and in-process ------------------------------------------------


def test_shipped_ct_lung_through_triton_equals_in_process_onnxruntime(tmp_path: Path) -> None:
    """The repository's ct_lung model (its own config.pbtxt), one realistic input: Triton's answer
    equals ONNX Runtime run in this process. Guards the tensor exchange between the stand-in backend
    and Triton's python stub, which with a mismatched numpy hands over zero-filled inputs and empty
    outputs without any error."""
    _require_tritonserver()
    model_dir = PROJECT_ROOT / "triton_models" / "ct_lung"
    http, grpc, metrics = free_ports(3)
    server = TritonServer(
        PROJECT_ROOT / "triton_models", http_port=http, grpc_port=grpc, metrics_port=metrics,
        log_file=tmp_path / "triton.log", backend_root=tmp_path / "backends",
        model_control="explicit", load_models=["ct_lung"],
    )  # fmt: skip
    # A lung-like volume: two dark ellipsoids in soft tissue, windowed to [0, 1] like preprocess does.
    z, y, x = np.mgrid[0:64, 0:128, 0:128].astype(np.float32)
    volume = np.full((64, 128, 128), 0.75, np.float32)
    for cx in (40.0, 88.0):
        volume[((x - cx) / 22) ** 2 + ((y - 64) / 40) ** 2 + ((z - 32) / 28) ** 2 < 1] = 0.1
    image = volume[None, None] + np.random.default_rng(7).normal(0, 0.01, (1, 1, 64, 128, 128)).astype(
        np.float32
    )
    expected = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["probabilities"], {"image": image})[0]
    with server:
        for use_shm in (True, False):
            with TritonClient(server.grpc_url, use_shared_memory=use_shm, timeout_s=60) as client:
                got = client.infer("ct_lung", {"image": image}, ["probabilities"])["probabilities"]
            assert got.shape == (1, 3, 64, 128, 128) and got.dtype == np.float32
            assert np.count_nonzero(got) > got.size // 2, "Triton answered (mostly) zeros"
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)  # softmax over the classes
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
