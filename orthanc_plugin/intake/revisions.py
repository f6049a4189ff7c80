"""Recognising a SEG that revises ours: a reviewer's edit, stored from the viewer.

The rule (docs/review.md): a SEG instance revises the SEG of job J when

1. it is in J's study and J has succeeded;
2. it is not ours: its Manufacturer is not ``orthanc-ai`` and its SOP Instance UID is not one
   of J's outputs;
3. its ReferencedSeriesSequence names a series J read (the source series of our SEG);
4. at least one of its segments' SegmentLabel is one of J's pipeline's segment names (case
   and spaces ignored).

Such a SEG never starts an inference job (routing never takes SEG series as input) and is
recorded once per job as an ``edit`` review (by its SOP Instance UID), however often it is
stored. The reviewer is the Orthanc user who stored it: Orthanc's ``HttpUsername`` metadata
(REST uploads), else the user the plugin noted for a STOW-RS (:func:`stored_by_key` in the job
store's key-value table, written by ``server.stow_users``); only when neither is known, the
SEG's ContentCreatorName.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orthanc_plugin.core.config import PipelineConfig
from orthanc_plugin.intake.routing import OWN_MANUFACTURER
from orthanc_plugin.jobs.store import Job


@dataclass(frozen=True)
class Revision:
    job: Job
    seg_uid: str
    seg_id: str


def stored_by_key(instance_id: str) -> str:
    """The job store key under which the user who stored an instance by STOW-RS is kept."""
    return f"stored-by:{instance_id}"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def revised_job(
    tags: Mapping[str, Any], instance_id: str, jobs: Sequence[Job], pipelines: Mapping[str, PipelineConfig]
) -> Revision | None:
    """The job whose SEG the instance with simplified ``tags`` revises, else None (the rule above)."""
    if str(tags.get("Modality", "")).upper() != "SEG" or tags.get("Manufacturer") == OWN_MANUFACTURER:
        return None
    uid = str(tags.get("SOPInstanceUID", ""))
    referenced = {str(s.get("SeriesInstanceUID", "")) for s in tags.get("ReferencedSeriesSequence") or []}
    labels = {_norm(str(s.get("SegmentLabel", ""))) for s in tags.get("SegmentSequence") or []}
    # The newest succeeded job first: a study processed again is revised against its latest result.
    for job in sorted(jobs, key=lambda j: j.finished or 0, reverse=True):
        if job.state != "succeeded" or job.outputs is None:
            continue
        if uid in {s.sop_instance_uid for _, s in job.outputs.instances()}:
            return None
        if not referenced & {r.series_uid for r in job.input.roles.values()}:
            continue
        pipeline = pipelines.get(job.pipeline)
        if pipeline is None or not labels & {_norm(s.name) for s in pipeline.segments}:
            continue
        return Revision(job, uid, instance_id)
    return None
