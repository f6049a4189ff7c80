"""An independent FHIR server for the tests: Medplum's FHIR router in a Node process.

``devstack/fhir_peer/server.mjs`` serves Medplum's transaction engine (``@medplum/fhir-router``,
Apache-2.0) with its in-memory repository on 127.0.0.1; ``scripts/install_fhir_peer.sh``
installs it. The FHIR base is the root URL; data lives as long as the process.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from devstack.common import ROOT, log_tail
from devstack.stack import free_port

PEER_DIR = ROOT / "devstack" / "fhir_peer"
SERVER = PEER_DIR / "server.mjs"
ROUTER = PEER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"


def missing() -> list[str]:
    """What is not installed for the server to run (empty when it can run)."""
    out = []
    if shutil.which("node") is None:
        out.append("node (Node.js >= 20)")
    if not ROUTER.is_file():
        out.append(f"@medplum/fhir-router in {PEER_DIR / 'node_modules'}")
    return out


class MedplumServer:
    """``node server.mjs --port PORT`` on 127.0.0.1, started and stopped by the caller."""

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start and wait until it answers ``GET /metadata``; ``RuntimeError`` if it cannot."""
        if self._proc is not None:
            raise RuntimeError("the Medplum FHIR server is already running")
        absent = missing()
        if absent:
            raise RuntimeError(
                f"cannot start the Medplum FHIR server, missing: {'; '.join(absent)}."
                " Run scripts/install_fhir_peer.sh"
            )
        out: Any = subprocess.DEVNULL
        if self.log_file is not None:
            out = open(self.log_file, "ab")  # noqa: SIM115 - the child writes to it until stop()
        try:
            self._proc = subprocess.Popen(
                ["node", str(SERVER), "--port", str(self.port)],
                cwd=str(PEER_DIR),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self._proc = None
                    raise RuntimeError(
                        f"the Medplum FHIR server exited with {code}: {log_tail(self.log_file) or '(no log)'}"
                    )
                try:
                    if client.get(f"{self.url}/metadata").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"the Medplum FHIR server did not answer within {timeout:.0f} s: {log_tail(self.log_file) or '(no log)'}"
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> MedplumServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """The matches of a search; ``RuntimeError`` if they do not fit in one page of 1000."""
        r = httpx.get(f"{self.url}/{resource_type}", params={"_count": "1000", **params}, timeout=10)
        r.raise_for_status()
        page = r.json()
        if any(link.get("relation") == "next" for link in page.get("link", [])):
            raise RuntimeError(f"more than 1000 {resource_type} match {params}")
        return [e["resource"] for e in page.get("entry", [])]

    def read(self, reference: str) -> dict[str, Any]:
        """``GET`` of a relative reference such as ``DiagnosticReport/<id>``."""
        r = httpx.get(f"{self.url}/{reference}", timeout=10)
        r.raise_for_status()
        return dict(r.json())
