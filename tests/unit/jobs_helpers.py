"""Typed job records for tests of the job store, metrics and delivery."""

from __future__ import annotations

from orthanc_plugin.core.handoff import InputsInfo, JobInput, JobOutputs, ModelRef, StoredInstance, VolumeInfo

NO_INPUT = JobInput()


def outputs(model: str = "ct_lung", version: str = "1", **stored: str) -> JobOutputs:
    """A succeeded job's outputs; ``stored`` maps an output kind to its SOP Instance UID."""
    return JobOutputs(
        stored={
            k: StoredInstance(sop_instance_uid=uid, series_instance_uid=uid + ".1")
            for k, uid in stored.items()
        },
        model=ModelRef(name=model, version=version),
        volume=VolumeInfo(shape=(30, 512, 512), spacing_mm=(8.0, 0.7, 0.7)),
        inputs=InputsInfo(channels=("ct",), grid=(64, 128, 128)),
    )
