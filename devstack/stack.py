"""The local stack: real Orthanc (Debian package) with our plugin, and real tritonserver.

Used by ``make up`` / ``make down`` / ``make demo`` and by the integration tests, so the
tests start the services exactly the way a user does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from devstack.common import ROOT, log_tail, var_dir
from devstack.triton_server import TritonServer, TritonServerError, terminate_process
from orthanc_plugin.core.processes import read_pid_file

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
PG_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")  # Debian orthanc-postgresql


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now and that this process has not handed
    out before: the kernel may offer a just-released port again, and two servers (or one server's
    HTTP and metrics ports) started together would then collide."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


@dataclass
class OrthancServer:
    """Orthanc started with ``config/orthanc.json``; settings passed as environment variables."""

    storage: Path
    http_port: int = 8042
    dicom_port: int = 4242
    triton_grpc_port: int = 8001
    workers: int = 1
    stable_age: int = 3
    lease_seconds: float = 30.0
    log_file: Path | None = None
    config_file: Path = ROOT / "config" / "orthanc.json"
    extra_env: dict[str, str] = field(default_factory=dict)
    # (user, password) for the readiness check when extra_env turns authentication on.
    http_auth: tuple[str, str] | None = None
    # Scale-out: several Orthancs share one index in PostgreSQL (index_database, a
    # postgresql://user@host:port/dbname URL) and one folder of DICOM files (dicom_storage);
    # job_database puts the job store there too. database_password serves both URLs.
    dicom_storage: Path | None = None
    index_database: str | None = None
    job_database: str | None = None
    database_password: str = field(default="", repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ORTHANC_AI_ROOT=str(ROOT),
            ORTHANC_AI_STORAGE=str(self.storage.resolve()),
            ORTHANC_AI_HTTP_PORT=str(self.http_port),
            ORTHANC_AI_DICOM_PORT=str(self.dicom_port),
            ORTHANC_AI_TRITON_GRPC_PORT=str(self.triton_grpc_port),
            ORTHANC_AI_WORKERS=str(self.workers),
            ORTHANC_AI_STABLE_AGE=str(self.stable_age),
            ORTHANC_AI_LEASE_SECONDS=str(self.lease_seconds),
        )
        # FHIR delivery: off unless the caller's environment or extra_env names a URL.
        for name, default in (
            ("ORTHANC_AI_PIPELINES", str(ROOT / "config" / "pipelines.yaml")),
            ("ORTHANC_AI_FHIR_URL", ""),
            # The OHIF viewer the admin page links studies to (devstack/viewer.py), empty: none.
            ("ORTHANC_AI_VIEWER_URL", ""),
            ("ORTHANC_AI_FHIR_TOKEN", ""),
            ("ORTHANC_AI_DELIVERY_MAX_BACKOFF", "300"),
            # Per-series start: quiet time of a series before its pipelines start (0: StableStudy only).
            ("ORTHANC_AI_SERIES_QUIET_SECONDS", "3"),
            ("ORTHANC_AI_PATIENT_ID_SYSTEM", ""),
            # HL7 ORU destinations (JSON list, see Settings.hl7_destinations).
            ("ORTHANC_AI_HL7_DESTINATIONS", "[]"),
            # Forwarding destinations (JSON text): Orthanc's DicomModalities and DicomWeb.Servers.
            ("ORTHANC_AI_DICOM_MODALITIES", "{}"),
            ("ORTHANC_AI_DICOMWEB_SERVERS", "{}"),
            # Authentication: off; users is a JSON object {"name": "password"}, admins a JSON list
            # of user names or null (every authenticated user), the worker user empty (no auth).
            ("ORTHANC_AI_AUTH", "false"),
            ("ORTHANC_AI_USERS", "{}"),
            ("ORTHANC_AI_ADMINS", "null"),
            ("ORTHANC_AI_REVIEWERS", "null"),
            ("ORTHANC_AI_WORKER_USER", ""),
            ("ORTHANC_AI_WORKER_PASSWORD", ""),
        ):
            env.setdefault(name, default)
        env.update(self._database_env())
        env.update(self.extra_env)
        return env

    def _database_env(self) -> dict[str, str]:
        """``${ORTHANC_AI_PG_*}``, the job database and the DICOM folder of config/orthanc.json."""
        from urllib.parse import urlsplit

        env = {
            "ORTHANC_AI_DICOM_STORAGE": str((self.dicom_storage or self.storage).resolve()),
            # No extra plugin: an empty folder (Orthanc loads the *.so files of a folder).
            "ORTHANC_AI_EXTRA_PLUGINS": str(self.storage.resolve() / "plugins"),
            "ORTHANC_AI_PG_INDEX": "false",
            "ORTHANC_AI_PG_HOST": "127.0.0.1",
            "ORTHANC_AI_PG_PORT": "5432",
            "ORTHANC_AI_PG_DATABASE": "orthanc",
            "ORTHANC_AI_PG_USER": "orthanc",
            "ORTHANC_AI_PG_PASSWORD": self.database_password,
            "ORTHANC_AI_JOB_DATABASE": self.job_database or "",
            "ORTHANC_AI_JOB_DATABASE_PASSWORD": self.database_password,
        }
        if self.index_database is not None:
            url = urlsplit(self.index_database)
            env.update(
                ORTHANC_AI_EXTRA_PLUGINS=str(PG_INDEX_PLUGIN),
                ORTHANC_AI_PG_INDEX="true",
                ORTHANC_AI_PG_HOST=url.hostname or "127.0.0.1",
                ORTHANC_AI_PG_PORT=str(url.port or 5432),
                ORTHANC_AI_PG_DATABASE=url.path.strip("/"),
                ORTHANC_AI_PG_USER=url.username or "orthanc",
            )
        return env

    def start(self, timeout: float = 30.0, detach: bool = False) -> OrthancServer:
        if not ORTHANC_BIN.exists():
            raise RuntimeError(f"{ORTHANC_BIN} not found: run `make install` (Debian package 'orthanc')")
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.storage / "plugins").mkdir(exist_ok=True)
        if self.index_database is not None and not PG_INDEX_PLUGIN.exists():
            raise RuntimeError(
                f"{PG_INDEX_PLUGIN} not found: run `make install` (Debian package 'orthanc-postgresql')"
            )
        log_file = self.log_file or self.storage.parent / "log" / "orthanc.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_file, "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(self.config_file)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
            cwd=str(ROOT), start_new_session=detach,
        )  # fmt: skip
        # With authentication on and no credentials to check with, Orthanc's 401 means it is up.
        auth_on = self.env().get("ORTHANC_AI_AUTH", "false").strip().lower() == "true"
        auth_without_credentials = auth_on and self.http_auth is None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}; see {log_file}:\n{log_tail(log_file)}"
                )
            try:
                status = httpx.get(f"{self.url}/ai/pipelines", timeout=1, auth=self.http_auth).status_code
                if status == 200 or (status == 401 and auth_without_credentials):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see {log_file}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown callbacks run."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


# --------------------------------------------------------------------------- CLI for make up/down


VAR = var_dir()


def _port(name: str, default: int) -> int:
    """A port of `make up`: the environment variable ``name`` or the usual default."""
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


# `make up` / `make demo` use the usual ports unless these variables say otherwise (the Debian 13
# check runs its demo on free ports beside whatever else runs on the machine).
ORTHANC_PORT = _port("ORTHANC_AI_HTTP_PORT", 8042)
DICOM_PORT = _port("ORTHANC_AI_DICOM_PORT", 4242)
TRITON_HTTP_PORT = _port("ORTHANC_AI_TRITON_HTTP_PORT", 8000)
TRITON_GRPC_PORT = _port("ORTHANC_AI_TRITON_GRPC_PORT", 8001)
TRITON_METRICS_PORT = _port("ORTHANC_AI_TRITON_METRICS_PORT", 8002)
EHR_PORT = _port("ORTHANC_AI_EHR_PORT", 8090)
VIEWER_PORT = _port("ORTHANC_AI_VIEWER_PORT", 3000)


def start_detached(name: str, args: list[str], ready_url: str, timeout: float = 30.0) -> int:
    """Start ``args`` in its own session with a pid file under var/, wait until ``ready_url`` answers."""
    log = open(VAR / "log" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=str(ROOT),
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {VAR / 'log' / f'{name}.log'}")
        try:
            if httpx.get(ready_url, timeout=1).status_code < 500:
                (VAR / f"{name}.pid").write_text(f"{proc.pid}\n")
                return proc.pid
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not answer on {ready_url} within {timeout:.0f} s")


def up(workers: int, stable_age: int) -> int:
    (VAR / "log").mkdir(parents=True, exist_ok=True)
    # The project's small FHIR server stands in for the hospital's EHR, unless one is configured.
    fhir_url = os.environ.get("ORTHANC_AI_FHIR_URL")
    if fhir_url is None:
        fhir_url = f"http://127.0.0.1:{EHR_PORT}"
        if read_pid_file(VAR / "ehr.pid") is None:
            try:
                start_detached(
                    "ehr",
                    [sys.executable, "-m", "devstack.ehr_server", "--port", str(EHR_PORT),
                     "--data", str(VAR / "ehr-data.jsonl")],
                    f"{fhir_url}/metadata",
                )  # fmt: skip
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        print(f"EHR (FHIR) ready   {fhir_url}  (the project's test FHIR server; data in var/ehr-data.jsonl)")
    triton_pid = read_pid_file(VAR / "triton.pid")
    if triton_pid is None:
        triton = TritonServer(
            ROOT / "triton_models", log_file=VAR / "log" / "triton.log", model_control="poll",
            http_port=TRITON_HTTP_PORT, grpc_port=TRITON_GRPC_PORT, metrics_port=TRITON_METRICS_PORT,
        )  # fmt: skip
        try:
            triton.start(timeout=120)
        except TritonServerError as e:
            print(f"error: Triton did not start: {e}", file=sys.stderr)
            return 1
        (VAR / "triton.pid").write_text(f"{triton.detach()}\n")
        print(
            f"Triton     ready   gRPC 127.0.0.1:{TRITON_GRPC_PORT}, HTTP http://127.0.0.1:{TRITON_HTTP_PORT} "
            f"(log {VAR / 'log/triton.log'})"
        )
    else:
        print(f"Triton     running (pid {triton_pid})")
    orthanc_pid = read_pid_file(VAR / "orthanc.pid")
    if orthanc_pid is None:
        server = OrthancServer(
            VAR / "orthanc-storage", workers=workers, stable_age=stable_age,
            http_port=ORTHANC_PORT, dicom_port=DICOM_PORT, triton_grpc_port=TRITON_GRPC_PORT,
            extra_env={"ORTHANC_AI_FHIR_URL": fhir_url,
                       "ORTHANC_AI_VIEWER_URL": os.environ.get("ORTHANC_AI_VIEWER_URL", f"http://127.0.0.1:{VIEWER_PORT}")},
        )  # fmt: skip
        try:
            server.start(timeout=60, detach=True)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        assert server.pid is not None
        (VAR / "orthanc.pid").write_text(f"{server.pid}\n")
        print(
            f"Orthanc    ready   {server.url}  (DICOMweb {server.url}/dicom-web/, log {VAR / 'log/orthanc.log'})"
        )
    else:
        print(f"Orthanc    running (pid {orthanc_pid})")
    from devstack.viewer import DEFAULT_CONFIG, DEFAULT_DIST, ViewerError, start_background

    try:
        start_background(f"http://127.0.0.1:{ORTHANC_PORT}", VIEWER_PORT, DEFAULT_DIST, DEFAULT_CONFIG)
    except ViewerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def down() -> int:
    for name in ("viewer", "orthanc", "triton", "ehr"):
        pid = read_pid_file(VAR / f"{name}.pid")
        if pid is not None:
            terminate_process(pid, 30)
            print(f"{name} stopped (pid {pid})")
        with contextlib.suppress(OSError):
            (VAR / f"{name}.pid").unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.stack", description="local Orthanc + Triton")
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--stable-age",
        type=int,
        default=int(os.environ.get("ORTHANC_AI_STABLE_AGE") or 5),
        help="Orthanc's StableAge in seconds (default $ORTHANC_AI_STABLE_AGE, else 5): try a site's own value",
    )
    args = p.parse_args(argv)
    return up(args.workers, args.stable_age) if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
