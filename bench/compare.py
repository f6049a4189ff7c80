"""Compare this checkout's benchmark records with the last committed ones: ratio new / old per figure.

    python bench/compare.py [--base REV]

A record written by a run since the last commit (bench/results/*.json, see bench/record.py) is
compared with the same file at REV (default HEAD). Ratios above 1 are slower (or larger) for
times and memory; for throughput (``per_hour``) and ``vs_in_process``-style ratios read them as
they are. The machine of both runs is printed: compare only runs on the same kind of machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from record import RESULTS, describe  # a sibling script: bench/ is sys.path[0]


def committed(path: Path, rev: str) -> dict[str, Any] | None:
    rel = path.relative_to(RESULTS.parent.parent).as_posix()
    shown = subprocess.run(
        ["git", "show", f"{rev}:{rel}"],
        cwd=RESULTS.parent.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def compare(new: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, float | None, float, float | None]]:
    """(figure, old value, new value, new / old) for every figure of the new record."""
    rows = []
    for name, value in new["figures"].items():
        before = old["figures"].get(name)
        ratio = value / before if isinstance(before, int | float) and before else None
        rows.append((name, before, value, ratio))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="the revision to compare with (default HEAD)")
    args = p.parse_args()
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        print("no records in bench/results/: run make bench first")
        return 1
    for path in files:
        new = json.loads(path.read_text())
        old = committed(path, args.base)
        print(f"\n== {new['bench']} ({path.name})")
        print(f"   now:  {new['date']}  {describe(new['machine'])}")
        if old is None:
            print(f"   no record at {args.base}: nothing to compare with")
            continue
        if old == new:
            print(f"   unchanged since {args.base} (no new run)")
            continue
        print(f"   then: {old['date']}  {describe(old['machine'])}")
        print(f"   {'figure':<44} {'then':>10} {'now':>10} {'now/then':>9}")
        for name, before, value, ratio in compare(new, old):
            b = f"{before:10.4g}" if before is not None else f"{'-':>10}"
            r = f"{ratio:8.2f}x" if ratio is not None else f"{'-':>9}"
            print(f"   {name:<44} {b} {value:10.4g} {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
