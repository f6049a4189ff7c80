from __future__ import annotations

import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import ConfigError, InputRole, load_pipelines
from orthanc_plugin.intake.routing import SeriesInfo, StudyInfo, route


@pytest.fixture(scope="module")
def ct_lung():
    return {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]


def series(sid: str, n: int = 30, **tags: str) -> SeriesInfo:
    base = {"Modality": "CT", "SeriesDescription": "Chest", "SliceThickness": "8", "SeriesNumber": sid}
    base.update(tags)
    return SeriesInfo(sid, f"1.2.3.{sid}", base, tuple(f"{sid}-{i}" for i in range(n)))


def study(*s: SeriesInfo) -> StudyInfo:
    return StudyInfo("st", "1.2.3", {"StudyDescription": "CT chest"}, tuple(s))


def test_prefers_soft_tissue_kernel_and_says_why(ct_lung):
    d = route(ct_lung, study(series("1", ConvolutionKernel="B70f"), series("2", ConvolutionKernel="B40f")))
    assert d.matched
    assert d.chosen()["ct"].orthanc_id == "2"
    assert "soft-tissue" in d.roles[0].reason and "'B40f'" in d.roles[0].reason


@pytest.mark.parametrize("kernel", ["B30f", "Br40\\2", "STANDARD", "SOFT", "B", "I31f"])
def test_soft_tissue_kernels_recognised(ct_lung, kernel):
    d = route(ct_lung, study(series("1", ConvolutionKernel="B70f"), series("2", ConvolutionKernel=kernel)))
    assert d.chosen()["ct"].orthanc_id == "2"


def test_rejections_name_the_failed_condition(ct_lung):
    d = route(
        ct_lung,
        study(
            series("1", Modality="MR"),
            series("2", n=5),
            series("3", SliceThickness="12"),
            series("4", SeriesDescription="Topogram 0.6 T20s"),
            series("5", Modality="SEG", Manufacturer="orthanc-ai"),
        ),
    )
    assert not d.matched
    assert "required role(s) without a series: ct" in d.reason
    rej = d.roles[0].rejected
    assert any("Modality is 'MR'" in m for m in rej["#1 'Chest'"])
    assert any("ImageCount is 5, below minimum 20" in m for m in rej["#2 'Chest'"])
    assert any("SliceThickness is 12, above maximum 10" in m for m in rej["#3 'Chest'"])
    assert any("excluded by rule on SeriesDescription" in m for m in rej["#4 'Topogram 0.6 T20s'"])
    assert rej["#5 'Chest'"] == ["series was written by orthanc-ai"]


def test_our_outputs_never_selected_even_if_rule_allows(ct_lung):
    d = route(ct_lung, study(series("1", Manufacturer="orthanc-ai")))
    assert not d.matched


def test_tie_fails_by_default_and_names_the_series(ct_lung):
    d = route(ct_lung, study(series("1"), series("2")))
    assert not d.matched
    assert d.roles[0].chosen is None
    assert [s.orthanc_id for s in d.roles[0].ambiguous] == ["1", "2"]
    assert d.problem is not None
    assert "role 'ct' ambiguous: 2 series fit equally well (#1 'Chest', #2 'Chest')" in d.problem
    assert "prefer" in d.problem


def test_tie_first_by_uid_is_deterministic(ct_lung):
    role = ct_lung.inputs[0].model_copy(update={"ambiguous": "first_by_uid"})
    p = ct_lung.model_copy(update={"inputs": [role]})
    a, b = series("2"), series("1")
    da, db = route(p, study(a, b)), route(p, study(b, a))
    assert da.matched and db.matched
    assert da.chosen()["ct"].orthanc_id == db.chosen()["ct"].orthanc_id == "1"
    assert "took the first by SeriesInstanceUID" in da.roles[0].reason


def _two_roles(ct_lung, second_required: bool = True):
    """ct-lung with two roles: 'soft' (B40f) and 'sharp' (B70f), like a two-channel model."""
    soft = InputRole.model_validate(
        {"role": "soft", "where": {"Modality": {"equals": "CT"}, "ConvolutionKernel": {"matches": "^B[1-4]"}}}
    )
    sharp = InputRole.model_validate(
        {"role": "sharp", "required": second_required,
         "where": {"Modality": {"equals": "CT"}, "ConvolutionKernel": {"matches": "^B[5-9]"}}}
    )  # fmt: skip
    return ct_lung.model_copy(update={"inputs": [soft, sharp]})


def test_roles_each_get_their_series(ct_lung):
    d = route(
        _two_roles(ct_lung),
        study(series("1", ConvolutionKernel="B70f"), series("2", ConvolutionKernel="B40f")),
    )
    assert d.matched
    assert {k: v.orthanc_id for k, v in d.chosen().items()} == {"soft": "2", "sharp": "1"}


def test_missing_role_is_a_problem_naming_the_role_and_why(ct_lung):
    d = route(_two_roles(ct_lung), study(series("2", ConvolutionKernel="B40f")))
    assert not d.matched
    assert d.problem is not None
    assert d.problem.startswith("role 'sharp' is missing: no series satisfies the rule")
    assert "ConvolutionKernel is 'B40f', does not match /^B[5-9]/" in d.problem


def test_optional_role_may_be_missing(ct_lung):
    d = route(_two_roles(ct_lung, second_required=False), study(series("2", ConvolutionKernel="B40f")))
    assert d.matched and d.problem is None
    assert set(d.chosen()) == {"soft"}


def test_study_for_another_pipeline_is_no_problem(ct_lung):
    d = route(_two_roles(ct_lung), study(series("1", Modality="MR")))
    assert not d.matched
    assert d.problem is None  # nothing of this pipeline is here: no job, only the dry-run's reason


def test_more_slices_preferred_when_kernels_equal(ct_lung):
    d = route(ct_lung, study(series("1", n=30), series("2", n=64)))
    assert d.chosen()["ct"].orthanc_id == "2"
    assert "most slices" in d.roles[0].reason


def test_disabled_pipeline(ct_lung):
    d = route(ct_lung.model_copy(update={"enabled": False}), study(series("1")))
    assert not d.matched and d.reason == "pipeline is disabled"


def test_invalid_config_names_file_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    text = (ROOT / "config" / "pipelines.yaml").read_text()
    bad.write_text(
        text.replace("ImageCount: {min: 20}", "ImageCount: {min: 20, max: 3}").replace(
            'matches: "(?i)topogram', 'matches: "(?i)[topogram'
        )
    )
    with pytest.raises(ConfigError) as e:
        load_pipelines(bad)
    msg = str(e.value)
    assert str(bad) in msg
    assert "pipelines.0.inputs.0.where.ImageCount" in msg and "greater than max" in msg
    assert "pipelines.0.inputs.0.exclude.SeriesDescription.matches" in msg


def test_unknown_key_rejected(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text((ROOT / "config" / "pipelines.yaml").read_text().replace("priority: 0", "priorty: 0"))
    with pytest.raises(ConfigError, match="pipelines.0.priorty"):
        load_pipelines(bad)
