"""docker/orthanc/Dockerfile and docker-compose.yml agree: the services that run it, the paths the
compose names inside the image (entry script, venv, mounted configuration), our settings section,
and the pinned requirements (they cover what the package imports and fit requirements.txt).

No Docker engine is needed: the files are parsed (the compose file through ``docker-compose
config``, as in test_compose.py).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement

from orthanc_plugin.core.config import Settings

from .test_compose import ROOT, _mounts
from .test_compose import compose as compose  # noqa: PLC0414 - the module fixture, reused

DOCKERFILE = ROOT / "docker" / "orthanc" / "Dockerfile"
IMAGE_REQUIREMENTS = ROOT / "docker" / "orthanc" / "requirements.txt"
#: The base image, and the Python its Python plugin embeds (orthancteam/orthanc release notes:
#: 25.1.1 brought Python plugin 5.0; up to 25.2.0 the images are Debian 12 with Python 3.11,
#: later ones Ubuntu 24.04 with Python 3.12).
BASE_IMAGE = "orthancteam/orthanc:25.2.0"
VIEWER_CONFIG = ROOT / "viewer" / "app-config.js"
OHIF_DIST = "/opt/ohif/dist"
BASE_PYTHON = (3, 11)
#: Import names whose distribution is named otherwise.
DISTRIBUTION = {"yaml": "pyyaml", "fhir": "fhir.resources", "skimage": "scikit-image", "PIL": "pillow"}
#: Imports that are not installed from PyPI: Orthanc's plugin module.
PROVIDED = {"orthanc"}
#: Modules that do not run in the image: the offline model tools (ONNX Runtime, run at build time
#: of a model, not by Orthanc or the workers).
OFFLINE = ("models",)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return out


def env_of(instr: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instr:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def stages(instr: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The build stages, each from its FROM."""
    out: list[list[tuple[str, str]]] = []
    for word, args in instr:
        if word == "FROM":
            out.append([])
        out[-1].append((word, args))
    return out


def copies(instr: list[tuple[str, str]]) -> dict[PurePosixPath, Path]:
    """{destination in the image: source in the repository} of the COPY instructions that take
    files from the build context (``COPY --from=stage`` takes another stage's files)."""
    out = {}
    for word, args in instr:
        if word == "COPY":
            *sources, dest = shlex.split(args)
            if any(s.startswith("--from") for s in sources):
                continue
            for s in sources:
                out[PurePosixPath(dest)] = ROOT / s
    return out


def in_image(path: str, files: dict[PurePosixPath, Path]) -> Path | None:
    """The repository file that an image path comes from (None if no COPY provides it)."""
    target = PurePosixPath(path)
    for dest, source in files.items():
        if source.is_dir() and target.is_relative_to(dest):
            return source / target.relative_to(dest)
        if target == dest:
            return source
    return None


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """The final stage: the image that runs."""
    return stages(instructions(DOCKERFILE))[-1]


def test_the_admin_page_charts_come_from_a_build_stage() -> None:
    # Chart.js is installed by npm ci from the committed lock file in a stage of its own (the
    # runtime image has no Node.js), and only its node_modules reach the image.
    charts, _ohif, final = stages(instructions(DOCKERFILE))
    assert charts[0][1].endswith(" AS charts"), charts[0]
    vendor = ROOT / "orthanc_plugin" / "server" / "ui" / "vendor"
    sources = [ROOT / x for w, a in charts if w == "COPY" for x in shlex.split(a)[:-1]]
    assert sources == [vendor / "package.json", vendor / "package-lock.json"]
    assert any(w == "RUN" and "npm ci" in a for w, a in charts)
    from_charts = [shlex.split(a) for w, a in final if w == "COPY" and a.startswith("--from=charts")]
    assert from_charts == [
        [
            "--from=charts",
            "/vendor/node_modules/",
            "/opt/orthanc-ai/orthanc_plugin/server/ui/vendor/node_modules/",
        ]
    ]
    # the plugin serves Chart.js from that folder (server/plugin.py VENDOR_FILES)
    plugin = (ROOT / "orthanc_plugin" / "server" / "plugin.py").read_text()
    assert '"vendor" / "node_modules" / "chart.js"' in plugin


def test_based_on_the_official_image_with_its_python(dockerfile: list[tuple[str, str]]) -> None:
    (base,) = [args for word, args in dockerfile if word == "FROM"]
    assert base == BASE_IMAGE
    runs = " ".join(args for word, args in dockerfile if word == "RUN")
    # The build stops if the image's Python is not the one the requirements are pinned for.
    assert f"sys.version_info[:2] == {BASE_PYTHON}" in runs


def test_copies_only_the_package(dockerfile: list[tuple[str, str]]) -> None:
    files = copies(dockerfile)
    assert set(files.values()) == {ROOT / "orthanc_plugin", IMAGE_REQUIREMENTS, VIEWER_CONFIG}
    assert all(source.exists() for source in files.values())
    # The build context sends nothing else either.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:4] == [
        "*", "!orthanc_plugin/", "!docker/orthanc/requirements.txt", "!viewer/app-config.js",
    ]  # fmt: skip


def test_the_viewer_is_the_tested_ohif_build() -> None:
    # The image's OHIF is the npm package's prebuilt dist/ at the version the browser tests use.
    _charts, ohif, final = stages(instructions(DOCKERFILE))
    assert ohif[0][1].endswith(" AS ohif"), ohif[0]
    tested = re.search(r"^OHIF_VERSION=(\S+)$", (ROOT / "scripts" / "install_viewer.sh").read_text(), re.M)
    assert tested is not None
    assert ("ARG", f"OHIF_VERSION={tested.group(1)}") in ohif
    assert any(w == "RUN" and "npm pack" in a and "@ohif/app@${OHIF_VERSION}" in a for w, a in ohif)
    from_ohif = [shlex.split(a) for w, a in final if w == "COPY" and a.startswith("--from=ohif")]
    assert from_ohif == [["--from=ohif", "/ohif/package/dist/", OHIF_DIST + "/"]]


def test_compose_services_run_this_image(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    env = env_of(dockerfile)
    files = copies(dockerfile)
    venv = env["ORTHANC_AI_VENV"]
    images = set()
    for name in ("orthanc", "ai-worker"):
        service = compose["services"][name]
        assert Path(service["build"]["context"]).resolve() == ROOT, name
        assert ROOT / service["build"]["dockerfile"] == DOCKERFILE, name
        images.add(service["image"])
        mounts = _mounts(service)
        # Nothing mounted over the package the image holds, or into it (a mount would hide it).
        for target in map(PurePosixPath, mounts):
            for dest in files:
                assert not (dest.is_relative_to(target) or target.is_relative_to(dest)), (
                    f"{name} mounts {target} over {dest}, which the image holds"
                )
    assert len(images) == 1  # one image, built once

    orthanc = compose["services"]["orthanc"]
    orthanc_env = orthanc["environment"]
    # The entry script Orthanc loads is one the Dockerfile copies, and the image says the same.
    script = orthanc_env["ORTHANC__PYTHON_SCRIPT"]
    assert script == env["ORTHANC__PYTHON_SCRIPT"]
    source = in_image(script, files)
    assert source is not None and source.is_file(), f"{script} is not in the image"
    assert str(orthanc_env.get("PYTHON_PLUGIN_ENABLED", env["PYTHON_PLUGIN_ENABLED"])).lower() == "true"
    # The venv is where the entry script and the plugin look for it (ORTHANC_AI_VENV).
    assert "ORTHANC_AI_VENV" in source.read_text()
    assert orthanc_env.get("ORTHANC_AI_VENV", venv) == venv

    # Our section is valid settings, and the files it names are in the image or mounted.
    section = json.loads(orthanc_env["ORTHANC__ORTHANC_A_I"])
    settings = Settings.model_validate(section)
    mounts = _mounts(orthanc)
    assert _source(str(settings.pipelines_file), mounts, files).is_file()

    worker = compose["services"]["ai-worker"]
    entry = worker["entrypoint"]
    assert entry[0] == f"{venv}/bin/python" and entry[1:4] == ["-m", "orthanc_plugin", "worker"]
    assert in_image(f"{worker['working_dir']}/orthanc_plugin/__main__.py", files) is not None
    (pipelines,) = [a.split("=", 1)[1] for a in entry if a.startswith("--pipelines=")]
    assert _source(pipelines, _mounts(worker), files).is_file()

    # The viewer gateway: this image, the product's command, OHIF and its configuration from the image.
    viewer = compose["services"]["viewer"]
    assert viewer["image"] in images
    entry = viewer["entrypoint"]
    assert entry[0] == f"{venv}/bin/python" and entry[1:4] == ["-m", "orthanc_plugin", "viewer"]
    assert in_image(f"{viewer['working_dir']}/orthanc_plugin/viewer/gateway.py", files) is not None
    flags = dict(a.removeprefix("--").split("=", 1) for a in entry[4:])
    assert flags["dist"] == OHIF_DIST
    assert _source(flags["config"], _mounts(viewer), files) == VIEWER_CONFIG
    assert flags["orthanc"] == "http://orthanc:8042"


def _source(path: str, mounts: dict[str, str], files: dict[PurePosixPath, Path]) -> Path:
    """The repository file behind an image path: from a bind mount or a COPY."""
    target = PurePosixPath(path)
    for mount, source in mounts.items():
        if target.is_relative_to(mount) and source.startswith(("/", ".")):
            return Path(source) / target.relative_to(mount)
    found = in_image(path, files)
    assert found is not None, f"{path} is neither mounted nor in the image"
    return found


def _third_party_imports() -> set[str]:
    names: set[str] = set()
    package = ROOT / "orthanc_plugin"
    for py in package.rglob("*.py"):
        if py.relative_to(package).parts[0] in OFFLINE:
            continue
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "orthanc_plugin"} - PROVIDED


def _requirements(path: Path, python: str = "3.11") -> dict[str, Requirement]:
    """The requirements that apply to the image's Python (environment markers evaluated for it)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": python}):
                out[req.name.lower()] = req
    return out


def test_image_requirements_cover_the_imports_and_fit_requirements_txt() -> None:
    pinned = _requirements(IMAGE_REQUIREMENTS)
    for name, req in pinned.items():
        assert re.fullmatch(r"==[0-9][0-9A-Za-z.]*", str(req.specifier)), f"{name} is not pinned exactly"
    needed = {DISTRIBUTION.get(n, n).lower() for n in _third_party_imports()}
    assert needed <= set(pinned), f"imported by orthanc_plugin but not in the image: {needed - set(pinned)}"
    # The same ranges as the project's runtime requirements (which the tests run with).
    ranges = _requirements(ROOT / "requirements.txt")
    for name, req in pinned.items():
        assert name in ranges, f"{name} is in the image but not in requirements.txt"
        version = str(req.specifier).removeprefix("==")
        assert ranges[name].specifier.contains(version), (
            f"{name}=={version} is outside {ranges[name].specifier}"
        )
        assert req.extras == ranges[name].extras, name
