"""Is a segment what it claims to be? Measurements that tell a brain from a water bottle.

A network run on the wrong kind of image still answers something, often with high confidence:
a brain network given an MR of a water-filled phantom outlines a "brain" of a litre and a
half. These are measurements of a segment, each cheap and independent of the network, that
a pipeline's checks (:class:`~orthanc_plugin.core.config.SegmentChecks`) compare with the range
its anatomy allows:

* ``mean``: the mean source value inside (HU on CT);
* ``volume_ml`` and ``covered_fraction``: the volume, and how much of the organ's typical
  extent along the slice normal the series covers when the segment is cut by its first or
  last slice (``partial``): a 75 mm slab holds only part of a brain;
* ``contrast``: Michelson contrast |a - b| / (|a| + |b|) between the mean inside and the mean
  in a shell around the segment (in-plane, ``shell_mm`` wide): an organ differs from what
  surrounds it, the inside of a bottle from more of the bottle does not;
* ``variation``: standard deviation / |mean| inside: grey and white matter, vessels in lung,
  against the flat signal of a phantom;
* ``enclosed``: the share of that shell that is tissue (above ``tissue_above``, by default a
  tenth of the image's 99.5th percentile): a brain lies inside a head, a bottle in air;
* ``compactness``: sphericity pi^(1/3) (6 V)^(2/3) / A (1 for a ball): an organ is one
  compact body, a network answering noise gives ragged shapes;
* ``confidence`` and ``entropy``: the network's own mean maximum probability and mean
  normalised entropy over the segment's voxels on its grid (recorded, checked if asked);
* ``airway_ml`` (lungs, :func:`airway_in_segments`): how much of the trachea and main bronchi
  the segment holds; they are air like the lung, so a network may count them as lung.

Computation only; the worker's pipeline decides what a failed check means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.postprocess import BOX_SLAB, label_box
from orthanc_plugin.imaging.volume import Volume

#: Sub-sampling step for means over big segments (every other voxel along each axis is plenty).
_STEP = 2


@dataclass(frozen=True)
class SegmentQuality:
    """What :func:`measure_label` found for one segment (``None``: not measured)."""

    volume_ml: float
    partial: bool
    covered_mm: float
    mean: float | None = None
    contrast: float | None = None
    variation: float | None = None
    enclosed: float | None = None
    compactness: float | None = None
    confidence: float | None = None
    entropy: float | None = None
    airway_ml: float | None = None

    def recorded(self) -> dict[str, float]:
        """The measured values, rounded, for the job's record."""
        out: dict[str, float] = {}
        for name in (
            "contrast",
            "variation",
            "enclosed",
            "compactness",
            "confidence",
            "entropy",
            "airway_ml",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = round(float(value), 4)
        return out


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


#: Whether this NumPy interpolates a percentile with a Python ``q`` in the input's own float type
#: (weak promotion: NumPy 2.x returns float32 for float32 voxels; 1.26 interpolates in float64).
_WEAK_Q = np.percentile(np.zeros(2, dtype=np.float32), 50.0).dtype == np.float32


def high_percentile(voxels: NDArray[np.float32] | NDArray[np.int16], q: float) -> float:
    """``float(np.percentile(voxels, q))`` of the voxels in float32 (as a float32 volume gives
    it: an int16 volume's values are converted) for a high ``q``, without its partition of a
    copy of the whole volume (335 MB for 320 CT slices): the order statistics it interpolates
    between are taken from the voxels at or above a bound estimated on every 4th voxel along
    each axis (gathered a few slices at a time), then interpolated in float32 with NumPy's own
    operations. Falls back to ``np.percentile`` when the bound is too high or a value is NaN."""
    n = voxels.size
    virtual = np.asanyarray((n - 1) * np.true_divide(q, 100))  # as NumPy's "linear" method
    k = int(np.floor(virtual))
    sample = voxels[::4, ::4, ::4]
    if voxels.ndim != 3 or n < 2 or sample.size < 1000 or k + 1 >= n:
        return float(np.percentile(np.asarray(voxels, dtype=np.float32), q))
    bound = np.percentile(sample, max(0.0, q - 0.5))
    parts, below = [], 0
    for z in range(0, voxels.shape[0], BOX_SLAB):
        slab = voxels[z : z + BOX_SLAB]
        high = slab >= bound
        below += int(np.count_nonzero(slab < bound))
        parts.append(slab[high])
    top = np.concatenate(parts)
    if below + top.size != n or below > k:  # NaNs, or the bound is above the k-th value
        return float(np.percentile(np.asarray(voxels, dtype=np.float32), q))
    top.partition((k - below, k + 1 - below))
    a = np.asarray(top[k - below : k - below + 1].reshape(()), dtype=np.float32)
    b = np.asarray(top[k + 1 - below : k + 2 - below].reshape(()), dtype=np.float32)
    t: Any = np.asanyarray(virtual - np.floor(virtual))
    if _WEAK_Q:
        t = float(t)  # as NumPy >= 2.x does for a Python q: the interpolation stays in float32
    # numpy's _lerp, operation for operation (so the rounding is the same).
    diff = np.subtract(b, a)
    out = np.asanyarray(np.add(a, diff * t))
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return float(out[()])


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
    grown = _dilate_in_plane(crop, disc)
    box = (
        slice(z0 * step_z, z1 * step_z, step_z),
        slice(y0 * step, y1 * step, step),
        slice(x0 * step, x1 * step, step),
    )
    return grown & ~crop, box


def _dilate_in_plane(mask: NDArray[np.bool_], disc: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``ndimage.binary_dilation(mask, structure=disc[np.newaxis])`` (each slice by the centred,
    symmetric ``disc``; outside the array is outside the mask), row by row of the disc: a disc's
    row is a run of columns centred on it, so the dilation is the union, over the disc's rows,
    of the mask dilated along the columns by that row's run and shifted by the row's offset.
    The runs are grown one column at a time, shortest first: a few dozen or-ed shifts of the
    mask instead of one look-up per disc element per voxel."""
    ry, rx = disc.shape[0] // 2, disc.shape[1] // 2
    by_run: dict[int, list[int]] = {}  # half-length of a row's run of columns -> the rows' offsets
    for a in range(-ry, ry + 1):
        xs = np.flatnonzero(disc[a + ry]) - rx
        if xs.size == 0:
            continue
        h = int(xs[-1])
        if not np.array_equal(xs, np.arange(-h, h + 1)):  # not a disc: the general dilation
            return np.asarray(ndimage.binary_dilation(mask, structure=disc[np.newaxis]))
        by_run.setdefault(h, []).append(a)
    grown = np.zeros_like(mask)
    along = mask.copy()  # the mask dilated along the columns by the current run
    rows, done = mask.shape[1], 0
    for h in sorted(by_run):
        for s in range(done + 1, h + 1):
            along[:, :, s:] |= mask[:, :, :-s]
            along[:, :, :-s] |= mask[:, :, s:]
        done = h
        for a in by_run[h]:
            if abs(a) >= rows:
                continue
            if a >= 0:
                grown[:, a:] |= along[:, : rows - a]
            else:
                grown[:, : rows + a] |= along[:, -a:]
    return grown


def sphericity(mask: NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    """pi^(1/3) (6 V)^(2/3) / A, the area counted as voxel faces between inside and outside.

    Counting faces overestimates a smooth surface (by up to 3/2 for a ball), so a voxelised
    ball scores about 0.67, not 1; thresholds are set against such values.
    """
    dz, dy, dx = spacing
    area = 0.0
    for axis, face in ((0, dy * dx), (1, dz * dx), (2, dz * dy)):
        # Faces between neighbours that differ, plus the faces on the array's two ends.
        m = np.moveaxis(mask, axis, 0)
        faces = np.count_nonzero(m[1:] != m[:-1]) + np.count_nonzero(m[0]) + np.count_nonzero(m[-1])
        area += float(faces) * face
    volume = float(np.count_nonzero(mask)) * dz * dy * dx
    if area == 0:
        return 0.0
    return float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)


def confidence(probabilities: NDArray[np.floating[Any]], labels: list[int]) -> dict[int, tuple[float, float]]:
    """Per label: mean maximum probability and mean normalised entropy over the voxels of the
    model grid the network gave that label (channel ``label`` of ``probabilities[K, ...]``)."""
    p = np.asarray(probabilities, dtype=np.float32)
    k = p.shape[0]
    if k < 2:
        return {}
    # The argmax and maximum one channel at a time (the channel axis is the strided one); the
    # first channel wins ties, as in the argmax. A NaN (the argmax picks the first) takes the
    # plain route.
    top = p[0].copy()
    winner = np.zeros(top.shape, dtype=np.intp)
    for c in range(1, k):
        wins = p[c] > top
        winner[wins] = c
        np.maximum(top, p[c], out=top)
    if np.isnan(top).any():
        winner, top = np.argmax(p, axis=0), np.max(p, axis=0)
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


@dataclass(frozen=True)
class Airway:
    """The trachea and main bronchi found by :func:`find_airway`: ``mask`` inside ``box`` of the
    volume (``None`` when no trachea was found at the top of the segments). ``measurable`` is
    False where the series cannot show it: not axial, or the segments reach the volume's cranial
    end (the apex is not covered, so the top slice of the lungs shows bronchi and lung, not the
    trachea above them)."""

    mask: NDArray[np.bool_] | None
    box: tuple[slice, slice, slice]
    measurable: bool = True


def find_airway(
    volume: Volume,
    lungs: NDArray[np.bool_] | LungExtent,
    *,
    air_below: float = -950.0,
    band_mm: float = 30.0,
    tube_area_mm2: tuple[float, float] = (30.0, 600.0),
    max_area_mm2: float = 800.0,
) -> Airway:
    """The air-filled tube that runs down the midline from the top of the lungs: the trachea, and
    the main bronchi as far as they stay within ``band_mm`` of the midline.

    On an axial series: the midline is the middle of the lungs' left-right extent; the seed is
    the air region (below ``air_below``, HU on CT) nearest the midline in the lungs' most cranial
    slice, of a trachea's cross-section (``tube_area_mm2``, at most 20 mm from the midline); the
    airway is the air connected to it (faces, not corners) within the band, the lungs' front-back
    extent and the slices at and below the seed, counting per slice only air regions up to
    ``max_area_mm2`` (so that emphysematous lung in the band is not taken for a bronchus).
    """
    if not isinstance(lungs, LungExtent):
        mask = lungs
        lungs = LungExtent.of(mask, lambda z0, z1: mask[z0:z1])
    return _find_airway(volume, lungs, air_below, band_mm, tube_area_mm2, max_area_mm2)


@dataclass(frozen=True)
class LungExtent:
    """Where the lungs are: all that :func:`find_airway` reads of their mask, which can be made
    a few slices at a time (no grid-sized mask, 84 MB for a 320-slice CT)."""

    slices: NDArray[np.intp]  # the slices the lungs are on
    rows_by_slice: NDArray[np.bool_]  # [slice, row]: lung on that row of that slice
    columns_by_slice: NDArray[np.bool_]  # [slice, column]
    end_slices: tuple[NDArray[np.bool_], NDArray[np.bool_]]  # the mask on the first and last slice

    @staticmethod
    def of(grid: NDArray[Any], mask: Callable[[int, int], NDArray[np.bool_]]) -> LungExtent:
        """The extent of ``mask(z0, z1)``, the lungs' mask of slices z0 to z1 of ``grid``'s."""
        n = grid.shape[0]
        rows, cols = [], []
        for z in range(0, n, BOX_SLAB):
            slab = mask(z, min(z + BOX_SLAB, n))
            rows.append(slab.any(axis=2))
            cols.append(slab.any(axis=1))
        by_row, by_col = np.concatenate(rows), np.concatenate(cols)
        ends = (np.array(mask(0, 1)[0], dtype=bool), np.array(mask(n - 1, n)[0], dtype=bool))
        return LungExtent(np.flatnonzero(by_row.any(axis=1)), by_row, by_col, ends)


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
    # Labelled straight into the index type: the sizes' bincount and the look-up below would
    # each convert int32 labels to it.
    flat = np.empty(air.shape, dtype=np.intp)
    ndimage.label(
        air,
        structure=np.array([np.zeros((3, 3)), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3))]),
        output=flat,
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
    """mL of the trachea and main bronchi (:func:`find_airway`) inside each segment of ``values``
    (0.0 each when no trachea was found; nothing, i.e. not measured, where the series cannot show
    it)."""
    airway = find_airway(volume, LungExtent.of(labels, lambda z0, z1: is_one_of(labels[z0:z1], values)))
    if not airway.measurable:
        return {}
    if airway.mask is None:
        return dict.fromkeys(values, 0.0)
    inside = labels[airway.box][airway.mask]
    return {v: float(np.count_nonzero(inside == v)) * volume.voxel_volume_ml for v in values}


def is_one_of(labels: NDArray[np.integer[Any]], values: list[int]) -> NDArray[np.bool_]:
    """``np.isin(labels, values)``; for unsigned labels and values that are a run (1 and 2, the
    lungs) one subtraction that wraps below the run and one comparison, in the labels' own type:
    a fraction of ``np.isin``'s comparison per value, or-ed into a mask."""
    run = sorted(set(values))
    if (
        labels.dtype.kind == "u"
        and run
        and run == list(range(run[0], run[-1] + 1))
        and run[0] >= 0
        and run[-1] <= np.iinfo(labels.dtype).max
    ):
        shifted = np.subtract(labels, labels.dtype.type(run[0]))  # wraps below run[0]: too large
        inside: NDArray[np.bool_] = np.less_equal(shifted, labels.dtype.type(run[-1] - run[0]))
        return inside
    return np.isin(labels, values)
