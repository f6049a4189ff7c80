"""Intake: Orthanc's change log -> routing decisions -> jobs.

One loop reads ``/changes`` from the last sequence number we persisted, so the same code
handles live events (the callback only wakes the loop) and the catch-up after a restart.

Per-series start: NewInstance changes tell when each series was last fed; a series quiet for
``series_quiet_s`` with its expected count reached (:mod:`orthanc_plugin.intake.series`) is
complete, and every pipeline whose chosen series are all complete starts then, without waiting
for Orthanc's StableAge. STABLE_STUDY stays the safety net: the whole study is routed again
(idempotent by job key), and a pipeline that cannot run is recorded only then. Orthanc forgets
stability timers at shutdown, so studies whose series arrived without a later StableStudy are
evaluated once the stable age has passed after the restart.

Supersession: a job whose series changed after it was queued (a late image: a new input
fingerprint for the same series) is superseded by a new job that writes its outputs under the
first job's identity (:attr:`JobInput.output_key`), so results are replaced, not duplicated. A
series arriving later in the study never re-routes a pipeline that already has a job there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orthanc_plugin.core.config import PipelineConfig
from orthanc_plugin.core.errors import NotFound
from orthanc_plugin.core.handoff import JobInput, RoleInput
from orthanc_plugin.core.uids import fingerprint, job_key
from orthanc_plugin.intake.priority import plan
from orthanc_plugin.intake.revisions import revised_job, stored_by_key
from orthanc_plugin.intake.routing import (
    OWN_MANUFACTURER,
    RoleResult,
    RouteDecision,
    SeriesInfo,
    StudyInfo,
    route,
)
from orthanc_plugin.intake.series import Feeding, expected_instances, is_complete
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import Job, JobStore

log = logging.getLogger("orthanc_ai.intake")

RestGet = Callable[[str], Any]  # path -> parsed JSON; raises on HTTP errors
SEQ_KEY = "changes.last_seq"
# Series-level keywords that /series/{id} does not carry; read from one instance.
_INSTANCE_KEYWORDS = (
    "ConvolutionKernel", "SliceThickness", "Manufacturer", "ManufacturerModelName", "ImageType",
    "BodyPartExamined", "ContrastBolusAgent", "SOPClassUID", "KVP", "PixelSpacing", "NumberOfFrames",
)  # fmt: skip
PENDING_TTL_S = 3600.0
GAP_WAIT_S = 5.0  # how long a missing change number is waited for (see Intake._gap_expired)
GAP_NEAR_TAIL = 1000  # only gaps this close to the newest change can still fill
# Study-level keywords for ``study_where`` that are not DICOM attributes: how the study arrived.
STUDY_CALLING_AET = "CallingAETitle"
STUDY_ORIGIN = "Origin"


def _pixel_measure(tags: dict[str, Any], keyword: str) -> Any:
    """SliceThickness / PixelSpacing of an enhanced multi-frame instance, which holds them in the
    Pixel Measures functional group (shared, else the first frame's), not at the top level."""
    if keyword not in ("SliceThickness", "PixelSpacing"):
        return None
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = tags.get(groups)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            measures = items[0].get("PixelMeasuresSequence")
            if isinstance(measures, list) and measures and isinstance(measures[0], dict):
                value = measures[0].get(keyword)
                if value is not None:
                    return value
    return None


class StudyGone(NotFound):
    """The study no longer exists in Orthanc."""


@dataclass(frozen=True)
class Enqueued:
    decision: RouteDecision
    job: Job | None
    created: bool


class Intake:
    def __init__(
        self,
        rest_get: RestGet,
        store: JobStore,
        pipelines: Callable[[], list[PipelineConfig]],
        max_attempts: int = 3,
        catch_up_delay_s: float = 10.0,
        wait_for_gaps: bool = False,
        may_review: Callable[[str | None], bool] = lambda user: True,
        authentication: bool = False,
        on_queued: Callable[[Job], None] | None = None,
        series_quiet_s: float = 0.0,
    ) -> None:
        # 0: no per-series start, jobs start on STABLE_STUDY only
        self.series_quiet_s = series_quiet_s
        self._feeding: dict[str, Feeding] = {}  # series id -> its study, when last fed
        self.rest_get = rest_get
        self.may_review = may_review
        self.authentication = authentication
        self.reviews = Reviews(store.path)
        # Called with each job this intake queues (or queues again): the plugin labels the study.
        self.on_queued = on_queued
        self.wait_for_gaps = wait_for_gaps
        self.store = store
        self.pipelines = pipelines
        self.max_attempts = max_attempts
        self.catch_up_delay_s = catch_up_delay_s
        self.wake = threading.Event()
        self._pending: dict[str, tuple[int, float]] = {}  # study id -> (first seq, first seen)
        self._catch_up: dict[str, float] = {}  # study id -> evaluate at
        self._gaps: dict[int, float] = {}  # missing change number -> when first noticed
        self._first_pass = True
        self._cursor: int | None = None  # read position; the persisted one may lag behind it

    # ------------------------------------------------------------------ study description

    def describe_study(self, orthanc_study_id: str) -> StudyInfo:
        try:
            study = self.rest_get(f"/studies/{orthanc_study_id}")
        except LookupError as e:
            raise StudyGone(orthanc_study_id) from e
        series: list[SeriesInfo] = []
        for sid in study.get("Series", []):
            try:
                s = self.rest_get(f"/series/{sid}")
            except LookupError:
                continue  # deleted meanwhile
            tags: dict[str, str] = {k: str(v) for k, v in s.get("MainDicomTags", {}).items()}
            instances = tuple(s.get("Instances", []))
            if instances:
                try:
                    extra = self.rest_get(f"/instances/{instances[0]}/simplified-tags")
                except LookupError:
                    extra = {}
                for kw in _INSTANCE_KEYWORDS:
                    v = extra.get(kw, _pixel_measure(extra, kw))
                    if isinstance(v, str | int | float) and kw not in tags:
                        tags[kw] = str(v)
            series.append(SeriesInfo(sid, tags.get("SeriesInstanceUID", ""), tags, instances))
        stags = {k: str(v) for k, v in study.get("MainDicomTags", {}).items()}
        stags.update(self._reception(series))
        return StudyInfo(orthanc_study_id, stags.get("StudyInstanceUID", ""), stags, tuple(series))

    def _reception(self, series: list[SeriesInfo]) -> dict[str, str]:
        """How the study arrived, for study-level rules: ``CallingAETitle`` (the sender's AE title
        for C-STORE, Orthanc's ``RemoteAET`` metadata) and ``Origin`` (``DicomProtocol``,
        ``RestApi``, ``Plugins``...), read from the first instance of each series. Our own
        SEG/SR series are left out; values from several senders are joined by a backslash."""
        found: dict[str, set[str]] = {STUDY_CALLING_AET: set(), STUDY_ORIGIN: set()}
        for s in series:
            if not s.instance_ids or s.tags.get("Manufacturer", "") == OWN_MANUFACTURER:
                continue
            try:
                meta = self.rest_get(f"/instances/{s.instance_ids[0]}/metadata?expand")
            except LookupError:
                continue
            if not isinstance(meta, dict):
                continue
            for key, source in ((STUDY_CALLING_AET, "RemoteAET"), (STUDY_ORIGIN, "Origin")):
                value = meta.get(source)
                if isinstance(value, str) and value.strip():
                    found[key].add(value.strip())
        return {k: "\\".join(sorted(v)) for k, v in found.items() if v}

    # ------------------------------------------------------------------ evaluation

    def dry_run(self, orthanc_study_id: str) -> list[RouteDecision]:
        study = self.describe_study(orthanc_study_id)
        return [route(p, study) for p in self.pipelines()]

    def evaluate(
        self,
        orthanc_study_id: str,
        only: str | None = None,
        rerun: bool = False,
        ready: frozenset[str] | None = None,
    ) -> list[Enqueued]:
        """Route the study and enqueue a job per matching pipeline (idempotent by job key).

        ``rerun`` puts an existing finished job with the same key back into the queue.
        ``ready`` (per-series start): the series that just became complete; only pipelines that
        chose one of them and none still being fed start, and one that cannot run waits for the
        stable study instead of being recorded as failed.
        """
        study = self.describe_study(orthanc_study_id)
        results: list[Enqueued] = []
        earlier = self._live_jobs(study)
        for p in self.pipelines():
            if only is not None and p.name != only:
                continue
            decision = route(p, study)
            current = earlier.get((p.name, p.version))
            if current is not None and not rerun:
                decision = self._keep_series(decision, current, study)
            if ready is not None:
                picked = {s.orthanc_id for s in decision.chosen().values()}
                if not decision.matched or not picked & ready or picked & self._feeding.keys():
                    continue
            if not decision.matched and decision.problem is None:
                results.append(Enqueued(decision, None, False))
                continue
            chosen = decision.chosen()
            # A pipeline that applies but cannot run (a role missing or ambiguous) still gets a
            # job, failed by the worker with the problem, so the admin sees it in the job list.
            tied = [s for r in decision.roles for s in r.ambiguous]
            fp = fingerprint(i for s in [*chosen.values(), *tied] for i in s.instance_ids)
            key = job_key(study.study_instance_uid, p.name, p.version, fp)
            priority, not_before, urgent = plan(p, study, datetime.now().astimezone())
            # The same series as the pipeline's current job, other instances: a late image.
            old = None
            if (
                current is not None
                and current.key != key
                and decision.problem is None
                and {r: c.series_instance_uid for r, c in chosen.items()}
                == {r: x.series_uid for r, x in current.input.roles.items()}
            ):
                old = current
            job_input = JobInput(
                roles={
                    r.role: RoleInput(
                        series_id=r.chosen.orthanc_id,
                        series_uid=r.chosen.series_instance_uid,
                        series_description=r.chosen.tags.get("SeriesDescription", ""),
                        instances=tuple(r.chosen.instance_ids),
                        reason=r.reason,
                    )
                    for r in decision.roles
                    if r.chosen is not None
                },
                problem=decision.problem,
                urgent=urgent,
                supersedes=old.id if old is not None else None,
                output_key=old.output_key if old is not None else None,
            )
            job, created = self.store.enqueue(
                key, study.study_instance_uid, orthanc_study_id, p.name, p.version, fp, job_input,
                priority=priority, max_attempts=self.max_attempts, not_before=not_before,
            )  # fmt: skip
            if created and old is not None:
                before = sum(len(x.instances) for x in old.input.roles.values())
                after = sum(len(x.instances) for x in job.input.roles.values())
                why = f"input series changed ({before} -> {after} instances); outputs replaced under the same UIDs"
                self.store.supersede(old.id, job.id, why)
                log.info(
                    "study %s: pipeline %s job %s supersedes job %s (%s)",
                    orthanc_study_id, p.name, job.id, old.id, why,
                    extra={"job_id": job.id, "study_uid": study.study_instance_uid, "pipeline": p.name},
                )  # fmt: skip
            if not created and rerun and job.state in ("succeeded", "failed", "cancelled"):
                job = self.store.retry(job.id, "run requested through the API")
                created = True
            log.info(
                "study %s: pipeline %s %s job %s",
                orthanc_study_id,
                p.name,
                "queued" if created else "has",
                job.id,
                extra={"job_id": job.id, "study_uid": study.study_instance_uid, "pipeline": p.name},
            )
            results.append(Enqueued(decision, job, created))
        try:
            self.detect_revisions(study)
        except Exception:
            log.exception("looking for revised SEGs in study %s failed", orthanc_study_id)
        if self.on_queued is not None:
            for item in results:
                if item.created and item.job is not None:
                    self.on_queued(item.job)
                    break  # the label is per study: one call covers all its new jobs
        return results

    def _live_jobs(self, study: StudyInfo) -> dict[tuple[str, str], Job]:
        """The newest job of each (pipeline, version) in the study that read series (no routing
        problem) and is not superseded."""
        jobs = [
            j for j in self.store.list_jobs(study_uid=study.study_instance_uid, limit=1000) if j.input.roles
        ]
        gone = self.store.superseded_ids([j.id for j in jobs])
        out: dict[tuple[str, str], Job] = {}
        for j in sorted(jobs, key=lambda j: j.created):
            if j.id not in gone and j.input.problem is None:
                out[(j.pipeline, j.pipeline_version)] = j
        return out

    @staticmethod
    def _keep_series(decision: RouteDecision, current: Job, study: StudyInfo) -> RouteDecision:
        """A series that arrived after the pipeline's job was queued does not re-route it: while the
        series that job read are all still in the study, the pipeline keeps them."""
        by_uid = {s.series_instance_uid: s for s in study.series}
        kept = {role: by_uid.get(r.series_uid) for role, r in current.input.roles.items()}
        chosen = {role: s.series_instance_uid for role, s in decision.chosen().items()}
        if any(s is None for s in kept.values()) or chosen == {
            r: x.series_uid for r, x in current.input.roles.items()
        }:
            return decision
        required = {r.role: r.required for r in decision.roles}
        roles = tuple(
            RoleResult(
                role, required.get(role, True), s,
                f"kept {s.label()} ({s.series_instance_uid}), the series of job {current.id}: a series "
                "arriving later does not re-route a pipeline that already has a job in the study",
            )
            for role, s in kept.items()
            if s is not None
        )  # fmt: skip
        return RouteDecision(decision.pipeline, True, roles, f"kept the series of job {current.id}")

    def detect_revisions(self, study: StudyInfo) -> int:
        """Record an edit review for every SEG in the study that revises one of our SEGs
        (rule: :mod:`orthanc_plugin.intake.revisions`); returns how many were new."""
        candidates = [
            s for s in study.series
            if s.tags.get("Modality", "").upper() == "SEG" and s.tags.get("Manufacturer", "") != OWN_MANUFACTURER
        ]  # fmt: skip
        if not candidates:
            return 0
        jobs = self.store.list_jobs(state="succeeded", study_uid=study.study_instance_uid)
        if not jobs:
            return 0
        pipelines = {p.name: p for p in self.pipelines()}
        new = 0
        for s in candidates:
            for iid in s.instance_ids:
                try:
                    tags = self.rest_get(f"/instances/{iid}/simplified-tags")
                    meta = self.rest_get(f"/instances/{iid}/metadata?expand")
                except LookupError:
                    continue
                revision = revised_job(tags, iid, jobs, pipelines)
                if revision is None:
                    continue
                # Orthanc records the storing user for REST uploads (HttpUsername); for a
                # STOW-RS the plugin noted it (server.stow_users); else the SEG's
                # ContentCreatorName names the reviewer (storing at all needed an Orthanc login).
                user = str(meta.get("HttpUsername") or "") if isinstance(meta, dict) else ""
                user = user or self.store.get_kv(stored_by_key(iid)) or ""
                reviewer = user or str(tags.get("ContentCreatorName") or "").replace("^", " ").strip()
                if self.authentication and not self.may_review(reviewer or None):
                    self.store.add_event(
                        revision.job.id, "review_refused",
                        f"revised SEG from {reviewer or 'an unknown user'}, who is not in ReviewerUsers",
                    )  # fmt: skip
                    continue
                reviewer = reviewer or "unknown reviewer"
                review, created = self.reviews.record(
                    revision.job.id, "edit", reviewer, "revised SEG", seg_uid=revision.seg_uid, seg_id=iid
                )
                new += created
                if created:
                    log.info(
                        "study %s: revised SEG recorded as an edit of job %s",
                        study.orthanc_id,
                        revision.job.id,
                    )
        return new

    # ------------------------------------------------------------------ change log

    def start_seq(self) -> int:
        stored = self.store.get_kv(SEQ_KEY)
        if stored is not None:
            return int(stored)
        # First start on this store: begin at the present, do not reprocess the whole archive.
        last = int(self.rest_get("/changes?last").get("Last", 0))
        self.store.set_kv(SEQ_KEY, str(last))
        return last

    @property
    def position(self) -> int | None:
        """The last change of Orthanc's log the intake has handled (None before the first read)."""
        return self._cursor

    def process_changes(self, limit: int = 200) -> int:
        """Handle every change after the persisted sequence number; returns how many were read."""
        if self._cursor is None:
            self._cursor = self.start_seq()
        since = self._cursor
        seen = 0
        while True:
            page = self.rest_get(f"/changes?since={since}&limit={limit}")
            changes = page.get("Changes", [])
            held = False
            if self.wait_for_gaps:
                self._note_gaps(since, changes)
            for ch in changes:
                seq = int(ch.get("Seq", since + 1))
                if seq > since + 1 and not self._gap_expired(since + 1, seq):
                    held = True  # read again from here on the next pass
                    break
                self._handle_change(ch)
                seen += 1
                since = max(since, seq)
            if changes and not held:
                since = max(since, int(page.get("Last", since)))
            self._cursor = since
            self._persist(since)
            if held or page.get("Done", True) or not changes:
                break
        if self._first_pass:
            self._first_pass = False
            now = time.time()
            for sid in self._pending:
                self._catch_up.setdefault(sid, now + self.catch_up_delay_s)
            if self._catch_up:
                log.info("catch-up: %d study(ies) without a stable event since restart", len(self._catch_up))
        self._run_catch_up()
        if self._feeding:
            self._check_series()
        return seen

    def _note_gaps(self, since: int, changes: list[dict[str, Any]]) -> None:
        """Remember when each gap of this page was first seen (all at once, so a page with many
        gaps costs one wait, not one per gap). Only gaps near the end of the log can still be
        filled by a transaction in flight; older ones are deleted resources: not waited for."""
        seqs = [int(ch.get("Seq", 0)) for ch in changes]
        if not seqs:
            return
        tail = int(self.rest_get("/changes?last").get("Last", seqs[-1]))
        now = time.monotonic()
        previous = since
        for seq in seqs:
            if seq > previous + 1 and tail - seq < GAP_NEAR_TAIL:
                self._gaps.setdefault(previous + 1, now)
            previous = max(previous, seq)

    def _gap_expired(self, missing: int, after: int) -> bool:
        """Change ``missing`` is not in the log although ``after`` is. With several Orthancs
        sharing one PostgreSQL index a lower number can become visible after a higher one (its
        transaction commits later), so near the end of the log the reader waits a little for it.
        A number still absent after GAP_WAIT_S belongs to a transaction that rolled back or to a
        deleted resource (Orthanc removes a resource's changes with it), and is skipped."""
        first = self._gaps.get(missing)
        if first is None:
            return True  # not waited for: no shared index, or far from the end of the log
        if time.monotonic() - first < GAP_WAIT_S:
            return False
        self._gaps.pop(missing, None)
        log.debug("change %d never appeared before %d; going on", missing, after)
        return True

    def _handle_change(self, ch: dict[str, Any]) -> None:
        kind, rid, seq = ch.get("ChangeType"), str(ch.get("ID", "")), int(ch.get("Seq", 0))
        if kind == "StableStudy":
            self._pending.pop(rid, None)
            self._catch_up.pop(rid, None)
            self._safe_evaluate(rid)
        elif kind == "NewSeries":
            try:
                study_id = str(self.rest_get(f"/series/{rid}").get("ParentStudy", ""))
            except LookupError:
                return
            if study_id and study_id not in self._pending:
                self._pending[study_id] = (seq, time.time())
            if study_id and self.series_quiet_s > 0:
                self._fed(rid, study_id)
        elif kind == "NewInstance" and self.series_quiet_s > 0:
            fed = self._instance_arrived(rid)
            if fed and fed not in self._pending:
                # A late image into a series seen before: until the study is stable (or caught
                # up after a restart) the persisted position stays before it.
                self._pending[fed] = (seq, time.time())
        elif kind == "Deleted" and ch.get("ResourceType") == "Study":
            self._pending.pop(rid, None)
            self._catch_up.pop(rid, None)
            for sid in [k for k, f in self._feeding.items() if f.study_id == rid]:
                del self._feeding[sid]
        elif kind == "Deleted" and ch.get("ResourceType") == "Series":
            self._feeding.pop(rid, None)

    # ------------------------------------------------------------------ per-series start

    def _fed(self, series_id: str, study_id: str) -> None:
        watch = self._feeding.get(series_id)
        if watch is None:
            self._feeding[series_id] = Feeding(study_id, time.monotonic())
        else:
            watch.last_seen = time.monotonic()
            watch.checked_count = -1

    def _instance_arrived(self, instance_id: str) -> str | None:
        """Note that the series of a new instance is being fed (one lookup per instance, two for
        the first of a series); returns the series' study when the series was not being fed."""
        try:
            series_id = str(self.rest_get(f"/instances/{instance_id}").get("ParentSeries", ""))
        except LookupError:
            return None  # deleted meanwhile
        if not series_id:
            return None
        watch = self._feeding.get(series_id)
        if watch is not None:
            watch.last_seen = time.monotonic()
            watch.checked_count = -1
            return None
        try:
            study_id = str(self.rest_get(f"/series/{series_id}").get("ParentStudy", ""))
        except LookupError:
            return None
        if study_id:
            self._fed(series_id, study_id)
        return study_id or None

    @property
    def receiving(self) -> int:
        """How many series received an instance lately and are not judged complete yet."""
        return len(self._feeding)

    def next_due(self) -> float | None:
        """Seconds until the next series may be complete (None: no series being fed)."""
        # A series short of its expected count waits for its next instance, which wakes the loop.
        waiting = [f.last_seen for f in self._feeding.values() if f.checked_count < 0]
        if not waiting:
            return None
        return max(0.0, min(waiting) + self.series_quiet_s - time.monotonic())

    def _check_series(self) -> None:
        """Judge every quiet series; route the studies of those that are complete."""
        now = time.monotonic()
        ready: dict[str, set[str]] = {}
        for series_id, watch in list(self._feeding.items()):
            if now - watch.last_seen > PENDING_TTL_S:
                del self._feeding[series_id]  # never reached its count: the stable study decided
                continue
            if now - watch.last_seen < self.series_quiet_s or watch.checked_count >= 0:
                continue  # still fed, or short of its expected count with nothing new since
            try:
                series = self.rest_get(f"/series/{series_id}")
            except LookupError:
                del self._feeding[series_id]
                continue
            instances = series.get("Instances", [])
            count = len(instances)
            first: dict[str, Any] = {}
            if instances:
                try:
                    first = self.rest_get(f"/instances/{instances[0]}/simplified-tags")
                except LookupError:
                    first = {}
            expected = expected_instances(series, first)
            if not is_complete(count, expected):
                watch.checked_count = count
                log.debug("series %s: %d of %s instances; waiting", series_id, count, expected)
                continue
            del self._feeding[series_id]
            ready.setdefault(watch.study_id, set()).add(series_id)
        for study_id, series_ids in ready.items():
            try:
                self.evaluate(study_id, ready=frozenset(series_ids))
            except StudyGone:
                log.info("study %s deleted before it could be routed", study_id)
            except Exception:
                log.exception("routing study %s after a series completed failed", study_id)

    def _safe_evaluate(self, study_id: str) -> None:
        try:
            self.evaluate(study_id)
        except StudyGone:
            log.info("study %s deleted before it could be routed", study_id)
        except Exception:
            log.exception("routing study %s failed", study_id)

    def _persist(self, last: int) -> None:
        now = time.time()
        for sid, (_, first_seen) in list(self._pending.items()):
            if now - first_seen > PENDING_TTL_S:
                del self._pending[sid]
        # Never move past a series whose study has not been seen stable: after a restart the
        # catch-up must see that series again.
        safe = min([last, *(seq - 1 for seq, _ in self._pending.values())])
        current = self.store.get_kv(SEQ_KEY)
        if current is None or int(current) != safe:
            self.store.set_kv(SEQ_KEY, str(safe))

    def _run_catch_up(self) -> None:
        now = time.time()
        for sid, due in list(self._catch_up.items()):
            if due > now:
                continue
            quiet_since = self._last_update(sid)
            if quiet_since is not None and now - quiet_since < self.catch_up_delay_s:
                # Instances still arrive (a sender resuming after the restart): wait, as
                # Orthanc's own stability timer would.
                self._catch_up[sid] = quiet_since + self.catch_up_delay_s
                continue
            del self._catch_up[sid]
            self._pending.pop(sid, None)
            log.info("catch-up: routing study %s (no stable event after restart)", sid)
            self._safe_evaluate(sid)

    def _last_update(self, study_id: str) -> float | None:
        """When Orthanc last changed the study (its LastUpdate, local time), as a timestamp."""
        try:
            text = str(self.rest_get(f"/studies/{study_id}").get("LastUpdate", ""))
            return time.mktime(time.strptime(text, "%Y%m%dT%H%M%S"))
        except (LookupError, ValueError):
            return None

    def run(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        """Loop until ``stop``: woken by STABLE_STUDY, and polling as a safety net."""
        while not stop.is_set():
            try:
                self.process_changes()
            except Exception:
                log.exception("reading Orthanc's change log failed; will retry")
            due = self.next_due()
            self.wake.wait(poll_s if due is None else min(poll_s, due + 0.05))
            self.wake.clear()
