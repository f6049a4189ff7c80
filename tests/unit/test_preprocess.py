"""The fused intensity scaling of ``preprocess.resize`` gives exactly the unfused result."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_plugin.imaging import preprocess


@pytest.mark.parametrize(
    "shape", [(16, 24, 24), (40, 96, 20), (33, 64, 64), (7, 7, 7)], ids=["shrink", "mixed", "same-z", "tiny"]
)
def test_pointwise_scaling_inside_resize_is_exact(shape: tuple[int, int, int]) -> None:
    v = np.random.default_rng(1).normal(-300, 700, (33, 64, 64)).astype(np.float32)

    def win(x: np.ndarray) -> np.ndarray:
        return preprocess.window(x, -1024, 400)

    expected = preprocess.resize(preprocess.window(v, -1024, 400), shape)
    got = preprocess.resize(v, shape, pointwise=win)
    assert np.array_equal(expected, got)
    assert (
        preprocess.resize(v, (33, 64, 64), pointwise=win).tolist()
        == preprocess.window(v, -1024, 400).tolist()
    )
    nearest = preprocess.resize(v, shape, order=0, pointwise=win)
    assert np.array_equal(nearest, preprocess.resize(preprocess.window(v, -1024, 400), shape, order=0))
