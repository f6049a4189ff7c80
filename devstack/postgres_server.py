"""A throw-away PostgreSQL server from the Debian binaries, for tests and local scale-out trials.

``initdb`` refuses to run as root: as root the server runs as the ``postgres`` user (created by
Debian's ``postgresql`` package) in a folder it owns; as anyone else, as that user. It listens
on 127.0.0.1 only, on the given port, with password authentication for TCP clients.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devstack.common import log_tail
from orthanc_plugin.jobs.database import PostgresTarget

SUPERUSER = "orthanc_ai"


class PostgresServerError(RuntimeError):
    """The server could not be set up or started; the message carries its log."""


def postgres_bin_dir() -> Path:
    """``ORTHANC_AI_PG_BIN`` or the newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb``."""
    env = os.environ.get("ORTHANC_AI_PG_BIN")
    if env:
        return Path(env)
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresServerError(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: apt-get install postgresql"
        )
    return found[-1]


@dataclass
class PostgresServer:
    """``start()`` makes a fresh cluster in a new temporary folder; ``stop()`` removes it."""

    port: int
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    bin_dir: Path | None = None
    root: Path | None = field(default=None, init=False)
    _run_as: str | None = field(default=None, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "start() the server first"
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "start() the server first"
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """URL without the password (it is in :attr:`password`)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def target(self, database: str, password_env: str) -> PostgresTarget:
        """A job-store target; set ``os.environ[password_env] = self.password`` for it to connect."""
        return PostgresTarget(self.url(database), password_env)

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self._run_as, "--", *args] if self._run_as else list(args)

    def _run(self, *args: str, timeout: float = 60) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise PostgresServerError(f"{' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    def start(self, timeout: float = 60) -> PostgresServer:
        bindir = self.bin_dir or postgres_bin_dir()
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="orthanc-ai-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresServerError(
                    "running as root needs the 'postgres' user (Debian package postgresql)"
                ) from None
            self._run_as = "postgres"
            os.chown(self.root, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            user = pwd.getpwnam(self._run_as)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        pwfile.chmod(0o600)
        try:
            self._run(
                str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale",
                "--no-sync", timeout=timeout,
            )  # fmt: skip
        finally:
            pwfile.unlink()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
            " -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        try:
            self._run(
                str(bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                "-t", str(int(timeout)), "-o", options, "start", timeout=timeout + 10,
            )  # fmt: skip
        except PostgresServerError as e:
            raise PostgresServerError(f"{e}\n{log_tail(self.log_file)}") from None
        return self

    def create_database(self, name: str) -> str:
        """Create ``name`` (letters, digits, underscore); returns its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be letters, digits and underscores: {name!r}")
        import psycopg

        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            bindir = self.bin_dir or postgres_bin_dir()
            with contextlib.suppress(PostgresServerError, subprocess.TimeoutExpired):
                self._run(
                    str(bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop", timeout=60
                )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
