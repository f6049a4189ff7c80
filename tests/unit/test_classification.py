"""Classification results: configuration (operating point), SR group, FHIR Observation."""

from __future__ import annotations

import datetime as dt
import io
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from numpy.typing import NDArray

from devstack.common import ROOT
from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.config import Classifier, ConfigError, load_pipelines
from orthanc_plugin.core.results import ClassificationResult, OutputUIDs, StudyRef
from orthanc_plugin.fhir.report import build_diagnostic_report
from orthanc_plugin.outputs.sr import build_sr

from .test_seg import ALGORITHM, CREATED, SEGMENTS, run_dciodvfy
from .test_sr import VOLUMES

Array = NDArray[Any]

ABNORMAL = Code("263654008", "SCT", "Abnormal")
LUNG = Code("39607008", "SCT", "Lung")


def result(probability: float, threshold: float = 1 / 3) -> ClassificationResult:
    return ClassificationResult(
        name="Dense lung share",
        tracking_id="dense-lung-share",
        finding=ABNORMAL,
        probability=probability,
        threshold=threshold,
        classes=("normal", "abnormal"),
        probabilities=(1 - probability, probability),
        model_name="lung_attenuation",
        model_version="1",
        finding_site=LUNG,
        validated_for="Not validated for clinical use.",
    )


def classifier(**kw: Any) -> Classifier:
    base: dict[str, Any] = {
        "name": "x",
        "model": {"name": "m", "output": "p"},
        "inputs": {"image": "image"},
        "classes": ["normal", "abnormal"],
        "positive": "abnormal",
        "finding": {"value": "263654008", "scheme": "SCT", "meaning": "Abnormal"},
    }
    return Classifier.model_validate(base | kw)


def test_operating_point_from_costs_is_the_bayes_threshold() -> None:
    assert classifier(costs={"false_negative": 2, "false_positive": 1}).operating_point == pytest.approx(
        1 / 3
    )
    assert classifier(costs={"false_negative": 1, "false_positive": 4}).operating_point == pytest.approx(0.8)
    assert classifier(threshold=0.42).operating_point == 0.42


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "exactly one of 'threshold' or 'costs'"),
        ({"threshold": 0.5, "costs": {"false_negative": 2, "false_positive": 1}}, "exactly one"),
        ({"threshold": 0.5, "positive": "sick"}, "positive class 'sick' is not one of classes"),
        ({"threshold": 1.5}, "less than 1"),
    ],
)
def test_classifier_configuration_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classifier(**kw)


def test_pipeline_file_errors_name_the_key(tmp_path: Path) -> None:
    text = (
        (ROOT / "config" / "pipelines.yaml")
        .read_text()
        .replace("costs: {false_negative: 2, false_positive: 1}", "")
    )
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=r"key 'pipelines\.2\.classify'.*exactly one of 'threshold' or 'costs'"
    ):
        load_pipelines(path)


def test_result_decides_at_the_threshold() -> None:
    assert result(0.34).positive and not result(0.33).positive
    assert result(1 / 3).positive  # at the operating point counts as positive
    with pytest.raises(ValueError, match="probability must be a number in"):
        result(1.2)


def _content(sr: pydicom.Dataset) -> dict[str, Any]:
    found: dict[str, Any] = {"num": {}, "code": {}}

    def walk(items: Any) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if it.ValueType == "NUM":
                found["num"][name] = float(it.MeasuredValueSequence[0].NumericValue)
            elif it.ValueType == "CODE":
                found["code"].setdefault(name, []).append(it.ConceptCodeSequence[0].CodeMeaning)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    return found


def _groups(sr: pydicom.Dataset) -> list[Any]:
    (measurements,) = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [it for it in measurements.ContentSequence if it.ValueType == "CONTAINER"]


def _tracking_id(group: Any) -> str:
    return next(
        str(it.TextValue)
        for it in group.ContentSequence
        if it.ConceptNameCodeSequence[0].CodeValue == "112039"
    )


@pytest.mark.parametrize(("probability", "value"), [(0.55, "Present"), (0.17, "Absent")])
def test_sr_carries_finding_probability_and_threshold(
    ct: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    labels: Array,
    tmp_path: Path,
    probability: float,
    value: str,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = build_sr(
            ct, seg, SEGMENTS, VOLUMES, ALGORITHM,
            series_instance_uid="2.25.3000", sop_instance_uid="2.25.3001", series_number=903,
            series_description="AI report", labels=labels, content_creation=CREATED,
            classifications=[result(probability)],
        )  # fmt: skip
    found = _content(sr)
    assert found["num"]["Probability"] == pytest.approx(probability)
    assert found["num"]["Threshold Value"] == pytest.approx(0.3333)
    assert value in found["code"]["Abnormal"]
    assert "Lung" in found["code"]["Finding Site"]
    # OHIF places each measurement group on its image region and crashes on a group without one.
    (group,) = [g for g in _groups(sr) if _tracking_id(g) == "dense-lung-share"]
    (region,) = [it for it in group.ContentSequence if it.ValueType == "SCOORD"]
    assert region.GraphicType == "POLYLINE" and len(region.GraphicData) == 10  # closed rectangle
    ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert ref in {str(ds.SOPInstanceUID) for ds in ct}
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    parsed = hd.sr.srread(buffer)  # highdicom reads it back as a TID 1500 report
    assert parsed.ContentSequence and parsed.ConceptNameCodeSequence[0].CodeValue == "126000"
    run_dciodvfy(sr, tmp_path)


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
@pytest.mark.parametrize(
    ("probability", "code", "value"), [(0.55, "POS", "Present"), (0.17, "NEG", "Absent")]
)
def test_fhir_observation_has_interpretation_and_components(
    fhir_version: str, probability: float, code: str, value: str
) -> None:
    study = StudyRef("1.2.3.4", patient_id="p1", study_date=dt.date(2024, 1, 2))
    ids = OutputUIDs("2.25.1", "2.25.2", "2.25.3", "2.25.4", key="k" * 16)
    bundle = build_diagnostic_report(
        study, SEGMENTS, VOLUMES, ALGORITHM, ids=ids, issued=dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
        fhir_version=fhir_version, classifications=[result(probability)],
    )  # fmt: skip
    resources = [e["resource"] for e in bundle["entry"]]
    (obs,) = [
        r for r in resources if r["resourceType"] == "Observation" and r["code"]["text"] == "Dense lung share"
    ]
    assert obs["code"]["coding"][0]["code"] == "263654008"
    assert obs["interpretation"][0]["coding"][0]["code"] == code
    assert obs["valueCodeableConcept"]["coding"][0]["display"] == value
    comps = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in obs["component"]}
    assert comps == {"122157": pytest.approx(probability), "122411": pytest.approx(0.3333)}
    assert obs["note"][0]["text"] == "Not validated for clinical use."
    (report,) = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    assert any(ref["display"] == "Dense lung share" for ref in report["result"])
    assert f"{value.lower()} (probability {probability:.2f}, threshold 0.33)" in report["text"]["div"]
