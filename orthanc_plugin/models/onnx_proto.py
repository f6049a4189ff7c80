# SPDX-License-Identifier: AGPL-3.0-or-later
"""A minimal ONNX writer: protobuf encoding by hand, following ``onnx.proto`` field numbers.

Small graphs (test models, the measurement models in ``triton_models/``) are written with it,
so neither the runtime environment nor the tests need the ``onnx`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray


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


def tensor(name: str, array: NDArray[Any]) -> bytes:
    body = b"".join(_int(1, d) for d in array.shape)  # dims
    body += _int(2, _ONNX_TYPES[array.dtype])  # data_type
    body += _str(8, name)  # name
    body += _len(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())  # raw_data
    return body


def value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(
        _len(1, _str(2, d) if isinstance(d, str) else _int(1, d))  # Dimension: dim_param / dim_value
        for d in shape
    )
    tensor_type = _int(1, elem_type) + _len(2, dims)  # TypeProto.Tensor: elem_type, shape
    return _str(1, name) + _len(2, _len(1, tensor_type))  # ValueInfoProto: name, type.tensor_type


def attr_int(name: str, value: int) -> bytes:
    return _str(1, name) + _int(20, 2) + _int(3, value)  # type INT, i


def attr_float(name: str, value: float) -> bytes:
    return _str(1, name) + _int(20, 1) + _varint((2 << 3) | 5) + np.float32(value).tobytes()  # type FLOAT, f


def attr_ints(name: str, values: Sequence[int]) -> bytes:
    return _str(1, name) + _int(20, 7) + b"".join(_int(8, v) for v in values)  # type INTS, ints


def node(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], attributes: Sequence[bytes] = ()
) -> bytes:
    body = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    body += _str(3, f"{op_type}_{outputs[0]}") + _str(4, op_type)
    body += b"".join(_len(5, a) for a in attributes)
    return body


def model(
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes],
    opset: int = 17,
    producer: str = "orthanc-ai",
) -> bytes:
    graph = b"".join(_len(1, n) for n in nodes) + _str(2, "graph")
    graph += b"".join(_len(5, t) for t in initializers)
    graph += b"".join(_len(11, i) for i in inputs) + b"".join(_len(12, o) for o in outputs)
    out = _int(1, 8)  # ir_version
    out += _str(2, producer)  # producer_name
    out += _len(7, graph)
    out += _len(8, _str(1, "") + _int(2, opset))  # opset_import
    return out
