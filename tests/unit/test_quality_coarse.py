"""The shell around a segment is sampled on a coarse grid: its contrast and enclosure must stay
those of the full-resolution shell (a disc dilation in each slice's plane, computed here)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from .test_quality import RNG, grid, measured, mm


def full_resolution(volume, mask, shell_mm: float, tissue_above: float) -> tuple[float, float]:
    """Contrast and enclosure from the shell at full resolution, as the definition reads."""
    _, dy, dx = volume.spacing
    ry, rx = round(shell_mm / dy), round(shell_mm / dx)
    yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disc = ((yy * dy) ** 2 + (xx * dx) ** 2) <= shell_mm**2
    shell = ndimage.binary_dilation(mask, structure=disc[np.newaxis]) & ~mask
    inside, around = volume.voxels[mask].mean(), volume.voxels[shell]
    contrast = abs(inside - around.mean()) / (abs(inside) + abs(around.mean()))
    return float(contrast), float(np.count_nonzero(around > tissue_above) / around.size)


@pytest.mark.parametrize("spacing", [(5.0, 0.7, 0.7), (1.0, 0.7, 0.7), (8.0, 2.8, 2.8)])
def test_coarse_shell_gives_the_full_resolution_values(spacing) -> None:
    """A lung-like ellipsoid half against soft tissue, half against air (enclosure about 0.5),
    on grids like a 512 x 512 CT's and a coarse one."""
    shape = (24, int(260 / spacing[1]), int(260 / spacing[2]))
    z, y, x = mm(shape, spacing)
    lung = (z / 50) ** 2 + (y / 70) ** 2 + (x / 50) ** 2 <= 1
    image = np.where(x > 0, 40.0, -1000.0)  # tissue on one side, air on the other
    image = np.where(lung, -850.0, image) + RNG.normal(0, 20, shape)
    volume = grid(shape, spacing, image)
    q = measured(volume, lung, shell_mm=10.0, tissue_above=-500)
    contrast, enclosed = full_resolution(volume, lung, 10.0, -500)
    assert 0.3 < enclosed < 0.7
    assert q.contrast == pytest.approx(contrast, abs=0.02)
    assert q.enclosed == pytest.approx(enclosed, abs=0.02)
