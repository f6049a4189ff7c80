"""How soon a job runs: urgent studies first, routine jobs of a scheduled pipeline in their window.

A pipeline's ``urgent`` rules mark a study urgent (the sender's AE title, a word in the study or
series description, ...): its job gets the urgent priority and is claimed before every routine
job (a running job is never interrupted). A pipeline's ``schedule`` keeps its routine jobs
queued until its daily window opens (off-hours mode); urgent jobs ignore the window.
"""

from __future__ import annotations

import datetime as dt

from orthanc_plugin.core.config import PipelineConfig, Schedule
from orthanc_plugin.intake.routing import OWN_MANUFACTURER, StudyInfo, check_condition


def urgency(pipeline: PipelineConfig, study: StudyInfo) -> str | None:
    """Why the study is urgent for ``pipeline`` (the first rule that holds), or None."""
    if pipeline.urgent is None:
        return None
    for rule in pipeline.urgent.rules:
        held = []
        for keyword, cond in rule.items():
            values = _values(study, keyword)
            matching = [v for v in values if not check_condition(keyword, cond, v)]
            if not matching:
                break
            held.append(f"{keyword} {matching[0]!r}")
        else:
            return "urgent: " + ", ".join(held)
    return None


def _values(study: StudyInfo, keyword: str) -> list[str | None]:
    """The study's value of ``keyword``, else every image series' own (ours left out)."""
    if keyword in study.tags:
        return [study.tags[keyword]]
    values = [s.tags.get(keyword) for s in study.series if s.tags.get("Manufacturer", "") != OWN_MANUFACTURER]
    return values or [None]


def window_opens(schedule: Schedule, now: dt.datetime) -> dt.datetime | None:
    """When the schedule's window next opens, or None when ``now`` (local, aware) is inside it."""
    start, end = (dt.time.fromisoformat(t) for t in schedule.run_between)
    t = now.time().replace(tzinfo=None)
    inside = start <= t < end if start < end else (t >= start or t < end)
    if inside:
        return None
    opens = now.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
    return opens if opens > now else opens + dt.timedelta(days=1)


def plan(pipeline: PipelineConfig, study: StudyInfo, now: dt.datetime) -> tuple[int, float, str | None]:
    """(priority, not before as a Unix time, urgency reason) for a new job of ``pipeline``."""
    reason = urgency(pipeline, study)
    if reason is not None:
        assert pipeline.urgent is not None
        return pipeline.urgent.priority, 0.0, reason
    if pipeline.schedule is not None:
        opens = window_opens(pipeline.schedule, now)
        if opens is not None:
            return pipeline.priority, opens.timestamp(), None
    return pipeline.priority, 0.0, None
