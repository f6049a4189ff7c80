"""Where the product is installed: the one definition of the folder that holds the package.

A local install keeps its venv (``.venv``) and configuration beside the package; worker
processes are started with this folder on ``PYTHONPATH`` and as their working directory.
"""

from __future__ import annotations

from pathlib import Path

#: the ``orthanc_plugin`` package folder
PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: the folder that holds the package (the repository root of a local install)
INSTALL_ROOT = PACKAGE_DIR.parent
