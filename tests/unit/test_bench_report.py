"""docs/performance.md shows what the committed benchmark records say, not figures copied by hand."""

from __future__ import annotations

import subprocess
import sys

from devstack.common import ROOT


def test_performance_page_is_generated_from_the_records() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
