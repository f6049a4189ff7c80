"""Model output -> label volume on the source grid, and the measurements taken from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.preprocess import axis_weights

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
    n, mz, my, mx = probabilities.shape
    nz, ny, nx = (int(s) for s in shape)
    if n < 2:
        return np.zeros((nz, ny, nx), dtype=np.uint8)
    # Every voxel is written below. np.empty, not np.zeros: NumPy asks the kernel for huge pages
    # for a large array it allocates itself (the 84 MB of 320 slices first written in about
    # 6 ms instead of 35 ms of page faults on the machine above), not for a zeroed one.
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    along_z = _AlongSlices(probabilities, nz)
    plane = _PlaneResampler(my, mx, ny, nx)
    scale = along_z.largest_magnitude()
    step = max(1, slab)
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        plane.labels(along_z.slab(z0, z1), _SAFE_MARGIN * scale, out=labels[z0:z1])
    if largest_component:
        keep_largest_components(labels, range(1, n))
    return labels


class _AlongSlices:
    """The probabilities resampled linearly along the slices to ``nz`` (as
    :func:`~.preprocess.resize` does it, bit for bit), a few output slices at a time: no
    copy of them all on the source's slices (63 MB for 320 slices)."""

    def __init__(self, probabilities: NDArray[np.floating[Any]], nz: int) -> None:
        self.p = probabilities
        self.resized = probabilities.shape[1] != nz
        self.lo, self.hi, self.w = axis_weights(probabilities.shape[1], nz)
        self.nz = nz

    def slab(self, z0: int, z1: int) -> NDArray[np.float32]:
        """Output slices ``z0`` to ``z1`` of every class, ``[class, slice, row, column]``."""
        if not self.resized:
            return np.asarray(self.p[:, z0:z1], dtype=np.float32)
        a = np.asarray(self.p[:, self.lo[z0:z1]], dtype=np.float32)
        b = np.asarray(self.p[:, self.hi[z0:z1]], dtype=np.float32)
        b -= a
        b *= self.w[z0:z1, np.newaxis, np.newaxis]
        a += b
        return a

    def largest_magnitude(self) -> float:
        """max(1, the largest magnitude of a resampled value), NaN ignored: the scale of the margin."""
        if self.p.size == 0:
            return 1.0
        # fmin/fmax ignore NaN (a NaN only where every value is one: then so is the blend).
        lowest, highest = _FMIN.reduce(self.p, axis=None), _FMAX.reduce(self.p, axis=None)
        if not (lowest < 0 or highest > 1):
            # A blend a + (b - a) w of two values in [0, 1] with w in [0, 1] rounds to a value in
            # [0, 1] (rounding is monotonic and never passes an exact bound): the maximum is 1.
            return 1.0
        top = 0.0
        for z0 in range(0, self.nz, _SLAB):
            m = float(_FMAX.reduce(np.abs(self.slab(z0, min(self.nz, z0 + _SLAB))), axis=None))
            top = max(top, m)  # a NaN m (a slab of NaN only) changes nothing, as in nanmax
        return max(1.0, top)


#: Output slices per step of :meth:`_AlongSlices.largest_magnitude`.
_SLAB = 16
#: fmin/fmax reductions (NaN ignored), typed loosely: NumPy 2.5's stubs have no overload for axis=None.
_FMIN: Any = np.fmin
_FMAX: Any = np.fmax


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
        # Output pixels of cell i along an axis: the run of indices whose lower source is i.
        self.ys_start, self.ys_count = _runs(self.lo_y, my)
        self.xs_start, self.xs_count = _runs(self.lo_x, mx)

    def labels(self, p: NDArray[np.float32], margin: float, out: NDArray[np.uint8]) -> None:
        """``p[c, k, my, mx]`` -> ``out[k, ny, nx]``, the argmax after in-plane resampling."""
        n = p.shape[0]
        # Winner and runner-up per model voxel, one channel at a time (cheaper than an
        # argmax across the strided class axis); ties go to the first class, like the argmax.
        # The runner-up after channel c is max(runner-up, min(top, channel c)). (Where a value
        # is NaN the top is NaN from then on and the voxel is never clear, whatever the runner-up.)
        wins = p[1] > p[0]
        best = wins.view(np.uint8).copy()
        top = np.maximum(p[0], p[1])
        second = np.minimum(p[0], p[1])
        for c in range(2, n):
            v = p[c]
            np.greater(v, top, out=wins)
            np.maximum(second, np.minimum(top, v), out=second)
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
        out[...] = np.repeat(np.repeat(best, self.xs_count, axis=2), self.ys_count, axis=1)
        z, ci, cj = np.nonzero(~same)
        if z.size == 0:
            return
        # The other cells' pixels interpolated, cells of one size (rows x columns of output
        # pixels: the edge cells differ) at a time: a cell's four corners are the same for all
        # its pixels, so each corner is read once per cell and each blend along the first axis
        # done once per row or column of the cell.
        values = [np.ascontiguousarray(p[c]).reshape(-1) for c in range(n)]
        target = out.reshape(-1)
        assert np.shares_memory(target, out)  # out is a run of whole slices of the label map
        hy_of, hx_of = self.ys_count[ci], self.xs_count[cj]
        size = hy_of * (int(np.max(self.xs_count)) + 1) + hx_of
        for key in np.unique(size):
            sel = np.flatnonzero(size == key)
            hy, hx = int(hy_of[sel[0]]), int(hx_of[sel[0]])
            if hy == 0 or hx == 0:  # a source row or column that no output pixel reads (shrinking)
                continue
            self._cells(values, z[sel], ci[sel], cj[sel], hy, hx, target)

    def _cells(
        self,
        values: list[NDArray[np.float32]],
        z: NDArray[np.intp],
        i: NDArray[np.intp],
        j: NDArray[np.intp],
        hy: int,
        hx: int,
        target: NDArray[np.uint8],
    ) -> None:
        """The argmax of the interpolated classes on every pixel of cells ``(z, i, j)``, each
        ``hy`` x ``hx`` output pixels, written into ``target`` (the flattened output slab)."""
        my, mx, ny, nx = self.shape
        rows = self.ys_start[i][:, np.newaxis] + np.arange(hy)  # [cell, row in the cell]
        cols = self.xs_start[j][:, np.newaxis] + np.arange(hx)
        wy, wx = self.w_y[rows], self.w_x[cols]
        # The corners as resize() reads them: lower and upper source index of the cell's pixels.
        i1, j1 = self.hi_y[rows[:, 0]], self.hi_x[cols[:, 0]]
        base = z * (my * mx)
        corners = (base + i * mx + j, base + i * mx + j1, base + i1 * mx + j, base + i1 * mx + j1)
        result = np.zeros((z.size, hy, hx), dtype=np.uint8)
        lead = self._value(values[0], corners, wy, wx)
        for c in range(1, len(values)):
            v = self._value(values[c], corners, wy, wx)
            result[v > lead] = c
            np.maximum(lead, v, out=lead)
        at = (z[:, np.newaxis, np.newaxis] * ny + rows[:, :, np.newaxis]) * nx + cols[:, np.newaxis, :]
        target[at] = result

    def _value(
        self,
        v: NDArray[np.float32],
        corners: tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]],
        wy: NDArray[np.float32],
        wx: NDArray[np.float32],
    ) -> NDArray[np.float32]:
        """One class interpolated on the cells' pixels, ``[cell, row, column]``: the operations
        of resize()'s two in-plane passes, each pass's blend of a cell's row (or column) done
        once for all its pixels."""

        def lerp(
            a: NDArray[np.float32], b: NDArray[np.float32], w: NDArray[np.float32]
        ) -> NDArray[np.float32]:
            d = b - a
            d = d * w
            d += a
            return d

        v00, v01, v10, v11 = (v.take(k) for k in corners)
        cells, hy, hx = wy.shape[0], wy.shape[1], wx.shape[1]
        if self.x_first:
            # Along the columns on the cell's upper and lower source row, then along the rows.
            r0 = lerp(v00[:, None], v01[:, None], wx) if self.pass_x else v00[:, None]
            r1 = lerp(v10[:, None], v11[:, None], wx) if self.pass_x else v10[:, None]
            r0, r1 = r0[:, np.newaxis, :], r1[:, np.newaxis, :]
            out = lerp(r0, r1, wy[:, :, np.newaxis]) if self.pass_y else r0
        else:
            c0 = lerp(v00[:, None], v10[:, None], wy) if self.pass_y else v00[:, None]
            c1 = lerp(v01[:, None], v11[:, None], wy) if self.pass_y else v01[:, None]
            c0, c1 = c0[:, :, np.newaxis], c1[:, :, np.newaxis]
            out = lerp(c0, c1, wx[:, np.newaxis, :]) if self.pass_x else c0
        if out.shape != (cells, hy, hx):  # an axis that keeps its size: copies of a row or column
            out = np.broadcast_to(out, (cells, hy, hx)).copy()
        return out


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
