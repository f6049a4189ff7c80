# SPDX-License-Identifier: AGPL-3.0-or-later
"""Start and stop a local Triton Inference Server from the ``nvidia-pytriton`` wheel.

The wheel ships a real ``tritonserver`` binary whose only backend is ``python``. This module
builds a backend directory that Triton can use (``python/`` with ``libtriton_python.so`` and
the stub matching this interpreter, ``onnxruntime/`` with our CPU stand-in from
``triton_backends/onnxruntime/``), sets up the environment the binary and its stubs need, and
runs the server on 127.0.0.1 only. Production uses NVIDIA's Triton container instead, with
the real ONNX Runtime/TensorRT backends and the same model repository.

Command line (used by ``make up`` / ``make down``)::

    python -m devstack.triton_server start --model-repository triton_models \\
        --pid-file var/triton.pid --log-file var/log/triton.log
    python -m devstack.triton_server status --pid-file var/triton.pid
    python -m devstack.triton_server stop --pid-file var/triton.pid
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from devstack.common import ROOT, log_tail, var_dir
from orthanc_plugin.core.processes import pid_alive, read_pid_file

log = logging.getLogger(__name__)

ModelControl = Literal["none", "explicit", "poll"]

DEFAULT_STANDIN_BACKENDS = ROOT / "triton_backends"
# One folder per Python version: its stub must match the venv's interpreter.
DEFAULT_BACKEND_ROOT = var_dir() / f"triton-backends-py{sys.version_info.major}.{sys.version_info.minor}"
LOCAL_HOST = "127.0.0.1"


class TritonServerError(RuntimeError):
    """Triton could not be found, started, or stopped."""


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the nvidia-pytriton package (which ships the tritonserver binary) is not installed in "
            f"{sys.prefix}: run `make install`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary from the wheel; a clear error when it is missing."""
    binary = _wheel_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonServerError(f"tritonserver binary not found at {binary}: run `make install`")
    return binary


def _libpython_dir() -> Path:
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if libdir and soname and (Path(libdir) / soname).exists():
        return Path(libdir)
    raise TritonServerError(
        f"no shared libpython for Python {sys.version_info.major}.{sys.version_info.minor} "
        f"({sys.executable}); Triton's python backend stub needs it. Create the venv with "
        "Debian's /usr/bin/python3 (package libpython3.11) and run `make install`"
    )


def _copy_if_changed(source: Path, target: Path, mode: int | None = None) -> None:
    """Copy atomically unless the target already has the same size and mtime."""
    if target.is_file() and not target.is_symlink():
        src, dst = source.stat(), target.stat()
        if src.st_size == dst.st_size and int(src.st_mtime) == int(dst.st_mtime):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, target)


def _libpython_soname() -> str:
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not soname:
        raise TritonServerError(f"no shared libpython for {sys.executable}")
    return str(soname)


def _install_stub(source: Path, target: Path) -> None:
    """Copy the wheel's stub to ``target``, linked against this system's libpython.

    The wheel's stub needs a libpython copied into the wheel (``libpython3-<hash>.13.so.1.0``),
    built for another file layout: on Debian 13 it cannot import standard modules
    (``could not import module "datetime"``). The copy is relinked with ``patchelf`` to the
    interpreter's own shared library (e.g. ``libpython3.13.so.1.0``), found through
    ``LD_LIBRARY_PATH`` (``server_environment``): the stub then runs the same Python as the venv.
    """
    soname = _libpython_soname()
    stamp = target.with_name(target.name + ".source")
    st = source.stat()
    wanted = f"{source} {st.st_size} {int(st.st_mtime)} {soname}\n"
    if target.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return
    patchelf = shutil.which("patchelf")
    if patchelf is None:
        raise TritonServerError(
            "patchelf not found: it links Triton's python backend stub to this system's libpython "
            "(Debian package 'patchelf'; run `make install`)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    tmp.chmod(0o755)
    try:
        needed = subprocess.run(
            [patchelf, "--print-needed", str(tmp)], check=True, capture_output=True, text=True
        ).stdout.split()
        for name in needed:
            if name.startswith("libpython") and name != soname:
                subprocess.run(
                    [patchelf, "--replace-needed", name, soname, str(tmp)], check=True, capture_output=True
                )
    except subprocess.CalledProcessError as exc:
        tmp.unlink(missing_ok=True)
        raise TritonServerError(f"patchelf failed on {source}: {exc.stderr!r}") from exc
    os.replace(tmp, target)
    stamp.write_text(wanted)


def prepare_backend_directory(backend_root: Path, standin_backends: Path = DEFAULT_STANDIN_BACKENDS) -> Path:
    """Build (or refresh) a Triton backend directory under ``backend_root`` and return it.

    ``python/`` receives the wheel's ``libtriton_python.so``, ``triton_python_backend_utils.py``
    and the stub for this interpreter's Python version; every folder of ``standin_backends``
    that holds a ``model.py`` (our ``onnxruntime`` stand-in) becomes a Python-based backend.
    """
    wheel = _wheel_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(
            f"the nvidia-pytriton wheel has no python backend stub for Python {version} ({stub}): "
            "run `make install` with a supported Python (3.8-3.13)"
        )
    python_dir = backend_root / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        source = wheel / "backends" / "python" / name
        if not source.is_file():
            raise TritonServerError(f"{source} is missing from the nvidia-pytriton wheel: run `make install`")
        _copy_if_changed(source, python_dir / name)
    _install_stub(stub, python_dir / "triton_python_backend_stub")

    if not standin_backends.is_dir():
        raise TritonServerError(f"stand-in backends folder {standin_backends} not found")
    for folder in sorted(p for p in standin_backends.iterdir() if (p / "model.py").is_file()):
        for source in folder.iterdir():
            if source.is_file() and source.suffix in {".py", ".txt", ".json"}:
                _copy_if_changed(source, backend_root / folder.name / source.name)
    return backend_root


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: its bundled libraries, libpython, and the venv first on PATH."""
    env = dict(os.environ if base is None else base)
    # This system's libpython first (the stub is linked to it, see _install_stub), then the wheel's
    # own libraries (its copy of libpython has another name, so it is never picked instead).
    libs = [str(_libpython_dir()), str(_wheel_root().parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The python backend stub locates site-packages (numpy, onnxruntime) through `python3` on PATH.
    bindir = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(
        [bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    )
    env.pop("PYTHONHOME", None)
    return env


def _niced(command: list[str], nice: int) -> list[str]:
    """``command`` run at CPU niceness ``nice`` through coreutils' ``nice`` (which execs it, same pid).

    Never ``Popen(preexec_fn=...)``: a preexec function makes Python fork() instead of vfork(),
    fork() runs gRPC's fork handlers in the child (a gRPC client, e.g. the workers' or a test's
    ``TritonClient``, lives in the parent), and gRPC's poller thread then restarted in the child
    finds its epoll descriptor closed by ``close_fds`` and aborts the child before it execs:
    tritonserver "exited with code -6" with ``Epoll1Poller ... epoll_wait error: Bad file
    descriptor`` as the only line of its log. It happened under CPU load, when the window between
    closing descriptors and exec is long enough.
    """
    if not nice:
        return command
    binary = shutil.which("nice")
    if binary is None:
        raise TritonServerError("the 'nice' command (coreutils) is not on PATH; set nice=0 to run without it")
    return [binary, "-n", str(nice), *command]


def _http_ready(http_port: int, timeout: float = 1.0) -> bool:
    url = f"http://{LOCAL_HOST}:{http_port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed local URL)
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_in_use(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOCAL_HOST, port)) == 0


class TritonServer:
    """A ``tritonserver`` child process bound to 127.0.0.1.

    ``start()`` returns once ``/v2/health/ready`` answers 200 (all models loaded). The process
    runs in its own session so that it survives the terminal; ``stop()`` (or leaving the
    ``with`` block) sends SIGTERM, then SIGKILL to its process group after ``timeout``.
    It runs at CPU niceness ``nice`` (10 by default, like the workers): on a node shared with
    Orthanc, CPU inference is background work and Orthanc's requests come first.
    """

    def __init__(
        self,
        model_repository: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_file: Path | None = None,
        model_control: ModelControl = "none",
        *,
        load_models: Sequence[str] = ("*",),
        poll_interval_s: int = 5,
        backend_root: Path | None = None,
        standin_backends: Path = DEFAULT_STANDIN_BACKENDS,
        exit_timeout_s: int = 10,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        nice: int = 10,
    ) -> None:
        if model_control not in ("none", "explicit", "poll"):
            raise ValueError(f"model_control must be 'none', 'explicit' or 'poll', not {model_control!r}")
        self.model_repository = Path(model_repository).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_file = Path(log_file) if log_file is not None else None
        self.model_control: ModelControl = model_control
        self.load_models = tuple(load_models)
        self.poll_interval_s = poll_interval_s
        self.backend_root = Path(backend_root) if backend_root is not None else DEFAULT_BACKEND_ROOT
        self.standin_backends = Path(standin_backends)
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19, not {nice}")
        self.nice = nice
        self._process: subprocess.Popen[bytes] | None = None
        self._own_log: Path | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def grpc_url(self) -> str:
        return f"{LOCAL_HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOCAL_HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.metrics_port}/metrics"

    @property
    def effective_log_file(self) -> Path | None:
        """Where stdout and stderr of the server go (a temporary file when ``log_file`` is None)."""
        return self.log_file or self._own_log

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def is_ready(self) -> bool:
        return self.is_running() and _http_ready(self.http_port)

    # -- life cycle ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The ``tritonserver`` command line (the backend directory must exist for it to run)."""
        args = [
            str(find_tritonserver()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_root.resolve()}",
            f"--http-address={LOCAL_HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOCAL_HOST}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={LOCAL_HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # CPU-only stand-in backends: no pinned or CUDA pools (also avoids CUDA warnings without GPU).
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            f"--model-control-mode={self.model_control}",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # Tensors cross the python backend's shared memory: grow it in big steps.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        if self.model_control == "poll":
            args.append(f"--repository-poll-secs={max(1, int(self.poll_interval_s))}")
        if self.model_control == "explicit":
            args.extend(f"--load-model={name}" for name in self.load_models)
        args.extend(self.extra_args)
        return args

    def start(self, timeout: float = 60) -> TritonServer:
        """Start the server and wait until it is ready; raises TritonServerError with the log tail."""
        if self.is_running():
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        busy = [port for port in (self.http_port, self.grpc_port, self.metrics_port) if _port_in_use(port)]
        if busy:
            raise TritonServerError(
                f"port(s) {', '.join(map(str, busy))} on {LOCAL_HOST} already in use (another tritonserver? "
                "`make down` stops the local stack)"
            )
        prepare_backend_directory(self.backend_root, self.standin_backends)
        command = self.command()
        env = server_environment()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            log_path = self.log_file
        else:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._own_log = log_path = Path(name)
        with log_path.open("ab") as out:
            log.info("starting tritonserver: %s", " ".join(command))
            try:
                self._process = subprocess.Popen(
                    _niced(command, self.nice),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(self.backend_root),
                    start_new_session=True,
                )
            except OSError as exc:
                raise TritonServerError(f"cannot run {command[0]}: {exc}") from exc
        atexit.register(self._stop_at_exit)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("tritonserver ready (pid %s, gRPC %s, HTTP %s)", self.pid, self.grpc_url, self.http_url)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        process = self._process
        assert process is not None
        while True:
            code = process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} while starting "
                    f"(log: {self.effective_log_file}):\n{log_tail(self.effective_log_file)}"
                )
            if _http_ready(self.http_port):
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:g} s on http://{self.http_url}/v2/health/ready "
                    f"(log: {self.effective_log_file}):\n{log_tail(self.effective_log_file)}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL to the process group after ``timeout`` s. Returns the exit code."""
        process = self._process
        if process is None:
            return None
        code = process.poll()
        if code is None:
            code = terminate_process(process.pid, timeout, wait=process.wait)
        else:
            # Stubs normally exit with the server; make sure none outlive a crashed one.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self._process = None
        atexit.unregister(self._stop_at_exit)
        if self._own_log is not None:
            with contextlib.suppress(OSError):
                self._own_log.unlink()
            self._own_log = None
        return code

    def detach(self) -> int:
        """Leave the running server alone from now on (not stopped at exit); returns its pid."""
        process = self._process
        if process is None or process.poll() is not None:
            raise TritonServerError("tritonserver is not running")
        self._process = None
        self._own_log = None
        atexit.unregister(self._stop_at_exit)
        return process.pid

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10)

    def __enter__(self) -> TritonServer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def terminate_process(pid: int, timeout: float, wait: Callable[..., int] | None = None) -> int | None:
    """SIGTERM ``pid``; after ``timeout`` s SIGKILL its process group. Returns the exit code if known.

    ``wait`` is ``Popen.wait`` when ``pid`` is our child; otherwise the pid is polled.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait is not None:
        try:
            code: int | None = wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            code = wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # leftover stubs, if any
        return code
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return None


def _is_tritonserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv0 = handle.read().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"tritonserver"


# -- command line ----------------------------------------------------------------------------------


def _read_pid(pid_file: Path) -> int | None:
    pid = read_pid_file(pid_file)
    return pid if pid is not None and _is_tritonserver(pid) else None


def _cli_start(args: argparse.Namespace, out: IO[str]) -> int:
    pid_file: Path = args.pid_file
    running = _read_pid(pid_file)
    if running is not None:
        print(f"tritonserver already running (pid {running})", file=out)
        return 0
    server = TritonServer(
        Path(args.model_repository),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=Path(args.log_file),
        model_control=args.model_control,
        backend_root=Path(args.backend_root) if args.backend_root else None,
    )
    try:
        server.start(timeout=args.timeout)
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pid = server.detach()  # leave it running when this command exits
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{pid}\n")
    print(f"tritonserver ready (pid {pid}, gRPC {server.grpc_url}, HTTP {server.http_url})", file=out)
    return 0


def _cli_stop(args: argparse.Namespace, out: IO[str]) -> int:
    pid_file: Path = args.pid_file
    pid = _read_pid(pid_file)
    if pid is None:
        print("tritonserver not running", file=out)
    else:
        terminate_process(pid, args.timeout)
        print(f"tritonserver stopped (pid {pid})", file=out)
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return 0


def _cli_status(args: argparse.Namespace, out: IO[str]) -> int:
    pid = _read_pid(args.pid_file)
    if pid is None:
        print("tritonserver not running", file=out)
        return 3
    if _http_ready(args.http_port):
        print(f"tritonserver running and ready (pid {pid}, HTTP port {args.http_port})", file=out)
        return 0
    print(f"tritonserver running but not ready (pid {pid}, HTTP port {args.http_port})", file=out)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.triton_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--model-repository", default="triton_models")
    parser.add_argument("--pid-file", type=Path, default=Path("var/triton.pid"))
    parser.add_argument("--log-file", default="var/log/triton.log")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control", choices=("none", "explicit", "poll"), default="none")
    parser.add_argument("--backend-root", default=None, help="writable folder for the backend directory")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for ready / for stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    actions = {"start": _cli_start, "stop": _cli_stop, "status": _cli_status}
    try:
        return actions[args.action](args, sys.stdout)
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
