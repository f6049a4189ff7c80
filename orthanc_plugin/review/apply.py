"""Apply one recorded review: the verified SR, for an edit the new values and the agreement,
the FHIR update, the study label.

Everything written derives from (job, review number): the SR's SOP Instance UID from the job
key and ``n``, the FHIR resources from the job's own identifiers. Applying a review twice (a
worker died before recording it) stores the same SR again (Orthanc overwrites) and queues the
same update.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from orthanc_plugin.core.config import PipelineConfig, Settings, segment_specs
from orthanc_plugin.core.results import AlgorithmInfo, VolumeMeasurement
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.fhir.review import review_bundle
from orthanc_plugin.imaging.agreement import agreement
from orthanc_plugin.imaging.postprocess import volumes_ml
from orthanc_plugin.imaging.volume import build_volume
from orthanc_plugin.jobs.reviews import Review, Reviews
from orthanc_plugin.jobs.store import Job, JobStore
from orthanc_plugin.orthanc_rest.client import OrthancClient
from orthanc_plugin.orthanc_rest.labels import label_review
from orthanc_plugin.outputs.seg_read import label_map, segment_labels
from orthanc_plugin.outputs.sr import build_sr
from orthanc_plugin.outputs.sr_review import verified_sr

log = logging.getLogger("orthanc_ai.review")


class ReviewProblem(ValueError):
    """The review cannot be applied as it is (retrying will not help); the message says why."""


@dataclass
class ReviewContext:
    settings: Settings
    pipelines: dict[str, PipelineConfig]
    store: JobStore
    reviews: Reviews
    orthanc: OrthancClient


def review_sr_uid(job: Job, n: int) -> str:
    """The SOP Instance UID of the SR that review ``n`` of ``job`` stores."""
    return derived_uid(job.key, f"review-sr-{n}")


def apply_review(ctx: ReviewContext, review: Review) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Store the verified SR; returns (the result to record, the FHIR update or None)."""
    job = ctx.store.get(review.job_id)
    if job.outputs is None or "sr" not in job.outputs.stored:
        raise ReviewProblem(f"job {job.id} has no SR to verify")
    sr_ref = job.outputs.one("sr")
    if sr_ref is None or not sr_ref.orthanc_id:
        raise ReviewProblem(f"job {job.id}: the SR's Orthanc id is not known")
    (ai_sr,) = ctx.orthanc.read_instances([sr_ref.orthanc_id])
    predecessors = [ai_sr]
    previous = ctx.reviews.latest_applied(job.id, before=review.n)
    if previous is not None and previous.result and previous.result.get("sr", {}).get("ID"):
        predecessors += ctx.orthanc.read_instances([previous.result["sr"]["ID"]])
    when = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {"decision": review.decision, "reviewer": review.reviewer}
    volumes_by_name: dict[str, float] | None = None
    document = ai_sr
    if review.decision == "edit":
        document, edit = _edited_document(ctx, job, review, ai_sr)
        result["agreement"] = edit["agreement"]
        result["measurements"] = edit["measurements"]
        volumes_by_name = {f"{m['segment']} volume": m["volume_ml"] for m in edit["measurements"]}
    comment = None
    if review.decision == "reject":
        comment = (
            f"AI result rejected by {review.reviewer}: {review.reason}. The AI segmentation and "
            "measurements in this study must not be used."
        )
    sr = verified_sr(
        document, predecessors, review.reviewer, ctx.settings.reviewer_organization, when,
        review_sr_uid(job, review.n), instance_number=review.n + 1, comment=comment,
    )  # fmt: skip
    stored = ctx.orthanc.store(sr)
    result["sr"] = {
        "SOPInstanceUID": str(sr.SOPInstanceUID),
        "SeriesInstanceUID": str(sr.SeriesInstanceUID),
        "ID": stored.get("ID"),
        "predecessors": [str(p.SOPInstanceUID) for p in predecessors],
    }
    result["labelled"] = label_review(ctx.orthanc, job.orthanc_study_id, review.decision)
    fhir = None
    if job.fhir is not None:
        fhir = review_bundle(
            job.fhir, review.decision, review.reviewer, when, review.reason, volumes_by_name,
            ctx.settings.fhir_version,
        )  # fmt: skip
    return result, fhir


def _edited_document(
    ctx: ReviewContext, job: Job, review: Review, ai_sr: Dataset
) -> tuple[Dataset, dict[str, Any]]:
    """The SR built on the revised SEG, and the edit's measurements and agreement."""
    pipeline = ctx.pipelines.get(job.pipeline)
    if pipeline is None:
        raise ReviewProblem(f"pipeline '{job.pipeline}' is not configured on this worker")
    assert job.outputs is not None
    if not review.seg_id:
        raise ReviewProblem("the edit does not name the revised SEG's Orthanc id")
    seg_ref = job.outputs.one("seg")
    if seg_ref is None or not seg_ref.orthanc_id:
        raise ReviewProblem(f"job {job.id} has no SEG to compare the edit with")
    ai_seg, revised = ctx.orthanc.read_instances([seg_ref.orthanc_id, review.seg_id])
    referenced = {str(s.SeriesInstanceUID) for s in ai_seg.get("ReferencedSeriesSequence", [])}
    roles = [r for r in job.input.roles.values() if r.series_uid in referenced]
    if not roles:
        raise ReviewProblem("the job's SEG references none of the job's input series")
    sources = ctx.orthanc.read_instances(list(roles[0].instances))
    volume = build_volume(sources, ctx.orthanc.pixels)
    uids = [str(d.SOPInstanceUID) for d in volume.datasets]
    specs = segment_specs(pipeline)
    by_name = {s.name: s.label for s in specs}
    ai_labels = label_map(ai_seg, uids, segment_labels(ai_seg, by_name))
    mapping = segment_labels(revised, by_name)
    if not mapping:
        raise ReviewProblem("the revised SEG has none of the pipeline's segments (by SegmentLabel)")
    try:
        edited = label_map(revised, uids, mapping)
    except ValueError as e:
        raise ReviewProblem(f"the revised SEG cannot be read on the job's slices: {e}") from None
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        # A SEG that breaks the standard where the reader relies on it: OHIF 3.13's default
        # LABELMAP SEG leaves out the per-frame FrameContentSequence (viewer/app-config.js
        # makes OHIF store BINARY SEGs, which carry it).
        sop_class = str(revised.get("SOPClassUID", "?"))
        raise ReviewProblem(
            f"the revised SEG (SOP class {sop_class}) is not a SEG the plugin can read: "
            f"{type(e).__name__}: {e}; store it as a BINARY SEG"
        ) from None
    vv = volume.voxel_volume_ml
    ai_present = [s for s in specs if (ai_labels == s.label).any()]
    agreements = agreement(ai_labels, edited, [s.label for s in ai_present], vv)
    vols = volumes_ml(edited, [s.label for s in specs], vv)
    present = [s for s in specs if vols[s.label] > 0]
    if not present:
        raise ReviewProblem("the revised SEG is empty: reject the result instead of erasing it")
    measurements = [VolumeMeasurement(s.label, round(vols[s.label], 2)) for s in present]
    model = job.outputs.model
    algorithm = AlgorithmInfo(
        name=pipeline.algorithm_name,
        version=pipeline.version,
        model_name=model.name,
        model_version=model.version,
    )
    sr = build_sr(
        list(volume.datasets), _with_tracking(revised, ai_seg, mapping), present, measurements, algorithm,
        series_instance_uid=str(ai_sr.SeriesInstanceUID), sop_instance_uid=review_sr_uid(job, review.n),
        series_number=int(ai_sr.get("SeriesNumber", 1)), series_description=str(ai_sr.get("SeriesDescription", "")),
        labels=edited,
    )  # fmt: skip
    names = {s.label: s.name for s in specs}
    return sr, {
        "agreement": [a.to_json() | {"segment": names[a.label]} for a in agreements],
        "measurements": [
            {"segment": names[m.segment_label], "label": m.segment_label, "volume_ml": m.volume_ml}
            for m in measurements
        ],
    }


def _with_tracking(revised: Dataset, ai_seg: Dataset, mapping: dict[int, int]) -> Dataset:
    """The revised SEG with our TrackingID/TrackingUID on its segments (the SR groups are tied
    to them; a viewer's export usually has none). Only the SR sees this copy."""
    ours = {}
    for item in ai_seg.SegmentSequence:
        ours[_norm(str(item.get("SegmentLabel", "")))] = item
    out = copy.copy(revised)
    segments = copy.deepcopy(revised.SegmentSequence)
    for item in segments:
        mine = ours.get(_norm(str(item.get("SegmentLabel", ""))))
        if int(item.SegmentNumber) in mapping and mine is not None:
            item.TrackingID = mine.TrackingID
            item.TrackingUID = item.get("TrackingUID") or derived_uid(
                str(revised.SOPInstanceUID), mine.TrackingID
            )
        else:
            item.TrackingID = item.get("TrackingID") or str(item.get("SegmentLabel", item.SegmentNumber))
            item.TrackingUID = item.get("TrackingUID") or derived_uid(
                str(revised.SOPInstanceUID), str(item.SegmentNumber)
            )
    out.SegmentSequence = segments
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
