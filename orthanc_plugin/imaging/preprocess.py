"""Volume -> model tensor, and model output -> volume grid.

The same functions are used when a model is trained (``triton_models/*/build_model.py``)
and when it runs in the worker, so the two can never drift apart.

Array convention everywhere in this project: ``(slice, row, column)`` = ``(z, y, x)``, slices
sorted by position along the slice normal (ascending), rows and columns as stored in DICOM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def window(volume: NDArray[Any], low: float, high: float) -> NDArray[np.float32]:
    """Clip intensities to ``[low, high]`` and scale them linearly to ``[0, 1]``."""
    if not high > low:
        raise ValueError(f"window: high ({high}) must be greater than low ({low})")
    out = (np.asarray(volume, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def minmax(volume: NDArray[Any]) -> NDArray[np.float32]:
    """Scale intensities to ``[0, 1]`` by the volume's own minimum and maximum."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros_like(v)
    return (v - np.float32(lo)) / np.float32(hi - lo)


def axis_weights(n_in: int, n_out: int) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float32]]:
    """Source indices and weights for linear resampling of one axis, voxel centres aligned."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize(
    volume: NDArray[Any],
    shape: tuple[int, int, int],
    order: int = 1,
    pointwise: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None,
) -> NDArray[np.float32]:
    """Resample a 3D array to ``shape``; linear (``order=1``) or nearest (``order=0``).

    Voxels are cells: an output voxel centre maps to the same physical place in the input
    (like ``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` and torch's
    ``align_corners=False``). Linear resampling is done one axis at a time, which is exact
    for trilinear interpolation and an order of magnitude faster than a generic zoom.

    ``pointwise`` (an element-wise function such as :func:`window`) is applied to the input
    first; the result is the same as ``resize(pointwise(volume))``, but for linear resampling
    it only touches the input planes the first pass reads (a 320-slice series resized to 64
    slices: 128 planes instead of 320).
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"resize: target shape must be three positive sizes, got {shape}")
    if order not in (0, 1):
        raise ValueError(f"resize: order must be 0 (nearest) or 1 (linear), got {order}")
    # Another type than float32 (an int16 CT) is converted where planes are taken: the same
    # float32 values as a float32 copy of the whole volume, without that copy.
    v: NDArray[Any] = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"resize: expected a 3D array, got shape {v.shape}")
    if order == 0 or v.shape == tuple(shape):
        v = np.asarray(v, dtype=np.float32)
    if pointwise is not None and (order == 0 or v.shape == tuple(shape)):
        v = np.asarray(pointwise(v), dtype=np.float32)
        pointwise = None
    if v.shape == tuple(shape):
        return v.copy() if v is volume else v
    if order == 0:
        zoom = [t / s for t, s in zip(shape, v.shape, strict=True)]
        out = ndimage.zoom(v, zoom, order=0, mode="nearest", grid_mode=True, prefilter=False)
        return np.asarray(out, dtype=np.float32)
    # Shrinking axes first, growing ones last: every pass then works on the smallest array.
    for axis in sorted(range(3), key=lambda ax: shape[ax] / v.shape[ax]):
        n_in, n_out = v.shape[axis], shape[axis]
        if n_in == n_out:
            continue
        lo, hi, w = axis_weights(n_in, n_out)
        wshape = [1, 1, 1]
        wshape[axis] = n_out
        wb = w.reshape(wshape)
        a, b = _planes(v, lo, axis), _planes(v, hi, axis)
        if pointwise is not None:  # element-wise, so it commutes with taking planes
            a = np.asarray(pointwise(a), dtype=np.float32)
            b = np.asarray(pointwise(b), dtype=np.float32)
            pointwise = None
        # a + (b - a) * w, in place to keep peak memory at three copies of the largest pass.
        b -= a
        b *= wb
        a += b
        v = a
    return v


def _planes(v: NDArray[Any], index: NDArray[np.intp], axis: int) -> NDArray[np.float32]:
    """``np.take(v, index, axis)`` as float32: along the slices of an int16 volume copied plane by
    plane into the float32 result (no int16 copy of the planes first)."""
    if v.dtype == np.float32 or axis != 0:
        return np.asarray(np.take(v, index, axis=axis), dtype=np.float32)
    out = np.empty((len(index), *v.shape[1:]), dtype=np.float32)
    for j, i in enumerate(index):
        out[j] = v[i]
    return out
