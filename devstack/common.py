"""What the local stack, the tests and the benchmarks share: the repository root, the state folder,
log tails."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the folder holding devstack/ and orthanc_plugin/)
ROOT = Path(__file__).resolve().parent.parent


def var_dir() -> Path:
    """Where the local stack keeps its state (pid files, logs, storage): ``$ORTHANC_AI_VAR`` or
    ``var/``. A second Debian release run from the same checkout (``make test-trixie``) uses its own."""
    return Path(os.environ.get("ORTHANC_AI_VAR") or ROOT / "var")


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last non-empty ``lines`` of a log file (read from its last 64 kB), or "" if unreadable."""
    if path is None or not path.is_file():
        return ""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
