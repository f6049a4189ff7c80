"""How devstack.triton_server starts tritonserver: niced through coreutils' nice, never a preexec_fn.

A preexec function makes Python fork() (not vfork()), which runs gRPC's fork handlers in the
child; with a gRPC client alive in the parent, the child then aborted before exec under CPU load
(``Epoll1Poller ... epoll_wait error: Bad file descriptor``, exit -6). See ``_niced``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devstack import triton_server
from devstack.small_models import free_ports
from devstack.triton_server import TritonServer, TritonServerError


def _popen_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nice: int
) -> tuple[list[str], dict[str, Any]]:
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def fake_popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        calls.append((list(args), kwargs))
        raise OSError("not started in this test")

    monkeypatch.setattr(triton_server, "prepare_backend_directory", lambda root, standin: root)
    monkeypatch.setattr(triton_server, "find_tritonserver", lambda: Path("/opt/triton/bin/tritonserver"))
    monkeypatch.setattr(triton_server, "server_environment", lambda: {"PATH": "/usr/bin:/bin"})
    monkeypatch.setattr(triton_server.subprocess, "Popen", fake_popen)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(tmp_path, http, grpc, metrics, log_file=tmp_path / "triton.log", nice=nice)
    with pytest.raises(TritonServerError, match="cannot run"):
        server.start(timeout=1)
    assert len(calls) == 1
    return calls[0]


def test_server_is_niced_by_the_nice_command_not_a_preexec_function(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args, kwargs = _popen_arguments(monkeypatch, tmp_path, nice=7)
    assert kwargs.get("preexec_fn") is None
    assert args[:3] == [shutil.which("nice"), "-n", "7"]
    assert args[3] == "/opt/triton/bin/tritonserver"
    assert kwargs["start_new_session"] is True and kwargs["stdin"] == subprocess.DEVNULL


def test_nice_zero_runs_the_binary_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args, kwargs = _popen_arguments(monkeypatch, tmp_path, nice=0)
    assert kwargs.get("preexec_fn") is None
    assert args[0] == "/opt/triton/bin/tritonserver"
