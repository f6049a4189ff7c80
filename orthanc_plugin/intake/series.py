"""When is a series complete? The per-series start's rule, pure logic over Orthanc's answers.

A series is complete when no instance of it arrived for the quiet time (``SeriesQuietSeconds``)
and, where the headers say how many instances it should have, that many are there:

- Orthanc's ``ExpectedNumberOfInstances`` of ``/series/{id}`` (Orthanc derives it from
  ImagesInAcquisition, NumberOfTemporalPositions or CardiacNumberOfImages, where present);
- else ``ImagesInAcquisition`` of the first instance;
- else ``NumberOfTemporalPositions`` x ``NumberOfSlices`` (NM, PET) of the first instance;
- an enhanced multi-frame instance (``NumberOfFrames`` > 1) holds the whole acquisition: one
  instance is the series.

A count the headers do not give is not waited for; a count that is never reached (a sender that
stopped) leaves the series to Orthanc's stable-study event, the safety net.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _positive_int(value: Any) -> int | None:
    try:
        n = int(float(str(value).split("\\")[0].strip()))
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def expected_instances(series: Mapping[str, Any], first_instance: Mapping[str, Any]) -> int | None:
    """How many instances the series should have (the rule above), None when nothing says."""
    frames = _positive_int(first_instance.get("NumberOfFrames"))
    if frames is not None and frames > 1:
        return 1
    for value in (series.get("ExpectedNumberOfInstances"), first_instance.get("ImagesInAcquisition")):
        n = _positive_int(value)
        if n is not None:
            return n
    positions = _positive_int(first_instance.get("NumberOfTemporalPositions"))
    slices = _positive_int(first_instance.get("NumberOfSlices"))
    if positions is not None and slices is not None:
        return positions * slices
    return None


@dataclass
class Feeding:
    """A series that received instances lately: its study and when the last one was seen."""

    study_id: str
    last_seen: float  # time.monotonic()
    checked_count: int = -1  # instances found when its count was last checked short


def is_complete(count: int, expected: int | None) -> bool:
    """A quiet series is complete unless the headers promise more instances than it has."""
    return expected is None or count >= expected
