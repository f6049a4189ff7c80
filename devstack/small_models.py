# SPDX-License-Identifier: AGPL-3.0-or-later
"""Small ONNX models for the Triton integration tests and ``bench/triton_transport.py``.

Small ONNX models are written with the minimal protobuf encoder of orthanc_plugin.models.onnx_proto
so neither the tests nor the benchmark need the ``onnx`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from devstack.stack import free_port
from orthanc_plugin.models.onnx_proto import attr_int, attr_ints, model, node, tensor, value_info


def conv_segmentation_onnx(
    spatial: Sequence[int],
    in_channels: int = 1,
    hidden: int = 4,
    classes: int = 3,
    seed: int = 0,
    input_name: str = "image",
    output_name: str = "probabilities",
) -> bytes:
    """A 3-D segmentation-like network: Conv3d(k3) -> ReLU -> Conv3d(k3) -> Softmax(axis=1).

    Input ``[batch, in_channels, *spatial]`` float32 with a dynamic batch axis, output
    ``[batch, classes, *spatial]`` float32 probabilities.
    """
    rng = np.random.default_rng(seed)
    rank = len(spatial)
    kernel = [3] * rank
    w1 = rng.normal(0.0, 0.5, (hidden, in_channels, *kernel)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, (hidden,)).astype(np.float32)
    w2 = rng.normal(0.0, 0.5, (classes, hidden, *kernel)).astype(np.float32)
    b2 = rng.normal(0.0, 0.1, (classes,)).astype(np.float32)
    conv_attrs = [attr_ints("kernel_shape", kernel), attr_ints("pads", [1] * (2 * rank))]
    nodes = [
        node("Conv", [input_name, "w1", "b1"], ["h1"], conv_attrs),
        node("Relu", ["h1"], ["h2"]),
        node("Conv", ["h2", "w2", "b2"], ["logits"], conv_attrs),
        node("Softmax", ["logits"], [output_name], [attr_int("axis", 1)]),
    ]
    return model(
        nodes,
        inputs=[value_info(input_name, 1, ["batch", in_channels, *spatial])],
        outputs=[value_info(output_name, 1, ["batch", classes, *spatial])],
        initializers=[tensor("w1", w1), tensor("b1", b1), tensor("w2", w2), tensor("b2", b2)],
    )


# -- model repository ------------------------------------------------------------------------


def write_onnx_model(
    repository: Path,
    name: str,
    version: int,
    onnx_bytes: bytes,
    input_dims: Sequence[int],
    output_dims: Sequence[int],
    max_batch_size: int = 4,
    input_name: str = "image",
    output_name: str = "probabilities",
    dynamic_batching: bool = True,
    parameters: dict[str, str] | None = None,
) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` (ONNX platform) and ``<version>/model.onnx``."""
    model_dir = repository / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        f'input [ {{ name: "{input_name}" data_type: TYPE_FP32 dims: [ {_dims(input_dims)} ] }} ]',
        f'output [ {{ name: "{output_name}" data_type: TYPE_FP32 dims: [ {_dims(output_dims)} ] }} ]',
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
    ]
    if dynamic_batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    path = model_dir / str(version) / "model.onnx"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(onnx_bytes)
    tmp.replace(path)
    return path


def _dims(dims: Sequence[int]) -> str:
    return ", ".join(str(int(d)) for d in dims)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, never handed out before in this process."""
    return [free_port() for _ in range(count)]
