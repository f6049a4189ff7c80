# SPDX-License-Identifier: AGPL-3.0-or-later
"""Succeeded jobs with acquisitions, volumes and reviews, written through the job store's and the
reviews' own functions (enqueue, claim, succeed; record, claim, applied), for the monitoring tests.

The times are then set on the rows (a job that finished hours ago, reviewed later), because
monitoring orders jobs by when they finished and measures the time to review.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

from orthanc_plugin.core.handoff import (
    AcquisitionInfo,
    InputsInfo,
    JobInput,
    JobOutputs,
    MeasurementOutput,
    ModelRef,
    VolumeInfo,
)
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import JobStore

SIEMENS = AcquisitionInfo(
    manufacturer="SIEMENS", model="SOMATOM Force", kernel="Br40d", slice_thickness_mm=1.0,
    pixel_spacing_mm=0.72, age_band="60-79",
)  # fmt: skip
GE = AcquisitionInfo(
    manufacturer="GE MEDICAL SYSTEMS", model="Revolution CT", kernel="LUNG", slice_thickness_mm=2.5,
    pixel_spacing_mm=0.88, age_band="40-59",
)  # fmt: skip


@dataclass
class Spec:
    """One job to write: its model, acquisition, measured volumes and review (None: unreviewed)."""

    acquisition: AcquisitionInfo | None
    volumes: dict[str, float]
    model: str = "ct_lung"
    version: str = "1"
    decision: str | None = None  # accept, edit, reject
    #: for an applied edit: {segment: (dice, volume_diff_pct)}
    agreement: dict[str, tuple[float, float]] = field(default_factory=dict)
    review_after_s: float = 3600.0


def write_jobs(store: JobStore, reviews: Reviews, specs: list[Spec], start: float | None = None,
               step_s: float = 1800.0, prefix: str = "m") -> list[str]:  # fmt: skip
    """Write ``specs`` as jobs finishing ``step_s`` apart, the first at ``start``; returns their ids."""
    start = time.time() - step_s * (len(specs) + 1) if start is None else start
    ids = []
    for i, spec in enumerate(specs):
        key = f"{prefix}{i}"
        job, _ = store.enqueue(key, f"2.25.{zlib.crc32(key.encode())}", f"study-{key}", "ct-lung", "1.0.0",
                               "fp", JobInput(), max_attempts=1)  # fmt: skip
        claimed = store.claim("w-monitor", lease_s=60)
        assert claimed is not None and claimed.id == job.id
        outputs = JobOutputs(
            measurements=tuple(
                MeasurementOutput(segment=s, label=n + 1, volume_ml=v)
                for n, (s, v) in enumerate(spec.volumes.items())
            ),
            model=ModelRef(name=spec.model, version=spec.version),
            volume=VolumeInfo(shape=(30, 512, 512), spacing_mm=(8.0, 0.7, 0.7)),
            inputs=InputsInfo(channels=("ct",), grid=(64, 128, 128)),
            acquisition=spec.acquisition,
        )
        assert store.succeed(job.id, "w-monitor", outputs, None)
        finished = start + i * step_s
        store._db.execute(
            "UPDATE jobs SET finished=?, started=? WHERE id=?", (finished, finished - 60, job.id)
        )
        if spec.decision is not None:
            reason = "not a usable result" if spec.decision == "reject" else None
            seg = f"2.25.9{i}" if spec.decision == "edit" else None
            review, created = reviews.record(job.id, spec.decision, "dr-test", "api", reason, seg_uid=seg)
            assert created
            store._db.execute(
                "UPDATE reviews SET created=? WHERE id=?", (finished + spec.review_after_s, review.id)
            )
            # applied at once, as a worker would (an edit's result carries the agreement)
            claimed_review = reviews.claim("w-monitor", lease_s=60)
            assert claimed_review is not None and claimed_review.id == review.id
            result: dict[str, object] = {"decision": spec.decision}
            if spec.agreement:
                result["agreement"] = [
                    {"segment": s, "label": n + 1, "dice": d, "volume_diff_pct": pct}
                    for n, (s, (d, pct)) in enumerate(spec.agreement.items())
                ]
            assert reviews.applied(claimed_review, "w-monitor", result, None, None)
        ids.append(job.id)
    return ids
