"""Radiomics features of a segment, as defined by the Image Biomarker Standardisation Initiative.

Families: morphology (``morph.*``, from a marching-cubes mesh of the mask and from its voxel
centres), intensity-based statistics (``stat.*``, on the raw intensities of the intensity mask)
and the grey level co-occurrence matrix (``cm.*``, on discretised intensities, 13 directions at
distance 1, symmetric, in 3D merged or 3D averaged aggregation). Feature identifiers are the
IBSI's (the subscript of each feature symbol, e.g. ``morph.vol`` for F_morph.vol); definitions
follow the IBSI reference manual (Zwanenburg et al., arXiv:1612.07003, chapter "Image features").

Processing before the features, in IBSI order: optional resampling to isotropic or any voxel
size (intensities by trilinear interpolation; the mask interpolated the same way and kept where
it is at least 0.5; grids aligned on their centres), optional re-segmentation to an intensity
range (the intensity mask; the morphological mask stays as it is), and discretisation with a
fixed bin size (FBS: bin 1 starts at the range's lower bound, or the lowest intensity in the
region) or a fixed bin number (FBN).

Implemented with NumPy/SciPy/scikit-image (marching cubes) rather than pyradiomics: pyradiomics
publishes no wheel for Python 3.13 and its default settings differ from the IBSI's in several
places (e.g. mesh, bin edges); the conformance test runs these functions on the IBSI digital
phantom against the consensus values.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

# The feature table is the shared kernel's (the configuration names features); re-exported here.
from orthanc_plugin.core.features import FEATURES as FEATURES
from orthanc_plugin.core.features import FEATURES_BY_ID as FEATURES_BY_ID
from orthanc_plugin.core.features import FeatureDef as FeatureDef
from orthanc_plugin.imaging.postprocess import label_box

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, slots=True, kw_only=True)
class RadiomicsSettings:
    """How the image is processed before the features (see the module docstring).

    Exactly one of ``bin_width`` (FBS) or ``bin_count`` (FBN). ``resample_mm`` is (x, y, z).
    """

    bin_width: float | None = None
    bin_count: int | None = None
    resample_mm: tuple[float, float, float] | None = None
    resegment: tuple[float, float] | None = None
    glcm_aggregation: Literal["3D_merged", "3D_averaged"] = "3D_merged"

    def __post_init__(self) -> None:
        if (self.bin_width is None) == (self.bin_count is None):
            raise ValueError(
                "radiomics: give exactly one of bin_width (fixed bin size) or bin_count (fixed bin number)"
            )
        if self.bin_width is not None and not self.bin_width > 0:
            raise ValueError(f"radiomics: bin_width must be > 0, got {self.bin_width}")
        if self.bin_count is not None and not self.bin_count >= 2:
            raise ValueError(f"radiomics: bin_count must be >= 2, got {self.bin_count}")
        if self.resegment is not None and not self.resegment[0] < self.resegment[1]:
            raise ValueError(f"radiomics: resegment {list(self.resegment)}: the second value must be greater")
        if self.resample_mm is not None and min(self.resample_mm) <= 0:
            raise ValueError(f"radiomics: resample_mm {list(self.resample_mm)} must be positive")


class RadiomicsError(ValueError):
    """The region cannot give features (empty, or nothing left after re-segmentation)."""


# --------------------------------------------------------------------------- processing


def _crop(image: NDArray[Any], mask: BoolArray, margin: int) -> tuple[NDArray[Any], BoolArray]:
    """The region's bounding box grown by ``margin`` (the image in its own type: values are
    taken to float64 where they are used, a box of a CT in float64 is 8 bytes a voxel)."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(max(int(found[0]) - margin, 0))
        hi.append(min(int(found[-1]) + 1 + margin, mask.shape[axis]))
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return image[box], mask[box]


def resample(
    image: FloatArray, mask: BoolArray, spacing_zyx: Sequence[float], new_spacing_zyx: Sequence[float]
) -> tuple[FloatArray, BoolArray]:
    """Image and mask on a grid of ``new_spacing_zyx`` with the same centre (IBSI grid alignment)."""
    old = np.asarray(spacing_zyx, dtype=np.float64)
    new = np.asarray(new_spacing_zyx, dtype=np.float64)
    shape_in = np.asarray(image.shape, dtype=np.float64)
    shape_out = np.maximum(np.ceil(shape_in * old / new), 1).astype(int)
    # Centre of the new grid on the centre of the old one (in old index units).
    step = new / old
    start = (shape_in - 1) / 2 - (shape_out - 1) / 2 * step
    axes = [start[a] + step[a] * np.arange(shape_out[a]) for a in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    img = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    msk = ndimage.map_coordinates(mask.astype(np.float64), coords, order=1, mode="constant", cval=0.0) >= 0.5
    return img, msk


def discretise(
    values: NDArray[Any], settings: RadiomicsSettings
) -> tuple[NDArray[np.int64] | NDArray[np.int32], int]:
    """Discretised grey levels (1..Ng) of ``values`` and Ng."""
    if settings.bin_width is not None:
        low = settings.resegment[0] if settings.resegment is not None else float(np.min(values))
        width = settings.bin_width
        if (
            np.issubdtype(values.dtype, np.integer)
            and values.dtype.itemsize <= 2
            and low == math.floor(low)
            and abs(low) < _SMALL
            and width == math.floor(width)
            and width < _SMALL
        ):
            # Whole intensities, bound and width: floor((v - low) / width) in float64 is the
            # integer floor division (the quotient is never within rounding of a whole number
            # it is not), done in int32 without a float64 copy.
            levels32 = values.astype(np.int32)
            levels32 -= int(low)
            levels32 //= int(width)
            levels32 += 1
            return levels32, int(np.max(levels32))
        scaled = np.asarray(values, dtype=np.float64) - low
        scaled /= settings.bin_width
        np.floor(scaled, out=scaled)
        levels = scaled.astype(np.int64)
        del scaled
        levels += 1
        return levels, int(np.max(levels))
    assert settings.bin_count is not None
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.min(values)), float(np.max(values))
    n = settings.bin_count
    if hi == lo:
        return np.ones(values.shape, dtype=np.int64), n
    levels = np.floor(n * (values - lo) / (hi - lo)).astype(np.int64) + 1
    return np.minimum(levels, n), n


# --------------------------------------------------------------------------- families


def morphology(
    image: NDArray[Any], morph_mask: BoolArray, int_mask: BoolArray, spacing_zyx: Sequence[float]
) -> dict[str, float]:
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    mesh = _surface(morph_mask, sp)
    volume, area = _mesh_sums(mesh.columns, mesh.faces)
    n_voxels, geom, cov = _centre_and_covariance(morph_mask, sp)
    approx = float(n_voxels * np.prod(sp))
    f: dict[str, float] = {
        "morph.vol": volume,
        "morph.approx.vol": approx,
        "morph.area": area,
        "morph.av": area / volume,
        "morph.comp.1": volume / (math.sqrt(math.pi) * area**1.5),
        "morph.comp.2": 36 * math.pi * volume**2 / area**3,
        "morph.sph.dispr": area / (36 * math.pi * volume**2) ** (1 / 3),
        "morph.sphericity": (36 * math.pi * volume**2) ** (1 / 3) / area,
        "morph.asphericity": (area**3 / (36 * math.pi * volume**2)) ** (1 / 3) - 1,
    }
    f["morph.com"] = float(np.linalg.norm(geom - _weighted_centre(image, int_mask, sp)))
    f["morph.diam"] = _diameter(mesh)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1] if cov is not None else np.zeros(3)
    major, minor, least = (max(float(e), 0.0) for e in eig)
    f["morph.pca.major"] = 4 * math.sqrt(major)
    f["morph.pca.minor"] = 4 * math.sqrt(minor)
    f["morph.pca.least"] = 4 * math.sqrt(least)
    f["morph.pca.elongation"] = math.sqrt(minor / major) if major > 0 else 1.0
    f["morph.pca.flatness"] = math.sqrt(least / major) if major > 0 else 1.0
    # The mesh's bounding box, in the vertices' own type (float32 when the spacing is 1 mm).
    ext = np.array([np.max(c) - np.min(c) for c in mesh.columns], dtype=mesh.columns[0].dtype)
    f["morph.v.dens.aabb"] = volume / float(np.prod(ext))
    f["morph.a.dens.aabb"] = area / float(2 * (ext[0] * ext[1] + ext[1] * ext[2] + ext[0] * ext[2]))
    return f


@dataclass(frozen=True, slots=True)
class _Mesh:
    """A marching-cubes mesh of a mask: ``columns`` the vertices' z, y and x in mm (contiguous,
    float64, or float32 where the spacing is 1 mm, as scikit-image returns them), ``faces`` the
    vertex indices per triangle, ``grid`` the vertices in half voxels of the mask's box (whole
    numbers: a vertex of a binary mask at level 0.5 lies halfway along an edge, on a face's or
    a cube's centre), or None where they are not."""

    columns: list[NDArray[np.floating[Any]]]
    faces: NDArray[np.integer[Any]]
    grid: NDArray[np.intp] | None


def _surface(mask: BoolArray, sp: FloatArray) -> _Mesh:
    """The mesh of ``mask`` padded by one voxel of background (closed where the mask touches its
    box), as ``marching_cubes(padded, 0.5, spacing=sp)`` gives it: vertices, their order and the
    faces' are the same, the vertices' values bit for bit.

    Made on the mask's own bounding box (the region handed over is the box grown by the crop
    margin) and moved back by the box's corner in voxel units, where the move is exact (whole and
    half voxels in float32); the cubes marched are only those with both inside and outside
    corners (:func:`_surface_cubes`; the others give no triangle), where scikit-image's mask
    selects cubes as :func:`_cube_mask_selects_cubes` checked."""
    from skimage.measure import marching_cubes

    lo, hi = _bounds(mask)
    shape = tuple(b - a + 2 for a, b in zip(lo, hi, strict=True))
    padded = np.zeros(shape, dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    cubes = _surface_cubes(padded) if _cube_mask_selects_cubes() else None
    volume = padded.astype(np.float32)
    del padded
    verts, faces, _, _ = marching_cubes(volume, level=0.5, mask=cubes)  # type: ignore[no-untyped-call]
    del volume, cubes
    unit = bool(np.array_equal(sp, (1, 1, 1)))  # scikit-image then leaves the vertices in float32
    columns: list[NDArray[np.floating[Any]]] = []
    for k in range(3):
        c = verts[:, k] + np.float32(lo[k])  # exact: whole and half voxels
        columns.append(np.ascontiguousarray(c) if unit else c.astype(np.float64) * sp[k])
    twice = verts * 2
    half = twice.astype(np.intp)
    grid = half if np.array_equal(half, twice) else None
    return _Mesh(columns, faces, grid)


def _bounds(mask: BoolArray) -> tuple[list[int], list[int]]:
    """The smallest box holding the voxels of ``mask`` (not empty): lower and upper bounds per axis."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(int(found[0]))
        hi.append(int(found[-1]) + 1)
    return lo, hi


def _surface_cubes(padded: NDArray[np.uint8], slab: int = 32) -> BoolArray:
    """Where scikit-image's marching cubes is to look: the cube whose corners are (z..z+1,
    y..y+1, x..x+1) is marked at (z+1, y+1, x+1) when its eight corners are not all alike.
    Counted ``slab`` slices at a time (the corners' sum, 0 or 8 for a cube all out or all in)."""
    cubes = np.zeros(padded.shape, dtype=bool)
    for z in range(0, padded.shape[0] - 1, slab):
        part = padded[z : z + slab + 1]
        s = part[:-1] + part[1:]
        s = s[:, :-1] + s[:, 1:]
        s = s[:, :, :-1] + s[:, :, 1:]
        s -= 1  # 0 (all out) wraps to 255; 8 (all in) becomes 7
        np.less(s, 7, out=cubes[z + 1 : z + 1 + len(s), 1:, 1:])
    return cubes


@functools.cache
def _cube_mask_selects_cubes() -> bool:
    """Whether scikit-image's ``marching_cubes(..., mask=)`` marches the cubes that
    :func:`_surface_cubes` marks, checked once on a small blob against the unmasked mesh (its
    documentation does not say which corner of a cube the mask is read at); without it every
    cube is marched."""
    from skimage.measure import marching_cubes

    z, y, x = np.ogrid[:9, :10, :11]
    blob = ((z - 4.2) ** 2 / 9 + (y - 4.6) ** 2 / 12 + (x - 5.1) ** 2 / 16 <= 1) | (
        (z == 7) & (y == 2) & (x > 6)
    )
    padded = np.zeros((11, 12, 13), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = blob
    volume = padded.astype(np.float32)
    plain = marching_cubes(volume, level=0.5)  # type: ignore[no-untyped-call]
    masked = marching_cubes(volume, level=0.5, mask=_surface_cubes(padded, slab=3))  # type: ignore[no-untyped-call]
    return all(np.array_equal(a, b) for a, b in zip(plain[:2], masked[:2], strict=True))


def _diameter(mesh: _Mesh) -> float:
    """The largest distance between two vertices: between two of the convex hull's, found among
    the vertices that are not strictly between two others on a line along a grid axis (per line
    of vertices along x only the first and last, then along y, then along z): a point between
    two others is never a corner of the hull, and the farthest pair is two corners."""
    n = len(mesh.columns[0])
    if n < 2:
        return 0.0
    keep = _line_ends(mesh.grid) if mesh.grid is not None else np.arange(n)
    points = np.stack([c[keep] for c in mesh.columns], axis=1)
    if len(points) >= 4:
        with contextlib.suppress(Exception):  # degenerate (flat) sets: every candidate
            points = points[ConvexHull(points).vertices]
    return float(math.sqrt(pdist(points, "sqeuclidean").max())) if len(points) > 1 else 0.0


def _line_ends(grid: NDArray[np.intp]) -> NDArray[np.intp]:
    """Indices (ascending) of the points of ``grid`` (N x 3, non-negative whole numbers) that are
    the first or the last on their line along x, then of those along y, then along z."""
    keep = np.arange(len(grid))
    top = np.array([int(np.max(grid[:, k])) + 1 for k in range(3)], dtype=np.intp)
    for axis, (a, b) in ((2, (0, 1)), (1, (0, 2)), (0, (1, 2))):
        g = grid if len(keep) == len(grid) else grid[keep]
        line = g[:, a] * top[b] + g[:, b]
        pos = g[:, axis]
        first = np.full(int(top[a] * top[b]), top[axis], dtype=np.intp)
        last = np.full(int(top[a] * top[b]), -1, dtype=np.intp)
        np.minimum.at(first, line, pos)
        np.maximum.at(last, line, pos)
        keep = keep[(pos == first[line]) | (pos == last[line])]
    return keep


def _centre_and_covariance(mask: BoolArray, sp: FloatArray) -> tuple[int, FloatArray, FloatArray | None]:
    """Voxel count, mean and sample covariance (mm) of the voxel centres of ``mask``, from the voxel counts
    of its planes (exact integer moments): no N x 3 coordinate array for a region of 10^7 voxels."""
    n = int(np.count_nonzero(mask))
    idx = [np.arange(k, dtype=np.float64) for k in mask.shape]
    # Counted in int32 (at most a side's length each: exact), which NumPy sums faster than int64.
    ones = mask.view(np.uint8)
    zy = ones.sum(axis=2, dtype=np.int32).astype(np.float64)
    zx = ones.sum(axis=1, dtype=np.int32).astype(np.float64)
    yx = ones.sum(axis=0, dtype=np.int32).astype(np.float64)
    z, y, x = zy.sum(axis=1), zy.sum(axis=0), zx.sum(axis=0)
    first = np.array([idx[0] @ z, idx[1] @ y, idx[2] @ x])
    mean = first / n
    if n < 2:
        return n, mean * sp, None
    second = np.empty((3, 3))
    second[0, 0], second[1, 1], second[2, 2] = (idx[0] ** 2) @ z, (idx[1] ** 2) @ y, (idx[2] ** 2) @ x
    second[0, 1] = second[1, 0] = idx[0] @ zy @ idx[1]
    second[0, 2] = second[2, 0] = idx[0] @ zx @ idx[2]
    second[1, 2] = second[2, 1] = idx[1] @ yx @ idx[2]
    cov = (second - np.outer(first, first) / n) / (n - 1)
    return n, mean * sp, cov * np.outer(sp, sp)


def _mesh_volume_and_area(verts: FloatArray, faces: NDArray[np.integer[Any]]) -> tuple[float, float]:
    """Volume and area of a closed triangle mesh (``verts`` N x 3): :func:`_mesh_sums`."""
    return _mesh_sums([np.ascontiguousarray(verts[:, k]) for k in range(3)], faces)


def _mesh_sums(
    v: Sequence[NDArray[np.floating[Any]]], faces: NDArray[np.integer[Any]]
) -> tuple[float, float]:
    """Volume (divergence theorem: signed tetrahedra from the origin) and area of a closed
    triangle mesh given its vertices' coordinates ``v`` (three contiguous columns), from one
    cross product per face, coordinate by coordinate, a block of faces at a time."""
    six_volume = 0.0
    twice_area = 0.0
    for start in range(0, len(faces), _FACES):
        block = faces[start : start + _FACES]
        i, j, k = (np.ascontiguousarray(block[:, c]) for c in range(3))
        a = [c[i] for c in v]
        ab = [c[j] - a0 for c, a0 in zip(v, a, strict=True)]
        ac = [c[k] - a0 for c, a0 in zip(v, a, strict=True)]
        # n = (b - a) x (c - a); a . n = a . (b x c), six times the tetrahedron's signed volume.
        n = [ab[1] * ac[2] - ab[2] * ac[1], ab[2] * ac[0] - ab[0] * ac[2], ab[0] * ac[1] - ab[1] * ac[0]]
        six_volume += float((a[0] * n[0] + a[1] * n[1] + a[2] * n[2]).sum())
        twice_area += float(np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sum())
    return abs(six_volume) / 6.0, twice_area / 2.0


#: Mesh faces per step of :func:`_mesh_volume_and_area`.
_FACES = 1 << 16


def _weighted_centre(image: NDArray[Any], mask: BoolArray, sp: FloatArray, slab: int = 16) -> FloatArray:
    """Intensity-weighted mean position (mm) of the voxels of ``mask``, ``slab`` slices at a time.

    Integer intensities (CT in HU) are summed as integers: every sum the floating-point
    computation makes is then a whole number below 2^53, exact in either, so the result is the
    same bit for bit without converting the region to float64."""
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        bound = int(np.count_nonzero(mask)) * max(abs(int(info.min)), int(info.max)) * max(mask.shape)
        if bound < _EXACT:
            return _weighted_centre_exact(image, mask, sp, slab)
    sums = np.zeros(3)
    total = 0.0
    iy, ix = np.arange(mask.shape[1], dtype=np.float64), np.arange(mask.shape[2], dtype=np.float64)
    for z0 in range(0, mask.shape[0], slab):
        w = np.where(mask[z0 : z0 + slab], np.asarray(image[z0 : z0 + slab], dtype=np.float64), 0.0)
        per_z = w.sum(axis=(1, 2))
        sums[0] += np.arange(z0, z0 + len(per_z), dtype=np.float64) @ per_z
        sums[1] += iy @ w.sum(axis=(0, 2))
        sums[2] += ix @ w.sum(axis=(0, 1))
        total += float(per_z.sum())
    return sums / total * sp


def _weighted_centre_exact(image: NDArray[Any], mask: BoolArray, sp: FloatArray, slab: int) -> FloatArray:
    """:func:`_weighted_centre` of an integer image, in integers (per row and per column of each
    slab: the intensities weigh their slice, row and column)."""
    per_row = np.empty(mask.shape[:2], dtype=np.int64)
    per_column = np.zeros(mask.shape[2], dtype=np.int64)
    for z0 in range(0, mask.shape[0], slab):
        w = image[z0 : z0 + slab] * mask[z0 : z0 + slab]  # the image's type: 0 or the value
        per_row[z0 : z0 + slab] = w.sum(axis=2, dtype=np.int64)
        per_column += w.sum(axis=(0, 1), dtype=np.int64)
    per_z, per_y = per_row.sum(axis=1), per_row.sum(axis=0)
    moments = [
        int(np.arange(len(per_z), dtype=np.int64) @ per_z),
        int(np.arange(len(per_y), dtype=np.int64) @ per_y),
        int(np.arange(len(per_column), dtype=np.int64) @ per_column),
    ]
    return np.array(moments, dtype=np.float64) / float(per_z.sum()) * sp


#: Integers below this are exact in float64 (and any sum of them that stays below it).
_EXACT = 1 << 53


def intensity(values: NDArray[Any]) -> dict[str, float]:
    """The intensity-based statistics of ``values`` (any real type; integers, e.g. CT in HU, are
    not converted to float64 as a whole: see :func:`_intensity_of_integers`)."""
    if np.issubdtype(values.dtype, np.integer) and values.size:
        smallest, largest = int(values.min()), int(values.max())
        top = max(-smallest, largest) + 1
        if largest - smallest < _MAX_SPAN and 4 * values.size * top * top < _EXACT:
            return _intensity_of_integers(values, smallest, largest)
    x = np.asarray(values, dtype=np.float64)  # no copy when it is float64 already
    mu = float(x.mean())
    # Two region-sized buffers however many moments: d = x - mu, and powers of it in turn.
    d = x - mu
    buf = d * d
    var = float(buf.mean())
    np.multiply(buf, d, out=buf)
    third = float(buf.mean())
    np.multiply(d, d, out=buf)
    np.multiply(buf, buf, out=buf)
    fourth = float(buf.mean())
    np.abs(d, out=d)
    mad = float(d.mean())
    del d
    lowest, highest = float(np.min(x)), float(np.max(x))
    p10, p25, median, p75, p90 = _percentiles(x, (10, 25, 50, 75, 90), lowest, highest, buf)
    np.subtract(x, median, out=buf)
    np.abs(buf, out=buf)
    medad = float(buf.mean())
    # The values from p10 to p90 (in order, gathered a million at a time), then their distances
    # from their mean, in the same buffer.
    k = 0
    for i in range(0, x.size, _COUNT_CHUNK):
        part = x[i : i + _COUNT_CHUNK]
        inside = part[(part >= p10) & (part <= p90)]
        buf[k : k + inside.size] = inside
        k += inside.size
    robust = buf[:k]
    np.subtract(robust, robust.mean(), out=robust)
    np.abs(robust, out=robust)
    rmad = float(robust.mean())
    del robust, buf
    energy = float(np.dot(x, x))
    return _statistics(
        x.size,
        mu,
        var,
        third,
        fourth,
        lowest,
        highest,
        (p10, p25, median, p75, p90),
        mad,
        rmad,
        medad,
        energy,
    )


def _statistics(
    n: int,
    mu: float,
    var: float,
    third: float,
    fourth: float,
    lowest: float,
    highest: float,
    percentiles: tuple[float, float, float, float, float],
    mad: float,
    rmad: float,
    medad: float,
    energy: float,
) -> dict[str, float]:
    """The intensity-based statistics from the moments and order statistics of ``n`` values
    (``percentiles``: the 10th, 25th, 50th, 75th and 90th)."""
    p10, p25, median, p75, p90 = percentiles
    sd = math.sqrt(var)
    return {
        "stat.mean": mu,
        "stat.var": var,
        "stat.skew": third / var**1.5 if var > 0 else 0.0,
        "stat.kurt": fourth / var**2 - 3 if var > 0 else 0.0,
        "stat.median": median,
        "stat.min": lowest,
        "stat.p10": p10,
        "stat.p90": p90,
        "stat.max": highest,
        "stat.iqr": p75 - p25,
        "stat.range": highest - lowest,
        "stat.mad": mad,
        "stat.rmad": rmad,
        "stat.medad": medad,
        "stat.cov": sd / mu if mu != 0 else math.nan,
        "stat.qcod": (p75 - p25) / (p75 + p25) if (p75 + p25) != 0 else math.nan,
        "stat.energy": energy,
        "stat.rms": math.sqrt(energy / n),
    }


def _intensity_of_integers(x: NDArray[np.integer[Any]], lowest: int, highest: int) -> dict[str, float]:
    """:func:`intensity` of integer values, bit for bit, from a count per value where the plain
    computation's sums are exact (whole or half numbers below 2^53: the mean, the energy, the
    percentiles, the mean distance from the median, the mean of the values from p10 to p90),
    and from the values themselves, in the same order and the same float64 operations, where
    they are not (the moments about the mean, the mean distances from the mean and from the
    robust mean: :func:`_deviation_sums`), without a float64 copy of the values."""
    x = x.ravel()
    n = x.size
    counts = _value_counts(x, lowest, highest)
    values = np.arange(lowest, highest + 1, dtype=np.int64)
    mu = float(int(counts @ values)) / n
    squares, cubes, fourths, distances = _deviation_sums(x, mu, moments=True)
    var = squares / n
    third = cubes / n
    fourth = fourths / n
    mad = distances / n
    p10, p25, median, p75, p90 = _order_statistics(counts, float(lowest), n, (10, 25, 50, 75, 90))
    twice = 2 * median
    if twice == math.floor(twice):  # always: the median of integers is a whole or half number
        medad = float(int(counts @ np.abs(2 * values - int(twice)))) / 2 / n
    else:  # pragma: no cover - kept for the definition's sake
        medad = _deviation_sums(x, median, moments=False)[3] / n
    inside = (values >= p10) & (values <= p90)
    robust_n = int(counts[inside].sum())
    if robust_n:  # the values from p10 to p90, in order, and their mean distance from their mean
        robust_mean = float(int(counts[inside] @ values[inside])) / robust_n
        kept = np.concatenate(
            [
                part[(part >= p10) & (part <= p90)]
                for part in np.split(x, range(_COUNT_CHUNK, n, _COUNT_CHUNK))
            ]
        )
        rmad = _deviation_sums(kept, robust_mean, moments=False)[3] / robust_n
        del kept
    else:  # no value from p10 to p90 (two values): NaN, as NumPy's mean of none
        rmad = math.nan
    energy = float(int(counts @ (values * values)))
    return _statistics(
        n, mu, var, third, fourth, float(lowest), float(highest), (p10, p25, median, p75, p90), mad, rmad, medad,
        energy,
    )  # fmt: skip


def _deviation_sums(x: NDArray[Any], centre: float, *, moments: bool) -> tuple[float, float, float, float]:
    """The sums NumPy makes of d^2, d^3 (as (d d) d), d^4 (as (d d)(d d)) and |d|, d = x - centre
    in float64 (only the last unless ``moments``), bit for bit: as NumPy adds a float64 array, the
    running sum of the pairwise sums of its blocks of 8192 values, computed a few blocks at a time
    (cache-sized buffers, no region-sized float64 array) where :func:`_numpy_sums_by_blocks`
    found NumPy to add that way, or else from whole arrays."""
    n = x.size
    if not _numpy_sums_by_blocks():
        d = x - centre
        if not moments:
            np.abs(d, out=d)
            return math.nan, math.nan, math.nan, float(np.sum(d))
        buf = d * d
        squares = float(np.sum(buf))
        np.multiply(buf, d, out=buf)
        cubes = float(np.sum(buf))
        np.multiply(d, d, out=buf)
        np.multiply(buf, buf, out=buf)
        fourths = float(np.sum(buf))
        np.abs(d, out=d)
        return squares, cubes, fourths, float(np.sum(d))
    step = _BLOCK * _BLOCKS
    d = np.empty(min(step, n))
    buf = np.empty(min(step, n))
    sums = [0.0, 0.0, 0.0, 0.0]

    def add(k: int, part: NDArray[np.float64]) -> None:
        whole = part.size // _BLOCK * _BLOCK
        blocks = [float(s) for s in np.sum(part[:whole].reshape(-1, _BLOCK), axis=1)] if whole else []
        if whole < part.size:
            blocks.append(float(np.sum(part[whole:])))
        total = sums[k]
        for s in blocks:  # one after the other, as NumPy's running sum
            total += s
        sums[k] = total

    for start in range(0, n, step):
        part = x[start : start + step]
        dd, bb = d[: part.size], buf[: part.size]
        np.subtract(part, centre, out=dd)
        if moments:
            np.multiply(dd, dd, out=bb)
            add(0, bb)
            np.multiply(bb, dd, out=bb)
            add(1, bb)
            np.multiply(dd, dd, out=bb)
            np.multiply(bb, bb, out=bb)
            add(2, bb)
        np.abs(dd, out=dd)
        add(3, dd)
    return (sums[0], sums[1], sums[2], sums[3]) if moments else (math.nan, math.nan, math.nan, sums[3])


@functools.cache
def _numpy_sums_by_blocks() -> bool:
    """Whether this NumPy sums a contiguous float64 array as the running sum of the pairwise sums
    of its blocks of :data:`_BLOCK` values, and sums each row of a C-contiguous block matrix as
    that row alone: checked once on random values of many magnitudes, where any other order of
    addition gives another result (NumPy 1.26 does; later versions may grow their blocks)."""
    rng = np.random.default_rng(1612)
    for n in (1, 7, _BLOCK - 1, _BLOCK, _BLOCK + 1, 3 * _BLOCK + 77, 9 * _BLOCK + 4099):
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 8, n)
        total = 0.0
        for start in range(0, n, _BLOCK):
            total += float(np.sum(x[start : start + _BLOCK]))
        if float(np.sum(x)) != total or float(x.mean()) != total / n:
            return False
    rows = x[: 4 * _BLOCK].reshape(4, _BLOCK)
    return all(float(a) == float(np.sum(r)) for a, r in zip(np.sum(rows, axis=1), rows, strict=True))


#: Values NumPy's reductions sum pairwise at a time (its buffer size), and blocks of them handled
#: at a time by :func:`_deviation_sums` (two float64 buffers of 256 kB).
_BLOCK = 8192
_BLOCKS = 4


def _value_counts(x: NDArray[np.integer[Any]], lowest: int, highest: int) -> NDArray[np.int64]:
    """How many of ``x`` equal lowest, lowest + 1, ... highest; a million values at a time (no
    region-sized index array)."""
    counts = np.zeros(highest - lowest + 1, dtype=np.int64)
    for i in range(0, x.size, _COUNT_CHUNK):
        part = x[i : i + _COUNT_CHUNK].astype(np.intp)
        part -= lowest
        counts += np.bincount(part, minlength=counts.size)
    return counts


def _order_statistics(
    counts: NDArray[np.integer[Any]], lowest: float, n: int, q: Sequence[float]
) -> list[float]:
    """``np.percentile`` of the ``n`` values counted per value from ``lowest`` up (linear
    interpolation between the order statistics around ``(n - 1) q / 100``, as NumPy computes it)."""
    below = np.cumsum(counts)

    def order(k: int) -> float:  # the k-th smallest value, from 0
        return lowest + float(np.searchsorted(below, k, side="right"))

    out = []
    for pct in q:
        v = (n - 1) * (pct / 100)
        if v >= n - 1:
            out.append(order(n - 1))
            continue
        k = math.floor(v)
        a, b, t = order(k), order(k + 1), v - k
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return out


def _percentiles(
    x: FloatArray, q: Sequence[float], lowest: float, highest: float, buf: FloatArray
) -> list[float]:
    """``np.percentile(x, q)`` (linear interpolation between the order statistics around
    ``(n - 1) q / 100``, computed as NumPy does), ``buf`` a scratch array of ``x``'s size.

    Integer intensities over a range of at most 2^16 (CT in HU) take their order statistics from
    a count per value instead of a partition of a copy of the region."""
    if highest - lowest < _MAX_SPAN and lowest == math.floor(lowest):
        np.subtract(x, lowest, out=buf)  # exact for integers
        # Counted a million values at a time: no region-sized copy as integers.
        counts = np.zeros(int(highest - lowest) + 1, dtype=np.intp)
        integers = True
        for i in range(0, buf.size, _COUNT_CHUNK):
            part = buf[i : i + _COUNT_CHUNK]
            offsets = part.astype(np.intp)
            integers = bool(np.array_equal(offsets, part))
            if not integers:
                break
            counts += np.bincount(offsets, minlength=counts.size)
        if integers:
            return _order_statistics(counts, lowest, x.size, q)
    np.copyto(buf, x)
    return [float(v) for v in np.percentile(buf, q, overwrite_input=True)]


#: Bounds and bin widths up to this are discretised in int32 (:func:`discretise`).
_SMALL = 1 << 30
#: Widest integer range that :func:`_percentiles` counts per value.
_MAX_SPAN = 1 << 16
#: Values converted to integers at a time by :func:`_percentiles`.
_COUNT_CHUNK = 1 << 20


#: The 13 unique directions of the 26-neighbourhood (dz, dy, dx), distance 1 (Chebyshev).
DIRECTIONS: tuple[tuple[int, ...], ...] = tuple(
    d for d in itertools.product((-1, 0, 1), repeat=3) if d > (0, 0, 0)
)


def glcm_matrices(levels: NDArray[np.integer[Any]], mask: BoolArray, n_levels: int) -> list[FloatArray]:
    """One symmetric co-occurrence count matrix per direction (pairs with both voxels in ``mask``)."""
    return _cooccurrences(_level_grid(levels, mask, n_levels), n_levels)


def _level_grid(levels: NDArray[np.integer[Any]], mask: BoolArray, n_levels: int) -> NDArray[np.integer[Any]]:
    """The grey levels of ``mask`` in a grid one voxel larger on every side, 0 elsewhere (in the
    smallest unsigned type that holds 0..n_levels: a byte for the usual 8 to 128 bins)."""
    g = np.zeros(tuple(k + 2 for k in mask.shape), dtype=_level_type(n_levels))
    np.copyto(g[1:-1, 1:-1, 1:-1], levels, where=mask, casting="unsafe")
    return g


def _level_type(n_levels: int) -> type[np.unsignedinteger[Any]] | type[np.int64]:
    if n_levels <= np.iinfo(np.uint8).max:
        return np.uint8
    if n_levels <= np.iinfo(np.uint16).max:
        return np.uint16
    return np.int64


def _cooccurrences(g: NDArray[np.integer[Any]], n_levels: int) -> list[FloatArray]:
    """The co-occurrence matrices of the padded level grid ``g`` (0 = outside the region).

    Works on the region's voxels only: each one's neighbour in a direction is a fixed offset in
    the flattened grid (positive for the 13 directions, the grid being padded). Outside counts
    as level 0, an extra column of the count matrix that is dropped at the end: no mask per
    direction. A pair's key (own level - 1) * (Ng + 1) + the neighbour's level is made in two
    bytes where it fits (up to 255 levels) and counted with ``np.add.at``, which NumPy does
    without a sort or an index check pass, unlike ``np.bincount``."""
    flat = g.ravel()
    strides = np.array([g.shape[1] * g.shape[2], g.shape[2], 1], dtype=np.intp)
    offsets = [int(np.dot(d, strides)) for d in DIRECTIONS]
    width = n_levels + 1  # neighbour levels 0 (outside) .. n_levels
    size = n_levels * width
    key_type = np.uint16 if size <= 1 << 16 else np.intp
    counts = np.zeros((len(DIRECTIONS), size), dtype=np.intp)
    # A million grid positions at a time: bounded index arrays however large the region.
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        at = np.flatnonzero(part != 0)
        if at.size == 0:
            continue
        row: NDArray[Any] = part[at].astype(key_type)  # (own level - 1) * width: the row of the pair's key
        row -= 1
        row *= width
        other = np.empty(at.size, dtype=flat.dtype)
        key = np.empty(at.size, dtype=key_type)
        for k, offset in enumerate(offsets):
            np.take(flat[start + offset :], at, out=other, mode="clip")
            np.add(row, other, out=key, casting="unsafe")
            np.add.at(counts[k], key, 1)
    out = []
    for k in range(len(DIRECTIONS)):
        c = counts[k].reshape(n_levels, width)[:, 1:].astype(np.float64)
        out.append(c + c.T)
    return out


#: Grid positions per step of :func:`_cooccurrences`.
_CHUNK = 1 << 20


def glcm_features(counts: FloatArray) -> dict[str, float]:
    total = counts.sum()
    if total == 0:
        return {f.id: math.nan for f in FEATURES if f.family == "glcm"}
    p = counts / total
    ng = p.shape[0]
    i, j = np.meshgrid(np.arange(1, ng + 1), np.arange(1, ng + 1), indexing="ij")
    k_abs = np.abs(i - j)
    p_minus: FloatArray = np.bincount(k_abs.ravel(), weights=p.ravel(), minlength=ng).astype(np.float64)
    p_plus: FloatArray = np.bincount((i + j).ravel(), weights=p.ravel(), minlength=2 * ng + 1).astype(
        np.float64
    )
    k_minus = np.arange(ng)
    k_plus = np.arange(2 * ng + 1)
    pi = p.sum(axis=1)
    mu = float((i * p).sum())
    sigma2 = float((((np.arange(1, ng + 1) - mu) ** 2) * pi).sum())

    def entropy(q: FloatArray) -> float:
        q = q[q > 0]
        return float(-(q * np.log2(q)).sum())

    diff_avg = float((k_minus * p_minus).sum())
    sum_avg = float((k_plus * p_plus).sum())
    hxy = entropy(p.ravel())
    hx = entropy(pi)
    outer = np.outer(pi, pi)
    nz = p > 0
    hxy1 = float(-(p[nz] * np.log2(outer[nz])).sum())
    hxy2 = entropy(outer.ravel())
    return {
        "cm.joint.max": float(p.max()),
        "cm.joint.avg": mu,
        "cm.joint.var": float(((i - mu) ** 2 * p).sum()),
        "cm.joint.entr": hxy,
        "cm.diff.avg": diff_avg,
        "cm.diff.var": float(((k_minus - diff_avg) ** 2 * p_minus).sum()),
        "cm.diff.entr": entropy(p_minus),
        "cm.sum.avg": sum_avg,
        "cm.sum.var": float(((k_plus - sum_avg) ** 2 * p_plus).sum()),
        "cm.sum.entr": entropy(p_plus),
        "cm.energy": float((p**2).sum()),
        "cm.contrast": float(((i - j) ** 2 * p).sum()),
        "cm.dissimilarity": float((k_abs * p).sum()),
        "cm.inv.diff": float((p / (1 + k_abs)).sum()),
        "cm.inv.diff.norm": float((p / (1 + k_abs / ng)).sum()),
        "cm.inv.diff.mom": float((p / (1 + k_abs**2)).sum()),
        "cm.inv.diff.mom.norm": float((p / (1 + (k_abs / ng) ** 2)).sum()),
        "cm.inv.var": float((p_minus[1:] / k_minus[1:] ** 2).sum()),
        "cm.corr": float(((i * j * p).sum() - mu**2) / sigma2) if sigma2 > 0 else 1.0,
        "cm.auto.corr": float((i * j * p).sum()),
        "cm.clust.tend": float(((i + j - 2 * mu) ** 2 * p).sum()),
        "cm.clust.shade": float(((i + j - 2 * mu) ** 3 * p).sum()),
        "cm.clust.prom": float(((i + j - 2 * mu) ** 4 * p).sum()),
        "cm.info.corr.1": (hxy - hxy1) / hx if hx > 0 else 0.0,
        "cm.info.corr.2": math.sqrt(max(0.0, 1 - math.exp(-2 * (hxy2 - hxy)))),
    }


def glcm(
    levels: NDArray[np.integer[Any]], mask: BoolArray, n_levels: int, aggregation: str
) -> dict[str, float]:
    return _aggregate(glcm_matrices(levels, mask, n_levels), n_levels, aggregation)


def _aggregate(matrices: list[FloatArray], n_levels: int, aggregation: str) -> dict[str, float]:
    if aggregation == "3D_merged":
        return glcm_features(np.sum(matrices, axis=0))
    per_direction = [glcm_features(m) for m in matrices if m.sum() > 0]
    if not per_direction:
        return glcm_features(np.zeros((n_levels, n_levels)))
    return {k: float(np.mean([f[k] for f in per_direction])) for k in per_direction[0]}


# --------------------------------------------------------------------------- entry point


def label_features(
    image: NDArray[Any],
    labels: NDArray[Any],
    label: int,
    spacing_zyx: Sequence[float],
    settings: RadiomicsSettings,
) -> dict[str, float]:
    """:func:`compute_features` of the voxels of ``labels`` equal to ``label``, given only the
    part of the grid it looks at (the label's box grown by the crop margin): no grid-sized mask."""
    box = label_box(labels, label)
    if box is None:
        raise RadiomicsError("the region is empty")
    grown = tuple(
        slice(max(s.start - _MARGIN, 0), min(s.stop + _MARGIN, n))
        for s, n in zip(box, labels.shape, strict=True)
    )
    return compute_features(image[grown], labels[grown] == label, spacing_zyx, settings)


#: Voxels kept around a region's bounding box (for the texture and morphology neighbourhoods).
_MARGIN = 2


def _exact_in(value: float, dtype: np.dtype[Any]) -> bool:
    """Whether ``value`` is a value of ``dtype`` (an int16 CT compares with -1000 as it is)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return math.isfinite(value) and value == math.floor(value) and info.min <= value <= info.max
    return float(np.asarray(value, dtype=dtype)) == value


def compute_features(
    image: NDArray[Any], mask: NDArray[Any], spacing_zyx: Sequence[float], settings: RadiomicsSettings
) -> dict[str, float]:
    """Every feature of :data:`FEATURES` for the region ``mask`` of ``image`` (both [z, y, x]).

    ``spacing_zyx`` is the voxel size in mm. Returns ``{feature id: value}`` in FEATURES order.
    """
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 3D shape")
    morph_mask = np.asarray(mask, dtype=bool)
    if not morph_mask.any():
        raise RadiomicsError("the region is empty")
    img, morph_mask = _crop(np.asarray(image), morph_mask, margin=_MARGIN)
    spacing = tuple(float(s) for s in spacing_zyx)
    if settings.resample_mm is not None:
        x, y, z = settings.resample_mm
        img, morph_mask = resample(np.asarray(img, dtype=np.float64), morph_mask, spacing, (z, y, x))
        spacing = (z, y, x)
        if not morph_mask.any():
            raise RadiomicsError("the region is empty after resampling (smaller than a resampled voxel)")
    int_mask = morph_mask.copy()
    if settings.resegment is not None:
        low, high = settings.resegment
        if not all(_exact_in(b, img.dtype) for b in (low, high)):
            img = np.asarray(img, dtype=np.float64)  # compare in float64 as the IBSI values are
        # Bounds in the image's own type (exact, checked above): an int16 CT is compared as int16,
        # not converted to float64 for the comparison.
        lo, hi = np.asarray(low, dtype=img.dtype), np.asarray(high, dtype=img.dtype)
        int_mask &= img >= lo
        int_mask &= img <= hi
        if not int_mask.any():
            raise RadiomicsError(
                f"no voxel of the region lies in the re-segmentation range {list(settings.resegment)}"
            )
    # One family after the other, each one's temporaries gone before the next one's.
    out = morphology(img, morph_mask, int_mask, spacing)
    values = img[int_mask]
    if not np.issubdtype(values.dtype, np.integer):
        values = np.asarray(values, dtype=np.float64)  # integers (CT in HU) stay as they are
    levels_flat, n_levels = discretise(values, settings)
    grid = np.zeros(tuple(k + 2 for k in int_mask.shape), dtype=_level_type(n_levels))
    grid[1:-1, 1:-1, 1:-1][int_mask] = levels_flat
    del levels_flat
    out.update(intensity(values))
    del values
    out.update(_aggregate(_cooccurrences(grid, n_levels), n_levels, settings.glcm_aggregation))
    return {f.id: out[f.id] for f in FEATURES}
