# SPDX-License-Identifier: AGPL-3.0-or-later
"""Helpers for the Triton integration tests and ``bench/triton_transport.py``.

Small ONNX models are written with a minimal protobuf encoder following ``onnx.proto``
field numbers, so neither the tests nor the benchmark need the ``onnx`` package.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

# -- minimal protobuf encoding -----------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # int64 two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _len(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _len(field, text.encode("utf-8"))


# onnx.proto: TensorProto.DataType
_ONNX_TYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.int64): 7,
    np.dtype(np.float16): 10,
    np.dtype(np.float64): 11,
}


def _tensor(name: str, array: np.ndarray) -> bytes:
    body = b"".join(_int(1, d) for d in array.shape)  # dims
    body += _int(2, _ONNX_TYPES[array.dtype])  # data_type
    body += _str(8, name)  # name
    body += _len(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())  # raw_data
    return body


def _value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(
        _len(1, _str(2, d) if isinstance(d, str) else _int(1, d))  # Dimension: dim_param / dim_value
        for d in shape
    )
    tensor_type = _int(1, elem_type) + _len(2, dims)  # TypeProto.Tensor: elem_type, shape
    return _str(1, name) + _len(2, _len(1, tensor_type))  # ValueInfoProto: name, type.tensor_type


def _attr_int(name: str, value: int) -> bytes:
    return _str(1, name) + _int(20, 2) + _int(3, value)  # type INT, i


def _attr_ints(name: str, values: Sequence[int]) -> bytes:
    return _str(1, name) + _int(20, 7) + b"".join(_int(8, v) for v in values)  # type INTS, ints


def _node(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], attributes: Sequence[bytes] = ()
) -> bytes:
    body = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    body += _str(3, f"{op_type}_{outputs[0]}") + _str(4, op_type)
    body += b"".join(_len(5, a) for a in attributes)
    return body


def _model(
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes],
    opset: int = 17,
) -> bytes:
    graph = b"".join(_len(1, n) for n in nodes) + _str(2, "graph")
    graph += b"".join(_len(5, t) for t in initializers)
    graph += b"".join(_len(11, i) for i in inputs) + b"".join(_len(12, o) for o in outputs)
    model = _int(1, 8)  # ir_version
    model += _str(2, "orthanc-ai-tests")  # producer_name
    model += _len(7, graph)
    model += _len(8, _str(1, "") + _int(2, opset))  # opset_import
    return model


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
    conv_attrs = [_attr_ints("kernel_shape", kernel), _attr_ints("pads", [1] * (2 * rank))]
    nodes = [
        _node("Conv", [input_name, "w1", "b1"], ["h1"], conv_attrs),
        _node("Relu", ["h1"], ["h2"]),
        _node("Conv", ["h2", "w2", "b2"], ["logits"], conv_attrs),
        _node("Softmax", ["logits"], [output_name], [_attr_int("axis", 1)]),
    ]
    return _model(
        nodes,
        inputs=[_value_info(input_name, 1, ["batch", in_channels, *spatial])],
        outputs=[_value_info(output_name, 1, ["batch", classes, *spatial])],
        initializers=[_tensor("w1", w1), _tensor("b1", b1), _tensor("w2", w2), _tensor("b2", b2)],
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together so they cannot repeat)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()
