"""Volume -> model tensor, and model output -> volume grid.

The same functions are used when a model is trained (``triton_models/*/build_model.py``)
and when it runs in the worker, so the two can never drift apart.

Array convention everywhere in this project: ``(slice, row, column)`` = ``(z, y, x)``, slices
sorted by position along the slice normal (ascending), rows and columns as stored in DICOM.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def window(volume: NDArray[np.floating], low: float, high: float) -> NDArray[np.float32]:
    """Clip intensities to ``[low, high]`` and scale them linearly to ``[0, 1]``."""
    if not high > low:
        raise ValueError(f"window: high ({high}) must be greater than low ({low})")
    out = (np.asarray(volume, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def minmax(volume: NDArray[np.floating]) -> NDArray[np.float32]:
    """Scale intensities to ``[0, 1]`` by the volume's own minimum and maximum."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros_like(v)
    return (v - np.float32(lo)) / np.float32(hi - lo)


def resize(volume: NDArray[np.floating], shape: tuple[int, int, int], order: int = 1) -> NDArray[np.float32]:
    """Resample a 3D array to ``shape`` (linear by default), corners of the grid kept aligned.

    ``grid_mode=True`` treats voxels as cells, so a voxel centre maps to the same physical
    place in both grids (what half-pixel-aware resampling in torch does with
    ``align_corners=False``).
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"resize: target shape must be three positive sizes, got {shape}")
    v = np.asarray(volume, dtype=np.float32)
    if v.shape == tuple(shape):
        return v.copy()
    zoom = [t / s for t, s in zip(shape, v.shape, strict=True)]
    out = ndimage.zoom(v, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    return np.asarray(out, dtype=np.float32)
