# SPDX-License-Identifier: AGPL-3.0-or-later
"""Weights reader and independent NumPy forward pass of the brainchop ``mindgrab`` MeshNet.

NumPy only (plus ``scipy.special.erf`` when SciPy is there), no torch: both ``build_model.py``
(training environment) and ``tests/unit/test_mr_brain_model.py`` (runtime environment) import it.

The forward pass follows the description of the network in the weights' README, in the TF.js
layout, so that it shares nothing with the PyTorch module that ``build_model.py`` exports:

- activations stay channels last ``[N, D, H, W, C]``;
- kernels are used as stored, ``[kd, kh, kw, in, out]`` (no transposition);
- a 3x3x3 convolution with dilation ``d`` and "same" padding is the sum over the 27 taps
  ``(i, j, k)`` of ``x_padded[:, i*d : i*d+D, j*d : j*d+H, k*d : k*d+W, :] @ kernel[i, j, k]``,
  where ``x_padded`` has ``d`` zeros on each side of every spatial axis;
- after a convolution whose name ends in ``_gn``: per-sample, per-channel normalisation over the
  spatial axes, ``(x - mean) / sqrt(var + 1e-5)`` with the biased variance, no affine parameters;
- GELU, exact (error-function) form ``0.5 * x * (1 + erf(x / sqrt(2)))``;
- finally a 1x1x1 convolution with bias to 2 logits (background, brain) and a softmax.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

# The shared material sits beside the repository (../shared).
WEIGHTS_DIR = Path(__file__).resolve().parents[3] / "shared" / "models" / "brainchop-mindgrab"
NORM_EPS = 1e-5
_DTYPES = {"float32": np.dtype("<f4")}


@dataclass(frozen=True)
class ConvLayer:
    """One ``Conv3D`` of the topology, with what follows it."""

    name: str
    kernel: NDArray[np.float32]  # [kd, kh, kw, in, out], as stored
    bias: NDArray[np.float32] | None
    dilation: int
    instance_norm: bool  # name ends in "_gn"
    gelu: bool  # followed by an Activation("gelu")


def read_weights(weights_dir: Path = WEIGHTS_DIR) -> dict[str, NDArray[np.float32]]:
    """Read ``model.bin`` by the manifest of ``model.json``: names, shapes, dtypes, in order."""
    meta = json.loads((weights_dir / "model.json").read_text())
    out: dict[str, NDArray[np.float32]] = {}
    for group in meta["weightsManifest"]:
        blob = b"".join((weights_dir / p).read_bytes() for p in group["paths"])
        group_offset = 0
        for w in group["weights"]:
            if w["dtype"] not in _DTYPES or "quantization" in w:
                raise ValueError(f"unsupported weight encoding for {w['name']}: {w['dtype']}")
            dtype = _DTYPES[w["dtype"]]
            shape = tuple(int(s) for s in w["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if group_offset + nbytes > len(blob):
                raise ValueError(f"weights file too short for {w['name']}")
            arr = np.frombuffer(blob, dtype=dtype, count=nbytes // dtype.itemsize, offset=group_offset)
            out[w["name"]] = arr.reshape(shape).astype(np.float32)
            group_offset += nbytes
        if group_offset != len(blob):
            raise ValueError(f"manifest describes {group_offset} bytes, weight files hold {len(blob)}")
    return out


def read_layers(weights_dir: Path = WEIGHTS_DIR) -> list[ConvLayer]:
    """The convolutions of the topology in order, with their weights and following ops."""
    meta = json.loads((weights_dir / "model.json").read_text())
    weights = read_weights(weights_dir)
    topo = meta["modelTopology"]["model_config"]["config"]["layers"]
    layers: list[dict] = []
    used: set[str] = set()
    for layer in topo:
        cls, cfg = layer["class_name"], layer["config"]
        if cls == "InputLayer":
            continue
        if cls == "Conv3D":
            if cfg.get("data_format", "channels_last") != "channels_last" or cfg["padding"] != "same":
                raise ValueError(f"unexpected Conv3D config in {cfg['name']}")
            if list(cfg["strides"]) != [1, 1, 1] or cfg["activation"] != "linear":
                raise ValueError(f"unexpected Conv3D config in {cfg['name']}")
            dil = set(cfg["dilation_rate"])
            if len(dil) != 1:
                raise ValueError(f"anisotropic dilation in {cfg['name']}")
            kernel = weights[f"{cfg['name']}/kernel"]
            used.add(f"{cfg['name']}/kernel")
            if kernel.shape[:3] != tuple(cfg["kernel_size"]) or kernel.shape[4] != cfg["filters"]:
                raise ValueError(f"kernel shape {kernel.shape} does not match {cfg['name']}")
            bias = None
            if cfg["use_bias"]:
                bias = weights[f"{cfg['name']}/bias"]
                used.add(f"{cfg['name']}/bias")
            layers.append(
                {
                    "name": cfg["name"],
                    "kernel": kernel,
                    "bias": bias,
                    "dilation": dil.pop(),
                    "instance_norm": cfg["name"].endswith("_gn"),
                    "gelu": False,
                }
            )
        elif cls == "Activation":
            inbound = layer["inbound_nodes"][0][0][0]
            if not layers or inbound != layers[-1]["name"] or cfg["activation"] != "gelu":
                raise ValueError(f"unexpected activation {cfg['name']}")
            layers[-1]["gelu"] = True
        else:
            raise ValueError(f"unexpected layer class {cls}")
    if used != set(weights):
        raise ValueError(f"unused weights: {sorted(set(weights) - used)}")
    return [ConvLayer(**d) for d in layers]


def _erf(x: NDArray[np.float64]) -> NDArray[np.float64]:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - both project environments have SciPy
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


def _conv_same(x: NDArray[np.float64], kernel: NDArray[np.float32], dilation: int) -> NDArray[np.float64]:
    """Channels-last 3D convolution (cross-correlation, as TF) with "same" zero padding."""
    kd, kh, kw, cin, cout = kernel.shape
    n, d, h, w, c = x.shape
    assert c == cin
    pads = [((k - 1) * dilation // 2, (k - 1) * dilation - (k - 1) * dilation // 2) for k in (kd, kh, kw)]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    k64 = kernel.astype(np.float64)
    out = np.zeros((n, d, h, w, cout), dtype=np.float64)
    for i in range(kd):
        for j in range(kh):
            for k in range(kw):
                patch = xp[:, i * dilation : i * dilation + d, j * dilation : j * dilation + h]
                patch = patch[:, :, :, k * dilation : k * dilation + w, :]
                out += patch @ k64[i, j, k]
    return out


def forward_channels_last(x: NDArray[np.floating], layers: list[ConvLayer]) -> NDArray[np.float64]:
    """Softmax probabilities ``[N, D, H, W, 2]`` for an input ``[N, D, H, W, 1]`` in [0, 1]."""
    y = np.asarray(x, dtype=np.float64)
    for layer in layers:
        y = _conv_same(y, layer.kernel, layer.dilation)
        if layer.bias is not None:
            y = y + layer.bias.astype(np.float64)
        if layer.instance_norm:
            mean = y.mean(axis=(1, 2, 3), keepdims=True)
            var = y.var(axis=(1, 2, 3), keepdims=True)
            y = (y - mean) / np.sqrt(var + NORM_EPS)
        if layer.gelu:
            y = 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    y = y - y.max(axis=-1, keepdims=True)
    e = np.exp(y)
    return e / e.sum(axis=-1, keepdims=True)


def forward(x: NDArray[np.floating], layers: list[ConvLayer]) -> NDArray[np.float64]:
    """Same as :func:`forward_channels_last` for the exported model's layout ``[N, 1, D, H, W]``."""
    x = np.asarray(x)
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected [N, 1, D, H, W], got {x.shape}")
    p = forward_channels_last(np.moveaxis(x, 1, -1), layers)
    return np.moveaxis(p, -1, 1)
