"""The fast radiomics paths against plain reference computations on random regions.

The fast paths (co-occurrences counted with "outside" as an extra grey level, the mesh's volume
and area from one cross product per face in blocks, moments from reused buffers, the diameter
from the hull's pairwise distances) must give what the textbook computations give: counts
exactly, floating-point sums to 1e-12.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes

from orthanc_plugin.imaging import radiomics
from orthanc_plugin.imaging.radiomics import (
    RadiomicsError,
    RadiomicsSettings,
    compute_features,
    label_features,
)

Array = NDArray[Any]
SPACING = (2.5, 0.8, 0.7)


def random_region(seed: int, shape: tuple[int, int, int] = (24, 31, 37)) -> tuple[Array, Array]:
    """CT-like integer intensities and a blobby region of several parts touching the edges."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    mask = smooth > np.quantile(smooth, 0.6)
    mask[0, :3, :4] = True  # a part on the grid's corner
    image = np.round(rng.normal(-600, 300, shape)).astype(np.float32)
    return image, mask


def plain_glcm(levels: Array, mask: Array, n: int) -> list[Array]:
    """One symmetric count matrix per direction, pair by pair with np.add.at."""
    out = []
    for d in itertools.product((-1, 0, 1), repeat=3):
        if not d > (0, 0, 0):
            continue
        a = tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(d, mask.shape, strict=True))
        b = tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(d, mask.shape, strict=True))
        both = mask[a] & mask[b]
        c = np.zeros((n, n))
        np.add.at(c, (levels[a][both] - 1, levels[b][both] - 1), 1)
        out.append(c + c.T)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("n", [6, 57, 300])  # a byte per level, and two bytes
def test_cooccurrences_equal_the_pairwise_count(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    _, mask = random_region(seed)
    levels = rng.integers(1, n + 1, mask.shape)
    ours = radiomics.glcm_matrices(levels, mask, n)
    plain = plain_glcm(levels, mask, n)
    assert len(ours) == len(plain) == 13
    for a, b in zip(ours, plain, strict=True):
        assert np.array_equal(a, b)


def test_level_grid_type() -> None:
    assert radiomics._level_type(255) is np.uint8
    assert radiomics._level_type(256) is np.uint16
    assert radiomics._level_type(70_000) is np.int64


@pytest.mark.parametrize("seed", [4, 5])
def test_mesh_volume_and_area_equal_the_per_face_formulas(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _, mask = random_region(seed)
    verts, faces, _, _ = marching_cubes(np.pad(mask.astype(np.float32), 1), level=0.5, spacing=SPACING)
    a, b, c = (verts[faces[:, k]] for k in range(3))
    volume = abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)
    area = float(np.linalg.norm(np.cross(b - a, c - a), axis=1).sum() / 2.0)
    monkeypatch.setattr(radiomics, "_FACES", 1000)  # several blocks
    ours = radiomics._mesh_volume_and_area(verts, faces)
    assert ours == pytest.approx((volume, area), rel=1e-12)


def plain_intensity(x: Array) -> dict[str, float]:
    mu, var = x.mean(), x.var()
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    robust = x[(x >= p10) & (x <= p90)]
    return {
        "stat.mean": mu,
        "stat.var": var,
        "stat.skew": ((x - mu) ** 3).mean() / var**1.5,
        "stat.kurt": ((x - mu) ** 4).mean() / var**2 - 3,
        "stat.median": p50,
        "stat.iqr": p75 - p25,
        "stat.mad": np.abs(x - mu).mean(),
        "stat.rmad": np.abs(robust - robust.mean()).mean(),
        "stat.medad": np.abs(x - p50).mean(),
        "stat.energy": (x**2).sum(),
    }


@pytest.mark.parametrize("seed", [6, 7])
def test_region_features_equal_the_plain_computations(seed: int) -> None:
    image, mask = random_region(seed)
    settings = RadiomicsSettings(bin_width=25, resegment=(-1000, 400))
    ours = compute_features(image, mask, SPACING, settings)

    hu = image.astype(np.float64)
    int_mask = mask & (hu >= -1000) & (hu <= 400)
    x = hu[int_mask]
    for k, v in plain_intensity(x).items():
        assert ours[k] == pytest.approx(v, rel=1e-12), k
    # Grey levels from -1000 HU in bins of 25 HU; the GLCM merged over the 13 directions.
    levels = np.zeros(mask.shape, dtype=np.int64)
    levels[int_mask] = np.floor((x + 1000) / 25).astype(np.int64) + 1
    n = int(levels.max())
    merged = radiomics.glcm_features(np.sum(plain_glcm(levels, int_mask, n), axis=0))
    for k, v in merged.items():
        assert ours[k] == pytest.approx(v, rel=1e-12), k
    # Morphology: counts, centres and the diameter over every mesh vertex.
    sp = np.asarray(SPACING)
    assert ours["morph.approx.vol"] == pytest.approx(mask.sum() * sp.prod(), rel=1e-12)
    verts, _, _, _ = marching_cubes(np.pad(mask.astype(np.float32), 1), level=0.5, spacing=SPACING)
    d = math.sqrt(pdist(verts, "sqeuclidean").max())  # every pair of vertices, not the hull's
    assert ours["morph.diam"] == pytest.approx(d, rel=1e-12)
    coords = np.argwhere(mask) * sp
    weights = hu[int_mask]
    com = np.linalg.norm(
        coords.mean(axis=0) - (np.argwhere(int_mask) * sp * weights[:, None]).sum(0) / weights.sum()
    )
    assert ours["morph.com"] == pytest.approx(com, rel=1e-9)
    major = np.sort(np.linalg.eigvalsh(np.cov(coords.T)))[::-1][0]
    assert ours["morph.pca.major"] == pytest.approx(4 * math.sqrt(major), rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 11, 1000, 12345])
def test_percentiles_from_counts_equal_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    q = (10, 25, 50, 75, 90)
    for x in (
        np.round(rng.normal(-600, 300, n)),  # integers: counted per value
        rng.integers(-3, 4, n).astype(np.float64),  # many ties
        np.array(
            [-15853, 15262, -4254, -6021, -24464, 8395, 5556], dtype=np.float64
        ),  # where NumPy interpolates from above
        rng.normal(-600, 300, n),  # not integers: partitioned
        np.round(rng.normal(0, 1e6, n)),  # integers over too wide a range: partitioned
    ):
        ours = radiomics._percentiles(x, q, float(x.min()), float(x.max()), np.empty_like(x))
        assert ours == [float(v) for v in np.percentile(x, q)]


def test_features_of_a_label_from_its_box_equal_those_of_the_whole_grid() -> None:
    """label_features hands compute_features only the label's box grown by the crop margin:
    every feature is the same as from the whole grid and a grid-sized mask."""
    settings = RadiomicsSettings(bin_width=25, resegment=(-1000, 400))
    rng = np.random.default_rng(9)
    image = rng.integers(-1000, 400, (30, 40, 44)).astype(np.float32)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0:9, 3:20, 30:44] = 1  # touching the grid's edges: the grown box is clipped there
    labels[12:25, 15:33, 5:21] = 2
    labels[14:20, 20:28, 8:15] = 0
    for label in (1, 2):
        whole = compute_features(image, labels == label, (2.0, 0.7, 0.7), settings)
        boxed = label_features(image, labels, label, (2.0, 0.7, 0.7), settings)
        assert boxed.keys() == whole.keys()
        assert all(boxed[k] == whole[k] or (math.isnan(boxed[k]) and math.isnan(whole[k])) for k in whole), [
            k for k in whole if boxed[k] != whole[k]
        ]
    with pytest.raises(RadiomicsError, match="empty"):
        label_features(image, labels, 3, (2.0, 0.7, 0.7), settings)


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
def test_intensity_features_do_not_depend_on_the_chunks_they_are_counted_in(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-value counts and the p10..p90 values are gathered in chunks of values; the
    features equal the plain computation's bit for bit whatever the chunk (the real lungs
    span several chunks of a million)."""
    rng = np.random.default_rng(chunk)
    x = np.round(rng.normal(-700, 200, 25_000))
    expected = radiomics.intensity(x.copy())
    monkeypatch.setattr(radiomics, "_COUNT_CHUNK", chunk)
    assert radiomics.intensity(x.copy()) == expected
    plain = plain_intensity(x)
    assert radiomics.intensity(x)["stat.rmad"] == plain["stat.rmad"]
    assert [radiomics.intensity(x)[k] for k in ("stat.p10", "stat.median", "stat.p90")] == [
        float(v) for v in np.percentile(x, [10, 50, 90])
    ]
