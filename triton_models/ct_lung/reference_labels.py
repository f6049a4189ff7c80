# SPDX-License-Identifier: AGPL-3.0-or-later
"""Classical left/right lung labelling of a chest CT, used as the training reference of ``ct_lung``.

No learning is involved: a Hounsfield threshold, connected components and a little morphology.
The result is what the ``ct_lung`` network is trained to reproduce; it is a *reference*, not a
ground truth drawn by a radiologist (see README.md for what it gets wrong).

Array convention (the same as the worker's): ``hu`` has shape ``(z, y, x)`` = (slice, row,
column), slices sorted along the slice normal, values in Hounsfield units. ``spacing`` is the
voxel size in mm in the same order. For an axial CT in the usual orientation the column index
``x`` grows toward the patient's LEFT, so the lung whose centroid has the smaller ``x`` is the
RIGHT lung.

Labels: 0 background, 1 right lung (patient right), 2 left lung (patient left).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

BACKGROUND = 0
RIGHT_LUNG = 1
LEFT_LUNG = 2
LABEL_NAMES = {BACKGROUND: "background", RIGHT_LUNG: "right_lung", LEFT_LUNG: "left_lung"}

_STRUCT_2D = ndi.generate_binary_structure(2, 1)


def _largest_component_2d(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    lab, n = ndi.label(mask, structure=_STRUCT_2D)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.asarray(lab == int(np.argmax(sizes)))


def _disk(radius_px: int) -> NDArray[np.bool_]:
    r = max(int(radius_px), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(yy * yy + xx * xx <= r * r + r)  # "+ r" rounds the disk out a little


def _body_and_candidates(
    hu: NDArray[np.floating[Any]], threshold: float
) -> tuple[NDArray[np.bool_], NDArray[np.floating[Any]]]:
    """Per slice: air inside the body outline, and the body's centroid column (NaN if no body)."""
    air = hu < threshold
    cand = np.zeros(hu.shape, dtype=bool)
    body_x = np.full(hu.shape[0], np.nan)
    for k in range(hu.shape[0]):
        body = _largest_component_2d(~air[k])
        if not body.any():
            continue
        body_x[k] = float(np.nonzero(body)[1].mean())
        inside = ndi.binary_fill_holes(body)
        # Air enclosed by the body outline; air connected to the image border (room air,
        # the gap under the patient) is not enclosed, and neither is air in the table.
        cand[k] = air[k] & inside
    return cand, body_x


def _remove_midline_airways(
    cand: NDArray[np.bool_],
    midline_x: float,
    spacing: tuple[float, float, float],
    max_area_mm2: float,
    band_mm: float,
) -> NDArray[np.bool_]:
    """Drop small 2D air components centred near the midline (trachea, main bronchi, oesophagus)."""
    out = cand.copy()
    pixel_mm2 = spacing[1] * spacing[2]
    for k in range(cand.shape[0]):
        lab, n = ndi.label(cand[k], structure=_STRUCT_2D)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        areas = ndi.sum_labels(cand[k], lab, idx) * pixel_mm2
        cx = np.array([c[1] for c in ndi.center_of_mass(cand[k], lab, idx)])
        drop = idx[(areas < max_area_mm2) & (np.abs(cx - midline_x) * spacing[2] < band_mm)]
        if drop.size:
            out[k][np.isin(lab, drop)] = False
    return out


def _split_merged(
    comp: NDArray[np.bool_], midline_x: float, spacing: tuple[float, float, float]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Split one 3D component holding both lungs into (right, left).

    Slice by slice, a 2D part of the component that lies (almost) entirely on one side of the
    midline seeds that side. Voxels of parts that straddle the midline (lungs joined through the
    carina or touching at the anterior junction) take the side of the nearest seed voxel
    (Euclidean distance in mm). Without any seed on one side it falls back to a plain cut at
    the midline.
    """
    seeds = np.zeros(comp.shape, dtype=np.uint8)
    for k in range(comp.shape[0]):
        lab, n = ndi.label(comp[k], structure=_STRUCT_2D)
        for i in range(1, n + 1):
            part = lab == i
            xs = np.nonzero(part)[1]
            right_frac = float(np.mean(xs < midline_x))
            if right_frac >= 0.9:
                seeds[k][part] = RIGHT_LUNG
            elif right_frac <= 0.1:
                seeds[k][part] = LEFT_LUNG
    x = np.arange(comp.shape[2])[None, None, :]
    if not (seeds == RIGHT_LUNG).any() or not (seeds == LEFT_LUNG).any():
        return comp & (x < midline_x), comp & (x >= midline_x)
    _, (iz, iy, ix) = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
    side = seeds[iz, iy, ix]
    return comp & (side == RIGHT_LUNG), comp & (side == LEFT_LUNG)


def _largest_component_3d(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.asarray(lab == int(np.argmax(sizes)))


def _smooth(mask: NDArray[np.bool_], radius_px: int, min_part_px: int) -> NDArray[np.bool_]:
    """Per slice: drop small stray parts, light closing, then fill enclosed holes (vessels).

    A 2D part smaller than ``min_part_px`` is dropped unless it is the largest part of the
    slice: at the lung bases with thick slices, gas bubbles in the stomach or colon touch the
    lung of the next slice and would otherwise be part of it.
    """
    out = np.zeros_like(mask)
    disk = _disk(radius_px)
    pad = radius_px + 1
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        lab, n = ndi.label(mask[k], structure=_STRUCT_2D)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        keep = (sizes >= min_part_px) | (np.arange(n + 1) == int(np.argmax(sizes)))
        keep[0] = False
        m = np.pad(keep[lab], pad)
        if radius_px > 0:
            m = ndi.binary_closing(m, structure=disk)
        out[k] = ndi.binary_fill_holes(m)[pad:-pad, pad:-pad]
    return out


def reference_labels(
    hu: NDArray[np.floating[Any]],
    spacing: Sequence[float],
    *,
    threshold: float = -320.0,
    airway_max_area_mm2: float = 800.0,
    airway_band_mm: float = 25.0,
    closing_radius_mm: float = 2.0,
    min_second_fraction: float = 0.15,
    min_part_area_mm2: float = 100.0,
) -> NDArray[np.uint8]:
    """Label the right (1) and left (2) lung of a chest CT by thresholding and morphology.

    Steps: air below ``threshold`` HU that lies inside the body outline (per slice); drop small
    air components near the midline (trachea, main bronchi, oesophagus); 3D connected
    components; keep the two largest, or split the largest along the midline when the lungs
    are still joined (the smaller one is then under ``min_second_fraction`` of it); per slice
    drop stray parts under ``min_part_area_mm2``, a light closing and hole filling (vessels);
    right/left from the centroid column.

    ``spacing`` is ``(dz, dy, dx)`` in mm. Returns a ``uint8`` array of ``hu.shape``.
    """
    vol = np.asarray(hu, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"reference_labels: expected a 3D (z, y, x) volume, got shape {vol.shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"reference_labels: spacing must be three positive sizes, got {spacing}")
    sp3: tuple[float, float, float] = (sp[0], sp[1], sp[2])
    labels = np.zeros(vol.shape, dtype=np.uint8)

    cand, body_x = _body_and_candidates(vol, threshold)
    if not cand.any() or np.all(np.isnan(body_x)):
        return labels
    midline_x = float(np.nanmedian(body_x))
    cand = _remove_midline_airways(cand, midline_x, sp3, airway_max_area_mm2, airway_band_mm)

    lab, n = ndi.label(cand)
    if n == 0:
        return labels
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    first = lab == order[0]
    if n >= 2 and sizes[order[1]] >= min_second_fraction * sizes[order[0]]:
        parts = [first, lab == order[1]]
    else:
        parts = list(_split_merged(first, midline_x, sp3))
    parts = [_largest_component_3d(p) for p in parts if p.any()]

    radius_px = int(round(closing_radius_mm / min(sp3[1], sp3[2])))
    min_part_px = int(np.ceil(min_part_area_mm2 / (sp3[1] * sp3[2])))
    smoothed = [_smooth(p, radius_px, min_part_px) for p in parts]
    # Closing may push one lung into the other where they touch: such voxels keep their
    # original owner, or nobody.
    for i, s in enumerate(smoothed):
        others = [parts[j] for j in range(len(parts)) if j != i]
        for o in others:
            s &= ~o
    if len(smoothed) == 2:
        both = smoothed[0] & smoothed[1]
        smoothed[0] &= ~both
        smoothed[1] &= ~both

    smoothed = [s for s in smoothed if s.any()]
    cx = [float(np.nonzero(s)[2].mean()) for s in smoothed]
    if len(smoothed) == 1:  # one lung only: its side relative to the body midline
        labels[smoothed[0]] = RIGHT_LUNG if cx[0] < midline_x else LEFT_LUNG
    elif len(smoothed) == 2:
        right, left = (0, 1) if cx[0] < cx[1] else (1, 0)
        labels[smoothed[right]] = RIGHT_LUNG
        labels[smoothed[left]] = LEFT_LUNG
    return labels


def label_volumes_ml(labels: NDArray[np.integer[Any]], spacing: Sequence[float]) -> dict[str, float]:
    """Volume of each lung label in millilitres."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {LABEL_NAMES[k]: float(np.count_nonzero(labels == k)) * voxel_ml for k in (RIGHT_LUNG, LEFT_LUNG)}
