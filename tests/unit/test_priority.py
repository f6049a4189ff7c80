"""Urgent studies first, routine jobs of a scheduled pipeline in their window (intake/priority.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import ConfigError, Schedule, Urgency, load_pipelines
from orthanc_plugin.intake.priority import plan, urgency, window_opens
from orthanc_plugin.intake.routing import SeriesInfo, StudyInfo
from orthanc_plugin.jobs.store import JobStore

from .jobs_helpers import NO_INPUT

SHIPPED = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}
CT_LUNG = SHIPPED["ct-lung"]
URGENT = CT_LUNG.model_copy(
    update={
        "urgent": Urgency.model_validate(
            {
                "rules": [
                    {"CallingAETitle": {"matches": "^ER"}},
                    {"SeriesDescription": {"matches": "(?i)trauma"}},
                ],
                "priority": 50,
            }
        )
    }
)


def study(aet: str = "CT1", description: str = "Thorax") -> StudyInfo:
    series = SeriesInfo("s1", "1.2.3.1", {"SeriesDescription": description, "Modality": "CT"}, ("i1",))
    return StudyInfo("st1", "1.2.3", {"CallingAETitle": aet, "StudyDescription": "CT chest"}, (series,))


def test_a_rule_on_the_sender_or_a_series_makes_the_study_urgent() -> None:
    assert urgency(URGENT, study(aet="ER_CT2")) == "urgent: CallingAETitle 'ER_CT2'"
    assert urgency(URGENT, study(description="TRAUMA spiral")) == "urgent: SeriesDescription 'TRAUMA spiral'"
    assert urgency(URGENT, study()) is None
    assert urgency(CT_LUNG, study(aet="ER_CT2")) is None  # no rules: never urgent


def test_urgent_jobs_are_claimed_before_routine_ones(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    now = dt.datetime(2026, 3, 2, 10, 0).astimezone()
    for key, s in (("routine-1", study()), ("routine-2", study()), ("urgent", study(aet="ER1"))):
        priority, not_before, _ = plan(URGENT, s, now)
        store.enqueue(
            key,
            "1.2." + str(len(key)),
            "oid",
            "ct-lung",
            "1",
            "fp",
            NO_INPUT,
            priority=priority,
            not_before=not_before,
        )
    first = store.claim("w1", 30)
    assert first is not None and first.key == "urgent" and first.priority == 50


@pytest.mark.parametrize(
    ("window", "clock", "opens"),
    [
        (("19:00", "07:00"), "18:30", "19:00"),  # before the night window: waits until it opens
        (("19:00", "07:00"), "23:10", None),  # inside, before midnight
        (("19:00", "07:00"), "06:59", None),  # inside, after midnight
        (("19:00", "07:00"), "07:00", "19:00"),  # the window just closed
        (("12:00", "13:00"), "13:30", "12:00+1"),  # after today's window: tomorrow's
    ],
)
def test_a_routine_job_waits_for_its_window(window: tuple[str, str], clock: str, opens: str | None) -> None:
    day = dt.datetime(2026, 3, 2).astimezone()
    hour, minute = map(int, clock.split(":"))
    now = day.replace(hour=hour, minute=minute)
    got = window_opens(Schedule(run_between=window), now)
    if opens is None:
        assert got is None
    else:
        days = 1 if opens.endswith("+1") else 0
        h, m = map(int, opens.removesuffix("+1").split(":"))
        assert got == day.replace(hour=h, minute=m) + dt.timedelta(days=days)


def test_urgent_jobs_ignore_the_window(tmp_path) -> None:
    scheduled = URGENT.model_copy(update={"schedule": Schedule(run_between=("19:00", "07:00"))})
    noon = dt.datetime(2026, 3, 2, 12, 0).astimezone()
    assert plan(scheduled, study(), noon)[1] == dt.datetime(2026, 3, 2, 19, 0).astimezone().timestamp()
    assert plan(scheduled, study(aet="ER1"), noon) == (50, 0.0, "urgent: CallingAETitle 'ER1'")


@pytest.mark.parametrize("window", [("7:00", "19:00"), ("19:00", "19:00"), ("25:00", "07:00")])
def test_a_bad_window_is_refused_naming_the_problem(window: tuple[str, str], tmp_path) -> None:
    text = (
        (ROOT / "config" / "pipelines.yaml")
        .read_text()
        .replace(
            "  - name: ct-lung\n",
            f'  - name: ct-lung\n    schedule: {{run_between: ["{window[0]}", "{window[1]}"]}}\n',
            1,
        )
    )
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="run_between"):
        load_pipelines(path)
