# SPDX-License-Identifier: AGPL-3.0-or-later
"""The committed ``triton_models/mr_brain/1/model.onnx`` against the independent NumPy forward pass.

Needs the published weights in /work/shared/models/brainchop-mindgrab (fails, does not skip,
when they are missing: the check is what ties the ONNX file to those weights).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

_DIR = Path(__file__).resolve().parents[2] / "triton_models" / "mr_brain"
ONNX_PATH = _DIR / "1" / "model.onnx"
TOL = 1e-4


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mr_brain_reference", _DIR / "reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ref = _load()


@pytest.fixture(scope="module")
def layers():
    wdir = ref.WEIGHTS_DIR
    assert (wdir / "model.json").is_file() and (wdir / "model.bin").is_file(), (
        f"brainchop mindgrab weights missing in {wdir} (model.json, model.bin): "
        "they are needed to check the committed ONNX model"
    )
    return ref.read_layers(wdir)


@pytest.fixture(scope="module")
def session():
    assert ONNX_PATH.is_file(), f"{ONNX_PATH} missing: run triton_models/mr_brain/build_model.py"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(ONNX_PATH), sess_options=opts, providers=["CPUExecutionProvider"])


def test_weights_match_readme(layers) -> None:
    convs = layers[:-1]
    assert len(convs) == 25
    assert [lay.dilation for lay in convs] == [16, 8, 4, 2, 1] * 5
    assert all(lay.kernel.shape[:3] == (3, 3, 3) and lay.kernel.shape[4] == 15 for lay in convs)
    assert all(lay.instance_norm and lay.gelu and lay.bias is None for lay in convs)
    out = layers[-1]
    assert out.kernel.shape == (1, 1, 1, 15, 2) and out.bias is not None and out.bias.shape == (2,)
    assert not out.instance_norm and not out.gelu


def test_onnx_io(session) -> None:
    (inp,) = session.get_inputs()
    (outp,) = session.get_outputs()
    assert inp.name == "image" and inp.type == "tensor(float)" and inp.shape[1] == 1
    assert outp.name == "probabilities" and outp.type == "tensor(float)" and outp.shape[1] == 2
    assert ONNX_PATH.stat().st_size < 1_000_000


def test_onnx_matches_numpy_reference(layers, session) -> None:
    x = np.random.default_rng(7).random((1, 1, 24, 24, 24), dtype=np.float32)
    got = session.run(["probabilities"], {"image": x})[0]
    want = ref.forward(x, layers)
    assert got.shape == want.shape == (1, 2, 24, 24, 24)
    assert float(np.max(np.abs(got - want))) < TOL
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_batch_and_anisotropic_shape(layers, session) -> None:
    # batch of 2 with different contents and a non-cubic grid: catches axis mix-ups that a
    # cube of one sample would hide, and checks that samples are normalised independently
    rng = np.random.default_rng(11)
    x = rng.random((2, 1, 20, 18, 22), dtype=np.float32)
    x[1] *= np.linspace(0.2, 1.0, 22, dtype=np.float32)
    got = session.run(["probabilities"], {"image": x})[0]
    want = ref.forward(x, layers)
    assert float(np.max(np.abs(got - want))) < TOL
    single = session.run(["probabilities"], {"image": x[1:]})[0]
    assert float(np.max(np.abs(single - got[1:]))) < 1e-5
