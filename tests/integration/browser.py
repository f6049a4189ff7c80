"""Headless Chromium checks driven by node + playwright-core (scripts/install_viewer.sh installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import ROOT

CHROMIUM = Path(os.environ.get("ORTHANC_AI_CHROMIUM", "/usr/bin/chromium"))
PLAYWRIGHT = ROOT / "viewer" / "node_modules" / "playwright-core" / "package.json"


def require_browser(what: str, more: list[str] | None = None) -> None:
    """A missing browser is a broken install, not a reason to skip: fail and say how to fix it."""
    missing = list(more or [])
    if not CHROMIUM.is_file():
        missing.insert(0, f"{CHROMIUM} (Debian package 'chromium')")
    if shutil.which("node") is None:
        missing.append("node (Node.js >= 20)")
    if not PLAYWRIGHT.is_file():
        missing.append(f"playwright-core in {PLAYWRIGHT.parent.parent}")
    if missing:
        pytest.fail(f"cannot run the {what}, missing: {'; '.join(missing)}. Run scripts/install_viewer.sh")


def run_check(
    script: Path, args: list[str], artifacts: Path, report_name: str, timeout: float = 150
) -> dict[str, Any]:
    """Run ``node script args --out artifacts --chromium ...``; its last stdout line is a JSON report."""
    argv = ["node", str(script), *args, "--out", str(artifacts), "--chromium", str(CHROMIUM)]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser check did not finish within {e.timeout:.0f} s: {e.stderr!r}")
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        pytest.fail(f"{script.name} exited with {run.returncode}:\n{run.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    (artifacts / report_name).write_text(json.dumps(report, indent=1))
    return report
