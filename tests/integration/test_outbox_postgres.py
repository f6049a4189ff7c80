"""The FHIR outbox's contract tests (tests/unit/test_outbox.py) on a real PostgreSQL server.

About 4 s: one server for the module, a fresh database per test.
"""

from __future__ import annotations

import pytest

from orthanc_plugin.jobs.database import PostgresTarget
from tests.unit.test_outbox import *  # noqa: F403 - the same tests, on another database

from .pg_fixtures import pg_target, postgres  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration
# Hands a raw sqlite3 connection to enqueue_in: SQLite's own API, nothing to run on PostgreSQL
# (test_enqueue_in_joins_the_callers_database_transaction is its counterpart here).
del test_enqueue_in_joins_the_callers_transaction  # noqa: F405, F821


@pytest.fixture
def db_target(pg_target: PostgresTarget) -> PostgresTarget:  # noqa: F811 - replaces the SQLite file
    return pg_target


def test_claims_from_two_connections_never_share_a_row(db_target: PostgresTarget) -> None:
    """SKIP LOCKED: a claim in progress (its transaction open) is passed over, not waited on."""
    first, second = Outbox(db_target), Outbox(db_target)  # noqa: F405
    first.enqueue("job1", bundle("1"), URL)  # noqa: F405
    first.enqueue("job2", bundle("2"), URL)  # noqa: F405
    with first._db.transaction() as db:
        locked = db.execute("SELECT id FROM fhir_outbox ORDER BY id LIMIT 1 FOR UPDATE").fetchone()
        assert locked is not None
        d = second.claim("w2", 30)
        assert d is not None and d.job_id == "job2"
    d1 = second.claim("w2", 30)
    assert d1 is not None and d1.job_id == "job1"
    first.close()
    second.close()
