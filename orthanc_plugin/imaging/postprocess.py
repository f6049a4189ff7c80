"""Model output -> label volume on the source grid, and the measurements taken from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.preprocess import axis_weights, resize

#: A model-grid voxel whose winning class leads every other by more than this (relative to
#: the largest probability) keeps its class wherever it is interpolated with such voxels;
#: float32 rounding of the interpolation is below 1e-6 of the largest value.
_SAFE_MARGIN = 1e-5


def labels_from_probabilities(
    probabilities: NDArray[np.floating[Any]],
    shape: tuple[int, int, int],
    largest_component: bool = True,
    slab: int = 16,
) -> NDArray[np.uint8]:
    """``probabilities[c, z, y, x]`` on the model grid -> uint8 labels on the source grid ``shape``.

    The result is the argmax of the channels each resampled linearly (along the slices
    first, at model resolution, then in the image plane), so boundaries fall where the
    classes cross rather than on the model's coarse voxels. Only the image-plane cells
    whose four model-grid corners do not agree on a clear winner are interpolated; every
    other output voxel takes its cell's class, which is what the interpolation would give
    (a linear blend of values where one class leads by a margin keeps that class in the
    lead). ``slab`` slices are done at a time, so memory stays bounded however long the
    series is.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities shaped (classes, z, y, x), got {probabilities.shape}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    n, _, my, mx = probabilities.shape
    nz, ny, nx = (int(s) for s in shape)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    if n < 2:
        return labels
    along_z = np.stack([resize(probabilities[c], (nz, my, mx)) for c in range(n)])
    plane = _PlaneResampler(my, mx, ny, nx)
    scale = max(1.0, float(np.nanmax(np.abs(along_z)))) if along_z.size else 1.0
    for z0 in range(0, nz, max(1, slab)):
        z1 = min(nz, z0 + max(1, slab))
        plane.labels(along_z[:, z0:z1], _SAFE_MARGIN * scale, out=labels[z0:z1])
    del along_z  # 63 MB for 320 slices: gone before the components are labelled
    if largest_component:
        keep_largest_components(labels, range(1, n))
    return labels


class _PlaneResampler:
    """Linear upsampling of class probabilities in the image plane, followed by the argmax.

    Reproduces :func:`~.preprocess.resize` on the (rows, columns) axes bit for bit where it
    interpolates: same source indices, weights, axis order and float32 operations.
    """

    def __init__(self, my: int, mx: int, ny: int, nx: int) -> None:
        self.lo_y, self.hi_y, self.w_y = axis_weights(my, ny)
        self.lo_x, self.hi_x, self.w_x = axis_weights(mx, nx)
        # resize() skips an axis whose size does not change, and does the shrinking one first.
        self.pass_y, self.pass_x = my != ny, mx != nx
        self.x_first = nx / mx < ny / my
        self.shape = (my, mx, ny, nx)

    def labels(self, p: NDArray[np.float32], margin: float, out: NDArray[np.uint8]) -> None:
        """``p[c, k, my, mx]`` -> ``out[k, ny, nx]``, the argmax after in-plane resampling."""
        n = p.shape[0]
        my, mx = self.shape[:2]
        # Winner and runner-up per model voxel, one channel at a time (cheaper than an
        # argmax across the strided class axis); ties go to the first class, like the argmax.
        best = np.zeros(p.shape[1:], dtype=np.uint8)
        top = p[0].copy()
        second = np.full_like(top, -np.inf)
        for c in range(1, n):
            v = p[c]
            wins = v > top
            np.copyto(second, np.where(wins, top, np.maximum(second, v)))
            np.maximum(top, v, out=top)
            best[wins] = c
        clear = (top - second) > margin
        # A cell (i, j) spans model voxels i..i+1, j..j+1 (the far edge clamped, as hi is):
        # its pixels keep the class of voxel (i, j) when all four are clear and agree.
        same = clear.copy()
        same[:, :-1] &= clear[:, 1:] & (best[:, :-1] == best[:, 1:])
        across = same.copy()
        across[:, :, :-1] &= same[:, :, 1:] & (best[:, :, :-1] == best[:, :, 1:])
        same = across
        # Output pixels of cell i along an axis: the run of indices whose lower source is i.
        ys_start, ys_count = _runs(self.lo_y, my)
        xs_start, xs_count = _runs(self.lo_x, mx)
        out[...] = np.repeat(np.repeat(best, xs_count, axis=2), ys_count, axis=1)
        z, ci, cj = np.nonzero(~same)
        if z.size == 0:
            return
        per_cell = ys_count[ci] * xs_count[cj]
        cell = np.repeat(np.arange(z.size), per_cell)
        rank = np.arange(cell.size) - np.repeat(np.cumsum(per_cell) - per_cell, per_cell)
        w = xs_count[cj][cell]
        y = ys_start[ci][cell] + rank // w
        x = xs_start[cj][cell] + rank % w
        zz = z[cell]
        y0, y1, wy = self.lo_y[y], self.hi_y[y], self.w_y[y]
        x0, x1, wx = self.lo_x[x], self.hi_x[x], self.w_x[x]
        result = np.zeros(zz.size, dtype=np.uint8)
        lead = self._value(p[0], zz, y0, y1, wy, x0, x1, wx)
        for c in range(1, n):
            v = self._value(p[c], zz, y0, y1, wy, x0, x1, wx)
            result[v > lead] = c
            np.maximum(lead, v, out=lead)
        out[zz, y, x] = result

    def _value(
        self,
        v: NDArray[np.float32],
        z: NDArray[np.intp],
        y0: NDArray[np.intp],
        y1: NDArray[np.intp],
        wy: NDArray[np.float32],
        x0: NDArray[np.intp],
        x1: NDArray[np.intp],
        wx: NDArray[np.float32],
    ) -> NDArray[np.float32]:
        def lerp(
            a: NDArray[np.float32], b: NDArray[np.float32], w: NDArray[np.float32]
        ) -> NDArray[np.float32]:
            b = b - a
            b *= w
            b += a
            return b

        if self.x_first:
            r0 = lerp(v[z, y0, x0], v[z, y0, x1], wx) if self.pass_x else v[z, y0, x0]
            r1 = lerp(v[z, y1, x0], v[z, y1, x1], wx) if self.pass_x else v[z, y1, x0]
            return lerp(r0, r1, wy) if self.pass_y else r0
        c0 = lerp(v[z, y0, x0], v[z, y1, x0], wy) if self.pass_y else v[z, y0, x0]
        c1 = lerp(v[z, y0, x1], v[z, y1, x1], wy) if self.pass_y else v[z, y0, x1]
        return lerp(c0, c1, wx) if self.pass_x else c0


def _runs(lo: NDArray[np.intp], n_in: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Per source index i: the first output index whose lower source index is i, and how many."""
    count = np.bincount(lo, minlength=n_in)
    start = np.cumsum(count) - count
    return start, count


def keep_largest_components(labels: NDArray[np.uint8], values: Sequence[int] | range) -> None:
    """In place: keep only the largest 3D connected component of each label value."""
    for v in values:
        box = label_box(labels, v)
        if box is None:
            continue
        crop = labels[box] == v
        comp, n = ndimage.label(crop)
        if n <= 1:
            continue
        # Sizes from each component's own bounding box: a bincount of the whole crop would
        # first copy the int32 labels to intp; a few hundred small boxes cost far less.
        objects = ndimage.find_objects(comp)
        if n > 256:
            sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        else:
            sizes = np.array(
                [np.count_nonzero(comp[sl] == i) for i, sl in enumerate(objects, start=1)], dtype=np.int64
            )
        keep = int(np.argmax(sizes)) + 1  # ties: the first, as before
        target = labels[box]
        for i, sl in enumerate(objects, start=1):
            if i != keep and sl is not None:
                target[sl][comp[sl] == i] = 0


def label_box(labels: NDArray[Any], label: Any) -> tuple[slice, slice, slice] | None:
    """The smallest box (slice, row, column) holding every voxel equal to ``label``, or None
    when there is none, from projections made a few slices at a time: no grid-sized temporary
    (a 320-slice label map compared whole is an 84 MB mask)."""
    slabs = range(0, labels.shape[0], BOX_SLAB)
    slice_rows = np.concatenate([(labels[z : z + BOX_SLAB] == label).any(axis=2) for z in slabs])
    in_slices, in_rows = np.flatnonzero(slice_rows.any(axis=1)), np.flatnonzero(slice_rows.any(axis=0))
    if in_slices.size == 0:
        return None
    z0, z1, r0, r1 = int(in_slices[0]), int(in_slices[-1]) + 1, int(in_rows[0]), int(in_rows[-1]) + 1
    cols = np.zeros(labels.shape[2], dtype=bool)
    for z in range(z0, z1, BOX_SLAB):
        cols |= (labels[z : min(z + BOX_SLAB, z1), r0:r1] == label).any(axis=(0, 1))
    in_cols = np.flatnonzero(cols)
    return slice(z0, z1), slice(r0, r1), slice(int(in_cols[0]), int(in_cols[-1]) + 1)


#: Slices per step of :func:`label_box`.
BOX_SLAB = 16


def volumes_ml(
    labels: NDArray[np.integer[Any]], values: Sequence[int], voxel_volume_ml: float
) -> dict[int, float]:
    # One comparison per value: bincount would first copy the label map to intp (8 bytes a voxel).
    return {v: float(np.count_nonzero(labels == v)) * voxel_volume_ml for v in values}
