"""Workers lower their CPU priority (WorkerNice) and never raise it."""

from __future__ import annotations

import subprocess
import sys

from devstack.common import ROOT


def _nice_after(*steps: int) -> int:
    code = (
        "import os\n"
        "from orthanc_plugin.worker.loop import lower_priority\n"
        f"for n in {list(steps)!r}:\n"
        "    lower_priority(n)\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout.strip())


def test_worker_takes_the_configured_niceness() -> None:
    assert _nice_after(10) == 10


def test_a_smaller_setting_never_raises_the_priority() -> None:
    assert _nice_after(12, 5) == 12


def test_default_setting_is_ten() -> None:
    from orthanc_plugin.core.config import Settings

    assert Settings.model_validate({"PipelinesFile": "x.yaml"}).worker_nice == 10
