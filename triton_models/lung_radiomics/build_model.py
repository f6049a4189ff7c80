# SPDX-License-Identifier: AGPL-3.0-or-later
"""Write ``1/model.onnx`` of ``lung_radiomics``: a logistic regression over radiomics features.

Input ``features`` [N, 4] float32, in this order (the ct-lung-radiomics pipeline's
``classify.inputs.features`` lists them so): IBSI ``stat.mean`` (mean intensity, HU) of the right
lung, of the left lung, then ``stat.p90`` (90th intensity percentile, HU) of the right lung, of
the left lung, each computed as ``outputs.radiomics`` of that pipeline says (re-segmented to
[-1000, 400] HU). Output ``class_probabilities`` [N, 2]: (normal, dense).

    p(dense) = sigmoid(b + sum_i w_i * (x_i - centre_i) / scale_i)

The coefficients are set by hand, not fitted (no labelled studies are available to this
project): weights 0.5 per lung, centres -700 HU (mean) and -400 HU (90th percentile), scales
50 HU and 100 HU, bias 0. Aerated adult lung averages about -850 HU on inspiratory CT and
scores near 0; lungs whose mean and 90th percentile rise towards soft tissue score near 1.
See README.md for what it is and is not validated for. The file is byte-for-byte the same on
every run (tests/unit/test_lung_radiomics_model.py). Run from the repository root:

    .venv/bin/python triton_models/lung_radiomics/build_model.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from orthanc_plugin.models.onnx_proto import attr_int, model, node, tensor, value_info  # noqa: E402

#: (segment tracking id, IBSI feature id, centre, scale, weight), in input order.
FEATURES = (
    ("right-lung", "stat.mean", -700.0, 50.0, 0.5),
    ("left-lung", "stat.mean", -700.0, 50.0, 0.5),
    ("right-lung", "stat.p90", -400.0, 100.0, 0.5),
    ("left-lung", "stat.p90", -400.0, 100.0, 0.5),
)
BIAS = 0.0


def coefficients() -> tuple[np.ndarray, float]:
    """The logistic regression as ``logit = x @ W + b`` (W [4, 1], b a number)."""
    w = np.array([f[4] / f[3] for f in FEATURES], np.float64)
    b = BIAS - float(sum(f[4] * f[2] / f[3] for f in FEATURES))
    return w.reshape(-1, 1), b


def build() -> bytes:
    w, b = coefficients()
    consts = {
        "W": w.astype(np.float32),
        "b": np.array([b], np.float32),
        "one": np.array(1.0, np.float32),
    }
    nodes = [
        node("MatMul", ["features", "W"], ["xw"]),
        node("Add", ["xw", "b"], ["logit"]),
        node("Sigmoid", ["logit"], ["p_dense"]),
        node("Sub", ["one", "p_dense"], ["p_normal"]),
        node("Concat", ["p_normal", "p_dense"], ["class_probabilities"], [attr_int("axis", 1)]),
    ]
    return model(
        nodes,
        inputs=[value_info("features", 1, ["batch", len(FEATURES)])],
        outputs=[value_info("class_probabilities", 1, ["batch", 2])],
        initializers=[tensor(k, v) for k, v in consts.items()],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "1" / "model.onnx")
    args = ap.parse_args()
    data = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
