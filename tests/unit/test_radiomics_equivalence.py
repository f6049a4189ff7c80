"""The radiomics module against its previous implementation (``radiomics_original.py``): every
feature equal bit for bit (NaN where it was NaN), on the real CT and on edge cases, and each
faster part equal to the plain computation it replaced.

What the faster parts rely on is checked here too: scikit-image's marching cubes gives the same
mesh on the mask's own box, moved back by the box's corner, and on the cubes with a surface only;
the vertices of a binary mask's mesh lie on half voxels; the farthest pair of vertices survives
the line-end filter; the sums made in integers are the ones the floating-point code made exactly.

Run as a script, it times the two on the chest CT and prints their peak memory (see ``main``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes

from orthanc_plugin.imaging import radiomics
from orthanc_plugin.imaging.radiomics import (
    RadiomicsError,
    RadiomicsSettings,
    compute_features,
    label_features,
)
from orthanc_plugin.imaging.volume import build_volume

from ..conftest import CT_A0001, read_series
from . import radiomics_original as original

Array = NDArray[Any]
CT = RadiomicsSettings(bin_width=25, resegment=(-1000, 400))  # config/pipelines.yaml's ct-lung
SETTINGS = [
    CT,
    RadiomicsSettings(bin_width=25),  # bins from the region's lowest value
    RadiomicsSettings(bin_width=12.5, resegment=(-1000.5, 400.25)),  # neither a whole number
    RadiomicsSettings(bin_count=32, glcm_aggregation="3D_averaged"),
    RadiomicsSettings(bin_width=300),  # few levels
]


def same(new: dict[str, float], old: dict[str, float]) -> list[str]:
    """The features that differ (NaN equals NaN); empty when all are equal bit for bit."""
    assert list(new) == list(old)
    return [k for k in old if not (new[k] == old[k] or (math.isnan(new[k]) and math.isnan(old[k])))]


def old_settings(s: RadiomicsSettings) -> original.RadiomicsSettings:
    return original.RadiomicsSettings(**asdict(s))


def both(image: Array, mask: Array, spacing: tuple[float, float, float], s: RadiomicsSettings) -> list[str]:
    """The features that differ between the module and the original, which must fail alike."""
    try:
        old = original.compute_features(image, mask, spacing, old_settings(s))
    except original.RadiomicsError as e:
        with pytest.raises(RadiomicsError) as raised:
            compute_features(image, mask, spacing, s)
        assert str(raised.value) == str(e)
        return []
    return same(compute_features(image, mask, spacing, s), old)


@pytest.fixture(scope="module")
def ct() -> tuple[Array, Array, tuple[float, float, float]]:
    """The 64-slice chest CT in HU (int16, as the worker holds it) and two lung-like labels:
    air inside the body, split at the middle column (several parts each, touching the box)."""
    volume = build_volume(read_series(CT_A0001))
    assert volume.voxels.dtype == np.int16
    v = volume.voxels
    body = np.zeros(v.shape, dtype=bool)
    body[:, 110:420, 60:450] = True
    lungs = body & (v < -400)
    labels = np.zeros(v.shape, dtype=np.uint8)
    labels[:, :, :256][lungs[:, :, :256]] = 1
    labels[:, :, 256:][lungs[:, :, 256:]] = 2
    sp = volume.spacing
    return v, labels, (float(sp[0]), float(sp[1]), float(sp[2]))


def test_the_real_ct_gives_the_same_features(ct: tuple[Array, Array, tuple[float, float, float]]) -> None:
    v, labels, spacing = ct
    for label in (1, 2):
        new = label_features(v, labels, label, spacing, CT)
        old = original.label_features(v, labels, label, spacing, old_settings(CT))
        assert same(new, old) == []
    # As float32 (a series whose values are not whole numbers takes that path) and other settings.
    for s in SETTINGS[1:4]:
        assert (
            same(
                label_features(v, labels, 2, spacing, s),
                original.label_features(v, labels, 2, spacing, old_settings(s)),
            )
            == []
        )
    wide = v.astype(np.float32)
    assert (
        same(
            label_features(wide, labels, 1, spacing, CT),
            original.label_features(wide, labels, 1, spacing, old_settings(CT)),
        )
        == []
    )


def ct_like(shape: tuple[int, ...], seed: int, dtype: Any = np.int16) -> Array:
    rng = np.random.default_rng(seed)
    return np.asarray(np.round(rng.normal(-600, 350, shape)), dtype=dtype)


def edge_cases() -> list[tuple[str, Array]]:
    shape = (9, 11, 12)
    cases: list[tuple[str, Array]] = []
    one = np.zeros(shape, dtype=bool)
    one[4, 5, 6] = True
    cases.append(("one voxel", one))
    corner = np.zeros(shape, dtype=bool)
    corner[0, 0, 0] = True
    cases.append(("one voxel in the grid's corner", corner))
    cases.append(("the whole grid", np.ones(shape, dtype=bool)))
    border = np.zeros(shape, dtype=bool)
    border[0:4, 3:11, 9:12] = True  # touching three faces of the grid
    border[6:9, 0:3, 0:5] = True  # a second component, touching three others
    cases.append(("two components on the border", border))
    line = np.zeros(shape, dtype=bool)
    line[4, 5, 1:11] = True
    cases.append(("a line", line))
    plane = np.zeros(shape, dtype=bool)
    plane[3, 1:10, 2:11] = True
    cases.append(("one slice", plane))
    shell = np.zeros(shape, dtype=bool)
    shell[1:8, 1:10, 1:11] = True
    shell[3:6, 3:8, 3:9] = False
    cases.append(("a hollow box", shell))
    diagonal = np.zeros(shape, dtype=bool)
    for k in range(9):
        diagonal[k, k, k] = True
    cases.append(("voxels touching by corners", diagonal))
    checker = (np.indices(shape).sum(axis=0) % 2 == 0) & (np.indices(shape)[0] < 3)
    cases.append(("a checkerboard (ambiguous cubes)", checker))
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        cases.append((f"blob {seed}", ndimage.gaussian_filter(rng.normal(size=(13, 16, 18)), 1.2) > 0.1))
    cases.append(("odd shape 1x1x7 grid", np.ones((1, 1, 7), dtype=bool)))
    return cases


@pytest.mark.parametrize(("name", "mask"), edge_cases(), ids=[n for n, _ in edge_cases()])
@pytest.mark.parametrize("spacing", [(2.5, 0.8, 0.7), (1.0, 1.0, 1.0)], ids=["anisotropic", "unit"])
def test_edge_cases_give_the_same_features(
    name: str, mask: Array, spacing: tuple[float, float, float]
) -> None:
    for dtype in (np.int16, np.float32, np.uint16):
        image = ct_like(mask.shape, 7, np.float32)
        if dtype is np.uint16:
            image = image + 1200  # MR-like: unsigned whole numbers
        if dtype is np.float32:
            image = image + 0.3  # not whole numbers
        image = np.clip(image, 0 if dtype is np.uint16 else -1024, 3000).astype(dtype)
        for s in SETTINGS if dtype is np.int16 else SETTINGS[::3]:
            assert both(image, mask, spacing, s) == [], (name, dtype, s)


def test_many_levels_give_the_same_features() -> None:
    """A level per HU over 261 HU: levels in two bytes, pair keys beyond two bytes."""
    rng = np.random.default_rng(8)
    mask = ndimage.gaussian_filter(rng.normal(size=(9, 12, 13)), 1.2) > 0.0
    image = rng.integers(-300, -39, mask.shape).astype(np.int16)
    image[tuple(np.argwhere(mask)[0])], image[tuple(np.argwhere(mask)[1])] = -300, -40
    assert both(image, mask, (2.5, 0.8, 0.7), RadiomicsSettings(bin_width=1)) == []


def test_a_label_inside_a_larger_grid_gives_the_same_features() -> None:
    image = ct_like((30, 40, 44), 9)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0:9, 3:20, 30:44] = 1  # touching the grid's edges: the grown box is clipped there
    labels[12:25, 15:33, 5:21] = 2
    labels[14:20, 20:28, 8:15] = 0
    labels[27, 38, 2] = 3  # one voxel
    for label in (1, 2, 3):
        for s in SETTINGS[:2]:
            new = label_features(image, labels, label, (2.0, 0.7, 0.7), s)
            assert (
                same(new, original.label_features(image, labels, label, (2.0, 0.7, 0.7), old_settings(s)))
                == []
            )


def test_empty_and_out_of_range_regions_fail_as_before() -> None:
    image = ct_like((6, 7, 8), 3)
    labels = np.zeros(image.shape, dtype=np.uint8)
    with pytest.raises(RadiomicsError, match="empty"):
        label_features(image, labels, 1, (1.0, 1.0, 1.0), CT)
    with pytest.raises(original.RadiomicsError, match="empty"):
        original.label_features(image, labels, 1, (1.0, 1.0, 1.0), old_settings(CT))
    labels[2:4, 2:4, 2:4] = 1
    hot = np.full(image.shape, 2000, dtype=np.int16)
    with pytest.raises(RadiomicsError, match="re-segmentation range"):
        label_features(hot, labels, 1, (1.0, 1.0, 1.0), CT)


def test_resampled_regions_give_the_same_features() -> None:
    rng = np.random.default_rng(4)
    mask = ndimage.gaussian_filter(rng.normal(size=(10, 24, 26)), 1.5) > 0.05
    image = ct_like(mask.shape, 4)
    s = RadiomicsSettings(bin_width=25, resegment=(-1000, 400), resample_mm=(1.0, 1.0, 1.0))
    assert both(image, mask, (2.5, 0.7, 0.7), s) == []


# --------------------------------------------------------------------------- the parts


def padded_mesh(mask: Array, spacing: tuple[float, float, float]) -> tuple[Array, Array]:
    verts, faces, _, _ = marching_cubes(np.pad(mask.astype(np.float32), 1), level=0.5, spacing=spacing)
    return verts, faces


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
@pytest.mark.parametrize("spacing", [(2.5, 0.8, 0.7), (1.0, 1.0, 1.0)], ids=["anisotropic", "unit"])
def test_the_mesh_is_scikit_images_on_the_padded_region(
    seed: int, spacing: tuple[float, float, float]
) -> None:
    """Vertices (bit for bit, in the type scikit-image gives), their order and the faces equal
    those of the whole region padded by one voxel, for a region with empty margins."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((20, 23, 25), dtype=bool)
    mask[2 + seed % 3 : 17, 1:21, 3 + seed % 2 : 22] = (
        ndimage.gaussian_filter(rng.normal(size=(15 - seed % 3, 20, 19 - seed % 2)), 1.3) > 0.05
    )
    verts, faces = padded_mesh(mask, spacing)
    mesh = radiomics._surface(mask, np.asarray(spacing))
    assert all(c.dtype == verts.dtype for c in mesh.columns)
    assert all(np.array_equal(c, verts[:, k]) for k, c in enumerate(mesh.columns))
    assert np.array_equal(mesh.faces, faces)
    assert mesh.grid is not None  # half voxels


def test_scikit_images_cube_mask_selects_the_cubes_we_mark() -> None:
    """Marching only the cubes with a surface is on (the check at first use passes with this
    scikit-image), and marks exactly the cubes whose corners differ."""
    assert radiomics._cube_mask_selects_cubes()
    padded = np.pad(np.random.default_rng(5).random((6, 7, 8)) > 0.5, 1).astype(np.uint8)
    cubes = radiomics._surface_cubes(padded, slab=2)
    corners = np.stack(
        [padded[z : z + 7, y : y + 8, x : x + 9] for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    )
    mixed = corners.min(axis=0) != corners.max(axis=0)
    assert np.array_equal(cubes[1:, 1:, 1:], mixed)
    assert not cubes[0].any() and not cubes[:, 0].any() and not cubes[:, :, 0].any()


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_the_diameter_is_the_largest_distance_between_any_two_vertices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.normal(size=(12, 20, 22)), 1.0) > 0.2
    mask[0, 0, :5] = True  # a thin part on the corner
    spacing = (2.5, 0.8, 0.7)
    verts, _ = padded_mesh(mask, spacing)
    every_pair = math.sqrt(pdist(verts, "sqeuclidean").max())
    mesh = radiomics._surface(mask, np.asarray(spacing))
    assert radiomics._diameter(mesh) == every_pair
    # The line ends keep every corner of the hull.
    assert mesh.grid is not None
    keep = radiomics._line_ends(mesh.grid)
    assert len(keep) < len(verts)
    corners = {tuple(p) for p in verts[ConvexHull(verts).vertices]}
    assert corners <= {tuple(p) for p in verts[keep]}


@pytest.mark.parametrize("n", [6, 57, 255, 256, 300])  # one-byte levels and keys up to 255 levels
def test_cooccurrences_equal_the_previous_count(n: int) -> None:
    rng = np.random.default_rng(n)
    mask = ndimage.gaussian_filter(rng.normal(size=(15, 18, 21)), 1.5) > 0.0
    mask[0, :3, :4] = True
    levels = rng.integers(1, n + 1, mask.shape)
    levels[tuple(np.argwhere(mask)[0])] = n  # the top level present
    new = radiomics.glcm_matrices(levels, mask, n)
    old = original.glcm_matrices(levels, mask, n)
    assert all(np.array_equal(a, b) for a, b in zip(new, old, strict=True))


@pytest.mark.parametrize("chunk", [997, 1 << 20])
def test_cooccurrences_do_not_depend_on_the_chunks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.normal(size=(11, 13, 17)), 1.5) > 0.0
    levels = rng.integers(1, 40, mask.shape)
    old = original.glcm_matrices(levels, mask, 40)
    monkeypatch.setattr(radiomics, "_CHUNK", chunk)
    assert all(
        np.array_equal(a, b) for a, b in zip(radiomics.glcm_matrices(levels, mask, 40), old, strict=True)
    )


def integer_samples() -> list[Array]:
    rng = np.random.default_rng(31)
    return [
        np.array([-700], dtype=np.int16),  # one value
        np.array([-700, 300], dtype=np.int16),  # no value from p10 to p90: NaN
        np.full(1000, -12, dtype=np.int16),  # all equal: no spread
        np.round(rng.normal(-700, 200, 25_000)).astype(np.int16),
        rng.integers(-1000, 401, 12_345).astype(np.int16),
        rng.integers(0, 4096, 9_999).astype(np.uint16),
        rng.integers(-3, 4, 777).astype(np.int8),
        rng.integers(0, 3, 1001).astype(np.uint8),
        rng.integers(-100_000, 100_000, 5000).astype(np.int32),  # too wide to count per value
    ]


@pytest.mark.parametrize("k", range(len(integer_samples())))
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
@pytest.mark.parametrize("by_blocks", [True, False], ids=["as NumPy sums", "whole arrays"])
def test_integer_intensities_give_the_float64_statistics(
    k: int, chunk: int, by_blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not by_blocks:
        monkeypatch.setattr(radiomics, "_numpy_sums_by_blocks", lambda: False)
    x = integer_samples()[k]
    with warnings.catch_warnings():  # the mean of no value (two values: none from p10 to p90)
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = original.intensity(x.astype(np.float64))
    monkeypatch.setattr(radiomics, "_COUNT_CHUNK", chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = radiomics.intensity(x)
    assert same(got, expected) == []


@pytest.mark.parametrize("k", range(len(integer_samples())))
def test_integer_discretisation_gives_the_float64_levels(k: int) -> None:
    x = integer_samples()[k]
    for s in (
        RadiomicsSettings(bin_width=25),
        RadiomicsSettings(bin_width=7, resegment=(float(x.min()) - 3, float(x.max()))),
        RadiomicsSettings(bin_width=2.5),
        RadiomicsSettings(bin_count=16),
    ):
        levels, n = radiomics.discretise(x, s)
        old_levels, old_n = original.discretise(x.astype(np.float64), old_settings(s))
        assert n == old_n
        assert np.array_equal(levels, old_levels)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32])
def test_the_weighted_centre_of_integers_is_the_float64_one(dtype: Any) -> None:
    rng = np.random.default_rng(41)
    mask = ndimage.gaussian_filter(rng.normal(size=(37, 21, 23)), 1.5) > 0.0
    image = rng.integers(0 if dtype is np.uint16 else -32768, 32767, mask.shape).astype(dtype)
    sp = np.array([2.5, 0.8, 0.7])
    expected = original._weighted_centre(image, mask, sp)
    assert np.array_equal(radiomics._weighted_centre(image, mask, sp), expected)
    assert np.array_equal(radiomics._weighted_centre(image, mask, sp, slab=5), expected)


def test_numpy_1_sums_by_blocks() -> None:
    """The sums by blocks are used where NumPy is known to add that way (1.26, Debian 12's);
    elsewhere the check at first use decides, and whole arrays give the same sums."""
    if np.lib.NumpyVersion(np.__version__) < "2.0.0":
        assert radiomics._numpy_sums_by_blocks()


@pytest.mark.parametrize("n", [1, 5, 8191, 8192, 8193, 4 * 8192, 100_003])
@pytest.mark.parametrize("by_blocks", [True, False], ids=["as NumPy sums", "whole arrays"])
def test_deviation_sums_are_numpys_sums(n: int, by_blocks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not by_blocks:
        monkeypatch.setattr(radiomics, "_numpy_sums_by_blocks", lambda: False)
    x = np.round(np.random.default_rng(n).normal(-700, 250, n)).astype(np.int16)
    centre = float(x.astype(np.float64).mean())
    d = x.astype(np.float64) - centre
    plain = (
        float((d * d).sum()),
        float((d * d * d).sum()),
        float(((d * d) * (d * d)).sum()),
        float(np.abs(d).sum()),
    )
    assert radiomics._deviation_sums(x, centre, moments=True) == plain
    assert radiomics._deviation_sums(x, centre, moments=False)[3] == plain[3]


def main() -> None:
    """Time the module against the previous implementation on the chest CT (or a version of it
    resampled to ``--slices`` slices along z, as ``bench/pipeline_stages.py`` derives it), both
    lungs labelled as the ``ct_lung`` model is trained to (``reference_labels``): the two
    alternately, ``--pairs`` times, then the peak memory of each (``tracemalloc``, per lung).
    ``python -m tests.unit.test_radiomics_equivalence --slices 320``."""
    import argparse
    import tempfile
    import time
    import tracemalloc
    from pathlib import Path

    from devstack.derive import resample_z, sorted_slices
    from triton_models.ct_lung.reference_labels import reference_labels

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = CT_A0001
        if args.slices != 64:
            folder = resample_z(
                sorted_slices(CT_A0001), args.slices, Path(tmp) / "ct", f"bench-z-{args.slices}"
            )
        volume = build_volume(read_series(folder))
    v, sp = volume.voxels, tuple(float(s) for s in volume.spacing)
    labels = reference_labels(v, sp)
    spacing = (sp[0], sp[1], sp[2])

    def new() -> list[dict[str, float]]:
        return [label_features(v, labels, label, spacing, CT) for label in (1, 2)]

    def old() -> list[dict[str, float]]:
        return [original.label_features(v, labels, label, spacing, old_settings(CT)) for label in (1, 2)]

    assert all(same(a, b) == [] for a, b in zip(new(), old(), strict=True)), "the features differ"
    times: dict[str, list[float]] = {"previous": [], "this": []}
    for _ in range(args.pairs):
        for name, run in (("previous", old), ("this", new)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    before, after = (float(np.median(times[k])) for k in ("previous", "this"))
    pairs = float(np.median(np.array(times["this"]) / np.array(times["previous"])))
    print(f"{v.shape[0]} slices, both lungs, {args.pairs} pairs: previous {before:.3f} s, this {after:.3f} s")
    print(f"  ratio of the medians {after / before:.2f}, median of the pairs' ratios {pairs:.2f}")
    print(
        f"  fastest: previous {min(times['previous']):.3f} s, this {min(times['this']):.3f} s; features equal"
    )
    for name, module in (("previous", original), ("this", radiomics)):
        peaks = []
        tracemalloc.start()
        for label in (1, 2):
            tracemalloc.reset_peak()
            held = tracemalloc.get_traced_memory()[0]
            settings = old_settings(CT) if module is original else CT
            module.label_features(v, labels, label, spacing, settings)  # type: ignore[arg-type]
            peaks.append((tracemalloc.get_traced_memory()[1] - held) / 1e6)
        tracemalloc.stop()
        print(f"  peak memory per lung, {name}: " + ", ".join(f"{p:.0f} MB" for p in peaks))


if __name__ == "__main__":
    main()
