"""Script loaded by Orthanc's Python plugin (``"PythonScript"`` in the Orthanc configuration).

Orthanc embeds Debian's Python, not our venv: put the venv's packages ahead of Debian's
dist-packages, make this repository importable, then hand over to ``plugin.register``.
"""

import os
import site
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("ORTHANC_AI_VENV", os.path.join(ROOT, ".venv"))
_site = os.path.join(VENV, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
_before = list(sys.path)
site.addsitedir(_site)
sys.path[:] = [p for p in sys.path if p not in _before] + _before
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from orthanc_plugin.server.plugin import register  # noqa: E402

register()
