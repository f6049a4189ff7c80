"""The whole-grid quality measurement, as the definition reads, that ``measure_label`` (which
works from a segment's bounding box) is compared with; for tests only."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from orthanc_plugin.imaging.postprocess import label_box
from orthanc_plugin.imaging.quality import _STEP, SegmentQuality, _shell, high_percentile, sphericity
from orthanc_plugin.imaging.volume import Volume


def touches_ends(mask: NDArray[np.bool_]) -> bool:
    """True when the segment has a voxel on the first or last slice: the series cuts it."""
    return bool(mask[0].any() or mask[-1].any())


def _sampled(voxels: NDArray[np.float32] | NDArray[np.int16], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    sub = mask[::_STEP, ::_STEP, ::_STEP]
    if np.count_nonzero(sub) >= 1000:
        return np.asarray(voxels[::_STEP, ::_STEP, ::_STEP][sub], dtype=np.float32)
    return np.asarray(voxels[mask], dtype=np.float32)


def measure_segment(
    volume: Volume,
    mask: NDArray[np.bool_],
    *,
    shell_mm: float = 10.0,
    tissue_above: float | None = None,
    shape_and_surroundings: bool = True,
) -> SegmentQuality:
    """The quality of the segment ``mask`` (on ``volume``'s grid), every step on the whole grid."""
    if mask.shape != volume.shape:
        raise ValueError(f"mask shaped {mask.shape}, the volume is {volume.shape}")
    voxel_ml = volume.voxel_volume_ml
    count = int(np.count_nonzero(mask))
    covered = volume.shape[0] * volume.spacing[0]
    if count == 0:
        return SegmentQuality(0.0, False, covered)
    voxels = volume.voxels
    inside = _sampled(voxels, mask)
    mean = float(inside.mean())
    if not shape_and_surroundings:
        return SegmentQuality(count * voxel_ml, touches_ends(mask), covered, mean=mean)
    variation = float(inside.std() / abs(mean)) if mean != 0 else math.inf
    shell, box = _shell(mask, volume.spacing, shell_mm)
    if shell.any():
        around = np.asarray(voxels[box][shell], dtype=np.float32)
        around_mean = float(around.mean())
        denominator = abs(mean) + abs(around_mean)
        contrast = abs(mean - around_mean) / denominator if denominator > 0 else 0.0
        threshold = tissue_above if tissue_above is not None else 0.1 * high_percentile(voxels, 99.5)
        enclosed = float(np.count_nonzero(around > threshold)) / around.size
    else:  # the segment fills every slice: nothing around it to compare with
        contrast, enclosed = 0.0, 0.0
    return SegmentQuality(
        volume_ml=count * voxel_ml,
        partial=touches_ends(mask),
        covered_mm=covered,
        mean=mean,
        contrast=contrast,
        variation=variation,
        enclosed=enclosed,
        compactness=sphericity(mask[label_box(mask, True) or ()], volume.spacing),
    )
