"""Benchmark results as files: each bench script records its figures in bench/results/NAME.json.

A record holds the figures (medians, minima, ratios; seconds unless the name says otherwise),
the command that produced them, the machine (CPU model, cores, Python, load average at the
start and end of the run) and the date. ``bench/compare.py`` prints the ratios of a new run to
the last committed one; ``bench/report.py`` writes the tables of docs/performance.md from the
committed records, so no figure there is copied by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    debian = Path("/etc/debian_version")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "debian": debian.read_text().strip() if debian.is_file() else None,
        "gpu": None,  # the CPU stand-in Triton: no GPU figure comes from these scripts
        "load_average_start": round(_LOAD_AT_START[0], 2),
        "load_average_end": round(os.getloadavg()[0], 2),
    }


def describe(m: dict[str, Any]) -> str:
    return (
        f"{m['cores']} CPU(s), {m['cpu']}, Python {m['python']}, Debian {m['debian']}, "
        f"load average {m['load_average_start']} -> {m['load_average_end']}"
    )


def record(name: str, figures: dict[str, float], notes: dict[str, Any] | None = None) -> Path:
    """Write bench/results/NAME.json (replacing the previous run's) and return its path."""
    RESULTS.mkdir(exist_ok=True)
    data = {
        "bench": name,
        "command": " ".join(["python", os.path.relpath(sys.argv[0], RESULTS.parent.parent), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "figures": {k: round(float(v), 6) for k, v in figures.items()},
        "notes": notes or {},
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    print(f"\nrecorded: {path.relative_to(RESULTS.parent.parent)} ({describe(data['machine'])})")
    return path
