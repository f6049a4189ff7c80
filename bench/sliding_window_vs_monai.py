"""Compare orthanc_plugin.inference.sliding_window with MONAI's sliding_window_inference on the same data.

Run with the training environment, which has torch and MONAI (from the repository root):

    .venv-train/bin/python bench/sliding_window_vs_monai.py

The predictor is not pointwise: each window is smoothed by a 5x5x5 box filter that sees only
the window (zeros beyond it) and a second channel is the window's mean, so the result depends
on where every window lies and on how they are blended. Both implementations get the same
NumPy predictor; any difference comes from window placement, padding or blending. Prints the
max |difference| per case and the time each took; exits 1 when a difference exceeds 1e-5.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.inference.sliding_window import sliding_window_inference  # noqa: E402

TOLERANCE = 1e-5


def predictor(batch: NDArray[np.float32]) -> NDArray[np.float32]:
    """[B, 1, *roi] -> [B, 2, *roi]: box-filtered window (zero outside it) and the window mean."""
    smooth = np.stack([ndimage.uniform_filter(w[0], size=5, mode="constant") for w in batch])
    mean = np.broadcast_to(batch.mean(axis=(1, 2, 3, 4), keepdims=True), smooth[:, None].shape)
    return np.concatenate([smooth[:, None], mean], axis=1).astype(np.float32)


def run_monai(image: NDArray[np.float32], **kwargs: Any) -> NDArray[np.float32]:
    import torch
    from monai.inferers import sliding_window_inference as monai_swi

    def torch_predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(predictor(x.numpy()))

    with torch.no_grad():
        out = monai_swi(torch.from_numpy(image[None]), predictor=torch_predictor, **kwargs)
    return np.asarray(out[0].numpy(), dtype=np.float32)


CASES: list[dict[str, Any]] = [
    {"shape": (96, 80, 57), "roi_size": (32, 32, 32), "sw_batch_size": 4, "overlap": 0.25},
    {"shape": (96, 80, 57), "roi_size": (32, 32, 32), "sw_batch_size": 1, "overlap": 0.5},
    {"shape": (70, 45, 33), "roi_size": (24, 40, 16), "sw_batch_size": 3, "overlap": (0.1, 0.6, 0.3)},
    {
        "shape": (21, 64, 9),
        "roi_size": (32, 32, 32),
        "sw_batch_size": 2,
        "overlap": 0.25,
    },  # padded, odd amounts
    {"shape": (64, 64, 15), "roi_size": (64, 64, 64), "sw_batch_size": 1, "overlap": 0.25},  # one window
    {"shape": (160, 192, 160), "roi_size": (96, 96, 96), "sw_batch_size": 2, "overlap": 0.25},  # brain-sized
]


def main() -> int:
    import monai
    import torch

    torch.set_num_threads(1)
    print(f"MONAI {monai.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    rng = np.random.default_rng(42)
    worst = 0.0
    for case in CASES:
        kwargs = {k: v for k, v in case.items() if k != "shape"}
        image = rng.normal(size=(1, *case["shape"])).astype(np.float32)
        for mode in ("constant", "gaussian"):
            t0 = time.perf_counter()
            mine = sliding_window_inference(image, predict=predictor, mode=mode, **kwargs)
            t1 = time.perf_counter()
            ref = run_monai(image, mode=mode, **kwargs)
            t2 = time.perf_counter()
            if mine.shape != ref.shape:
                print(f"{case} {mode}: shapes differ, ours {mine.shape}, MONAI {ref.shape}")
                return 1
            diff = float(np.max(np.abs(mine - ref)))
            worst = max(worst, diff)
            print(
                f"image {case['shape']} roi {kwargs['roi_size']} overlap {kwargs['overlap']} "
                f"batch {kwargs['sw_batch_size']} {mode:8s}: max |diff| {diff:.2e} "
                f"(|out| max {float(np.abs(ref).max()):.2f}); ours {t1 - t0:.2f} s, MONAI {t2 - t1:.2f} s"
            )
    print(f"worst max |diff| {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
