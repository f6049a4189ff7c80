"""Delivery outboxes: one row per (job, destination) in the job store's database.

Two tables of the same shape: ``fhir_outbox`` (FHIR transaction Bundles for the EHR) and
``hl7_outbox`` (HL7 v2 ORU^R01 messages for RIS destinations, see :mod:`orthanc_plugin.hl7`).
A row of ``hl7_outbox`` can also end ``failed``: a receiver that answers AE or AR has refused that
message for good, and sending it unchanged again would only be refused again.

A finished job's transaction Bundle is put here (ideally in the same transaction that marks
the job succeeded, see :func:`enqueue_in`); the delivery loops of the worker processes claim
rows with a lease, POST them and record the outcome. Every transition is one short
transaction, so a process killed at any moment leaves the row either pending or leased; an
expired lease makes it claimable again. On PostgreSQL a claim passes over rows that another
process is claiming (``FOR UPDATE SKIP LOCKED``): delivery loops on several hosts never send
the same row at once.

The outbox never gives up on a row by itself: an EHR that is down for an hour gets everything
once it is back. What it does with a failure is choose when to try again (exponential
backoff, capped) and keep the last error in words an admin can act on. Re-delivering is
harmless because every entry of our bundles is a conditional create or a conditional update on
its identifier. A job's rows (its report, then one per review, see
:func:`orthanc_plugin.jobs.reviews.outbox_key`) go out in the order they were queued: a
review's update never overtakes the report it updates, nor an earlier review.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

from orthanc_plugin.core.uids import JOB_ID_LENGTH
from orthanc_plugin.jobs.database import Database, DatabaseTarget, Row, open_with_schema

#: Stored states. ``failing`` is never stored: it is a pending row whose last attempt failed.
#: ``failed`` only in ``hl7_outbox``: the receiver refused the message (AE/AR).
STATES = ("pending", "delivering", "delivered", "failed")
REPORTED_STATES = ("pending", "delivering", "delivered", "failing", "failed")
#: The outbox tables and what their rows carry.
FHIR = "fhir_outbox"
HL7 = "hl7_outbox"
TABLES = (FHIR, HL7)
#: Why an attempt failed: ``retry`` a transient fault (network, 5xx, 429), ``auth`` the EHR
#: refused our credentials, ``rejected`` the EHR refused the content (other 4xx, odd answers).
FailureKind = Literal["retry", "auth", "rejected"]
FAILURE_KINDS: tuple[str, ...] = ("retry", "auth", "rejected")


# Separate statements, not one script: ``executescript`` would commit an open transaction,
# and :func:`enqueue_in` runs inside the job store's.
def _schema(table: str, states: str) -> tuple[str, str]:
    return (
        f"""CREATE TABLE IF NOT EXISTS {table} (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        bundle TEXT NOT NULL,
        revision INTEGER NOT NULL DEFAULT 1,
        state TEXT NOT NULL CHECK (state IN ({states})),
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_expires REAL,
        last_error TEXT,
        last_kind TEXT,
        last_http_status INTEGER,
        last_attempt REAL,
        delivered_at REAL,
        response TEXT,
        queued REAL NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (job_id, destination)
    )""",
        f"CREATE INDEX IF NOT EXISTS {table}_due ON {table}(state, not_before)",
    )


SCHEMA = _schema(FHIR, "'pending','delivering','delivered'")
HL7_SCHEMA = _schema(HL7, "'pending','delivering','delivered','failed'")
ALL_SCHEMA = (*SCHEMA, *HL7_SCHEMA)


def ensure_schema(db: Database | sqlite3.Connection) -> None:
    """Create the outbox table if needed (SQLite); safe inside an open transaction.

    On PostgreSQL the table is made once, when the store is opened (:class:`Outbox`,
    :class:`~orthanc_plugin.jobs.store.JobStore`): DDL there takes locks that a hot path must not.
    """
    if isinstance(db, Database):
        if db.dialect != "sqlite":
            return
        for statement in ALL_SCHEMA:
            db.execute(statement)
        return
    for statement in ALL_SCHEMA:
        db.execute(statement)


def enqueue_in(
    db: Database | sqlite3.Connection,
    job_id: str,
    bundle: dict[str, Any],
    destination: str,
    now: float | None = None,
    table: str = FHIR,
) -> None:
    """Put ``bundle`` in the outbox using ``db``, inside the caller's open transaction.

    ``table`` :data:`FHIR`: ``bundle`` is a FHIR Bundle; :data:`HL7`: ``{"message": <ER7 text>}``.

    Idempotent per (job, destination): a job that is run again replaces its bundle and makes
    the row pending again, with fresh attempts; an in-flight delivery of the old bundle can no
    longer complete the row (the revision changed).
    """
    if not job_id:
        raise ValueError("job_id must not be empty")
    if not destination:
        raise ValueError("destination must not be empty")
    if table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}, got {table!r}")
    if table == FHIR and (not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle"):
        raise ValueError("bundle must be a FHIR Bundle as a dict")
    if table == HL7 and (
        not isinstance(bundle, dict) or not str(bundle.get("message", "")).startswith("MSH|")
    ):
        raise ValueError("an HL7 outbox entry must be {'message': <an ER7 message starting with MSH|>}")
    now = time.time() if now is None else now
    ensure_schema(db)
    db.execute(
        f"INSERT INTO {table}(job_id, destination, bundle, state, queued, created, updated)"
        " VALUES (?,?,?,'pending',?,?,?)"
        f" ON CONFLICT(job_id, destination) DO UPDATE SET bundle=excluded.bundle, revision={table}.revision+1,"
        " state='pending', attempts=0, not_before=0, lease_owner=NULL, lease_expires=NULL, last_error=NULL,"
        " last_kind=NULL, last_http_status=NULL, delivered_at=NULL, response=NULL, queued=excluded.queued,"
        " updated=excluded.updated",
        (job_id, destination, json.dumps(bundle), now, now, now),
    )


@dataclass(frozen=True)
class Delivery:
    """A claimed outbox row: what to send where, and which lease and revision we hold."""

    id: int
    job_id: str
    destination: str
    bundle: dict[str, Any]
    revision: int
    attempts: int
    owner: str


class Outbox:
    """The outbox table; one connection per instance (create one per thread or process).

    ``first_backoff_s`` is the wait after the first failed attempt; it doubles with every
    further failure up to ``max_backoff_s``. Refusals (auth, rejected content) wait
    ``max_backoff_s`` at once: they need a person, and retrying fast would only flood the EHR.
    """

    def __init__(
        self,
        path: DatabaseTarget,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        busy_timeout_s: float = 30.0,
        table: str = FHIR,
    ) -> None:
        if table not in TABLES:
            raise ValueError(f"table must be one of {', '.join(TABLES)}, got {table!r}")
        self.table = table
        if first_backoff_s <= 0 or max_backoff_s <= 0:
            raise ValueError("backoff times must be positive")
        self.path = path
        self.first_backoff_s = min(first_backoff_s, max_backoff_s)
        self.max_backoff_s = max_backoff_s
        self._db = open_with_schema(path, ALL_SCHEMA, busy_timeout_s)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[Database]:
        return self._db.transaction()

    # ------------------------------------------------------------------ producer side

    def enqueue(self, job_id: str, bundle: dict[str, Any], destination: str) -> None:
        """Queue ``bundle`` of ``job_id`` for ``destination`` (replaces a previous one)."""
        with self._tx() as db:
            enqueue_in(db, job_id, bundle, destination, table=self.table)

    # ------------------------------------------------------------------ delivery side

    def claim(self, owner: str, lease_s: float, destination: str | None = None) -> Delivery | None:
        """Lease the most overdue row to ``owner``: pending and due, or delivering with an expired lease.

        With ``destination``, only rows for that base URL: a loop never sends a bundle (and
        its token) to a URL other than the one it is configured for.
        """
        now = time.time()
        # In order per job: a row waits while an earlier row of the same job (the job's own
        # report, then its review updates, keyed "<job id>~r<n>") is not delivered.
        sql = (
            f"SELECT id FROM {self.table} WHERE ((state='pending' AND not_before<=?)"
            " OR (state='delivering' AND lease_expires<?))"
            f" AND NOT EXISTS (SELECT 1 FROM {self.table} e WHERE e.destination={self.table}.destination"
            f" AND e.state!='delivered' AND e.id<{self.table}.id"
            f" AND substr(e.job_id, 1, {JOB_ID_LENGTH})=substr({self.table}.job_id, 1, {JOB_ID_LENGTH}))"
        )
        args: list[Any] = [now, now]
        if destination is not None:
            sql += " AND destination=?"
            args.append(destination)
        sql += " ORDER BY not_before, id LIMIT 1"
        # Idle loops poll often: look without the write lock first, take it only when there is work.
        if self._db.execute(sql, args).fetchone() is None:
            return None
        with self._tx() as db:
            row = db.execute(sql + db.skip_locked, args).fetchone()
            if row is None:
                return None
            db.execute(
                f"UPDATE {self.table} SET state='delivering', attempts=attempts+1, lease_owner=?, lease_expires=?,"
                " last_attempt=?, updated=? WHERE id=?",
                (owner, now + lease_s, now, now, row["id"]),
            )
            r = db.execute(f"SELECT * FROM {self.table} WHERE id=?", (row["id"],)).fetchone()
        assert r is not None
        return Delivery(
            id=r["id"],
            job_id=r["job_id"],
            destination=r["destination"],
            bundle=json.loads(r["bundle"]),
            revision=r["revision"],
            attempts=r["attempts"],
            owner=owner,
        )

    def delivered(self, d: Delivery, response_summary: dict[str, Any]) -> bool:
        """Mark ``d`` delivered; False when the lease or the revision is no longer ours.

        A success also makes the rows that wait on a transient fault of the same destination
        due now: the EHR is back, so the backlog need not wait out its backoff.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {self.table} SET state='delivered', delivered_at=?, response=?, last_error=NULL,"
                " last_kind=NULL, last_http_status=?, lease_owner=NULL, lease_expires=NULL, updated=?"
                " WHERE id=? AND state='delivering' AND lease_owner=? AND revision=?",
                (
                    now,
                    json.dumps(response_summary),
                    response_summary.get("http_status"),
                    now,
                    d.id,
                    d.owner,
                    d.revision,
                ),
            )
            if cur.rowcount == 1:
                db.execute(
                    f"UPDATE {self.table} SET not_before=? WHERE destination=? AND state='pending'"
                    " AND not_before>? AND (last_kind IS NULL OR last_kind!='rejected')",
                    (now, d.destination, now),
                )
            return cur.rowcount == 1

    def failed_attempt(
        self,
        d: Delivery,
        error: str,
        kind: FailureKind = "retry",
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> float | None:
        """Record a failed attempt and when to try again; returns that delay in seconds.

        None when the row is no longer ours (its lease expired and was taken, or the job
        queued a new bundle meanwhile): the outcome of a stale attempt is not recorded.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAILURE_KINDS)}, got {kind!r}")
        if kind == "retry":
            delay = self.first_backoff_s * 2 ** max(0, min(d.attempts - 1, 30))
        else:
            delay = self.max_backoff_s
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        delay = min(delay, self.max_backoff_s)
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {self.table} SET state='pending', not_before=?, last_error=?, last_kind=?,"
                " last_http_status=?, lease_owner=NULL, lease_expires=NULL, updated=?"
                " WHERE id=? AND state='delivering' AND lease_owner=? AND revision=?",
                (now + delay, error, kind, http_status, now, d.id, d.owner, d.revision),
            )
            return delay if cur.rowcount == 1 else None

    def refused(self, d: Delivery, error: str) -> bool:
        """Record that the receiver refused ``d`` for good (HL7 AE/AR): the row ends ``failed``,
        with the receiver's text in ``last_error``. False when the row is no longer ours."""
        if self.table != HL7:
            raise ValueError(f"{self.table} rows are never given up: use failed_attempt")
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {self.table} SET state='failed', last_error=?, last_kind='rejected', lease_owner=NULL,"
                " lease_expires=NULL, updated=? WHERE id=? AND state='delivering' AND lease_owner=? AND revision=?",
                (error, now, d.id, d.owner, d.revision),
            )
            return cur.rowcount == 1

    def release(self, d: Delivery) -> None:
        """Give an unattempted claim back at once (the loop is stopping)."""
        with self._tx() as db:
            db.execute(
                f"UPDATE {self.table} SET state='pending',"
                " attempts=CASE WHEN attempts>0 THEN attempts-1 ELSE 0 END, lease_owner=NULL,"
                " lease_expires=NULL, updated=? WHERE id=? AND state='delivering' AND lease_owner=? AND revision=?",
                (time.time(), d.id, d.owner, d.revision),
            )

    def release_owner(self, owner: str) -> int:
        """Make the rows leased to ``owner`` (a process known to be dead) claimable at once."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {self.table} SET state='pending', not_before=?, lease_owner=NULL, lease_expires=NULL,"
                " updated=? WHERE state='delivering' AND lease_owner=?",
                (now, now, owner),
            )
            return cur.rowcount

    # ------------------------------------------------------------------ reads

    def status_for_job(self, job_id: str) -> dict[str, Any] | None:
        """Delivery status of a job's report (its latest destination); None if never queued."""
        row = self._db.execute(
            f"SELECT * FROM {self.table} WHERE job_id=? ORDER BY updated DESC, id DESC LIMIT 1", (job_id,)
        ).fetchone()
        return None if row is None else _status(row)

    def statuses_for_job(self, job_id: str) -> list[dict[str, Any]]:
        """Delivery status of every destination of a job, by destination."""
        rows = self._db.execute(
            f"SELECT * FROM {self.table} WHERE job_id=? ORDER BY destination", (job_id,)
        ).fetchall()
        return [_status(r) for r in rows]

    def list(
        self, state: str | None = None, destination: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Rows as status dicts, most recently changed first; ``state`` may be ``failing``."""
        sql, args = f"SELECT * FROM {self.table} WHERE 1=1", []
        if state is not None:
            if state not in REPORTED_STATES:
                raise ValueError(f"unknown delivery state {state!r}; one of {', '.join(REPORTED_STATES)}")
            if state == "failing":
                sql += " AND state='pending' AND last_error IS NOT NULL"
            elif state == "pending":
                sql += " AND state='pending' AND last_error IS NULL"
            else:
                sql += " AND state=?"
                args.append(state)
        if destination is not None:
            sql += " AND destination=?"
            args.append(destination)
        sql += " ORDER BY updated DESC, id DESC LIMIT ?"
        return [_status(r) for r in self._db.execute(sql, (*args, limit)).fetchall()]

    def backlog(self, destination: str | None = None) -> int:
        """How many bundles are not delivered yet."""
        sql, args = f"SELECT COUNT(*) AS n FROM {self.table} WHERE state NOT IN ('delivered','failed')", []
        if destination is not None:
            sql += " AND destination=?"
            args.append(destination)
        row = self._db.execute(sql, args).fetchone()
        return int(row["n"]) if row is not None else 0

    def oldest_undelivered(self) -> float | None:
        """When the oldest bundle still waiting was queued (for health: how far behind we are)."""
        row = self._db.execute(
            f"SELECT MIN(queued) AS oldest FROM {self.table} WHERE state NOT IN ('delivered','failed')"
        ).fetchone()
        return None if row is None or row["oldest"] is None else float(row["oldest"])


def _status(r: Row) -> dict[str, Any]:
    state = r["state"]
    if state == "pending" and r["last_error"] is not None:
        state = "failing"
    return {
        "job_id": r["job_id"],
        "destination": r["destination"],
        "state": state,
        "attempts": r["attempts"],
        "queued": r["queued"],
        "last_error": r["last_error"],
        "last_error_kind": r["last_kind"],
        "last_http_status": r["last_http_status"],
        "last_attempt": r["last_attempt"],
        "next_attempt": r["not_before"] if r["state"] == "pending" else None,
        "delivered_at": r["delivered_at"],
        "response": json.loads(r["response"]) if r["response"] else None,
    }


def deliver_until(
    stop: threading.Event,
    run_once: Callable[[], bool],
    poll_s: float,
    log: logging.Logger,
    what: str,
    wake: threading.Event | None = None,
) -> None:
    """The loop every delivery channel runs (FHIR, HL7): ``run_once`` until ``stop`` is set, waiting
    ``poll_s`` when it found nothing to send, or less when ``wake`` is set (the worker beside it
    has just queued a delivery); an error (e.g. the database locked past its timeout) is logged
    and the loop goes on."""
    while not stop.is_set():
        try:
            busy = run_once()
        except Exception:  # noqa: BLE001 - one failed pass must not end the deliveries
            log.exception("%s loop error; retrying", what)
            busy = False
        if busy:
            continue
        if wake is None:
            stop.wait(poll_s)
        else:
            wake.wait(poll_s)
            wake.clear()
