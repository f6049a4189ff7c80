"""Sliding-window inference: exactness on pointwise models, window placement, blending. Under 1 s."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from orthanc_plugin.inference.sliding_window import (
    importance_map,
    roi_for,
    sliding_window_inference,
    window_origins,
    window_starts,
)

Array = NDArray[Any]


def pointwise(batch: Array) -> Array:
    """Two output channels, each a function of the input voxel alone."""
    assert batch.dtype == np.float32 and batch.ndim == 5
    return np.stack([np.sin(batch[:, 0]) + batch[:, 1], batch[:, 0] * batch[:, 1] - 3.0], axis=1)


def expected_pointwise(image: Array) -> Array:
    return np.stack([np.sin(image[0]) + image[1], image[0] * image[1] - 3.0])


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "batch", "mode"),
    [
        ((40, 37, 23), (16, 16, 16), 0.25, 4, "constant"),
        ((40, 37, 23), (16, 16, 16), 0.5, 3, "gaussian"),
        ((33, 29, 31), (32, 20, 8), 0.0, 1, "constant"),
        ((5, 20, 7), (16, 16, 16), 0.25, 2, "gaussian"),  # smaller than the window on two axes
        ((12, 12, 12), 12, 0.9, 5, "gaussian"),  # exactly one window
        ((17, 9, 30), (None, 0, 7), 0.6, 8, "constant"),  # whole axes as the window
    ],
)
def test_pointwise_model_gives_the_pointwise_result(
    shape: tuple[int, ...], roi: Any, overlap: float, batch: int, mode: Any
) -> None:
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    got = sliding_window_inference(image, roi, pointwise, sw_batch_size=batch, overlap=overlap, mode=mode)
    assert got.shape == (2, *shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected_pointwise(image), rtol=1e-5, atol=1e-5)


def coordinates(shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Channel d holds each voxel's index along axis d: a window's first voxel tells its origin."""
    return np.indices(shape, dtype=np.float32)


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "batch"),
    [
        ((100, 64, 50), (32, 32, 32), 0.25, 4),
        ((100, 64, 50), (32, 32, 32), 0.5, 3),
        ((70, 33, 48), (32, 16, 48), 0.0, 7),
        ((45, 45, 45), (20, 30, 40), (0.1, 0.5, 0.8), 1),
    ],
)
def test_windows_cover_everything_with_the_requested_overlap(
    shape: tuple[int, ...], roi: tuple[int, ...], overlap: Any, batch: int
) -> None:
    seen: list[tuple[int, ...]] = []
    batch_sizes: list[int] = []

    def record(x: Array) -> Array:
        batch_sizes.append(x.shape[0])
        for window in x:
            origin = tuple(int(window[d, 0, 0, 0]) for d in range(3))
            # the window is the contiguous block starting there
            np.testing.assert_array_equal(
                window, coordinates(roi) + np.array(origin, np.float32)[:, None, None, None]
            )
            seen.append(origin)
        return np.ones((x.shape[0], 1, *roi), dtype=np.float32)

    out = sliding_window_inference(coordinates(shape), roi, record, sw_batch_size=batch, overlap=overlap)
    np.testing.assert_array_equal(out, 1.0)

    assert seen == window_origins(shape, roi, overlap)
    assert len(set(seen)) == len(seen)
    assert all(b == batch for b in batch_sizes[:-1]) and 1 <= batch_sizes[-1] <= batch
    assert sum(batch_sizes) == len(seen)
    covered = np.zeros(shape, dtype=np.int32)
    for o in seen:
        covered[tuple(slice(s, s + r) for s, r in zip(o, roi, strict=True))] += 1
    assert covered.min() >= 1
    overlaps = (overlap,) * 3 if isinstance(overlap, float) else overlap
    for axis, starts in enumerate(window_starts(shape, roi, overlap)):
        assert sorted({o[axis] for o in seen}) == starts
        step = roi[axis] if roi[axis] == shape[axis] else max(1, int(roi[axis] * (1 - overlaps[axis])))
        assert starts[0] == 0 and starts[-1] + roi[axis] == shape[axis]  # the last window ends at the edge
        assert all(b - a == step for a, b in zip(starts[:-2], starts[1:-1], strict=True))
        assert 0 < starts[-1] - starts[-2] <= step if len(starts) > 1 else True
        # no more windows than needed: without the last one the axis would not be covered
        assert len(starts) == 1 or starts[-2] + roi[axis] < shape[axis]


def test_window_starts_by_hand() -> None:
    # 100 voxels, window 32, overlap 0.25: step int(32 * 0.75) = 24, the 4th window pulled back to 68
    assert window_starts((100,), (32,), 0.25) == [[0, 24, 48, 68]]
    assert window_starts((64,), (32,), 0.5) == [[0, 16, 32]]
    assert window_starts((64,), (32,), 0.0) == [[0, 32]]
    assert window_starts((32,), (32,), 0.9) == [[0]]
    assert window_starts((10,), (3,), 0.99) == [list(range(8))]  # step floored at 1
    assert roi_for((10, 20, 30), (None, -1, 8)) == (10, 20, 8)
    assert roi_for((10, 20, 30), 16) == (16, 16, 16)
    with pytest.raises(ValueError, match="overlap"):
        window_starts((100,), (32,), 1.0)


def test_small_image_is_padded_centrally_then_cropped() -> None:
    """10 x 12 x 3 in a 16^3 window: padded (3, 3), (2, 2), (6, 7) with cval, like MONAI."""
    image = np.full((1, 10, 12, 3), 5.0, dtype=np.float32)
    seen: list[Array] = []

    def keep(x: Array) -> Array:
        seen.append(x.copy())
        return x.copy()

    out = sliding_window_inference(image, 16, keep, cval=-1.0)
    assert len(seen) == 1 and seen[0].shape == (1, 1, 16, 16, 16)
    window = seen[0][0, 0]
    inside = (slice(3, 13), slice(2, 14), slice(6, 9))
    np.testing.assert_array_equal(window[inside], 5.0)
    window[inside] = -1.0
    np.testing.assert_array_equal(window, -1.0)
    np.testing.assert_array_equal(out, image)
    replicated = sliding_window_inference(image, 16, keep, padding_mode="replicate")
    np.testing.assert_array_equal(seen[-1], 5.0)
    np.testing.assert_array_equal(replicated, image)


def test_gaussian_importance_map() -> None:
    roi = (33, 16, 9)
    w = importance_map(roi, "gaussian", 0.125)
    assert w.shape == roi and w.dtype == np.float32
    # centred and symmetric, 1 on the centre voxel of the odd axes
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)
    assert np.unravel_index(np.argmax(w), roi)[0] == 16 and np.unravel_index(np.argmax(w), roi)[2] == 4
    # separable Gaussian with sigma = 0.125 * size, floored at 1e-3
    g = [np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (0.125 * n) ** 2)) for n in roi]
    expected = np.maximum(np.einsum("i,j,k->ijk", *g), 1e-3)
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    assert w.max() == pytest.approx(
        np.exp(-(0.5**2) / (2 * 2.0**2)), rel=1e-6
    )  # even axis: centre between voxels
    assert w.min() == pytest.approx(1e-3)
    # a floor above 1e-3 leaves the map untouched
    wide = importance_map((8, 8), "gaussian", 1.0)
    assert wide.min() > 1e-3
    np.testing.assert_array_equal(importance_map((4, 5, 6)), np.ones((4, 5, 6), np.float32))
    with pytest.raises(ValueError, match="mode"):
        importance_map((4, 4), "linear")  # type: ignore[arg-type]


def test_non_pointwise_model_matches_a_brute_force_blend() -> None:
    """Each window predicts its own mean: the output is the weighted mean over the windows covering a voxel."""
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 30, 22, 19)).astype(np.float32)
    roi = (12, 10, 19)

    def window_mean(x: Array) -> Array:
        return np.broadcast_to(x.mean(axis=(2, 3, 4), keepdims=True), x.shape).copy()

    for mode in ("constant", "gaussian"):
        got = sliding_window_inference(image, roi, window_mean, sw_batch_size=3, overlap=0.4, mode=mode)
        w = importance_map(roi, mode).astype(np.float64)
        num = np.zeros(image.shape[1:])
        den = np.zeros(image.shape[1:])
        # by hand: step int(12 * 0.6) = 7 -> 0, 7, 14, 18; int(10 * 0.6) = 6 -> 0, 6, 12; one window of 19
        for z in (0, 7, 14, 18):
            for y in (0, 6, 12):
                block = (slice(z, z + 12), slice(y, y + 10), slice(0, 19))
                num[block] += w * float(image[(0, *block)].astype(np.float64).mean())
                den[block] += w
        np.testing.assert_allclose(got[0], num / den, rtol=1e-5, atol=1e-6)


def test_channels_and_out_bound_memory() -> None:
    image = np.random.default_rng(1).normal(size=(2, 20, 18, 5)).astype(np.float32)
    out = np.full((1, 20, 18, 5), np.nan, dtype=np.float32)
    got = sliding_window_inference(image, (8, 8, 8), pointwise, sw_batch_size=2, channels=[1], out=out)
    assert got is out
    np.testing.assert_allclose(out[0], expected_pointwise(image)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out must be float32"):
        sliding_window_inference(image, 8, pointwise, out=np.zeros((2, 20, 18, 5), np.float32), channels=[0])


def test_predictor_output_is_checked() -> None:
    image = np.zeros((1, 20, 20, 20), dtype=np.float32)
    with pytest.raises(ValueError, match="the predictor returned shape"):
        sliding_window_inference(image, 10, lambda x: x[:, :, :5])
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(image, (10, 10), lambda x: x)
    with pytest.raises(ValueError, match="sw_batch_size"):
        sliding_window_inference(image, 10, lambda x: x, sw_batch_size=0)
