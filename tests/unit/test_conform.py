"""Conforming volumes to the brain network's grid and back, on synthetic volumes of known geometry
and on the real GE EPI series. About 25 s on 2 shared cores (50 s when busy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.conform import (
    conform,
    orientation_directions,
    resample_to,
    same_grid,
    to_source,
    volume_affine,
)
from orthanc_plugin.imaging.volume import Volume, build_volume

from ..conftest import MR, read_series

Array = NDArray[Any]
Field = Callable[[Array], Array]  # LPS points [..., 3] -> values [...]

CENTER = np.array([12.0, -30.0, 45.0])  # LPS centre of every synthetic field of view


def _rotation(ax: float, ay: float, az: float) -> Array:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


_R = _rotation(np.radians(20), np.radians(-15), np.radians(30))

# (row_direction, column_direction) as in ImageOrientationPatient.
GEOMETRIES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "axial-head-first": ((1, 0, 0), (0, 1, 0)),
    "axial-feet-first": ((-1, 0, 0), (0, 1, 0)),  # normal toward the feet
    "axial-prone": ((-1, 0, 0), (0, -1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "oblique": (tuple(_R[:, 0]), tuple(_R[:, 1])),
}


def make_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    geometry: str,
    field: Field | None = None,
    center: Array = CENTER,
    supersample: int = 3,
) -> Volume:
    """A volume whose voxels average ``field`` over ``supersample``^3 points of each voxel box."""
    row, col = (np.asarray(v, dtype=np.float64) for v in GEOMETRIES[geometry])
    normal = np.cross(row, col)
    axes = np.stack([normal * spacing[0], col * spacing[1], row * spacing[2]], axis=1)
    origin = center - axes @ ((np.asarray(shape) - 1) / 2.0)
    voxels = np.zeros(shape, dtype=np.float32)
    if field is not None:
        idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
        subs = (np.arange(supersample) + 0.5) / supersample - 0.5
        acc = np.zeros(idx.shape[1])
        for dz in subs:
            for dy in subs:
                for dx in subs:
                    pts = axes @ (idx + np.array([[dz], [dy], [dx]])) + origin[:, None]
                    acc += field(pts.T)
        voxels = (acc / supersample**3).reshape(shape).astype(np.float32)
    return Volume(
        voxels=voxels,
        datasets=(),
        spacing=spacing,
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        row_direction=tuple(float(v) for v in row),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in col),  # type: ignore[arg-type]
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
    )


def sphere(center: Array, radius: float, value: float = 1.0) -> Field:
    return lambda p: np.where(np.linalg.norm(p - center, axis=-1) <= radius, value, 0.0)


def dice(a: Array, b: Array) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def centroid(image: Array) -> Array:
    total = float(image.sum(dtype=np.float64))
    marginals = [
        image.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64) for axis in range(3)
    ]
    return np.array([float(np.arange(m.size) @ m) / total for m in marginals])


def expected_lia_index(p: Array, size: int = 256) -> Array:
    """Index of LPS point ``p`` on a 1 mm LIA grid, worked out by hand: axes toward A (-y), I (-z), L (+x)."""
    d, mid = p - CENTER, (size - 1) / 2.0
    return np.array([mid - d[1], mid - d[2], mid + d[0]])


def test_lia_axes_point_anterior_inferior_left() -> None:
    np.testing.assert_array_equal(orientation_directions("LIA"), [[0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    np.testing.assert_array_equal(orientation_directions("ras"), [[0, 0, -1], [0, -1, 0], [1, 0, 0]])
    for bad in ("LIX", "LLA", "LI", "RLA"):
        with pytest.raises(ValueError, match="orientation"):
            orientation_directions(bad)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_sphere_lands_at_its_conformed_voxel_with_its_volume(geometry: str) -> None:
    radius = 20.0
    where = CENTER + np.array([25.0, -18.0, 14.0])
    vol = make_volume((30, 64, 64), (5.0, 3.75, 3.75), geometry, sphere(where, radius))
    c = conform(vol)
    assert c.image.shape == (256, 256, 256) and c.image.dtype == np.float32
    np.testing.assert_allclose(c.spacing_mm, (1.0, 1.0, 1.0))
    # position: the sphere's centroid is at the voxel worked out by hand, and the affine agrees
    got = centroid(c.image)
    np.testing.assert_allclose(got, expected_lia_index(where), atol=0.3)
    np.testing.assert_allclose((c.affine @ np.append(got, 1.0))[:3], where, atol=0.3)
    # volume: 1 mm^3 voxels, so the sum of the partial-volume image is the volume in mm^3
    true_ml = 4.0 / 3.0 * np.pi * radius**3
    assert float(c.image.sum()) == pytest.approx(true_ml, rel=0.03)
    assert float(vol.voxels.sum()) * float(np.prod(vol.spacing)) == pytest.approx(true_ml, rel=0.03)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_asymmetric_pattern_reads_anterior_inferior_left(geometry: str) -> None:
    """Blobs Anterior, toward the feet and to the patient's Left land on array axes 0, 1, 2, high end."""
    directions = {0: np.array([0, -50.0, 0]), 1: np.array([0, 0, -30.0]), 2: np.array([40.0, 0, 0])}
    for axis, offset in directions.items():
        vol = make_volume(
            (40, 64, 64), (4.0, 3.0, 3.0), geometry, sphere(CENTER + offset, 8.0), supersample=2
        )
        where = centroid(conform(vol, shape=(128, 128, 128)).image)
        np.testing.assert_allclose(where, expected_lia_index(CENTER + offset, size=128), atol=0.3)
        assert where[axis] > 90.0  # 30-50 voxels toward the end of that axis
        others = [a for a in range(3) if a != axis]
        assert np.all(np.abs(where[others] - 63.5) < 0.3)


def test_every_geometry_gives_the_same_conformed_image() -> None:
    def field(p: Array) -> Array:  # smooth and asymmetric: a tilted ramp times a soft ball
        d = p - CENTER
        return (1.0 + 0.01 * d @ np.array([1.0, -2.0, 3.0])) * np.exp(-np.sum(d**2, axis=-1) / (2 * 35.0**2))

    images = {
        g: conform(make_volume((48, 72, 72), (3.0, 3.0, 3.0), g, field), shape=(128,) * 3).image
        for g in GEOMETRIES
    }
    ref = images["axial-head-first"]
    core = (slice(14, 114),) * 3  # well inside every field of view (144-216 mm)
    for g, img in images.items():
        assert np.abs(img[core] - ref[core]).max() < 0.02, g


def test_linear_field_is_reproduced_exactly_inside() -> None:
    """Trilinear interpolation is exact on a linear field: checks the affine to interpolation precision."""
    grad = np.array([0.7, -1.3, 2.1])

    def field(p: Array) -> Array:
        return (p - CENTER) @ grad + 500.0

    vol = make_volume((20, 50, 60), (5.0, 3.75, 3.75), "oblique", field, supersample=1)
    c = conform(vol, shape=(128, 128, 128), spacing_mm=2.0)
    idx = np.indices(c.image.shape, dtype=np.float64).reshape(3, -1)
    world = (c.affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    src = np.linalg.solve(volume_affine(vol), np.vstack([world, np.ones(world.shape[1])]))[:3]
    interior = np.all((src >= 0) & (src <= np.array(vol.shape)[:, None] - 1), axis=0)
    assert interior.sum() > 100_000
    expected = (field(world.T))[interior]
    np.testing.assert_allclose(c.image.reshape(-1)[interior], expected, atol=2e-3)
    # beyond half a voxel outside the field of view the image is 0
    outside = np.any((src < -0.51) | (src > np.array(vol.shape)[:, None] - 0.49), axis=0)
    assert outside.sum() > 500_000
    assert np.all(c.image.reshape(-1)[outside] == 0)


def _labels(vol: Volume) -> NDArray[np.uint8]:
    """Label 1: a ball; label 2: an oblique slab; on the source grid, sampled at voxel centres."""
    idx = np.indices(vol.shape, dtype=np.float64).reshape(3, -1)
    p = (volume_affine(vol) @ np.vstack([idx, np.ones(idx.shape[1])]))[:3].T
    ball = np.linalg.norm(p - (CENTER + [10.0, 5.0, -3.0]), axis=1) <= 28.0
    # bounded, so that all of it lies inside the 256 mm cube whatever the field of view
    slab = (np.abs((p - CENTER) @ np.array([0.6, 0.0, 0.8]) - 40.0) <= 9.0) & (
        np.linalg.norm(p - CENTER, axis=1) < 100
    )
    out = np.zeros(idx.shape[1], dtype=np.uint8)
    out[slab] = 2
    out[ball] = 1
    return out.reshape(vol.shape)


@pytest.mark.parametrize(
    ("shape", "spacing", "geometry", "min_dice"),
    [
        ((24, 64, 64), (5.0, 3.75, 3.75), "axial-head-first", 0.95),
        ((24, 64, 64), (5.0, 3.75, 3.75), "oblique", 0.95),
        ((24, 64, 64), (5.0, 3.75, 3.75), "axial-feet-first", 0.95),
        ((96, 112, 120), (1.0, 1.0, 1.0), "axial-head-first", 0.99),
        ((95, 111, 121), (1.0, 1.0, 1.0), "sagittal", 0.99),  # odd sizes: grids half a voxel apart
        ((96, 112, 120), (1.0, 1.0, 1.0), "oblique", 0.99),
    ],
)
def test_round_trip_reproduces_a_label_map(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], geometry: str, min_dice: float
) -> None:
    vol = make_volume(shape, spacing, geometry)
    labels = _labels(vol)
    as_volume = replace(vol, voxels=labels.astype(np.float32))
    # nearest both ways (a label map sent to the grid and back)
    c = conform(as_volume, order=0)
    back = to_source(c, c.image.astype(np.uint8), vol, order=0)
    assert back.dtype == np.uint8 and back.shape == vol.shape
    # the network's way: each class conformed linearly, the argmax on the grid, labels mapped back
    scores = [conform(replace(vol, voxels=(labels == k).astype(np.float32))) for k in (1, 2)]
    best = np.argmax(np.stack([s.image for s in scores]), axis=0).astype(np.uint8) + 1
    on_grid = np.where(np.maximum(scores[0].image, scores[1].image) > 0.5, best, 0).astype(np.uint8)
    argmax_back = to_source(scores[0], on_grid, vol, order=0)
    for k in (1, 2):
        assert (labels == k).sum() > 200
        assert dice(back == k, labels == k) > min_dice, k
        # grids half a voxel apart smooth the classes on the grid: a little lost at the edges
        assert dice(argmax_back == k, labels == k) > 0.95, k


@pytest.mark.parametrize("geometry", ["axial-head-first", "oblique", "coronal"])
def test_probabilities_from_the_conformed_grid_land_on_the_source(geometry: str) -> None:
    """A ball drawn on the conformed grid, mapped back (linear, with a channel axis), is the ball."""
    vol = make_volume((20, 40, 40), (5.0, 3.75, 3.75), geometry)  # inside the cube even when oblique
    c = conform(vol)
    where, radius = CENTER + np.array([-20.0, 10.0, 5.0]), 30.0
    idx = np.indices(c.image.shape, dtype=np.float32).reshape(3, -1)
    world = (c.affine[:3, :3].astype(np.float32) @ idx).T + c.affine[:3, 3].astype(np.float32)
    dist = np.linalg.norm(world - where.astype(np.float32), axis=1).reshape(c.image.shape)
    brain = np.clip(radius + 0.5 - dist, 0.0, 1.0).astype(np.float32)
    probs = np.stack([1.0 - brain, brain])
    back = to_source(c, probs, vol, order=1)
    assert back.shape == (2, *vol.shape) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    src = np.indices(vol.shape, dtype=np.float64).reshape(3, -1)
    p = (volume_affine(vol) @ np.vstack([src, np.ones(src.shape[1])]))[:3].T
    truth = (np.linalg.norm(p - where, axis=1) <= radius).reshape(vol.shape)
    assert dice(back[1] > 0.5, truth) > 0.97
    with pytest.raises(ValueError, match="order=0"):
        to_source(c, (brain > 0.5).astype(np.uint8), vol, order=1)
    with pytest.raises(ValueError, match="expected an array shaped"):
        to_source(c, brain[:10], vol)


def test_bool_mask_round_trip_keeps_bool() -> None:
    vol = make_volume((20, 40, 40), (5.0, 3.75, 3.75), "axial-head-first")
    c = conform(vol, shape=(64, 64, 64), spacing_mm=2.0)
    mask = np.zeros(c.image.shape, dtype=bool)
    mask[20:40, 30:34, 10:50] = True
    back = to_source(c, mask, vol, order=0)
    assert back.dtype == np.bool_ and 0 < back.sum() < back.size


def test_resample_to_puts_a_second_series_on_the_first_grid() -> None:
    grad = np.array([0.5, 1.5, -1.0])

    def field(p: Array) -> Array:
        return (p - CENTER) @ grad + 100.0

    reference = make_volume((40, 96, 96), (3.0, 1.5, 1.5), "axial-head-first", field, supersample=1)
    moving = make_volume((50, 60, 60), (4.0, 2.5, 2.5), "oblique", field, supersample=1)
    got = resample_to(moving, reference)
    assert got.shape == reference.shape and got.dtype == np.float32
    idx = np.indices(reference.shape, dtype=np.float64).reshape(3, -1)
    world = volume_affine(reference) @ np.vstack([idx, np.ones(idx.shape[1])])
    src = np.linalg.solve(volume_affine(moving), world)[:3]
    interior = np.all((src >= 0) & (src <= np.array(moving.shape)[:, None] - 1), axis=0)
    assert interior.mean() > 0.3
    np.testing.assert_allclose(got.reshape(-1)[interior], reference.voxels.reshape(-1)[interior], atol=2e-3)
    outside = np.any((src < -0.51) | (src > np.array(moving.shape)[:, None] - 0.49), axis=0)
    assert outside.sum() > 1000 and np.all(got.reshape(-1)[outside] == 0)
    # the same grid: a plain copy
    same = resample_to(reference, reference)
    np.testing.assert_array_equal(same, reference.voxels)
    assert same is not reference.voxels


def test_same_grid() -> None:
    a = make_volume((10, 20, 30), (2.0, 1.0, 1.0), "oblique")
    assert same_grid(a, a)
    nudged = replace(a, origin=tuple(np.add(a.origin, [0.004, 0.0, 0.0])))
    assert same_grid(a, nudged)
    moved = replace(a, origin=tuple(np.add(a.origin, [0.0, 0.05, 0.0])))
    assert not same_grid(a, moved)
    assert same_grid(a, moved, tol_mm=0.1)
    finer = replace(a, spacing=(2.0, 1.0, 1.001))  # 29 columns x 0.001 mm apart at the end
    assert not same_grid(a, finer)
    assert not same_grid(a, make_volume((10, 20, 31), (2.0, 1.0, 1.0), "oblique"))
    assert not same_grid(a, make_volume((10, 20, 30), (2.0, 1.0, 1.0), "axial-head-first"))


# --- the real GE EPI series (axial, 15 slices of 64 x 64, 3.75 x 3.75 mm, 5 mm apart)


@pytest.fixture(scope="module")
def epi() -> Volume:
    return build_volume(read_series(MR / "mr_0004"), temporal_position=1)


def test_real_epi_is_conformed_centred_in_lia(epi: Volume) -> None:
    assert epi.shape == (15, 64, 64)
    ones = replace(epi, voxels=np.ones(epi.shape, dtype=np.float32))
    support = np.nonzero(conform(ones).image)
    extent = [int(a.max() - a.min() + 1) for a in support]
    # 64 x 3.75 = 240 mm toward Anterior, 15 x 5 = 75 mm toward Inferior, 240 mm toward Left
    assert extent == [240, 75, 240]
    mid = [(int(a.min()) + int(a.max())) / 2.0 for a in support]
    np.testing.assert_allclose(mid, 127.5, atol=0.5)

    c = conform(epi)
    head = ndimage.binary_fill_holes(c.image > 0.2 * float(c.image.max()))
    assert head.sum() > 500_000  # 1 mm^3 voxels: more than 0.5 L of head in the 75 mm slab (0.95 L)
    where = centroid(head.astype(np.float32))
    assert np.all(np.abs(where - 127.5) < 20.0), where
    # superior slices of the series are at the low end of axis 1 (Inferior grows with the index)
    top = conform(replace(ones, voxels=np.arange(15, dtype=np.float32)[:, None, None] * ones.voxels))
    column = top.image[128, 91:166, 128]
    assert column[0] > column[-1] and np.all(np.diff(column) <= 1e-4)


def test_real_epi_matches_the_brainchop_check_transposition(epi: Volume) -> None:
    """Same result as build_model.py --check-mr --orient lia: 1 mm in array axes, then (1, 0, 2), flip 0 and 1."""
    spacing = np.asarray(epi.spacing)
    centre = (np.asarray(epi.shape) - 1) / 2.0
    scale = 1.0 / spacing
    cube = ndimage.affine_transform(
        np.asarray(epi.voxels, dtype=np.float32), scale, offset=centre - 127.5 * scale, output_shape=(256,) * 3,
        order=1, cval=0.0,
    )  # fmt: skip
    expected = np.flip(cube.transpose(1, 0, 2), axis=(0, 1))
    c = conform(epi)
    # compare where the check's cube interpolates inside the series (it drops the outer half voxels)
    inner = np.flip(
        ndimage.affine_transform(
            np.ones(epi.shape, np.float32),
            scale,
            offset=centre - 127.5 * scale,
            output_shape=(256,) * 3,
            order=0,
        ).transpose(1, 0, 2),
        axis=(0, 1),
    ).astype(bool)
    assert inner.sum() > 3_000_000
    np.testing.assert_allclose(c.image[inner], expected[inner], rtol=1e-4, atol=1e-2)


def test_real_epi_label_round_trip(epi: Volume) -> None:
    brain = (epi.voxels > 0.3 * float(epi.voxels.max())).astype(np.uint8)
    c = conform(epi)
    mask = conform(replace(epi, voxels=brain.astype(np.float32)), order=0).image
    back = to_source(c, mask.astype(np.uint8), epi, order=0)
    assert brain.sum() > 5000
    np.testing.assert_array_equal(back, brain)
