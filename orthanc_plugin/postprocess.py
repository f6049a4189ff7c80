"""Model output -> label volume on the source grid, and the measurements taken from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .preprocess import resize


def labels_from_probabilities(
    probabilities: NDArray[np.floating[Any]],
    shape: tuple[int, int, int],
    largest_component: bool = True,
    slab: int = 16,
) -> NDArray[np.uint8]:
    """``probabilities[c, z, y, x]`` on the model grid -> uint8 labels on the source grid ``shape``.

    Each channel is resampled linearly before the argmax, so boundaries fall where the
    classes cross rather than on the model's coarse voxels. The slice axis is resampled
    first at model resolution, then the image plane ``slab`` slices at a time, so memory
    stays bounded however long the series is.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities shaped (classes, z, y, x), got {probabilities.shape}")
    n, _, my, mx = probabilities.shape
    nz, ny, nx = shape
    along_z = [resize(probabilities[c], (nz, my, mx)) for c in range(n)]
    labels = np.empty(shape, dtype=np.uint8)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        best = resize(along_z[0][z0:z1], (z1 - z0, ny, nx))
        out = np.zeros((z1 - z0, ny, nx), dtype=np.uint8)
        for c in range(1, n):
            up = resize(along_z[c][z0:z1], (z1 - z0, ny, nx))
            better = up > best
            out[better] = c
            np.maximum(best, up, out=best)
        labels[z0:z1] = out
    if largest_component:
        keep_largest_components(labels, range(1, n))
    return labels


def keep_largest_components(labels: NDArray[np.uint8], values: Sequence[int] | range) -> None:
    """In place: keep only the largest 3D connected component of each label value."""
    for v in values:
        mask = labels == v
        if not mask.any():
            continue
        # Work inside the label's bounding box: the organ is a fraction of the field of view.
        box = tuple(
            slice(int(idx[0]), int(idx[-1]) + 1)
            for idx in (
                np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
            )
        )
        crop = mask[box]
        comp, n = ndimage.label(crop)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        drop = crop & (comp != int(np.argmax(sizes)))
        labels[box][drop] = 0


def volumes_ml(
    labels: NDArray[np.integer[Any]], values: Sequence[int], voxel_volume_ml: float
) -> dict[int, float]:
    counts = np.bincount(labels.ravel(), minlength=max(values, default=0) + 1)
    return {v: float(counts[v]) * voxel_volume_ml for v in values}
