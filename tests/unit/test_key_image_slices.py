"""The choice of key-image slices, counted a few slices at a time, against the whole-grid count."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from orthanc_plugin.imaging.postprocess import BOX_SLAB
from orthanc_plugin.outputs.key_images import choose_slices


def plain_choice(labels: NDArray[Any], values: Sequence[int], count: int) -> list[int]:
    """The whole-grid count: np.isin of the label map, areas per slice, the largest of each run."""
    mask = np.isin(labels, np.asarray(list(values), dtype=labels.dtype))
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    holding = np.flatnonzero(area)
    if holding.size == 0:
        return []
    return sorted(
        {int(run[np.argmax(area[run])]) for run in np.array_split(holding, min(count, holding.size))}
    )


def test_key_slices_counted_by_slab_are_the_whole_grid_choice() -> None:
    rng = np.random.default_rng(3)
    for trial in range(120):
        nz = int(rng.integers(1, 3 * BOX_SLAB))
        density = float(rng.random()) * 0.3
        labels = (rng.random((nz, 7, 9)) < density).astype(np.uint8) * rng.integers(1, 4, (nz, 7, 9)).astype(
            np.uint8
        )
        values = ([1], [1, 2], [2, 3, 3], [5])[trial % 4]
        for count in (1, 3, 8):
            assert choose_slices(labels, values, count) == plain_choice(labels, values, count), (trial, count)
