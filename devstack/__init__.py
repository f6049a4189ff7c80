"""The local stack and the test services: never part of the product.

Starts Orthanc, Triton (the tritonserver from the nvidia-pytriton wheel with the CPU stand-in
backend), the OHIF viewer proxy, PostgreSQL and a small FHIR server for ``make up``, ``make demo``
and the tests. May import ``orthanc_plugin``; the product never imports this package.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def var_dir() -> Path:
    """Where the local stack keeps its state (pid files, logs, storage): ``$ORTHANC_AI_VAR`` or
    ``var/``. A second Debian release run from the same checkout (``make test-trixie``) uses its own."""
    return Path(os.environ.get("ORTHANC_AI_VAR") or ROOT / "var")
