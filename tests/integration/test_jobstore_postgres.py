"""The job store's contract tests (tests/unit/test_jobstore.py) on a real PostgreSQL server.

About 5 s: one server for the module (initdb + start, about 1 s), a fresh database per test.
"""

from __future__ import annotations

import pytest

from orthanc_plugin.jobs.database import PostgresTarget
from tests.unit.test_jobstore import *  # noqa: F403 - the same tests, on another database

from .pg_fixtures import pg_target, postgres  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration


@pytest.fixture
def db_target(pg_target: PostgresTarget) -> PostgresTarget:  # noqa: F811 - replaces the SQLite file
    return pg_target


def test_the_store_really_is_postgresql(store) -> None:  # noqa: F405
    assert store._db.dialect == "postgresql"
    row = store._db.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_name='jobs' AND column_name='created'"
    ).fetchone()
    # REAL would be 4 bytes in PostgreSQL: a Unix time would lose its seconds.
    assert row == {"data_type": "double precision"}
