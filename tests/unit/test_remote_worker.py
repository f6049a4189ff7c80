"""The worker-host command line and the JobDatabase settings: validated, errors naming the key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import ConfigError, load_settings
from orthanc_plugin.jobs.database import DatabaseError, PostgresTarget, parse_target, to_pyformat
from orthanc_plugin.worker.remote import add_arguments, settings_from_args, settings_from_file

PIPELINES = str(ROOT / "config" / "pipelines.yaml")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default=None)
    add_arguments(p)
    return p.parse_args(list(argv))


BASE = (
    "--orthanc-url", "http://orthanc.example:8042", "--triton-url", "triton.example:8001",
    "--database-url", "postgresql://ai@db.example:5432/orthanc_ai", "--pipelines", PIPELINES,
)  # fmt: skip


def test_command_line_makes_validated_settings() -> None:
    s = settings_from_args(
        parse(*BASE, "--orthanc-user", "worker", "--workers", "3"),
        {"ORTHANC_AI_ORTHANC_PASSWORD": "x", "ORTHANC_AI_DATABASE_PASSWORD": "y"},
    )
    assert s.orthanc_url == "http://orthanc.example:8042" and s.orthanc_username == "worker"
    assert s.orthanc_password_env == "ORTHANC_AI_ORTHANC_PASSWORD" and s.workers == 3
    assert s.triton_url == "triton.example:8001" and s.triton_shared_memory is None  # auto: remote, so off
    assert s.database() == PostgresTarget(
        "postgresql://ai@db.example:5432/orthanc_ai", "ORTHANC_AI_DATABASE_PASSWORD"
    )


def test_command_line_refusals_name_what_to_fix() -> None:
    with pytest.raises(ConfigError, match="--pipelines missing"):
        settings_from_args(parse(*BASE[:-2]), {})
    with pytest.raises(ConfigError, match="ORTHANC_AI_ORTHANC_PASSWORD"):
        settings_from_args(parse(*BASE, "--orthanc-user", "worker"), {})
    with pytest.raises(ConfigError, match="key 'JobDatabase'.*password"):
        settings_from_args(parse(*BASE[:-4], "--database-url", "postgresql://ai:secret@db/x", *BASE[-2:]), {})
    with pytest.raises(ConfigError, match="not both"):
        settings_from_args(parse(*BASE, "--settings", "x.json"), {})
    assert settings_from_args(parse(*BASE, "--triton-shared-memory", "off"), {}).triton_shared_memory is False


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/x", "must start with postgresql://"),
        ("postgresql://u:pw@db/x", "must not contain a password"),
        ("postgresql://u@db", "needs a database name"),
        ("postgresql:///x", "needs a host"),
    ],
)
def test_job_database_is_checked(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"OrthancAI: key 'JobDatabase': .*{message}"):
        load_settings({"OrthancAI": {"PipelinesFile": PIPELINES, "JobDatabase": url}}, "orthanc.json")


def test_without_job_database_the_sqlite_file_stays() -> None:
    s = load_settings(
        {"OrthancAI": {"PipelinesFile": PIPELINES, "JobDatabase": ""}, "StorageDirectory": "/db"}
    )
    assert s.database() == Path("/db/orthanc-ai/jobs.sqlite")
    with pytest.raises(ConfigError, match="JobDatabasePasswordEnv"):
        load_settings({"OrthancAI": {"PipelinesFile": PIPELINES, "JobDatabasePasswordEnv": "not a name"}})


def test_password_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    target = PostgresTarget("postgresql://ai@db/x", "JOBS_PW")
    monkeypatch.delenv("JOBS_PW", raising=False)
    with pytest.raises(DatabaseError, match="JOBS_PW"):
        target.password()
    monkeypatch.setenv("JOBS_PW", "s3cret")
    assert target.password() == "s3cret" and "s3cret" not in str(target)
    assert parse_target("postgres://ai@db/x") == PostgresTarget("postgres://ai@db/x")
    assert parse_target("/var/lib/jobs.sqlite") == Path("/var/lib/jobs.sqlite")


def test_placeholders_are_translated_outside_quoted_text() -> None:
    assert to_pyformat("SELECT * FROM t WHERE a=? AND b LIKE '%?%' AND c=?") == (
        "SELECT * FROM t WHERE a=%s AND b LIKE '%%?%%' AND c=%s"
    )


def test_a_worker_host_reads_the_orthancs_configuration_file(tmp_path: Path) -> None:
    """Every setting an Orthanc gives its own workers reaches a worker host through the same file."""
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("not read here")
    config = {
        "StorageDirectory": "${STORAGE}",
        "OrthancAI": {
            "PipelinesFile": PIPELINES,
            "OrthancUrl": "http://${ORTHANC_HOST}:8042",
            "TritonUrl": "triton.example:8001",
            "TritonTls": True,
            "TritonTlsCaFile": str(tmp_path / "ca.pem"),
            "TritonTlsCertFile": str(tmp_path / "client.pem"),
            "TritonTlsKeyFile": str(tmp_path / "client.key"),
            "FhirBaseUrl": "https://ehr.example/fhir",
            "FhirVerifyTls": str(tmp_path / "ca.pem"),
            "FhirClientCertFile": str(tmp_path / "client.pem"),
            "FhirClientKeyFile": str(tmp_path / "client.key"),
            "WorkerNice": 15,
            "Workers": 3,
            "ForwardAttempts": 5,
        },
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    s = settings_from_file(str(path), {"ORTHANC_HOST": "pacs.example", "STORAGE": str(tmp_path / "db")})
    assert s.orthanc_url == "http://pacs.example:8042"
    assert (
        s.triton_tls
        and s.triton_tls_ca == tmp_path / "ca.pem"
        and s.triton_tls_key == tmp_path / "client.key"
    )
    assert s.fhir_base_url == "https://ehr.example/fhir" and str(s.fhir_verify_tls) == str(
        tmp_path / "ca.pem"
    )
    assert s.worker_nice == 15 and s.workers == 3 and s.forward_attempts == 5
    assert s.job_store == tmp_path / "db" / "orthanc-ai" / "jobs.sqlite"  # as Orthanc's own workers
    # an unset variable becomes empty, as in Orthanc: here that leaves no host in the URL
    with pytest.raises(ConfigError, match="OrthancUrl"):
        settings_from_file(str(path), {})
