# SPDX-License-Identifier: AGPL-3.0-or-later
"""Per model name and version: what reviewers decided, how fast, how much edits changed, and
whether the inputs or outputs of recent jobs drift from a reference window.

Built on request from the job store (succeeded jobs, their ``JobOutputs``) and the latest review
of each job (``Reviews.all_latest``). Windows are counted in jobs of one model version, in
the order they finished: the **reference** window is the version's first ``reference`` jobs,
the **recent** window its last ``recent`` jobs; with fewer jobs than both windows need, the
reference takes the older half and the recent window the rest, so they never overlap.

Nothing about a patient is returned: categories of scanners and age bands, volumes, times.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orthanc_plugin.core.handoff import AcquisitionInfo, HandoffError, JobOutputs
from orthanc_plugin.jobs.reviews import Review, Reviews
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.monitoring.drift import Drift, categorical_drift, numeric_drift, worst

REFERENCE_JOBS = 200
RECENT_JOBS = 50
#: jobs read at most, the most recently finished
MAX_JOBS = 20_000
#: the input attributes compared, in the order shown
INPUT_ATTRIBUTES = ("manufacturer", "model", "kernel", "slice_thickness", "pixel_spacing", "age_band")
UNKNOWN = "unknown"
HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class JobRecord:
    """What monitoring needs of one succeeded job."""

    id: str
    finished: float
    model: str
    version: str
    acquisition: AcquisitionInfo | None
    #: {segment name: volume in mL}
    volumes: dict[str, float]
    review: Review | None = None


@dataclass
class _Version:
    records: list[JobRecord] = field(default_factory=list)


def input_categories(a: AcquisitionInfo | None) -> dict[str, str]:
    """The category of each monitored input attribute (``unknown`` where not recorded)."""
    if a is None:
        return dict.fromkeys(INPUT_ATTRIBUTES, UNKNOWN)

    def spacing(v: float | None) -> str:
        if v is None:
            return UNKNOWN
        low = math.floor(v * 10) / 10  # 0.1 mm bins: spacing follows the field of view
        return f"{low:.1f}-{low + 0.1:.1f} mm"

    return {
        "manufacturer": a.manufacturer or UNKNOWN,
        "model": a.model or UNKNOWN,
        "kernel": a.kernel or UNKNOWN,
        "slice_thickness": UNKNOWN
        if a.slice_thickness_mm is None
        else f"{round(a.slice_thickness_mm, 2):g} mm",
        "pixel_spacing": spacing(a.pixel_spacing_mm),
        "age_band": a.age_band or UNKNOWN,
    }


def load_records(store: JobStore, reviews: Reviews, limit: int = MAX_JOBS) -> list[JobRecord]:
    """Succeeded jobs, oldest finished first, with their latest review."""
    rows = store._db.execute(
        "SELECT id, finished, outputs FROM jobs WHERE state='succeeded' AND finished IS NOT NULL"
        " ORDER BY finished DESC LIMIT ?",
        (limit,),
    ).fetchall()
    latest = reviews.all_latest()
    out = []
    for r in reversed(rows):
        try:
            outputs = JobOutputs.from_json(json.loads(r["outputs"] or "{}"))
        except (HandoffError, ValueError):
            continue  # a record of another release: the API shows it, monitoring leaves it out
        out.append(
            JobRecord(
                id=r["id"], finished=float(r["finished"]), model=outputs.model.name,
                version=outputs.model.version, acquisition=outputs.acquisition,
                volumes={m.segment: m.volume_ml for m in outputs.measurements},
                review=latest.get(r["id"]),
            )
        )  # fmt: skip
    return out


def windows(
    records: Sequence[JobRecord], reference: int, recent: int
) -> tuple[list[JobRecord], list[JobRecord]]:
    """(reference window, recent window) of one version's records, oldest first (module docstring)."""
    n = len(records)
    ref_n = min(reference, n // 2) if n < reference + recent else reference
    rec_n = min(recent, n - ref_n)
    return list(records[:ref_n]), list(records[n - rec_n :]) if rec_n else []


def histogram(values: Sequence[float], edges: Sequence[float] | None = None) -> dict[str, list[float]]:
    """{"edges": [...], "counts": [...]}; edges spread over the values when not given."""
    if edges is None:
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        step = (hi - lo) / HISTOGRAM_BINS
        edges = [round(lo + i * step, 6) for i in range(HISTOGRAM_BINS + 1)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        i = next((k for k in range(len(counts)) if v < edges[k + 1]), len(counts) - 1)
        if edges[0] <= v <= edges[-1]:
            counts[i] += 1
    return {"edges": list(edges), "counts": [float(c) for c in counts]}


def summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)

    def q(p: float) -> float | None:
        return None if not ordered else ordered[min(len(ordered), max(1, math.ceil(p * len(ordered)))) - 1]

    return {
        "n": len(ordered),
        "median": q(0.5),
        "p90": q(0.9),
        "min": ordered[0] if ordered else None,
        "max": ordered[-1] if ordered else None,
        "histogram": histogram(ordered),
    }


def _drift_json(d: Drift) -> dict[str, Any]:
    return {
        "test": d.test,
        "statistic": round(d.statistic, 6),
        "p_value": None if d.p_value is None else round(d.p_value, 6),
        "state": d.state,
        "reference_n": d.reference_n,
        "recent_n": d.recent_n,
    }


@dataclass(frozen=True)
class ReviewValues:
    """The raw values behind a version's review statistics."""

    counts: dict[str, int]
    review_seconds: list[float]
    edit_dice: list[float]
    edit_volume_diff_pct: list[float]


def review_values(records: Iterable[JobRecord]) -> ReviewValues:
    """Counts by latest review (``unreviewed`` without one), seconds from a job's end to its latest
    review, and each edited segment's Dice and volume change (from applied edits)."""
    v = ReviewValues({"accepted": 0, "edited": 0, "rejected": 0, "unreviewed": 0}, [], [], [])
    for r in records:
        if r.review is None:
            v.counts["unreviewed"] += 1
            continue
        v.counts[r.review.review_state] += 1
        v.review_seconds.append(max(0.0, r.review.created - r.finished))
        if r.review.decision == "edit" and r.review.result:
            for a in r.review.result.get("agreement") or []:
                if isinstance(a.get("dice"), (int, float)):
                    v.edit_dice.append(float(a["dice"]))
                if isinstance(a.get("volume_diff_pct"), (int, float)):
                    v.edit_volume_diff_pct.append(float(a["volume_diff_pct"]))
    return v


def review_stats(records: Iterable[JobRecord]) -> dict[str, Any]:
    v = review_values(records)
    return {
        "counts": v.counts,
        "review_seconds": summary(v.review_seconds),
        "edit_dice": summary(v.edit_dice),
        "edit_volume_diff_pct": summary(v.edit_volume_diff_pct),
    }


def drift_report(records: Sequence[JobRecord], reference: int, recent: int) -> dict[str, Any]:
    ref, rec = windows(records, reference, recent)
    ref_cat = [input_categories(r.acquisition) for r in ref]
    rec_cat = [input_categories(r.acquisition) for r in rec]
    inputs = []
    for attr in INPUT_ATTRIBUTES:
        d, a, b = categorical_drift([c[attr] for c in ref_cat], [c[attr] for c in rec_cat])
        categories = sorted(set(a) | set(b))
        inputs.append(
            {"attribute": attr, **_drift_json(d), "categories": categories,
             "reference": [a.get(c, 0) for c in categories], "recent": [b.get(c, 0) for c in categories]}
        )  # fmt: skip
    outputs = []
    for name in sorted({s for r in records for s in r.volumes}):
        a_v = [r.volumes[name] for r in ref if name in r.volumes]
        b_v = [r.volumes[name] for r in rec if name in r.volumes]
        d = numeric_drift(a_v, b_v)
        both = a_v + b_v
        edges = histogram(both)["edges"] if both else None
        outputs.append(
            {"measurement": f"{name} volume_ml", "segment": name, **_drift_json(d),
             "reference": histogram(a_v, edges), "recent": histogram(b_v, edges)}
        )  # fmt: skip
    states = [x["state"] for x in inputs + outputs]
    return {
        "windows": {
            "reference": {
                "jobs": len(ref),
                "from": ref[0].finished if ref else None,
                "to": ref[-1].finished if ref else None,
            },
            "recent": {
                "jobs": len(rec),
                "from": rec[0].finished if rec else None,
                "to": rec[-1].finished if rec else None,
            },
        },  # fmt: skip
        "input_drift": inputs,
        "output_drift": outputs,
        "state": worst(states),
        "alert": "alert" in states,
    }


def by_version(
    records: Iterable[JobRecord], model: str | None = None
) -> dict[tuple[str, str], list[JobRecord]]:
    out: dict[tuple[str, str], list[JobRecord]] = defaultdict(list)
    for r in records:
        if model is None or r.model == model:
            out[(r.model, r.version)].append(r)
    return dict(sorted(out.items()))


def model_report(
    records: Sequence[JobRecord], model: str, reference: int = REFERENCE_JOBS, recent: int = RECENT_JOBS
) -> dict[str, Any]:
    """The monitoring of one model, one entry per version (empty ``versions`` when it has no jobs)."""
    versions = []
    for (_, version), recs in by_version(records, model).items():
        versions.append(
            {
                "version": version,
                "jobs": len(recs),
                **review_stats(recs),
                "drift": drift_report(recs, reference, recent),
            }
        )
    return {
        "model": model,
        "windows": {"reference_jobs": reference, "recent_jobs": recent},
        "versions": versions,
        "alert": any(v["drift"]["alert"] for v in versions),
    }


def models_summary(records: Sequence[JobRecord]) -> list[dict[str, Any]]:
    """Every model seen in succeeded jobs, with its versions and job counts."""
    names: dict[str, dict[str, int]] = defaultdict(dict)
    for (model, version), recs in by_version(records).items():
        names[model][version] = len(recs)
    return [{"model": m, "versions": v} for m, v in sorted(names.items())]
