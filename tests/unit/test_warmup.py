"""A worker warms every shipped pipeline's stages on a synthetic series before its first job."""

from __future__ import annotations

import logging

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import Settings, load_pipelines
from orthanc_plugin.worker import warmup

PIPELINES = load_pipelines(ROOT / "config" / "pipelines.yaml")


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if p.enabled], ids=lambda p: p.name)
def test_every_stage_of_a_shipped_pipeline_runs_on_the_synthetic_series(pipeline, monkeypatch) -> None:
    written: list[str] = []
    real_encode = warmup.encode

    def encode(run, volume, labels, findings, algorithm):  # type: ignore[no-untyped-def]
        encoded = real_encode(run, volume, labels, findings, algorithm)
        written.extend(encoded.datasets)
        return encoded

    monkeypatch.setattr(warmup, "encode", encode)
    warmup.warm_pipeline(pipeline, Settings.model_validate({"PipelinesFile": "x"}), None)
    out = pipeline.outputs
    optional = {"rtstruct": out.rtstruct, "key_images": out.key_images.enabled, "pdf": out.pdf_report}
    expected = {"seg", "sr"} | {kind for kind, on in optional.items() if on}
    assert set(written) == expected


def test_warm_up_never_raises_and_says_what_failed(caplog) -> None:
    broken = PIPELINES[0].model_copy(update={"inputs": []})  # no role: nothing can be prepared
    with caplog.at_level(logging.WARNING, logger="orthanc_ai.worker"):
        seconds = warmup.warm_up([broken], Settings.model_validate({"PipelinesFile": "x"}), None)
    assert seconds >= 0 and f"warm-up of pipeline {broken.name} failed" in caplog.text
