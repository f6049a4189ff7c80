"""One small database API over SQLite (one host) and PostgreSQL (scale-out over several hosts).

The job store and the FHIR outbox write their SQL once, in SQLite's dialect with ``?``
placeholders; this module runs it on either engine:

- SQLite: one file, WAL, ``BEGIN IMMEDIATE`` transactions (the write lock up front, so two
  processes of one host never claim the same row). See :mod:`orthanc_plugin.jobs.sqlite_db`.
- PostgreSQL (psycopg 3): placeholders become ``%s``; schema types are widened where SQLite's
  names mean something smaller in PostgreSQL (``REAL`` is 4 bytes there: a Unix time would lose
  its seconds). Claims add ``FOR UPDATE SKIP LOCKED`` (:attr:`Database.skip_locked`), so workers
  on several hosts each take a different row without waiting on each other.

Rows come back as plain ``dict``s on both engines.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from orthanc_plugin.core.db_target import (
    DatabaseError,
    DatabaseTarget,
    PostgresTarget,
    check_postgres_url,
    parse_target,
)
from orthanc_plugin.jobs.sqlite_db import connect as sqlite_connect

__all__ = [
    "Database",
    "DatabaseError",
    "DatabaseTarget",
    "PostgresTarget",
    "Row",
    "check_postgres_url",
    "open_with_schema",
    "parse_target",
    "split_script",
    "to_pyformat",
]

Row = dict[str, Any]
Dialect = Literal["sqlite", "postgresql"]
# Any fixed number: serialises schema creation of processes that start at the same moment
# (concurrent CREATE TABLE IF NOT EXISTS can fail in PostgreSQL).
_SCHEMA_LOCK_KEY = 0x6F7274_6169


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders -> ``%s`` (and a literal ``%`` -> ``%%``), leaving quoted text alone."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


_DDL_POSTGRES = (
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", re.IGNORECASE), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
)


def to_postgres_ddl(statement: str) -> str:
    """SQLite schema -> PostgreSQL: auto-increment keys and 8-byte floats."""
    for pattern, replacement in _DDL_POSTGRES:
        statement = pattern.sub(replacement, statement)
    return statement


class Result:
    """The rows of one statement (already fetched or fetchable), as dicts, and its row count."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.rowcount: int = int(cursor.rowcount)

    def _names(self) -> list[str]:
        return [d[0] for d in self._cursor.description or ()]

    def fetchone(self) -> Row | None:
        row = self._cursor.fetchone()
        if row is None:
            return None
        return row if isinstance(row, dict) else dict(zip(self._names(), row, strict=True))

    def fetchall(self) -> list[Row]:
        rows = self._cursor.fetchall()
        if rows and isinstance(rows[0], dict):
            return list(rows)
        names = self._names()
        return [dict(zip(names, r, strict=True)) for r in rows]


class Database:
    """A connection to the job store's database; one per thread (or guard it with a lock).

    ``execute`` outside :meth:`transaction` runs in autocommit mode on both engines.
    """

    def __init__(self, target: DatabaseTarget | sqlite3.Connection, busy_timeout_s: float = 30.0) -> None:
        self.busy_timeout_s = busy_timeout_s
        self._pg: Any = None
        self._sqlite: sqlite3.Connection | None = None
        self._owned = True
        self._local = threading.local()
        self.target: DatabaseTarget | None
        if isinstance(target, sqlite3.Connection):
            # Somebody else's connection (and maybe their open transaction): use, never close.
            self._sqlite, self._owned, self.target = target, False, None
            self.dialect: Dialect = "sqlite"
        elif isinstance(target, PostgresTarget):
            self.target, self.dialect = target, "postgresql"
            self._pg = self._connect_pg()
        else:
            self.target, self.dialect = Path(target), "sqlite"
            self._sqlite = sqlite_connect(self.target, busy_timeout_s)

    # ------------------------------------------------------------------ dialect bits

    @property
    def lock_rows(self) -> str:
        """Suffix of a SELECT whose rows the transaction will change: ``FOR UPDATE`` on PostgreSQL.

        SQLite needs none: ``BEGIN IMMEDIATE`` already holds the database's write lock.
        """
        return " FOR UPDATE" if self.dialect == "postgresql" else ""

    @property
    def skip_locked(self) -> str:
        """Suffix of a claim's SELECT: rows another worker is claiming are passed over, not waited on."""
        return " FOR UPDATE SKIP LOCKED" if self.dialect == "postgresql" else ""

    # ------------------------------------------------------------------ connection

    def _connect_pg(self) -> Any:
        assert isinstance(self.target, PostgresTarget)
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise DatabaseError(
                "JobDatabase is a PostgreSQL URL but psycopg is not installed: pip install 'psycopg[binary]'"
            ) from None
        extra: dict[str, Any] = {}
        password = self.target.password()
        if password is not None:
            extra["password"] = password
        try:
            return psycopg.connect(
                self.target.url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, int(min(self.busy_timeout_s, 30))),
                application_name="orthanc-ai",
                # A claim must never wait long on a row lock: FOR UPDATE waits at most this long.
                options=f"-c lock_timeout={int(self.busy_timeout_s * 1000)}",
                **extra,
            )
        except psycopg.OperationalError as e:
            raise DatabaseError(f"cannot connect to {self.target.url}: {str(e).strip()}") from None

    def _pg_connection(self) -> Any:
        # A server restart breaks the connection: the statement that saw it failed, the next
        # one gets a fresh connection instead of failing forever.
        if self._pg is None or self._pg.closed or self._pg.broken:
            self._pg = self._connect_pg()
        return self._pg

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._sqlite is not None and self._owned:
            self._sqlite.close()

    # ------------------------------------------------------------------ statements

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Run one statement written with ``?`` placeholders."""
        if self._sqlite is not None:
            return Result(self._sqlite.execute(sql, tuple(params)))
        conn = self._pg if self._in_tx() else self._pg_connection()
        return Result(conn.execute(to_pyformat(sql), tuple(params)))

    def _in_tx(self) -> bool:
        return bool(getattr(self._local, "depth", 0))

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._sqlite.execute("ROLLBACK")
                raise
            self._sqlite.execute("COMMIT")
            return
        conn = self._pg_connection()
        with conn.transaction():
            self._local.depth = getattr(self._local, "depth", 0) + 1
            try:
                yield self
            finally:
                self._local.depth -= 1

    def create_schema(self, statements: Iterable[str]) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements (SQLite dialect) in one transaction."""
        with self.transaction():
            if self.dialect == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))
            for statement in statements:
                self.execute(to_postgres_ddl(statement) if self.dialect == "postgresql" else statement)


def open_with_schema(
    target: DatabaseTarget | sqlite3.Connection, statements: Iterable[str], busy_timeout_s: float = 30.0
) -> Database:
    """Open ``target`` and make sure ``statements`` (``CREATE ... IF NOT EXISTS``) ran; closed again
    if that fails, so a store that cannot start leaves no connection behind."""
    db = Database(target, busy_timeout_s)
    try:
        db.create_schema(statements)
    except BaseException:
        db.close()
        raise
    return db


def split_script(script: str) -> list[str]:
    """A schema script (no ``;`` inside statements) as separate statements."""
    return [s.strip() for s in script.split(";") if s.strip()]
