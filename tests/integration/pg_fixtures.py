"""A real PostgreSQL (Debian binaries) for integration tests; import the fixtures you use.

The server runs as user ``postgres`` when the tests run as root (initdb refuses root), in its
own temporary folder, on a free port of 127.0.0.1; each test gets a fresh database.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from devstack.postgres_server import PostgresServer
from devstack.stack import free_port
from orthanc_plugin.jobs.database import PostgresTarget

PASSWORD_ENV = "ORTHANC_AI_TEST_PG_PASSWORD"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def pg_target(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> PostgresTarget:
    """A fresh, empty database; its password is in the environment variable ``PASSWORD_ENV``."""
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    name = f"t{next(_names)}"
    postgres.create_database(name)
    return postgres.target(name, PASSWORD_ENV)
