"""Local worker processes: started, watched and restarted by the plugin.

Workers run the project's venv Python explicitly: inside Orthanc ``sys.executable`` is the
Orthanc binary, so ``multiprocessing`` would start another Orthanc.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orthanc_plugin.core.paths import INSTALL_ROOT
from orthanc_plugin.jobs.database import DatabaseTarget
from orthanc_plugin.jobs.store import JobStore

log = logging.getLogger("orthanc_ai.supervisor")


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    log_file: IO[bytes] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(
        self,
        python: Path,
        settings_file: Path,
        count: int,
        store_path: DatabaseTarget,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.settings_file = settings_file
        self.slots = [_Slot(i) for i in range(count)]
        self.store_path = store_path
        self.log_dir = log_dir
        self.env = env
        self.host = socket.gethostname()
        self._lock = threading.Lock()

    def _spawn(self, slot: _Slot) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if slot.log_file is None:
            slot.log_file = open(self.log_dir / f"worker-{slot.index}.log", "ab")  # noqa: SIM115
        root = INSTALL_ROOT
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        slot.proc = subprocess.Popen(
            [str(self.python), "-m", "orthanc_plugin", "worker", "--settings", str(self.settings_file),
             "--parent-pid", str(os.getpid())],
            stdout=slot.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(root),
            start_new_session=True,  # a Ctrl-C to Orthanc's terminal reaches us, not the workers directly
        )  # fmt: skip
        slot.started = time.time()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def start(self) -> None:
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)

    def check(self) -> None:
        """Restart dead workers and give their jobs back to the queue at once."""
        with self._lock:
            for slot in self.slots:
                if slot.proc is None or slot.proc.poll() is None:
                    continue
                code = slot.proc.returncode
                owner = f"{self.host}:{slot.proc.pid}"
                store = JobStore(self.store_path)
                try:
                    n = store.release_owner(
                        owner, f"worker {slot.index} (pid {slot.proc.pid}) exited with {code}"
                    )
                finally:
                    store.close()
                log.warning(
                    "worker %d (pid %d) exited with %s; %d job(s) requeued",
                    slot.index,
                    slot.proc.pid,
                    code,
                    n,
                )
                # Back off when a worker dies right after starting (broken set-up), up to 30 s.
                if time.time() - slot.started < 10:
                    slot.restarts += 1
                    if time.time() - slot.started < min(30.0, 2.0**slot.restarts):
                        continue
                else:
                    slot.restarts = 0
                self._spawn(slot)

    def run(self, stop: threading.Event, period_s: float = 1.0) -> None:
        while not stop.wait(period_s):
            try:
                self.check()
            except Exception:
                log.exception("supervising workers failed")

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "index": s.index,
                    "pid": s.proc.pid if s.proc else None,
                    "alive": s.proc is not None and s.proc.poll() is None,
                    "restarts": s.restarts,
                    "since": s.started,
                }
                for s in self.slots
            ]

    def restart_all(self) -> None:
        """Ask every worker to finish its current job and exit; ``check`` starts fresh ones."""
        with self._lock:
            for s in self.slots:
                if s.proc is not None and s.proc.poll() is None:
                    s.proc.send_signal(signal.SIGTERM)
                    s.started = 0.0  # not a crash: no back-off when it is restarted

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            deadline = time.time() + timeout_s
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for s in self.slots:
                if s.log_file is not None:
                    s.log_file.close()
                    s.log_file = None
