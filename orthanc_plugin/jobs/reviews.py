"""Reviews of succeeded jobs: a person accepts, edits or rejects the AI's result.

A review is recorded here by whoever receives it (the REST API, the admin page, the intake when
a revised SEG arrives) and applied later by a worker (a verified SR stored in the study, a FHIR
update queued in the outbox), so the Orthanc process never builds DICOM. Rows are numbered per
job (``n`` = 1, 2, ...): a later review supersedes an earlier one and the rows are the trail.

Recording is idempotent: a review equal to the job's latest (same decision, reason and
reviewer) is not recorded again, and an edit names its revised SEG, which is recorded once
per job however often it is stored. Applying is leased like a job: a worker killed half-way
leaves the row claimable again, and the outputs of a review derive from (job, n), so applying
twice writes the same objects.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from orthanc_plugin.core.errors import BadRequest
from orthanc_plugin.jobs.database import Database, DatabaseTarget, Row
from orthanc_plugin.jobs.outbox import enqueue_in
from orthanc_plugin.jobs.store import JobNotFound, JobStateError, JobStore

#: What a reviewer decides, and the review state each one leaves the job in (see
#: :data:`~orthanc_plugin.jobs.store.REVIEW_STATES`).
DECISIONS = {"accept": "accepted", "edit": "edited", "reject": "rejected"}
#: How a row is applied: ``queued`` waits for a worker, ``applying`` is leased, ``applied`` done.
APPLY_STATES = ("queued", "applying", "applied", "failed")
MAX_REASON = 1000


@dataclass(frozen=True)
class Review:
    id: int
    job_id: str
    n: int
    decision: str
    reason: str | None
    reviewer: str
    via: str
    seg_uid: str | None
    seg_id: str | None
    state: str
    attempts: int
    error: str | None
    result: dict[str, Any] | None
    created: float
    applied: float | None

    @classmethod
    def from_row(cls, r: Row) -> Review:
        return cls(
            id=r["id"], job_id=r["job_id"], n=r["n"], decision=r["decision"], reason=r["reason"],
            reviewer=r["reviewer"], via=r["via"], seg_uid=r["seg_uid"], seg_id=r["seg_id"],
            state=r["state"], attempts=r["attempts"], error=r["error"],
            result=json.loads(r["result"]) if r["result"] else None, created=r["created"], applied=r["applied"],
        )  # fmt: skip

    @property
    def review_state(self) -> str:
        return DECISIONS[self.decision]

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "decision": self.decision,
            "state": self.review_state,
            "reason": self.reason,
            "reviewer": self.reviewer,
            "via": self.via,
            "revised_seg": self.seg_uid,
            "applied": self.state == "applied",
            "apply_state": self.state,
            "error": self.error,
            "result": self.result,
            "created": self.created,
            "applied_at": self.applied,
        }


def outbox_key(job_id: str, n: int) -> str:
    """The outbox row of review ``n`` of a job: the job id, then the review number, so the
    outbox delivers a job's rows in order (see :meth:`~orthanc_plugin.jobs.outbox.Outbox.claim`)."""
    return f"{job_id}~r{n}"


class Reviews:
    """The reviews table; one connection per instance (create one per thread or process)."""

    def __init__(self, path: DatabaseTarget, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        # The job store's schema holds the reviews table; opening it makes sure it exists.
        self._store = JobStore(path, busy_timeout_s)
        self._db = self._store._db

    def close(self) -> None:
        self._store.close()

    def _tx(self) -> AbstractContextManager[Database]:
        return self._db.transaction()

    @staticmethod
    def _event(db: Database, jid: str, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO job_events(job_id, ts, kind, detail) VALUES (?,?,?,?)",
            (jid, time.time(), kind, detail),
        )

    # ------------------------------------------------------------------ recording

    def record(
        self,
        job_id: str,
        decision: str,
        reviewer: str,
        via: str,
        reason: str | None = None,
        seg_uid: str | None = None,
        seg_id: str | None = None,
    ) -> tuple[Review, bool]:
        """Record a review of a succeeded job; returns (review, created).

        Not created when it repeats the job's latest review, or (an edit) when its revised
        SEG was recorded before. Raises ``BadRequest`` for a review that makes no sense and
        ``JobNotFound`` when the job does not exist or has not succeeded.
        """
        if decision not in DECISIONS:
            raise BadRequest(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        reason = (reason or "").strip() or None
        if decision == "reject" and reason is None:
            raise BadRequest(
                "a rejection needs a reason: the EHR and the SR say why the result must not be used"
            )
        if reason is not None and len(reason) > MAX_REASON:
            raise BadRequest(f"reason is longer than {MAX_REASON} characters")
        if decision == "edit" and not seg_uid:
            raise BadRequest("an edit names the revised SEG")
        if not reviewer:
            raise BadRequest("a review needs a reviewer")
        with self._tx() as db:
            job = db.execute("SELECT state FROM jobs WHERE id=?" + db.lock_rows, (job_id,)).fetchone()
            if job is None:
                raise JobNotFound(job_id)
            if job["state"] != "succeeded":
                raise ReviewStateError(f"job {job_id} is {job['state']}; only succeeded jobs can be reviewed")
            if seg_uid:
                same = db.execute(
                    "SELECT * FROM reviews WHERE job_id=? AND seg_uid=? ORDER BY n LIMIT 1", (job_id, seg_uid)
                ).fetchone()
                if same is not None:
                    return Review.from_row(same), False
            last = db.execute(
                "SELECT * FROM reviews WHERE job_id=? ORDER BY n DESC LIMIT 1", (job_id,)
            ).fetchone()
            if (
                last is not None
                and decision != "edit"
                and (last["decision"], last["reason"], last["reviewer"]) == (decision, reason, reviewer)
            ):
                return Review.from_row(last), False
            n = 1 if last is None else int(last["n"]) + 1
            now = time.time()
            db.execute(
                "INSERT INTO reviews(job_id, n, decision, reason, reviewer, via, seg_uid, seg_id, state, created)"
                " VALUES (?,?,?,?,?,?,?,?,'queued',?)",
                (job_id, n, decision, reason, reviewer, via, seg_uid, seg_id, now),
            )
            what = f"review {n}: {DECISIONS[decision]} by {reviewer} via {via}"
            if last is not None:
                what += (
                    f" (supersedes review {last['n']}: {DECISIONS[last['decision']]} by {last['reviewer']})"
                )
            self._event(db, job_id, "review_recorded", what)
            row = db.execute("SELECT * FROM reviews WHERE job_id=? AND n=?", (job_id, n)).fetchone()
        assert row is not None
        return Review.from_row(row), True

    # ------------------------------------------------------------------ applying (workers)

    def claim(self, owner: str, lease_s: float) -> Review | None:
        """Lease the oldest review waiting to be applied whose earlier reviews are applied."""
        now = time.time()
        sql = (
            "SELECT id FROM reviews WHERE (state='queued' OR (state='applying' AND lease_expires<?))"
            " AND NOT EXISTS (SELECT 1 FROM reviews e WHERE e.job_id=reviews.job_id AND e.n<reviews.n"
            " AND e.state IN ('queued','applying')) ORDER BY id LIMIT 1"
        )
        if self._db.execute(sql, (now,)).fetchone() is None:
            return None
        with self._tx() as db:
            row = db.execute(sql + db.skip_locked, (now,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE reviews SET state='applying', attempts=attempts+1, lease_owner=?, lease_expires=? WHERE id=?",
                (owner, now + lease_s, row["id"]),
            )
            r = db.execute("SELECT * FROM reviews WHERE id=?", (row["id"],)).fetchone()
        assert r is not None
        return Review.from_row(r)

    def applied(
        self,
        review: Review,
        owner: str,
        result: dict[str, Any],
        fhir: dict[str, Any] | None,
        deliver_to: str | None,
    ) -> bool:
        """Record what applying made; with ``deliver_to``, queue the FHIR update in the same transaction."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reviews SET state='applied', result=?, error=NULL, applied=?, lease_owner=NULL,"
                " lease_expires=NULL WHERE id=? AND state='applying' AND lease_owner=?",
                (json.dumps(result), now, review.id, owner),
            )
            if cur.rowcount != 1:
                return False
            detail = (
                f"review {review.n} ({review.review_state}): SR {result.get('sr', {}).get('SOPInstanceUID')}"
            )
            self._event(db, review.job_id, "review_applied", detail)
            if fhir is not None and deliver_to:
                enqueue_in(db, outbox_key(review.job_id, review.n), fhir, deliver_to, now)
                self._event(
                    db, review.job_id, "fhir_queued", f"review {review.n} update queued for {deliver_to}"
                )
            return True

    def failed(self, review: Review, owner: str, error: str, retry: bool, max_attempts: int = 5) -> str:
        """Record a failed attempt: back to the queue while attempts are left and ``retry``."""
        state = "queued" if retry and review.attempts < max_attempts else "failed"
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reviews SET state=?, error=?, lease_owner=NULL, lease_expires=NULL"
                " WHERE id=? AND state='applying' AND lease_owner=?",
                (state, error, review.id, owner),
            )
            if cur.rowcount == 1:
                self._event(db, review.job_id, "review_failed", f"review {review.n}: {error}")
        return state

    # ------------------------------------------------------------------ reads

    def for_job(self, job_id: str) -> list[Review]:
        rows = self._db.execute("SELECT * FROM reviews WHERE job_id=? ORDER BY n", (job_id,)).fetchall()
        return [Review.from_row(r) for r in rows]

    def latest(self, job_id: str) -> Review | None:
        row = self._db.execute(
            "SELECT * FROM reviews WHERE job_id=? ORDER BY n DESC LIMIT 1", (job_id,)
        ).fetchone()
        return None if row is None else Review.from_row(row)

    def latest_applied(self, job_id: str, before: int | None = None) -> Review | None:
        sql = "SELECT * FROM reviews WHERE job_id=? AND state='applied'"
        args: list[Any] = [job_id]
        if before is not None:
            sql += " AND n<?"
            args.append(before)
        row = self._db.execute(sql + " ORDER BY n DESC LIMIT 1", args).fetchone()
        return None if row is None else Review.from_row(row)

    def all_latest(self) -> dict[str, Review]:
        """The latest review of every reviewed job (for monitoring)."""
        rows = self._db.execute(
            "SELECT * FROM reviews r WHERE n=(SELECT MAX(n) FROM reviews x WHERE x.job_id=r.job_id)"
        ).fetchall()
        return {r["job_id"]: Review.from_row(r) for r in rows}


class ReviewStateError(JobStateError):
    """A review of a job that cannot be reviewed (not succeeded)."""
