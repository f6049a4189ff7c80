# SPDX-License-Identifier: AGPL-3.0-or-later
"""Write ``1/model.onnx`` of ``lung_attenuation``: a score from the ct_lung model's output.

The graph takes what the ct-lung pipeline already has: the windowed CT the segmentation model
saw (``image``, [N, 1, 64, 128, 128], -1024..400 HU scaled to 0..1) and that model's softmax
(``segmentation``, [N, 3, 64, 128, 128]). It measures the share of lung voxels (background
probability < 0.5) denser than -500 HU, and turns it into a probability of "abnormal" with a
logistic curve centred on ``--centre`` (share) with scale ``--scale``. Output
``class_probabilities`` [N, 2]: (normal, abnormal).

This is a measurement with a logistic link, not a trained classifier: see README.md for what it
is and is not validated for. Run from the repository root:

    .venv/bin/python triton_models/lung_attenuation/build_model.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from orthanc_plugin.models.onnx_proto import attr_int, model, node, tensor, value_info  # noqa: E402

WINDOW = (-1024.0, 400.0)  # the ct_lung window: image = (HU - low) / (high - low)
SPATIAL = (64, 128, 128)


def build(threshold_hu: float, centre: float, scale: float) -> bytes:
    t = (threshold_hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    f32 = np.float32
    consts = {
        "half": np.array(0.5, f32),
        "t": np.array(t, f32),
        "eps": np.array(1e-6, f32),
        "centre": np.array(centre, f32),
        "inv_scale": np.array(1.0 / scale, f32),
        "one": np.array(1.0, f32),
        "c0": np.array([0], np.int64),
        "c1": np.array([1], np.int64),
        "axis1": np.array([1], np.int64),
        "spatial_axes": np.array([1, 2, 3, 4], np.int64),
    }
    nodes = [
        node("Slice", ["segmentation", "c0", "c1", "axis1"], ["background"]),
        node("Less", ["background", "half"], ["lung_b"]),
        node("Cast", ["lung_b"], ["lung"], [attr_int("to", 1)]),
        node("Greater", ["image", "t"], ["dense_b"]),
        node("Cast", ["dense_b"], ["dense"], [attr_int("to", 1)]),
        node("Mul", ["lung", "dense"], ["dense_lung"]),
        node("ReduceSum", ["dense_lung", "spatial_axes"], ["n_dense"], [attr_int("keepdims", 0)]),
        node("ReduceSum", ["lung", "spatial_axes"], ["n_lung"], [attr_int("keepdims", 0)]),
        node("Add", ["n_lung", "eps"], ["n_lung_eps"]),
        node("Div", ["n_dense", "n_lung_eps"], ["share"]),
        node("Sub", ["share", "centre"], ["offset"]),
        node("Mul", ["offset", "inv_scale"], ["logit"]),
        node("Sigmoid", ["logit"], ["p_abnormal"]),
        node("Sub", ["one", "p_abnormal"], ["p_normal"]),
        node("Unsqueeze", ["p_normal", "axis1"], ["p_normal_col"]),
        node("Unsqueeze", ["p_abnormal", "axis1"], ["p_abnormal_col"]),
        node("Concat", ["p_normal_col", "p_abnormal_col"], ["class_probabilities"], [attr_int("axis", 1)]),
    ]
    return model(
        nodes,
        inputs=[
            value_info("image", 1, ["batch", 1, *SPATIAL]),
            value_info("segmentation", 1, ["batch", 3, *SPATIAL]),
        ],
        outputs=[value_info("class_probabilities", 1, ["batch", 2])],
        initializers=[tensor(k, v) for k, v in consts.items()],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold-hu", type=float, default=-500.0)
    ap.add_argument("--centre", type=float, default=0.10, help="share of dense lung where p = 0.5")
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--out", type=Path, default=HERE / "1" / "model.onnx")
    args = ap.parse_args()
    data = build(args.threshold_hu, args.centre, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
