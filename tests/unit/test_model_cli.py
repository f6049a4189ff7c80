# SPDX-License-Identifier: AGPL-3.0-or-later
"""``python -m orthanc_plugin model add|list``: config.pbtxt, versions, refusals, pipeline stub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.small_models import conv_segmentation_onnx
from orthanc_plugin.__main__ import main
from orthanc_plugin.core.config import ConfigError, load_pipelines
from orthanc_plugin.models.cli import (
    TODO,
    ModelCliError,
    TritonTensor,
    add_model,
    list_models,
    read_config,
)
from orthanc_plugin.models.onnx_proto import model as _model
from orthanc_plugin.models.onnx_proto import node as _node
from orthanc_plugin.models.onnx_proto import value_info as _value_info


def _onnx(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def seg_onnx(tmp_path: Path) -> Path:
    """[batch, 1, 8, 16, 16] float32 -> [batch, 3, 8, 16, 16] probabilities."""
    return _onnx(tmp_path, "seg.onnx", conv_segmentation_onnx([8, 16, 16]))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def _identity(shape: list[int | str], elem_type: int = 1, names: tuple[str, str] = ("x", "y")) -> bytes:
    return _model(
        [_node("Identity", [names[0]], [names[1]])],
        inputs=[_value_info(names[0], elem_type, shape)],
        outputs=[_value_info(names[1], elem_type, shape)],
        initializers=[],
    )


def test_config_pbtxt_from_the_onnx(seg_onnx: Path, repo: Path) -> None:
    added = add_model(seg_onnx, "my_seg", repository=repo)
    assert added.version == 1 and added.config_written and added.max_batch_size == 4
    assert added.model_file == repo / "my_seg" / "1" / "model.onnx"
    assert added.model_file.read_bytes() == seg_onnx.read_bytes()
    text = (repo / "my_seg" / "config.pbtxt").read_text()
    assert 'name: "my_seg"' in text and 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 4" in text and "dynamic_batching { }" in text
    # No instance_group: Triton chooses the GPU where there is one.
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any("instance_group" in line or "KIND_" in line for line in settings)
    platform, mbs, inputs, outputs = read_config(repo / "my_seg" / "config.pbtxt")
    assert (platform, mbs) == ("onnxruntime_onnx", 4)
    assert inputs == (TritonTensor("image", "TYPE_FP32", (1, 8, 16, 16)),)
    assert outputs == (TritonTensor("probabilities", "TYPE_FP32", (3, 8, 16, 16)),)
    assert added.inputs == inputs and added.outputs == outputs and not added.warnings
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".my_seg.")], "staging left behind"


def test_max_batch_size_option_and_types(tmp_path: Path, repo: Path) -> None:
    ints = _onnx(tmp_path, "ints.onnx", _identity(["n", 5], elem_type=7))  # int64
    added = add_model(ints, "ints", repository=repo, max_batch_size=0)
    assert added.max_batch_size == 0
    _, mbs, inputs, _ = read_config(added.config_file)
    assert mbs == 0 and inputs == (TritonTensor("x", "TYPE_INT64", (-1, 5)),)
    text = added.config_file.read_text()
    assert "dynamic_batching" not in text and "max_batch_size: 0" in text
    assert any("'n'" in w and "-1" in w for w in added.warnings)


def test_fixed_first_axis_means_no_batching(tmp_path: Path, repo: Path) -> None:
    fixed = _onnx(tmp_path, "fixed.onnx", _identity([1, 1, 4, 6, 6]))
    added = add_model(fixed, "fixed", repository=repo)
    assert added.max_batch_size == 0
    assert read_config(added.config_file)[2] == (TritonTensor("x", "TYPE_FP32", (1, 1, 4, 6, 6)),)
    assert any("not symbolic" in w for w in added.warnings)
    # The pipeline sends [1, 1, z, y, x]: the stub takes the shape from the fixed dims.
    assert yaml.safe_load(added.stub)["pipelines"][0]["preprocess"]["shape"] == [4, 6, 6]


def test_versions_next_free_explicit_and_force(seg_onnx: Path, repo: Path) -> None:
    assert add_model(seg_onnx, "m", repository=repo).version == 1
    second = add_model(seg_onnx, "m", repository=repo)
    assert second.version == 2 and not second.config_written  # same signature: config kept
    assert add_model(seg_onnx, "m", repository=repo, version=7).version == 7
    assert add_model(seg_onnx, "m", repository=repo).version == 8
    with pytest.raises(ModelCliError, match=r"m/7 exists"):
        add_model(seg_onnx, "m", repository=repo, version=7)
    assert add_model(seg_onnx, "m", repository=repo, version=7, force=True).version == 7
    (entry,) = list_models(repo)
    assert entry.name == "m" and entry.versions == (1, 2, 7, 8) and entry.max_batch_size == 4
    assert [t.name for t in entry.inputs] == ["image"] and [t.name for t in entry.outputs] == [
        "probabilities"
    ]
    with pytest.raises(ModelCliError, match="version must be 1 or more"):
        add_model(seg_onnx, "m", repository=repo, version=0)


def test_existing_handwritten_config_is_kept(seg_onnx: Path, repo: Path) -> None:
    """A hand-tuned config.pbtxt (instance_group, version_policy) survives a new version."""
    (repo / "tuned" / "1").mkdir(parents=True)
    (repo / "tuned" / "1" / "model.onnx").write_bytes(seg_onnx.read_bytes())
    config = (
        'name: "tuned"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 2\n'
        "version_policy: { latest: { num_versions: 1 } }\n"
        'input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 16, 16 ] } ]\n'
        'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3, 8, 16, 16 ] } ]\n'
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
    )
    (repo / "tuned" / "config.pbtxt").write_text(config)
    added = add_model(seg_onnx, "tuned", repository=repo)
    assert added.version == 2 and not added.config_written
    assert (repo / "tuned" / "config.pbtxt").read_text() == config


@pytest.mark.parametrize("name", ["", "a b", "../evil", ".hidden", "-x", "x/y", "ü"])
def test_refuses_invalid_names(seg_onnx: Path, repo: Path, name: str) -> None:
    with pytest.raises(ModelCliError, match="model name .* is not valid"):
        add_model(seg_onnx, name, repository=repo)
    assert not any(repo.iterdir())


def test_refuses_invalid_pipeline_name(seg_onnx: Path, repo: Path) -> None:
    with pytest.raises(ModelCliError, match="pipeline name 'Bad_Name' is not valid"):
        add_model(seg_onnx, "m", repository=repo, pipeline="Bad_Name")
    assert add_model(seg_onnx, "My_Model.v2", repository=repo).pipeline == "my-model-v2"


def test_refuses_another_signature_unless_forced(tmp_path: Path, seg_onnx: Path, repo: Path) -> None:
    add_model(seg_onnx, "m", repository=repo)
    other = _onnx(tmp_path, "other.onnx", conv_segmentation_onnx([8, 16, 16], classes=2, output_name="p"))
    with pytest.raises(ModelCliError, match=r"describes another model.*probabilities.*p TYPE_FP32"):
        add_model(other, "m", repository=repo)
    assert list_models(repo)[0].versions == (1,)
    forced = add_model(other, "m", repository=repo, force=True)
    assert forced.version == 2 and forced.config_written
    assert any("rewritten" in w for w in forced.warnings)
    assert read_config(repo / "m" / "config.pbtxt")[3] == (TritonTensor("p", "TYPE_FP32", (2, 8, 16, 16)),)


def test_symbolic_non_batch_dims_are_written_as_minus_one_with_a_warning(tmp_path: Path, repo: Path) -> None:
    dyn = _onnx(tmp_path, "dyn.onnx", conv_segmentation_onnx(["depth", 16, 16]))  # type: ignore[list-item]
    added = add_model(dyn, "dyn", repository=repo)
    assert added.inputs[0].dims == (1, -1, 16, 16) and added.outputs[0].dims == (3, -1, 16, 16)
    assert "dims: [ 1, -1, 16, 16 ]" in added.config_file.read_text()
    warning = next(w for w in added.warnings if "input 'image'" in w)
    assert "axis 2 ('depth')" in warning and "-1" in warning and "preprocess.shape" in warning
    # No fixed shape to take: the stub asks for one.
    assert yaml.safe_load(added.stub)["pipelines"][0]["preprocess"]["shape"] == TODO


def test_refuses_what_is_not_onnx(tmp_path: Path, repo: Path) -> None:
    junk = _onnx(tmp_path, "junk.onnx", b"not a model")
    with pytest.raises(ModelCliError, match="ONNX Runtime cannot load"):
        add_model(junk, "junk", repository=repo)
    with pytest.raises(ModelCliError, match="no such file"):
        add_model(tmp_path / "missing.onnx", "junk", repository=repo)
    with pytest.raises(ModelCliError, match="not a folder"):
        add_model(junk, "junk", repository=tmp_path / "nowhere")
    assert not any(repo.iterdir())


def _fill(stub: dict[str, Any]) -> dict[str, Any]:
    """What an admin would write in place of the TODOs."""
    (p,) = stub["pipelines"]
    p["inputs"][0]["where"] = {"Modality": {"equals": "CT"}, "ImageCount": {"min": 20}}
    for s in p["segments"]:
        s["name"] = f"Structure {s['label']}"
        s["category"] = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
        s["type"] = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
    return stub


def test_stub_is_refused_until_filled_then_valid(tmp_path: Path, seg_onnx: Path, repo: Path) -> None:
    added = add_model(
        seg_onnx, "my_seg", repository=repo, pipeline="my-seg", stub_dir=tmp_path / "pipelines.d"
    )
    assert added.stub_file == tmp_path / "pipelines.d" / "my-seg.yaml.example"
    assert added.stub_file.read_text() == added.stub
    assert TODO in added.stub
    with pytest.raises(ConfigError) as err:
        load_pipelines(added.stub_file)
    assert "where" in str(err.value) and "category" in str(err.value)

    filled = tmp_path / "filled.yaml"
    filled.write_text(yaml.safe_dump(_fill(yaml.safe_load(added.stub))))
    (p,) = load_pipelines(filled)
    assert p.name == "my-seg" and not p.enabled
    assert (p.model.name, p.model.version, p.model.input, p.model.output) == (
        "my_seg",
        "",
        "image",
        "probabilities",
    )
    assert p.preprocess.shape == (8, 16, 16)
    assert [s.label for s in p.segments] == [1, 2]  # 3 output channels: background + 2 segments


def test_stub_is_never_written_into_pipelines_yaml(seg_onnx: Path, repo: Path) -> None:
    pipelines = Path(__file__).resolve().parents[2] / "config" / "pipelines.yaml"
    before = pipelines.read_bytes()
    add_model(seg_onnx, "m", repository=repo)
    assert pipelines.read_bytes() == before


def test_cli_add_and_list(
    tmp_path: Path, seg_onnx: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stubs = tmp_path / "stubs"
    argv = ["model", "add", str(seg_onnx), "--name", "cli_seg", "--repository", str(repo)]
    assert main([*argv, "--pipeline", "cli-seg", "--write-stub", str(stubs)]) == 0
    out, err = capsys.readouterr()
    assert "pipelines:" in out and "name: cli-seg" in out and "version 1" in err
    assert (stubs / "cli-seg.yaml.example").is_file()
    assert main([*argv, "--max-batch-size", "0"]) == 2  # no batch axis: another signature
    assert "describes another model" in capsys.readouterr().err
    assert main(["model", "list", "--repository", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "cli_seg  versions 1" in out and "image  TYPE_FP32" in out
    assert main(["model", "add", str(seg_onnx), "--name", "bad name", "--repository", str(repo)]) == 2
    assert "is not valid" in capsys.readouterr().err
