"""docker-compose.yml validates (``docker-compose config``, no Docker engine needed) and holds the
services of a production deployment: Orthanc (built on the orthancteam image: Python, DICOMweb and
PostgreSQL plugins, our package inside), NVIDIA Triton with a GPU and triton_models/ mounted, the OHIF viewer gateway, HAPI FHIR,
PostgreSQL. Runs in CI with the rest of the unit tests (about 2 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.common import ROOT

# Placeholders for the variables the file requires (secrets in production, never in the repository).
ENV = {
    "POSTGRES_PASSWORD": "compose-check", "ORTHANC_ADMIN_PASSWORD": "compose-check", "FHIR_TOKEN": "",
    "VIEWER_ORIGIN": "https://pacs.example",
}  # fmt: skip


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) when it works, else Debian's ``docker-compose`` (1.29)."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is None:
        pytest.fail(
            "neither `docker compose` nor `docker-compose` found: run scripts/install.sh (Debian docker-compose)"
        )
    return [legacy]


def _config(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ENV}
    return subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**base, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    quiet = _config("-q", env=ENV)
    assert quiet.returncode == 0, quiet.stderr
    resolved = _config(env=ENV)
    assert resolved.returncode == 0, resolved.stderr
    data: dict[str, Any] = yaml.safe_load(resolved.stdout)
    return data


def _service(compose: dict[str, Any], image_prefix: str) -> dict[str, Any]:
    found = [s for s in compose["services"].values() if str(s.get("image", "")).startswith(image_prefix)]
    assert found, f"no service runs an image {image_prefix}*"
    return found[0]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: source} of a service's volumes, whatever syntax the tool prints."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[str(v["target"])] = str(v.get("source", ""))
        else:
            source, target = str(v).split(":")[:2]
            out[target] = source
    return out


def test_secrets_are_required_not_defaulted() -> None:
    r = _config("-q", env={})
    assert r.returncode != 0
    assert "POSTGRES_PASSWORD" in r.stderr or "ORTHANC_ADMIN_PASSWORD" in r.stderr


def test_orthanc_with_plugins_and_ours(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    # Built on the official image (docker/orthanc/Dockerfile; tests/unit/test_dockerfile.py).
    assert Path(orthanc["build"]["context"]).resolve() == ROOT
    assert orthanc["build"]["dockerfile"] == "docker/orthanc/Dockerfile"
    env = orthanc["environment"]
    for plugin in ("PYTHON", "DICOM_WEB", "POSTGRESQL"):
        assert str(env.get(f"{plugin}_PLUGIN_ENABLED")).lower() == "true", plugin
    assert env["ORTHANC__POSTGRESQL__HOST"] == "postgres"
    assert str(env["ORTHANC__DICOM_WEB__ENABLE"]).lower() == "true"
    # Our plugin: in the image, the configuration mounted, the entry script named, our section valid JSON.
    mounts = _mounts(orthanc)
    assert Path(mounts["/opt/orthanc-ai/config"]).resolve() == ROOT / "config"
    assert env["ORTHANC__PYTHON_SCRIPT"] == "/opt/orthanc-ai/orthanc_plugin/orthanc_entry.py"
    assert (ROOT / "orthanc_plugin" / "orthanc_entry.py").is_file()
    section = json.loads(env["ORTHANC__ORTHANC_A_I"])
    assert section["PipelinesFile"] == "/opt/orthanc-ai/config/pipelines.yaml"
    assert section["TritonUrl"].startswith("triton:")
    assert section["FhirBaseUrl"].startswith("http://fhir:")
    assert "compose-check" not in env["ORTHANC__ORTHANC_A_I"]  # passwords by variable name only


def test_triton_with_gpu_and_models(compose: dict[str, Any]) -> None:
    triton = _service(compose, "nvcr.io/nvidia/tritonserver:")
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    mounts = _mounts(triton)
    assert Path(mounts["/models"]).resolve() == ROOT / "triton_models"
    command = " ".join(triton["command"]) if isinstance(triton["command"], list) else triton["command"]
    assert "--model-repository=/models" in command


def test_viewer_fhir_and_database(compose: dict[str, Any]) -> None:
    from orthanc_plugin.viewer.gateway import parse_listen, parse_origins

    # The viewer gateway (tests/unit/test_dockerfile.py: from this image), storing only from the site's origin.
    entry = compose["services"]["viewer"]["entrypoint"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in entry[4:])
    assert parse_origins([flags["origin"]]) == {"https://pacs.example"}
    assert parse_listen(flags["listen"]) == ("0.0.0.0", 3000)
    assert not any(str(s.get("image", "")).startswith("ohif/app") for s in compose["services"].values())
    fhir = _service(compose, "hapiproject/hapi:")
    assert fhir["environment"]["hapi.fhir.fhir_version"] == "R4"
    postgres = _service(compose, "postgres:")
    assert postgres["environment"]["POSTGRES_PASSWORD"] == ENV["POSTGRES_PASSWORD"]
    assert "healthcheck" in postgres
