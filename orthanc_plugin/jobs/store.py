"""Durable job store: states, attempts, leases with heartbeat, per-job audit events.

Shared by the plugin (enqueue, read, retry) and the worker processes (claim, heartbeat, finish).
Every transition is one short transaction, so a process killed at any moment leaves a
consistent store; a running job whose lease expires goes back to the queue.

It lives in a SQLite file (one host) or a PostgreSQL database (Orthancs and workers on several
hosts), see :mod:`orthanc_plugin.jobs.database`. Rows another transaction will change are locked
(``FOR UPDATE``) on PostgreSQL, and claims pass over rows being claimed (``SKIP LOCKED``), so
no two workers ever take the same job; on SQLite the write lock of ``BEGIN IMMEDIATE`` does it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from orthanc_plugin.core.errors import BadRequest, NotFound
from orthanc_plugin.core.handoff import JobInput, JobOutputs
from orthanc_plugin.core.uids import job_id
from orthanc_plugin.jobs.database import Database, DatabaseTarget, Row, open_with_schema, split_script
from orthanc_plugin.jobs.outbox import ALL_SCHEMA as OUTBOX_SCHEMA
from orthanc_plugin.jobs.outbox import HL7, enqueue_in


class JobNotFound(NotFound):
    """No job with that id."""

    def __str__(self) -> str:
        return f"job {self.args[0]}"


STATES = ("queued", "running", "succeeded", "failed", "cancelled")
#: Review states of a succeeded job (see :mod:`orthanc_plugin.jobs.reviews`): ``pending`` until
#: someone reviews it, then the decision of its latest review.
REVIEW_STATES = ("pending", "accepted", "edited", "rejected")
#: SQL for a job row's review state, for filters.
REVIEW_STATE_SQL = (
    "(CASE (SELECT decision FROM reviews r WHERE r.job_id=jobs.id ORDER BY n DESC LIMIT 1)"
    " WHEN 'accept' THEN 'accepted' WHEN 'edit' THEN 'edited' WHEN 'reject' THEN 'rejected'"
    " ELSE 'pending' END)"
)
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    orthanc_study_id TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    not_before REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    stage TEXT,
    error TEXT,
    input TEXT NOT NULL,
    timings TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '{}',
    fhir TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, created);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, seq);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('accept','edit','reject')),
    reason TEXT,
    reviewer TEXT NOT NULL,
    via TEXT NOT NULL,
    seg_uid TEXT,
    seg_id TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued','applying','applied','failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    applied REAL,
    UNIQUE (job_id, n)
);
CREATE INDEX IF NOT EXISTS reviews_state ON reviews(state, id);
CREATE TABLE IF NOT EXISTS supersessions (
    old_id TEXT PRIMARY KEY,
    new_id TEXT NOT NULL,
    ts REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class Job:
    id: str
    key: str
    study_uid: str
    orthanc_study_id: str
    pipeline: str
    pipeline_version: str
    fingerprint: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    not_before: float
    lease_owner: str | None
    lease_expires: float | None
    stage: str | None
    error: str | None
    input: JobInput
    timings: dict[str, float]
    outputs: JobOutputs | None  # None until the job succeeds
    fhir: dict[str, Any] | None
    created: float
    updated: float
    started: float | None
    finished: float | None

    @property
    def output_key(self) -> str:
        """The key the outputs' identifiers derive from: the same along a chain of supersessions."""
        return self.input.output_key or self.key

    @classmethod
    def from_row(cls, row: Row) -> Job:
        d = dict(row)
        d["input"] = JobInput.from_json(json.loads(d["input"]))
        d["timings"] = json.loads(d["timings"])
        outputs = json.loads(d["outputs"])
        d["outputs"] = JobOutputs.from_json(outputs) if outputs else None
        d["fhir"] = json.loads(d["fhir"]) if d["fhir"] else None
        return cls(**d)


class JobStore:
    """The job store; one connection per instance (create one per thread or process).

    ``path`` is where it lives: a SQLite file path or a :class:`~orthanc_plugin.jobs.database.PostgresTarget`
    (pass it on to open another connection to the same store).
    """

    def __init__(self, path: DatabaseTarget, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        # The outbox's table too: a job's success may queue its report.
        self._db = open_with_schema(path, [*split_script(_SCHEMA), *OUTBOX_SCHEMA], busy_timeout_s)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[Database]:
        return self._db.transaction()

    def _event(self, db: Database, jid: str, kind: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO job_events(job_id, ts, kind, detail) VALUES (?,?,?,?)",
            (jid, time.time(), kind, detail),
        )

    def add_event(self, jid: str, kind: str, detail: str = "") -> None:
        """Append an event to a job's history (forwarding attempts, audit notes)."""
        with self._tx() as db:
            self._event(db, jid, kind, detail)

    # ------------------------------------------------------------------ intake side

    def enqueue(
        self,
        key: str,
        study_uid: str,
        orthanc_study_id: str,
        pipeline: str,
        pipeline_version: str,
        fingerprint: str,
        input: JobInput,
        priority: int = 0,
        max_attempts: int = 3,
        not_before: float = 0.0,
    ) -> tuple[Job, bool]:
        """Insert a job unless its key exists; returns (job, created). No worker claims it before
        ``not_before`` (a Unix time; a scheduled pipeline's window)."""
        jid = job_id(key)
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
            if row is not None:
                return Job.from_row(row), False
            # Two Orthancs sharing a PostgreSQL store may enqueue the same study at the same
            # moment: the loser of the race sees the winner's row instead of an error. No
            # conflict target: the id (derived from the key) collides too, and PostgreSQL only
            # forgives conflicts on the target's index.
            cur = db.execute(
                "INSERT INTO jobs(id, key, study_uid, orthanc_study_id, pipeline, pipeline_version, fingerprint,"
                " state, priority, max_attempts, not_before, input, created, updated)"
                " VALUES (?,?,?,?,?,?,?,'queued',?,?,?,?,?,?)"
                " ON CONFLICT DO NOTHING",
                (
                    jid, key, study_uid, orthanc_study_id, pipeline, pipeline_version, fingerprint,
                    priority, max_attempts, not_before, json.dumps(input.to_json()), now, now,
                ),
            )  # fmt: skip
            created = cur.rowcount == 1
            if created:
                self._event(db, jid, "queued", "new job")
                if not_before > now:
                    when = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(not_before))
                    self._event(db, jid, "deferred", f"routine job: waits for the pipeline's window, {when}")
            row = db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
        assert row is not None
        return Job.from_row(row), created

    def retry(self, jid: str, reason: str = "retry requested") -> Job:
        """Put a finished job back in the queue with fresh attempts; its outputs will be replaced."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?" + db.lock_rows, (jid,)).fetchone()
            if row is None:
                raise JobNotFound(jid)
            if row["state"] in ("queued", "running"):
                raise JobStateError(f"job {jid} is {row['state']}; only finished jobs can be retried")
            db.execute(
                "UPDATE jobs SET state='queued', attempts=0, not_before=0, error=NULL, stage=NULL,"
                " lease_owner=NULL, lease_expires=NULL, finished=NULL, updated=? WHERE id=?",
                (time.time(), jid),
            )
            self._event(db, jid, "queued", reason)
        return self.get(jid)

    def supersede(self, old_id: str, new_id: str, reason: str) -> None:
        """Record that job ``new_id`` supersedes ``old_id`` (its input series changed), in both
        histories. A queued ``old_id`` is cancelled; a running one finishes its attempt but the
        worker stores nothing (:meth:`superseded_by`); a finished one keeps its row and history,
        its outputs are replaced by the new job's."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?" + db.lock_rows, (old_id,)).fetchone()
            if row is None:
                raise JobNotFound(old_id)
            db.execute(
                "INSERT INTO supersessions(old_id, new_id, ts, reason) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (old_id, new_id, now, reason),
            )
            self._event(db, old_id, "superseded", f"by job {new_id}: {reason}")
            self._event(db, new_id, "supersedes", f"job {old_id}: {reason}")
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state='cancelled', error=?, finished=?, updated=? WHERE id=?",
                    (f"superseded by job {new_id} before it ran", now, now, old_id),
                )
                self._event(db, old_id, "cancelled", f"superseded by job {new_id}")

    def superseded_by(self, jid: str) -> str | None:
        """The job that supersedes ``jid``, if any."""
        row = self._db.execute("SELECT new_id FROM supersessions WHERE old_id=?", (jid,)).fetchone()
        return None if row is None else str(row["new_id"])

    def superseded_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are superseded."""
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT old_id FROM supersessions WHERE old_id IN ({marks})", ids).fetchall()
        return {str(r["old_id"]) for r in rows}

    def abandon_superseded(self, jid: str, owner: str, new_id: str) -> bool:
        """A running job that was superseded while it ran ends without storing: cancelled."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state='cancelled', error=?, stage=NULL, lease_owner=NULL, lease_expires=NULL,"
                " finished=?, updated=? WHERE id=? AND state='running' AND lease_owner=?",
                (
                    f"superseded by job {new_id} while it ran; its outputs were not stored",
                    now,
                    now,
                    jid,
                    owner,
                ),
            )
            if cur.rowcount == 1:
                self._event(db, jid, "cancelled", f"superseded by job {new_id}; outputs not stored")
            return cur.rowcount == 1

    def cancel(self, jid: str) -> Job:
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?" + db.lock_rows, (jid,)).fetchone()
            if row is None:
                raise JobNotFound(jid)
            if row["state"] in TERMINAL:
                raise JobStateError(f"job {jid} is already {row['state']}")
            now = time.time()
            db.execute(
                "UPDATE jobs SET state='cancelled', lease_owner=NULL, lease_expires=NULL, finished=?, updated=?"
                " WHERE id=?",
                (now, now, jid),
            )
            self._event(db, jid, "cancelled")
        return self.get(jid)

    # ------------------------------------------------------------------ worker side

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the most urgent runnable job and lease it to ``owner``."""
        now = time.time()
        with self._tx() as db:
            self._expire(db, now)
            row = db.execute(
                "SELECT id FROM jobs WHERE state='queued' AND not_before<=? ORDER BY priority DESC, created LIMIT 1"
                + db.skip_locked,
                (now,),
            ).fetchone()
            if row is None:
                return None
            jid = row["id"]
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, lease_owner=?, lease_expires=?,"
                " started=COALESCE(started, ?), updated=?, stage='claimed', timings='{}' WHERE id=?",
                (owner, now + lease_s, now, now, jid),
            )
            self._event(db, jid, "running", f"claimed by {owner}")
            claimed = db.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()
            assert claimed is not None
            return Job.from_row(claimed)

    def _expire(self, db: Database, now: float) -> None:
        # Expired leases another claimer is handling right now are left to it.
        rows = db.execute(
            "SELECT id, attempts, max_attempts, lease_owner FROM jobs WHERE state='running' AND lease_expires<?"
            + db.skip_locked,
            (now,),
        ).fetchall()
        for r in rows:
            self._requeue_lost(db, r, now, f"lease of {r['lease_owner']} expired")

    def _requeue_lost(self, db: Database, r: Row, now: float, why: str) -> None:
        if r["attempts"] >= r["max_attempts"]:
            db.execute(
                "UPDATE jobs SET state='failed', error=?, lease_owner=NULL, lease_expires=NULL, finished=?, updated=?"
                " WHERE id=?",
                (
                    f"worker lost during attempt {r['attempts']} of {r['max_attempts']} ({why})",
                    now,
                    now,
                    r["id"],
                ),
            )
            self._event(db, r["id"], "failed", why)
        else:
            db.execute(
                "UPDATE jobs SET state='queued', lease_owner=NULL, lease_expires=NULL, updated=? WHERE id=?",
                (now, r["id"]),
            )
            self._event(db, r["id"], "requeued", why)

    def release_owner(self, owner: str, why: str) -> int:
        """Requeue every job leased to ``owner`` (a worker known to be dead)."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, attempts, max_attempts, lease_owner FROM jobs WHERE state='running' AND lease_owner=?"
                + db.lock_rows,
                (owner,),
            ).fetchall()
            for r in rows:
                self._requeue_lost(db, r, now, why)
        return len(rows)

    def heartbeat(self, jid: str, owner: str, lease_s: float, stage: str | None = None) -> bool:
        """Extend the lease; False when the job is no longer ours (expired, cancelled)."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires=?, updated=?, stage=COALESCE(?, stage)"
                " WHERE id=? AND state='running' AND lease_owner=?",
                (now + lease_s, now, stage, jid, owner),
            )
            return cur.rowcount == 1

    def record_stage(self, jid: str, owner: str, stage: str, seconds: float) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT timings FROM jobs WHERE id=? AND lease_owner=?" + db.lock_rows, (jid, owner)
            ).fetchone()
            if row is None:
                return
            timings = json.loads(row["timings"])
            timings[stage] = round(seconds, 4)
            db.execute(
                "UPDATE jobs SET timings=?, stage=?, updated=? WHERE id=?",
                (json.dumps(timings), stage, time.time(), jid),
            )

    def succeed(
        self,
        jid: str,
        owner: str,
        outputs: JobOutputs,
        fhir: dict[str, Any] | None,
        deliver_to: str | None = None,
        hl7: Mapping[str, str] | None = None,
    ) -> bool:
        """Record the results; with ``deliver_to``, queue the FHIR bundle for it in the same transaction,
        and every HL7 message of ``hl7`` (destination name -> ER7 text) for its destination."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state='succeeded', outputs=?, fhir=?, error=NULL, stage='done', lease_owner=NULL,"
                " lease_expires=NULL, finished=?, updated=? WHERE id=? AND state='running' AND lease_owner=?",
                (
                    json.dumps(outputs.to_json()),
                    json.dumps(fhir) if fhir is not None else None,
                    now,
                    now,
                    jid,
                    owner,
                ),
            )
            if cur.rowcount == 1:
                self._event(
                    db,
                    jid,
                    "succeeded",
                    ", ".join(f"{k}={v.sop_instance_uid}" for k, v in outputs.instances()),
                )
                if fhir is not None and deliver_to:
                    enqueue_in(db, jid, fhir, deliver_to, now)
                    self._event(db, jid, "fhir_queued", f"report queued for delivery to {deliver_to}")
                for destination, message in (hl7 or {}).items():
                    enqueue_in(db, jid, {"message": message}, destination, now, table=HL7)
                    self._event(db, jid, "hl7_queued", f"ORU^R01 queued for delivery to {destination}")
            return cur.rowcount == 1

    def fail(self, jid: str, owner: str, error: str, retryable: bool, backoff_s: float) -> str:
        """Record a failed attempt; requeue with backoff when allowed. Returns the new state."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id=? AND state='running' AND lease_owner=?"
                + db.lock_rows,
                (jid, owner),
            ).fetchone()
            if row is None:
                return "lost"
            if retryable and row["attempts"] < row["max_attempts"]:
                delay = backoff_s * (2 ** (row["attempts"] - 1))
                db.execute(
                    "UPDATE jobs SET state='queued', error=?, not_before=?, lease_owner=NULL, lease_expires=NULL,"
                    " updated=? WHERE id=?",
                    (error, now + delay, now, jid),
                )
                self._event(
                    db, jid, "requeued", f"attempt {row['attempts']} failed, retry in {delay:.0f} s: {error}"
                )
                return "queued"
            db.execute(
                "UPDATE jobs SET state='failed', error=?, lease_owner=NULL, lease_expires=NULL, finished=?, updated=?"
                " WHERE id=?",
                (error, now, now, jid),
            )
            self._event(db, jid, "failed", error)
            return "failed"

    # ------------------------------------------------------------------ reads

    def get(self, jid: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()
        if row is None:
            raise JobNotFound(jid)
        return Job.from_row(row)

    def get_by_key(self, key: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
        return None if row is None else Job.from_row(row)

    def list_jobs(
        self,
        state: str | None = None,
        study_uid: str | None = None,
        limit: int = 200,
        review: str | None = None,
        oldest_first: bool = False,
    ) -> list[Job]:
        """Jobs, newest first; ``review`` keeps succeeded jobs in that review state."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if review:
            if review not in REVIEW_STATES:
                raise BadRequest(f"unknown review state {review!r}; one of {', '.join(REVIEW_STATES)}")
            sql += f" AND state='succeeded' AND {REVIEW_STATE_SQL}=?"
            args.append(review)
        if state:
            if state not in STATES:
                raise BadRequest(f"unknown state {state!r}; one of {', '.join(STATES)}")
            sql += " AND state=?"
            args.append(state)
        if study_uid:
            sql += " AND study_uid=?"
            args.append(study_uid)
        sql += f" ORDER BY {'finished, created' if oldest_first else 'created DESC'} LIMIT ?"
        return [Job.from_row(r) for r in self._db.execute(sql, (*args, limit)).fetchall()]

    def events(self, jid: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT ts, kind, detail FROM job_events WHERE job_id=? ORDER BY seq", (jid,))
        return rows.fetchall()

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for r in self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall():
            out[r["state"]] = r["n"]
        return out

    def waiting(self, now: float | None = None) -> dict[str, int]:
        """Queued jobs by how they wait: ``deferred`` (until a pipeline's window), ``urgent`` (a
        priority above 0) and ``routine``."""
        now = time.time() if now is None else now
        out = {"urgent": 0, "routine": 0, "deferred": 0}
        rows = self._db.execute(
            "SELECT CASE WHEN not_before>? THEN 'deferred' WHEN priority>0 THEN 'urgent' ELSE 'routine' END AS kind,"
            " COUNT(*) AS n FROM jobs WHERE state='queued' GROUP BY kind",
            (now,),
        ).fetchall()
        for r in rows:
            out[str(r["kind"])] = int(r["n"])
        return out

    def get_kv(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_kv(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO kv(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )


class JobStateError(RuntimeError):
    """A transition that the job's current state does not allow."""
