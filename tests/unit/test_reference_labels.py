# SPDX-License-Identifier: AGPL-3.0-or-later
"""The classical lung labeller of ``triton_models/ct_lung`` on a small synthetic chest phantom."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "triton_models" / "ct_lung" / "reference_labels.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ct_lung_reference_labels", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rl = _load()

SHAPE = (24, 96, 112)  # (z, y, x)
SPACING = (6.0, 3.0, 3.0)  # mm
CENTRE_Y, CENTRE_X = 46.0, 56.0
LUNG_DX = 22.0  # lung centres at CENTRE_X -/+ LUNG_DX (small x = patient right)
VOXEL_ML = float(np.prod(SPACING)) / 1000.0


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    return z, y, x


def _phantom(airway: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU volume, body mask, right-lung mask, left-lung mask."""
    z, y, x = _grid()
    body = ((y - CENTRE_Y) / 34.0) ** 2 + ((x - CENTRE_X) / 50.0) ** 2 <= 1.0
    hu = np.full(SHAPE, -1000.0)
    hu[body] = 0.0
    # Patient table under the body, with a hollow (air) core and an air gap above it.
    hu[:, 86:93, 8:104] = 200.0
    hu[:, 88:91, 12:100] = -1000.0

    def ellipsoid(cx: float) -> np.ndarray:
        return ((z - 11.5) / 9.0) ** 2 + ((y - CENTRE_Y) / 24.0) ** 2 + ((x - cx) / 15.0) ** 2 <= 1.0

    right = ellipsoid(CENTRE_X - LUNG_DX)
    left = ellipsoid(CENTRE_X + LUNG_DX)
    hu[right | left] = -800.0
    if airway:
        # Trachea down the midline from the top slice, and main bronchi joining both lungs.
        trachea = ((y - 40.0) ** 2 + (x - CENTRE_X) ** 2 <= 3.5**2) & (z >= 12)
        bronchi = (np.abs(y - 40.0) <= 2) & (np.abs(z - 12.0) <= 0) & (np.abs(x - CENTRE_X) <= LUNG_DX)
        hu[trachea | bronchi] = -1000.0
    rng = np.random.default_rng(0)
    hu += rng.normal(0.0, 20.0, SHAPE)
    return hu.astype(np.float32), body, right, left


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def test_labels_land_on_the_right_sides() -> None:
    hu, _, right, left = _phantom()
    labels = rl.reference_labels(hu, SPACING)
    assert labels.dtype == np.uint8
    assert labels.shape == SHAPE
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    x = _grid()[2]
    # Label 1 (patient RIGHT) has the smaller column index, label 2 (patient LEFT) the larger.
    assert x[labels == 1].mean() < CENTRE_X < x[labels == 2].mean()
    assert _dice(labels == 1, right) > 0.9
    assert _dice(labels == 2, left) > 0.9


def test_outside_air_and_table_are_excluded() -> None:
    hu, body, _, _ = _phantom()
    labels = rl.reference_labels(hu, SPACING)
    assert not labels[~body].any()
    assert not labels[:, 86:, :].any()  # hollow table core


def test_volumes_are_near_the_phantom() -> None:
    hu, _, right, left = _phantom()
    labels = rl.reference_labels(hu, SPACING)
    vols = rl.label_volumes_ml(labels, SPACING)
    for name, truth in (("right_lung", right), ("left_lung", left)):
        expected = float(np.count_nonzero(truth)) * VOXEL_ML
        assert vols[name] == pytest.approx(expected, rel=0.08)


def test_lungs_joined_by_airways_are_split_and_trachea_dropped() -> None:
    hu, _, right, left = _phantom(airway=True)
    labels = rl.reference_labels(hu, SPACING)
    x = _grid()[2]
    assert x[labels == 1].mean() < CENTRE_X < x[labels == 2].mean()
    assert _dice(labels == 1, right) > 0.85
    assert _dice(labels == 2, left) > 0.85
    # The trachea above the lungs is not lung.
    assert not labels[21:, 36:45, 52:61].any()


def test_no_lungs_gives_background_only() -> None:
    hu, _, _, _ = _phantom()
    hu[hu < -500] = -1000.0
    z, y, x = _grid()
    body = ((y - CENTRE_Y) / 34.0) ** 2 + ((x - CENTRE_X) / 50.0) ** 2 <= 1.0
    hu[body] = 40.0
    assert not rl.reference_labels(hu, SPACING).any()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        rl.reference_labels(np.zeros((4, 4), np.float32), SPACING)
    with pytest.raises(ValueError):
        rl.reference_labels(np.zeros((4, 4, 4), np.float32), (1.0, 0.0, 1.0))
