"""A classifier over radiomics features: configuration, the feature vector, the shipped model."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from pydantic import ValidationError

from devstack.common import ROOT
from orthanc_plugin.core.config import PipelineConfig
from orthanc_plugin.core.results import FeatureValue, SegmentFeatures
from orthanc_plugin.worker.pipeline import BadInput, feature_vector

MODEL_DIR = ROOT / "triton_models" / "lung_radiomics"


def shipped(name: str) -> dict[str, Any]:
    pipelines = yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())["pipelines"]
    (p,) = [p for p in pipelines if p["name"] == name]
    return dict(p)


def build_module() -> Any:
    spec = importlib.util.spec_from_file_location("lung_radiomics_build", MODEL_DIR / "build_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_radiomics_pipeline_is_valid_and_disabled() -> None:
    p = PipelineConfig.model_validate(shipped("ct-lung-radiomics"))
    assert p.enabled is False, "an unvalidated classifier must ship disabled"
    assert p.classify is not None
    assert [(f.segment, f.feature) for f in p.classify.features] == [
        (seg, feat) for seg, feat, *_ in build_module().FEATURES
    ], "the pipeline must feed the features in the order the model was built for"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["classify"]["inputs"]["features"].append({"segment": "right-lung", "feature": "stat.nope"}),
         "unknown radiomics feature 'stat.nope'"),
        (lambda p: p["classify"]["inputs"]["features"].append({"segment": "liver", "feature": "stat.mean"}),
         "no such segment"),
        (lambda p: p["outputs"].pop("radiomics"), "turn on outputs.radiomics"),
        (lambda p: p["classify"]["inputs"].update(features=[]), "feature list is empty"),
        (lambda p: p["classify"]["inputs"].update(features="stat.mean"), "features"),
    ],
)  # fmt: skip
def test_feature_inputs_are_validated(change: Any, message: str) -> None:
    p = shipped("ct-lung-radiomics")
    change(p)
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(p)


def _features(label: int, **values: float) -> SegmentFeatures:
    return SegmentFeatures(label, tuple(FeatureValue(k, k, "1", v) for k, v in values.items()))


def test_feature_vector_follows_the_listed_order_by_tracking_id_or_name() -> None:
    p = PipelineConfig.model_validate(shipped("ct-lung-radiomics"))
    assert p.classify is not None
    from orthanc_plugin.core.config import segment_specs

    present = segment_specs(p)
    feats = [
        _features(1, **{"stat.mean": -850.0, "stat.p90": -700.0}),
        _features(2, **{"stat.mean": -800.0, "stat.p90": -650.0}),
    ]
    vec = feature_vector(p.classify.features, present, feats)
    assert vec.dtype == np.float32 and vec.tolist() == [[-850.0, -800.0, -700.0, -650.0]]
    by_name = [f.model_copy(update={"segment": "Left lung"}) for f in p.classify.features[:1]]
    assert feature_vector(by_name, present, feats).tolist() == [[-800.0]]
    with pytest.raises(BadInput, match="'left-lung', which the model did not find"):
        feature_vector(p.classify.features, present[:1], feats[:1])
    with pytest.raises(BadInput, match="has no value"):
        feature_vector(p.classify.features, present, [feats[0], _features(2, **{"stat.mean": math.nan})])


def test_the_committed_model_is_what_the_build_script_writes() -> None:
    assert (MODEL_DIR / "1" / "model.onnx").read_bytes() == build_module().build(), (
        "triton_models/lung_radiomics/1/model.onnx differs from build_model.py: rerun the script"
    )


def test_the_model_is_the_documented_logistic_regression() -> None:
    build = build_module()
    session = ort.InferenceSession(str(MODEL_DIR / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.uniform(-1000, 0, size=(4, len(build.FEATURES))).astype(np.float32)
    (out,) = session.run(["class_probabilities"], {"features": x})
    logit = sum(w * (x[:, i] - c) / s for i, (_, _, c, s, w) in enumerate(build.FEATURES)) + build.BIAS
    expected = 1 / (1 + np.exp(-logit.astype(np.float64)))
    np.testing.assert_allclose(out[:, 1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    # Aerated lung (about -850 HU mean) scores low; lungs at the centres score one half.
    (low,) = session.run(
        ["class_probabilities"], {"features": np.array([[-850, -850, -700, -700]], np.float32)}
    )
    (mid,) = session.run(
        ["class_probabilities"], {"features": np.array([[-700, -700, -400, -400]], np.float32)}
    )
    assert low[0, 1] < 0.01 and mid[0, 1] == pytest.approx(0.5)
