"""Identifiers derived from a job's idempotency key, so a retry replaces instead of duplicating."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

from orthanc_plugin.core.results import OutputUIDs


def fingerprint(instance_ids: Iterable[str]) -> str:
    """Order-independent digest of the input instances (Orthanc ids hash the DICOM UIDs)."""
    h = hashlib.sha256()
    for i in sorted(set(instance_ids)):
        h.update(i.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def job_key(study_instance_uid: str, pipeline: str, pipeline_version: str, input_fingerprint: str) -> str:
    """The idempotency key of a job: study + pipeline + pipeline version + input fingerprint."""
    for name, v in (("study", study_instance_uid), ("pipeline", pipeline), ("version", pipeline_version)):
        if not v or "|" in v:
            raise ValueError(f"job_key: {name} must be non-empty and contain no '|', got {v!r}")
    return f"{study_instance_uid}|{pipeline}|{pipeline_version}|{input_fingerprint}"


#: Characters in a job id.
JOB_ID_LENGTH = 20


def job_id(key: str) -> str:
    """Short stable id for URLs and logs (no patient data in it)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:JOB_ID_LENGTH]


def derived_uid(key: str, purpose: str) -> str:
    """A DICOM UID (2.25 form: a 128-bit integer, PS3.5 B.2) that is a pure function of key and purpose.

    Not pydicom's ``generate_uid(prefix=None)``: that ignores its entropy sources and is random.
    """
    digest = hashlib.sha256(f"orthanc-ai|{key}|{purpose}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def derived_uuid(key: str, purpose: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"orthanc-ai:{key}:{purpose}"))


def output_uids(key: str) -> OutputUIDs:
    return OutputUIDs(
        seg_series=derived_uid(key, "seg-series"),
        seg_instance=derived_uid(key, "seg-instance"),
        sr_series=derived_uid(key, "sr-series"),
        sr_instance=derived_uid(key, "sr-instance"),
        key=job_id(key),  # hashed: the raw key holds the StudyInstanceUID
    )


def key_image_uids(key: str, count: int) -> tuple[str, list[str]]:
    """(series UID, one SOP Instance UID per key image) of a job's key images."""
    return derived_uid(key, "key-images-series"), [derived_uid(key, f"key-image-{i}") for i in range(count)]


def pdf_uids(key: str) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of a job's Encapsulated PDF summary."""
    return derived_uid(key, "pdf-series"), derived_uid(key, "pdf-instance")


def message_control_id(key: str) -> str:
    """HL7 MSH-10 of a job's ORU (ST, at most 20 characters): the same for every send of one result,
    so a receiver that drops repeated control ids never files it twice."""
    return job_id(key)
