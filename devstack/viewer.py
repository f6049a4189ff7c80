# SPDX-License-Identifier: AGPL-3.0-or-later
"""The viewer gateway (:mod:`orthanc_plugin.viewer.gateway`) on 127.0.0.1 for ``make up`` and the tests.

It serves the prebuilt OHIF viewer (``var/ohif/package/dist``, fetched by
``scripts/install_viewer.sh``) with our ``viewer/app-config.js`` and forwards DICOMweb/WADO to
Orthanc on one origin; pages of that origin (``http://127.0.0.1:PORT``, ``localhost``, ``[::1]``)
may store a corrected segmentation (STOW-RS). Production runs the same gateway in the image
(``docker-compose.yml``, service ``viewer``).

Command line (``make up`` / ``make down``)::

    python -m devstack.viewer --orthanc http://127.0.0.1:8042 --port 3000          # foreground
    python -m devstack.viewer --orthanc http://127.0.0.1:8042 --port 3000 start    # background
    python -m devstack.viewer stop
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from devstack.common import ROOT, var_dir
from orthanc_plugin.core.processes import read_pid_file
from orthanc_plugin.viewer.gateway import ViewerError as ViewerError
from orthanc_plugin.viewer.gateway import check_files, create_app, serve

VAR = var_dir()
# The prebuilt OHIF (scripts/install_viewer.sh) is the same for every release: always under var/.
DEFAULT_DIST = ROOT / "var" / "ohif" / "package" / "dist"
DEFAULT_CONFIG = ROOT / "viewer" / "app-config.js"
PID_FILE = VAR / "viewer.pid"
LOG_FILE = VAR / "log" / "viewer.log"
HOST = "127.0.0.1"


def local_origins(port: int) -> frozenset[str]:
    """The origins a browser uses for a proxy on 127.0.0.1:``port``."""
    return frozenset(f"http://{host}:{port}" for host in (HOST, "localhost", "[::1]"))


class ViewerServer:
    """The viewer proxy on 127.0.0.1:``port``, run by uvicorn in a background thread (tests)."""

    def __init__(
        self,
        orthanc_url: str,
        port: int,
        dist_dir: Path = DEFAULT_DIST,
        config_file: Path = DEFAULT_CONFIG,
    ) -> None:
        self.orthanc_url = orthanc_url
        self.port = port
        self.dist_dir = Path(dist_dir)
        self.config_file = Path(config_file)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def viewer_url(self, study_instance_uid: str) -> str:
        """OHIF's basic viewer for one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"

    def start(self, timeout: float = 15.0) -> ViewerServer:
        import uvicorn

        app = create_app(self.orthanc_url, self.dist_dir, self.config_file, local_origins(self.port))
        config = uvicorn.Config(
            app, host=HOST, port=self.port, log_level="warning", access_log=False, lifespan="on",
            timeout_keep_alive=30,
        )  # fmt: skip
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, name=f"viewer:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise ViewerError(f"the viewer could not listen on {self.url} (port taken?)")
            if time.monotonic() > deadline:
                self.stop()
                raise ViewerError(f"the viewer did not start on {self.url} within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI for make up/down


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ViewerError(f"the viewer exited with {proc.returncode}; see {LOG_FILE}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/app-config.js", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise ViewerError(f"the viewer did not answer on {url} within {timeout:.0f} s; see {LOG_FILE}")


def start_background(orthanc_url: str, port: int, dist_dir: Path, config_file: Path) -> int:
    """Start ``run`` as a detached process, write ``var/viewer.pid``; returns the pid."""
    pid = read_pid_file(PID_FILE)
    if pid is not None:
        print(f"Viewer     running (pid {pid})")
        return pid
    check_files(dist_dir, config_file)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "devstack.viewer", "--orthanc", orthanc_url, "--port", str(port),
            "--dist", str(dist_dir), "--config", str(config_file), "run"]  # fmt: skip
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
            start_new_session=True,
        )  # fmt: skip
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(url, proc, 20)
    except ViewerError:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        raise
    PID_FILE.write_text(f"{proc.pid}\n")
    print(f"Viewer     ready   {url}/  (OHIF, DICOMweb of {orthanc_url}, log {LOG_FILE})")
    return proc.pid


def stop_background() -> None:
    from devstack.triton_server import terminate_process

    pid = read_pid_file(PID_FILE)
    if pid is not None:
        terminate_process(pid, 10)
        print(f"viewer stopped (pid {pid})")
    with contextlib.suppress(OSError):
        PID_FILE.unlink()


def run_foreground(orthanc_url: str, port: int, dist_dir: Path, config_file: Path) -> None:
    serve(orthanc_url, HOST, port, dist_dir, config_file, local_origins(port))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m devstack.viewer", description="OHIF viewer + DICOMweb forwarder on one origin"
    )
    p.add_argument("action", nargs="?", default="run", choices=("run", "start", "stop"),
                   help="run in the foreground (default), start in the background (var/viewer.pid), stop")  # fmt: skip
    p.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP root")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--dist", type=Path, default=DEFAULT_DIST, help="OHIF's prebuilt dist/ folder")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="app-config.js to serve")
    args = p.parse_args(argv)
    try:
        if args.action == "stop":
            stop_background()
        elif args.action == "start":
            start_background(args.orthanc, args.port, args.dist.resolve(), args.config.resolve())
        else:
            with contextlib.suppress(KeyboardInterrupt):
                run_foreground(args.orthanc, args.port, args.dist.resolve(), args.config.resolve())
    except ViewerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
