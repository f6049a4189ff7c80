"""The imaging code of the pre-processing, post-processing and quality checks as it was before
the faster versions (one pass per step over the whole grid or the segment's box, kept as the
definition reads), that the product's functions are compared with bit for bit; for tests only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.preprocess import axis_weights
from orthanc_plugin.imaging.quality import (
    _STEP,
    Airway,
    LungExtent,
    SegmentQuality,
    high_percentile,
    sphericity,
)
from orthanc_plugin.imaging.volume import Volume

BOX_SLAB = 16
_SAFE_MARGIN = 1e-5


def window(volume: NDArray[Any], low: float, high: float) -> NDArray[np.float32]:
    """Clip intensities to ``[low, high]`` and scale them linearly to ``[0, 1]``."""
    if not high > low:
        raise ValueError(f"window: high ({high}) must be greater than low ({low})")
    out = (np.asarray(volume, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def resize(
    volume: NDArray[Any],
    shape: tuple[int, int, int],
    order: int = 1,
    pointwise: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None,
) -> NDArray[np.float32]:
    """Resample a 3D array to ``shape``; linear (``order=1``) or nearest (``order=0``).

    Voxels are cells: an output voxel centre maps to the same physical place in the input
    (like ``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` and torch's
    ``align_corners=False``). Linear resampling is done one axis at a time, which is exact
    for trilinear interpolation and an order of magnitude faster than a generic zoom.

    ``pointwise`` (an element-wise function such as :func:`window`) is applied to the input
    first; the result is the same as ``resize(pointwise(volume))``, but for linear resampling
    it only touches the input planes the first pass reads (a 320-slice series resized to 64
    slices: 128 planes instead of 320).
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"resize: target shape must be three positive sizes, got {shape}")
    if order not in (0, 1):
        raise ValueError(f"resize: order must be 0 (nearest) or 1 (linear), got {order}")
    # Another type than float32 (an int16 CT) is converted where planes are taken: the same
    # float32 values as a float32 copy of the whole volume, without that copy.
    v: NDArray[Any] = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"resize: expected a 3D array, got shape {v.shape}")
    if order == 0 or v.shape == tuple(shape):
        v = np.asarray(v, dtype=np.float32)
    if pointwise is not None and (order == 0 or v.shape == tuple(shape)):
        v = np.asarray(pointwise(v), dtype=np.float32)
        pointwise = None
    if v.shape == tuple(shape):
        return v.copy() if v is volume else v
    if order == 0:
        zoom = [t / s for t, s in zip(shape, v.shape, strict=True)]
        out = ndimage.zoom(v, zoom, order=0, mode="nearest", grid_mode=True, prefilter=False)
        return np.asarray(out, dtype=np.float32)
    # Shrinking axes first, growing ones last: every pass then works on the smallest array.
    for axis in sorted(range(3), key=lambda ax: shape[ax] / v.shape[ax]):
        n_in, n_out = v.shape[axis], shape[axis]
        if n_in == n_out:
            continue
        lo, hi, w = axis_weights(n_in, n_out)
        wshape = [1, 1, 1]
        wshape[axis] = n_out
        wb = w.reshape(wshape)
        a, b = _planes(v, lo, axis), _planes(v, hi, axis)
        if pointwise is not None:  # element-wise, so it commutes with taking planes
            a = np.asarray(pointwise(a), dtype=np.float32)
            b = np.asarray(pointwise(b), dtype=np.float32)
            pointwise = None
        # a + (b - a) * w, in place to keep peak memory at three copies of the largest pass.
        b -= a
        b *= wb
        a += b
        v = a
    return v


def _planes(v: NDArray[Any], index: NDArray[np.intp], axis: int) -> NDArray[np.float32]:
    """``np.take(v, index, axis)`` as float32: along the slices of an int16 volume copied plane by
    plane into the float32 result (no int16 copy of the planes first)."""
    if v.dtype == np.float32 or axis != 0:
        return np.asarray(np.take(v, index, axis=axis), dtype=np.float32)
    out = np.empty((len(index), *v.shape[1:]), dtype=np.float32)
    for j, i in enumerate(index):
        out[j] = v[i]
    return out


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


def measure_label(
    volume: Volume,
    labels: NDArray[np.integer[Any]],
    label: int,
    *,
    shell_mm: float = 10.0,
    tissue_above: float | None = None,
    shape_and_surroundings: bool = True,
) -> SegmentQuality:
    """Measure the segment ``labels == label`` (on ``volume``'s grid) as the module docstring
    says, from the label's bounding box only: no grid-sized mask (84 MB for a 320-slice CT). The
    mean and variation come from every other voxel of the whole grid that falls in the segment
    (all its voxels when that sample holds fewer than 1000), the shell from the whole grid's
    coarse points: the values do not depend on where the box lies."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shaped {labels.shape}, the volume is {volume.shape}")
    covered = volume.shape[0] * volume.spacing[0]
    box = label_box(labels, label)
    if box is None:
        return SegmentQuality(0.0, False, covered)
    mask = labels[box] == label
    start = (box[0].start, box[1].start, box[2].start)
    count = int(np.count_nonzero(mask))
    # On the first or last slice exactly when the box is.
    partial = box[0].start == 0 or box[0].stop == volume.shape[0]
    voxels = volume.voxels
    # The every-other-voxel sample of the whole grid that falls in the box, in the same order.
    skip = [(-a) % _STEP for a in start]
    sub = mask[skip[0] :: _STEP, skip[1] :: _STEP, skip[2] :: _STEP]
    if np.count_nonzero(sub) >= 1000:
        grid = tuple(slice(b.start + k, b.stop, _STEP) for b, k in zip(box, skip, strict=True))
        inside = np.asarray(voxels[grid][sub], dtype=np.float32)
    else:
        inside = np.asarray(voxels[box][mask], dtype=np.float32)
    mean = float(inside.mean())
    if not shape_and_surroundings:
        return SegmentQuality(count * volume.voxel_volume_ml, partial, covered, mean=mean)
    variation = float(inside.std() / abs(mean)) if mean != 0 else math.inf
    shell, around_box = _shell(mask, volume.spacing, shell_mm, start, volume.shape)
    if shell.any():
        around = np.asarray(voxels[around_box][shell], dtype=np.float32)
        around_mean = float(around.mean())
        denominator = abs(mean) + abs(around_mean)
        contrast = abs(mean - around_mean) / denominator if denominator > 0 else 0.0
        threshold = tissue_above if tissue_above is not None else 0.1 * high_percentile(voxels, 99.5)
        enclosed = float(np.count_nonzero(around > threshold)) / around.size
    else:  # the segment fills every slice: nothing around it to compare with
        contrast, enclosed = 0.0, 0.0
    return SegmentQuality(
        volume_ml=count * volume.voxel_volume_ml,
        partial=partial,
        covered_mm=covered,
        mean=mean,
        contrast=contrast,
        variation=variation,
        enclosed=enclosed,
        compactness=sphericity(mask, volume.spacing),
    )


def _shell(
    mask: NDArray[np.bool_],
    spacing: tuple[float, float, float],
    shell_mm: float,
    start: tuple[int, int, int] = (0, 0, 0),
    grid: tuple[int, ...] | None = None,
) -> tuple[NDArray[np.bool_], tuple[slice, slice, slice]]:
    """The band up to ``shell_mm`` around the segment in each slice's plane (in-plane only, so a
    slab's missing neighbours beyond its ends do not count as 'outside'), on a coarser grid:
    every ``step``-th row and column (and slice), ``step`` chosen so that a grid cell is at most
    a quarter of the shell wide (the shell is a sample of its surroundings for two means; a disc
    dilation at full resolution cost seconds on a 512 x 512 CT for the same verdicts).

    ``mask`` is the segment in a box of the volume's ``grid`` (shape) that starts at ``start``,
    all of the grid by default; the coarse grid is the whole grid's either way. Returns the shell
    inside a box of the volume and that box (as strided slices), so that ``voxels[box][shell]``
    are the sampled surroundings."""
    dz, dy, dx = spacing
    step = max(1, int(shell_mm / 4 / min(dy, dx)))
    step_z = max(1, int(shell_mm / 4 / dz))  # the shell is per slice: slices can be sampled too
    dy, dx = dy * step, dx * step
    ry, rx = max(1, round(shell_mm / dy)), max(1, round(shell_mm / dx))
    yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disc = ((yy * dy) ** 2 + (xx * dx) ** 2) <= shell_mm**2 + 1e-9
    steps = (step_z, step, step)
    shape = grid if grid is not None else mask.shape
    coarse_shape = [-(-n // k) for n, k in zip(shape, steps, strict=True)]
    # The grid's coarse points inside the box, and the coarse index of the first.
    skip = [(-a) % k for a, k in zip(start, steps, strict=True)]
    first = [(a + o) // k for a, o, k in zip(start, skip, steps, strict=True)]
    coarse = mask[skip[0] :: step_z, skip[1] :: step, skip[2] :: step]
    # The segment's bounding box on the coarse grid, grown by the disc's radius.
    z = np.flatnonzero(coarse.any(axis=(1, 2)))
    if z.size == 0:  # thinner than the coarse grid: no shell to sample
        empty = (slice(0, 0), slice(0, 0), slice(0, 0))
        return np.zeros((0, 0, 0), dtype=bool), empty
    rows = np.flatnonzero(coarse[z[0] : z[-1] + 1].any(axis=(0, 2))) + first[1]
    cols = np.flatnonzero(coarse[z[0] : z[-1] + 1].any(axis=(0, 1))) + first[2]
    z0, z1 = int(z[0]) + first[0], int(z[-1]) + first[0] + 1
    y0, y1 = max(0, int(rows[0]) - ry), min(coarse_shape[1], int(rows[-1]) + ry + 1)
    x0, x1 = max(0, int(cols[0]) - rx), min(coarse_shape[2], int(cols[-1]) + rx + 1)
    crop = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=bool)
    # What of the box lies in the crop (the rest of the crop is outside the segment).
    lo = (z0, y0, x0)
    part = tuple(
        slice(max(f, a) - f, min(f + n, b) - f)
        for f, n, a, b in zip(first, coarse.shape, lo, (z1, y1, x1), strict=True)
    )
    at = tuple(slice(p.start + f - a, p.stop + f - a) for p, f, a in zip(part, first, lo, strict=True))
    crop[at] = coarse[part]
    grown = ndimage.binary_dilation(crop, structure=disc[np.newaxis])
    box = (
        slice(z0 * step_z, z1 * step_z, step_z),
        slice(y0 * step, y1 * step, step),
        slice(x0 * step, x1 * step, step),
    )
    return grown & ~crop, box


def confidence(probabilities: NDArray[np.floating[Any]], labels: list[int]) -> dict[int, tuple[float, float]]:
    """Per label: mean maximum probability and mean normalised entropy over the voxels of the
    model grid the network gave that label (channel ``label`` of ``probabilities[K, ...]``)."""
    p = np.asarray(probabilities, dtype=np.float32)
    k = p.shape[0]
    if k < 2:
        return {}
    winner = np.argmax(p, axis=0)
    top = np.max(p, axis=0)
    out: dict[int, tuple[float, float]] = {}
    for label in labels:
        if label >= k:
            continue
        where = winner == label
        if not where.any():
            continue
        q = np.clip(p[:, where], 1e-7, 1.0)
        entropy = float((-(q * np.log(q)).sum(axis=0) / math.log(k)).mean())
        out[label] = (float(top[where].mean()), entropy)
    return out


def _find_airway(
    volume: Volume,
    lungs: LungExtent,
    air_below: float,
    band_mm: float,
    tube_area_mm2: tuple[float, float],
    max_area_mm2: float,
) -> Airway:
    empty = Airway(None, (slice(0, 0),) * 3)
    if abs(volume.normal[2]) < 0.8 or lungs.slices.size == 0:
        # not axial: the midline and the cranial end are not what this assumes
        return Airway(None, empty.box, measurable=False)
    _, dy, dx = volume.spacing
    zs = lungs.slices
    rows = np.flatnonzero(lungs.rows_by_slice[zs[0] : zs[-1] + 1].any(axis=0))
    cols = np.flatnonzero(lungs.columns_by_slice[zs[0] : zs[-1] + 1].any(axis=0))
    mid = (cols[0] + cols[-1]) / 2
    half = band_mm / dx
    x0, x1 = max(0, int(mid - half)), min(volume.shape[2], int(mid + half) + 1)
    # The patient's head is where the normal points (+z, superior, in DICOM's patient axes).
    cranial_last = volume.normal[2] > 0
    top = int(zs[-1]) if cranial_last else int(zs[0])
    # Lung beside the midline band in the volume's cranial end slice: the apices are cut off, and
    # the top slice shows bronchi and lung, not the trachea above them. (A trachea taken for lung
    # may reach that slice: it lies within the band.)
    edge = lungs.end_slices[1] if cranial_last else lungs.end_slices[0]
    if edge[:, :x0].any() or edge[:, x1:].any():
        return Airway(None, empty.box, measurable=False)
    z = slice(0, top + 1) if cranial_last else slice(top, volume.shape[0])
    box = (z, slice(int(rows[0]), int(rows[-1]) + 1), slice(x0, x1))
    air = np.asarray(volume.voxels[box] < air_below)
    # Per slice, only air regions of at most max_area_mm2 (in-plane connectivity).
    flat, _ = ndimage.label(
        air, structure=np.array([np.zeros((3, 3)), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3))])
    )
    sizes = np.bincount(flat.ravel()) * dy * dx
    small = sizes <= max_area_mm2
    small[0] = False
    air &= small[flat]
    seed_slice = flat[-1] if cranial_last else flat[0]
    # Air outside the body (in front of the neck, the suprasternal notch) reaches the image's
    # edge through air in the seed's slice; the trachea is walled by tissue.
    outside, _ = ndimage.label(volume.voxels[top] < -500)
    edges = np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])
    open_air = np.isin(outside[box[1:]], edges[edges > 0])
    best, nearest = 0, 20.0
    for i, where in enumerate(ndimage.find_objects(seed_slice), start=1):
        if where is None:
            continue
        area = sizes[i]
        if not tube_area_mm2[0] <= area <= tube_area_mm2[1] or open_air[where][seed_slice[where] == i].any():
            continue
        cx = float(np.nonzero(seed_slice[where] == i)[1].mean()) + where[1].start + x0
        distance = abs(cx - mid) * dx
        if distance <= nearest:
            best, nearest = i, distance
    if best == 0:
        return empty
    tube, _ = ndimage.label(air)
    seed_plane = tube[-1] if cranial_last else tube[0]
    (component,) = np.unique(seed_plane[seed_slice == best])
    return Airway(tube == component, box)


def airway_in_segments(
    volume: Volume, labels: NDArray[np.integer[Any]], values: list[int]
) -> dict[int, float]:
    """mL of the trachea and main bronchi inside each segment of ``values`` (as the product's)."""
    lungs = lung_extent(labels, lambda z0, z1: np.isin(labels[z0:z1], values))
    airway = _find_airway(volume, lungs, -950.0, 30.0, (30.0, 600.0), 800.0)
    if not airway.measurable:
        return {}
    if airway.mask is None:
        return dict.fromkeys(values, 0.0)
    inside = labels[airway.box][airway.mask]
    return {v: float(np.count_nonzero(inside == v)) * volume.voxel_volume_ml for v in values}


def lung_extent(grid: NDArray[Any], mask: Callable[[int, int], NDArray[np.bool_]]) -> LungExtent:
    """``LungExtent.of``: the extent of ``mask(z0, z1)``, the lungs' mask of slices z0 to z1."""
    n = grid.shape[0]
    rows, cols = [], []
    for z in range(0, n, BOX_SLAB):
        slab = mask(z, min(z + BOX_SLAB, n))
        rows.append(slab.any(axis=2))
        cols.append(slab.any(axis=1))
    by_row, by_col = np.concatenate(rows), np.concatenate(cols)
    ends = (np.array(mask(0, 1)[0], dtype=bool), np.array(mask(n - 1, n)[0], dtype=bool))
    return LungExtent(np.flatnonzero(by_row.any(axis=1)), by_row, by_col, ends)
