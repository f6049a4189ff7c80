"""What the local stack, the tests and the benchmarks share: the repository root and log tails."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the folder holding devstack/ and orthanc_plugin/)
ROOT = Path(__file__).resolve().parent.parent


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
