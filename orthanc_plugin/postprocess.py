"""Model output -> label volume on the source grid, and the measurements taken from it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .preprocess import resize


def labels_from_probabilities(
    probabilities: NDArray[np.floating], shape: tuple[int, int, int], largest_component: bool = True
) -> NDArray[np.uint8]:
    """``probabilities[c, z, y, x]`` on the model grid -> uint8 labels on the source grid ``shape``.

    Each channel is resampled linearly before the argmax, so the boundary is placed where the
    classes cross rather than on the model's coarse voxels.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities shaped (classes, z, y, x), got {probabilities.shape}")
    n = probabilities.shape[0]
    best = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for c in range(n):
        up = resize(probabilities[c], shape, order=1)
        better = up > best
        labels[better] = c
        best = np.maximum(best, up, out=best)
    if largest_component:
        keep_largest_components(labels, range(1, n))
    return labels


def keep_largest_components(labels: NDArray[np.uint8], values: Sequence[int] | range) -> None:
    """In place: keep only the largest 3D connected component of each label value."""
    for v in values:
        mask = labels == v
        if not mask.any():
            continue
        comp, n = ndimage.label(mask)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        labels[mask & (comp != int(np.argmax(sizes)))] = 0


def volumes_ml(labels: NDArray[np.integer], values: Sequence[int], voxel_volume_ml: float) -> dict[int, float]:
    counts = np.bincount(labels.ravel(), minlength=max(values, default=0) + 1)
    return {v: float(counts[v]) * voxel_volume_ml for v in values}
