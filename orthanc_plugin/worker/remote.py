"""Workers on a host of their own: ``python -m orthanc_plugin worker --settings orthanc.json``
(the Orthancs' own configuration file) or ``... worker --orthanc-url ... --database-url ...``.

Orthanc starts its own workers from its configuration file; a worker host has no Orthanc and
reads the same file, or is configured on the command line. The settings are validated by the same model as
the ``OrthancAI`` section, so a wrong value gives the same message (naming the key). Passwords
and tokens never appear on the command line (visible to every user of the host in ``ps``):
only the names of the environment variables that hold them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orthanc_plugin.core.config import (
    ConfigError,
    Settings,
    explain_validation,
    load_pipelines,
    load_settings,
    settings_to_json,
)

log = logging.getLogger("orthanc_ai.remote_worker")

ORTHANC_PASSWORD_ENV = "ORTHANC_AI_ORTHANC_PASSWORD"
DATABASE_PASSWORD_ENV = "ORTHANC_AI_DATABASE_PASSWORD"
#: Flags that make the command-line form; ``--settings`` is the other form (Orthanc's own workers).
REQUIRED = ("orthanc_url", "triton_url", "database_url", "pipelines")


def add_arguments(w: argparse.ArgumentParser) -> None:
    """The command-line form of ``worker`` (besides ``--settings``)."""
    g = w.add_argument_group("a worker host without Orthanc (instead of --settings)")
    g.add_argument("--orthanc-url", help="Orthanc's REST API, e.g. http://orthanc.example:8042")
    g.add_argument("--orthanc-user", default=None, help="Orthanc user the workers log in as")
    g.add_argument(
        "--orthanc-password-env",
        default=ORTHANC_PASSWORD_ENV,
        help=f"environment variable holding that user's password (default {ORTHANC_PASSWORD_ENV})",
    )
    g.add_argument("--triton-url", help="Triton gRPC address HOST:PORT (one server or a load balancer)")
    g.add_argument(
        "--triton-shared-memory",
        choices=("auto", "on", "off"),
        default="auto",
        help="system shared memory with Triton: auto = only when Triton's host is this host's "
        "loopback address (default); off for a load balancer on localhost",
    )
    g.add_argument(
        "--database-url",
        help="the job store shared with the Orthancs: postgresql://user@host:port/dbname (no password)",
    )
    g.add_argument(
        "--database-password-env",
        default=DATABASE_PASSWORD_ENV,
        help=f"environment variable holding the database password (default {DATABASE_PASSWORD_ENV}; "
        "when it is unset, libpq's PGPASSWORD or ~/.pgpass apply)",
    )
    g.add_argument("--pipelines", help="the pipelines file, the same as the Orthancs use")
    g.add_argument("--workers", type=int, default=1, help="worker processes on this host (default 1)")
    g.add_argument("--lease-seconds", type=float, default=None, help="job lease (default as in OrthancAI)")
    g.add_argument("--fhir-url", default=None, help="FHIR base URL to deliver reports to (default none)")
    g.add_argument(
        "--fhir-token-env", default=None, help="environment variable holding the FHIR bearer token"
    )
    g.add_argument("--log-dir", default=None, help="with --workers > 1: one log file per worker here")


def uses_command_line(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) is not None for name in REQUIRED)


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Validated settings from the command-line form; ConfigError names the flag's key."""
    env = os.environ if environ is None else environ
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if getattr(args, n, None) is None]
    if missing:
        raise ConfigError(f"worker: {', '.join(missing)} missing (or give --settings FILE instead)")
    if args.settings is not None:
        raise ConfigError("worker: give either --settings FILE or the --orthanc-url/... flags, not both")
    if args.workers < 1 or args.workers > 64:
        raise ConfigError(f"worker: --workers must be 1 to 64, got {args.workers}")
    section: dict[str, Any] = {
        "PipelinesFile": str(Path(args.pipelines).resolve()),
        "OrthancUrl": args.orthanc_url,
        "TritonUrl": args.triton_url.split("://", 1)[-1],
        "TritonSharedMemory": {"auto": None, "on": True, "off": False}[args.triton_shared_memory],
        "Workers": args.workers,
    }
    if args.orthanc_user:
        section["OrthancUsername"] = args.orthanc_user
        if args.orthanc_password_env not in env:
            raise ConfigError(
                f"worker: --orthanc-user is set but the environment variable {args.orthanc_password_env} "
                "(--orthanc-password-env) holding its password is not"
            )
        section["OrthancPasswordEnv"] = args.orthanc_password_env
    if "://" in args.database_url:
        section["JobDatabase"] = args.database_url
        if args.database_password_env in env:
            section["JobDatabasePasswordEnv"] = args.database_password_env
    else:
        section["JobStore"] = str(Path(args.database_url).resolve())  # a SQLite file of this host
    if args.lease_seconds is not None:
        section["LeaseSeconds"] = args.lease_seconds
    if args.fhir_url:
        section["FhirBaseUrl"] = args.fhir_url
        if args.fhir_token_env:
            section["FhirTokenEnv"] = args.fhir_token_env
    if args.log_dir:
        section["LogDirectory"] = str(Path(args.log_dir).resolve())
    try:
        settings = Settings.model_validate(section)
    except ValidationError as e:
        raise ConfigError(explain_validation(e, "worker command line")) from None
    load_pipelines(settings.pipelines_file)  # fail now, with the file's own message
    return settings


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def settings_from_file(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from an Orthanc configuration file with its ``OrthancAI`` section: the very file
    the Orthancs use, so a worker host gets every setting their workers get (TLS to Triton and
    the EHR, niceness, forwarding, ...). ``${NAME}`` in strings is replaced by the environment
    variable, as Orthanc does (an unset one by the empty string)."""
    env = os.environ if environ is None else environ
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e}") from None

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return _ENV_REFERENCE.sub(lambda m: env.get(m.group(1), ""), value)
        if isinstance(value, list):
            return [expand(v) for v in value]
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        return value

    settings = load_settings(expand(config), path)
    load_pipelines(settings.pipelines_file)  # fail now, with the file's own message
    return settings


def run(args: argparse.Namespace, from_file: bool = False) -> int:
    """Run the workers of this host until SIGTERM/SIGINT: configured by the flags, or with
    ``from_file`` by the Orthanc configuration file given as ``--settings``."""
    try:
        settings = settings_from_file(args.settings) if from_file else settings_from_args(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    # The worker processes read their settings from a file, as Orthanc's own do. It holds no
    # secret (only the names of the variables that hold them).
    fd, name = tempfile.mkstemp(prefix="orthanc-ai-worker-", suffix=".json")
    settings_file = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(settings_to_json(settings))
        log.info(
            "worker host: %d worker(s), Orthanc %s, Triton %s, job store %s",
            settings.workers, settings.orthanc_url, settings.triton_url, settings.database(),
        )  # fmt: skip
        if settings.workers == 1:
            from orthanc_plugin.worker.loop import main as worker_main

            return worker_main(str(settings_file), args.owner, args.parent_pid)
        return _supervise(settings, settings_file)
    finally:
        settings_file.unlink(missing_ok=True)


def _supervise(settings: Settings, settings_file: Path) -> int:
    """Several worker processes, restarted when they die (their jobs requeued at once)."""
    from orthanc_plugin.worker.supervisor import Supervisor

    log_dir = settings.log_dir or Path.cwd() / "orthanc-ai-logs"
    supervisor = Supervisor(
        Path(sys.executable), settings_file, settings.workers, settings.database(), log_dir
    )
    stop = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    supervisor.start()
    log.info("worker logs in %s", log_dir)
    try:
        supervisor.run(stop)
    finally:
        supervisor.stop()
    return 0
