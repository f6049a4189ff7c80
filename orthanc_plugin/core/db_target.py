"""Where jobs and the outbox live, as configuration names it: a SQLite file or a PostgreSQL URL.

These are values of the settings (``JobStore``, ``JobDatabase``); opening and using the database
is :mod:`orthanc_plugin.jobs.database`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_SCHEMES = ("postgresql", "postgres")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DatabaseError(RuntimeError):
    """The database cannot be opened as configured; the message says what to fix."""


def check_postgres_url(url: str) -> str:
    """Validate ``postgresql://user@host[:port]/dbname[?options]``; returns it unchanged.

    A password in the URL is refused: it would end up in logs and in the settings file that
    the plugin writes for its workers. It comes from an environment variable instead.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid PostgreSQL URL: {e}") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"must start with postgresql://, got {url.split('://')[0]!r}://")
    if parts.password is not None:
        raise ValueError(
            "must not contain a password; name the environment variable that holds it in JobDatabasePasswordEnv"
        )
    if not parts.hostname:
        raise ValueError("needs a host: postgresql://user@host:port/dbname")
    if not parts.path.strip("/"):
        raise ValueError("needs a database name: postgresql://user@host:port/dbname")
    if port == 0:
        raise ValueError("port 0 is not a valid port")
    return url


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL database: URL without password, and the variable that holds the password.

    Without ``password_env`` libpq's own sources apply (``PGPASSWORD``, ``~/.pgpass``, trust).
    """

    url: str
    password_env: str | None = None

    def __post_init__(self) -> None:
        check_postgres_url(self.url)
        if self.password_env is not None and not _ENV_NAME.match(self.password_env):
            raise ValueError(f"not an environment variable name: {self.password_env!r}")

    def __str__(self) -> str:
        return self.url

    def password(self) -> str | None:
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value == "":
            return None  # set but empty (an unset ${VAR} passed on): libpq's own sources apply
        if value is None:
            raise DatabaseError(
                f"the environment variable {self.password_env} (JobDatabasePasswordEnv) is not set: "
                f"it must hold the password for {self.url}"
            )
        return value


#: Where the job store lives: a SQLite file or a PostgreSQL database.
DatabaseTarget = Path | PostgresTarget


def parse_target(value: str | Path, password_env: str | None = None) -> DatabaseTarget:
    """``postgresql://...`` (or ``postgres://``) is PostgreSQL; anything else a SQLite file path."""
    text = str(value)
    if text.split("://", 1)[0] in _SCHEMES and "://" in text:
        return PostgresTarget(text, password_env)
    return Path(value)
