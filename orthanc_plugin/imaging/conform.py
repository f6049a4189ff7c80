"""Volume geometry in patient space: conform to a network's grid and map its output back.

Coordinates are DICOM patient coordinates (LPS: +x toward the patient's Left, +y Posterior,
+z Superior), in mm. A :class:`~orthanc_plugin.imaging.volume.Volume` is indexed ``voxels[z, y, x]``:
z runs along the slice normal, y (row index) along ``column_direction``, x (column index)
along ``row_direction``.

A voxel is taken to fill the box of half a spacing either side of its centre: points of an
output grid inside that box take the (interpolated, edge-replicated) value, points beyond it
are 0. Sampling uses ``scipy.ndimage.map_coordinates`` on chunks of the output grid, so no
float64 array of the whole output is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.imaging.volume import Volume

Affine = NDArray[np.float64]
ScalarT = TypeVar("ScalarT", bound=np.generic)

# LPS unit vector of each anatomical direction letter.
_LPS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}
_PAIRS = ("LR", "AP", "SI")

# Nearest-neighbour sampling must break ties (a sample exactly half-way between two voxel
# centres, which happens whenever grids are offset by half a voxel) the same way in both
# directions, or a round trip moves a label map by one voxel. Samples are nudged by this
# tiny, generic vector (mm) on the way to the network grid and by its opposite on the way back.
_TIE_BIAS_MM = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0) * 1e-4

_CHUNK_POINTS = 1 << 20  # output points per sampling chunk: 3 x 8 MiB of float64 coordinates


@dataclass(frozen=True)
class Conformed:
    """A volume resampled onto a network's grid, with the geometry to map results back.

    ``image[a0, a1, a2]``: see :func:`conform` for what each array axis points to.
    """

    image: NDArray[np.float32]
    affine: Affine  # 4x4: (a0, a1, a2, 1) of ``image`` -> LPS mm
    source_affine: Affine  # 4x4: (z, y, x, 1) of the source volume -> LPS mm
    source_shape: tuple[int, int, int]
    orientation: str

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])


def volume_affine(volume: Volume) -> Affine:
    """4x4 matrix taking a voxel index ``(z, y, x, 1)`` of ``volume`` to LPS mm."""
    dz, dy, dx = volume.spacing
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(volume.normal, dtype=np.float64) * dz
    affine[:3, 1] = np.asarray(volume.column_direction, dtype=np.float64) * dy
    affine[:3, 2] = np.asarray(volume.row_direction, dtype=np.float64) * dx
    affine[:3, 3] = np.asarray(volume.origin, dtype=np.float64)
    return affine


def volume_center(volume: Volume) -> NDArray[np.float64]:
    """LPS position (mm) of the centre of the volume's field of view."""
    half = (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
    return np.asarray((volume_affine(volume) @ np.append(half, 1.0))[:3], dtype=np.float64)


def orientation_directions(orientation: str) -> NDArray[np.float64]:
    """3x3 matrix whose column ``a`` is the LPS direction of array axis ``a`` for a voxel-axis code.

    The code names the voxel axes (i, j, k) in the NIfTI/FreeSurfer way, ``i`` first; the array is
    indexed ``[k, j, i]`` (``i`` fastest in memory), so array axis 0 is the code's last letter.
    ``"LIA"`` gives array axes toward Anterior, Inferior, Left.
    """
    code = orientation.upper()
    if len(code) != 3 or any(c not in _LPS for c in code):
        raise ValueError(f"orientation {orientation!r}: expected three letters among L/R, A/P, S/I")
    for pair in _PAIRS:
        if sum(c in pair for c in code) != 1:
            raise ValueError(
                f"orientation {orientation!r}: needs exactly one of {pair[0]}/{pair[1]} (one letter per axis)"
            )
    return np.array([_LPS[c] for c in reversed(code)], dtype=np.float64).T


def grid_affine(
    center: Sequence[float] | NDArray[np.float64],
    shape: tuple[int, int, int],
    spacing_mm: float,
    orientation: str,
) -> Affine:
    """Affine of a grid of ``shape`` in ``orientation`` whose centre ``(shape - 1) / 2`` lies at ``center``."""
    affine = np.eye(4)
    affine[:3, :3] = orientation_directions(orientation) * float(spacing_mm)
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - affine[:3, :3] @ half
    return affine


def conform(
    volume: Volume,
    shape: tuple[int, int, int] = (256, 256, 256),
    spacing_mm: float = 1.0,
    orientation: str = "LIA",
    order: int = 1,
) -> Conformed:
    """Resample ``volume`` onto an isotropic grid of ``shape`` centred on the centre of its field of view.

    With the defaults this is the FreeSurfer "conformed" layout that brainchop feeds its
    networks: 256^3 voxels of 1 mm, voxel axes (i, j, k) toward (Left, Inferior, Anterior)
    (RAS terms: i = -R, j = -S, k = +A), stored as ``image[k, j, i]``. So in the returned array
    axis 0 increases toward patient **Anterior**, axis 1 toward **Inferior**, axis 2 toward
    **Left** (LPS directions (0, -1, 0), (0, 0, -1), (1, 0, 0)). For an axial head-first supine
    series, whose array axes run (S, P, L), that is transposing the first two axes and flipping
    both. The grid centre, index 127.5 on each axis, sits on the centre of the source field of
    view (FreeSurfer puts it on voxel 128; half a millimetre does not matter to the network and
    the way back uses the same affine). ``order`` 1 is trilinear, 0 nearest (for label maps);
    outside the source field of view the image is 0.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    source_affine = volume_affine(volume)
    affine = grid_affine(volume_center(volume), shape, spacing_mm, orientation)
    image = _resample(
        volume.voxels, source_affine, shape, affine, order=order, tie_sign=1.0, dtype=np.float32
    )
    return Conformed(
        image=image,
        affine=affine,
        source_affine=source_affine,
        source_shape=volume.shape,
        orientation=orientation.upper(),
    )


def to_source(
    conformed: Conformed,
    labels_or_probs: NDArray[ScalarT],
    volume: Volume,
    order: int = 0,
) -> NDArray[ScalarT]:
    """Map an array on the conformed grid back onto ``volume``'s voxels ``(z, y, x)``.

    ``labels_or_probs`` is shaped like ``conformed.image``, or has a leading channel axis
    (``[K, a0, a1, a2]`` -> ``[K, z, y, x]``). ``order=0`` (nearest: label maps, masks) keeps the
    dtype; ``order=1`` (trilinear: probabilities) needs a floating array. Each source voxel takes
    the value at its centre, so a SEG made from the result lies on the source slices.
    """
    grid = conformed.image.shape
    arr = np.asarray(labels_or_probs)
    if arr.shape[-3:] != grid or arr.ndim not in (3, 4):
        raise ValueError(f"expected an array shaped {grid} or (K, *{grid}), got {arr.shape}")
    if order == 1 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"order=1 (linear) needs probabilities as floats, got {arr.dtype}: use order=0")
    target = volume_affine(volume)
    if arr.ndim == 3:
        return _resample(arr, conformed.affine, volume.shape, target, order=order, tie_sign=-1.0)
    out = np.empty((arr.shape[0], *volume.shape), dtype=arr.dtype)
    for k in range(arr.shape[0]):
        out[k] = _resample(arr[k], conformed.affine, volume.shape, target, order=order, tie_sign=-1.0)
    return out


def resample_to(volume: Volume, reference: Volume, order: int = 1) -> NDArray[np.float32]:
    """``volume``'s intensities on ``reference``'s voxel grid ``(z, y, x)``, by patient position.

    Trilinear (``order=1``) or nearest (``order=0``); 0 where ``reference`` reaches beyond
    ``volume``'s field of view. For a second series of a study on the grid of the first.
    """
    if same_grid(volume, reference, tol_mm=1e-4):
        return np.array(volume.voxels, dtype=np.float32, copy=True)
    return _resample(
        volume.voxels,
        volume_affine(volume),
        reference.shape,
        volume_affine(reference),
        order=order,
        tie_sign=1.0,
        dtype=np.float32,
    )


def same_grid(a: Volume, b: Volume, tol_mm: float = 0.01) -> bool:
    """True when both volumes have the same shape and every voxel centre within ``tol_mm``."""
    if a.shape != b.shape:
        return False
    # The grids are affine, so the eight corner voxels bound the distance of every voxel.
    corners = np.array(
        [
            [z, y, x, 1.0]
            for z in (0, a.shape[0] - 1)
            for y in (0, a.shape[1] - 1)
            for x in (0, a.shape[2] - 1)
        ]
    ).T
    diff = (volume_affine(a) - volume_affine(b)) @ corners
    return bool(np.max(np.linalg.norm(diff[:3], axis=0)) <= tol_mm)


def _support_box(
    src_shape: tuple[int, ...], src_affine: Affine, out_shape: tuple[int, ...], out_affine: Affine
) -> tuple[tuple[int, int], ...] | None:
    """Index range (start, stop) per output axis that can fall inside the source's voxel boxes."""
    corners = np.array(
        [
            [z, y, x, 1.0]
            for z in (-0.5, src_shape[0] - 0.5)
            for y in (-0.5, src_shape[1] - 0.5)
            for x in (-0.5, src_shape[2] - 0.5)
        ]
    ).T
    in_out = (np.linalg.inv(out_affine) @ src_affine @ corners)[:3]
    box = []
    for axis in range(3):
        start = max(0, int(np.floor(in_out[axis].min())) - 1)
        stop = min(out_shape[axis], int(np.ceil(in_out[axis].max())) + 2)
        if stop <= start:
            return None
        box.append((start, stop))
    return tuple(box)


def _resample(
    src: NDArray[Any],
    src_affine: Affine,
    out_shape: tuple[int, int, int],
    out_affine: Affine,
    order: int,
    tie_sign: float,
    dtype: type[np.generic] | None = None,
) -> NDArray[Any]:
    """Sample ``src`` at the centres of the output grid; 0 beyond half a voxel outside ``src``."""
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    is_bool = src.dtype == np.bool_
    data = src.view(np.uint8) if is_bool else src
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    result = np.zeros(out_shape, dtype=out_dtype)
    box = _support_box(data.shape, src_affine, out_shape, out_affine)
    if box is not None:
        _fill(data, src_affine, out_affine, order, tie_sign, box, result)
    return result.view(np.bool_) if is_bool and dtype is None else result


def _fill(
    data: NDArray[Any],
    src_affine: Affine,
    out_affine: Affine,
    order: int,
    tie_sign: float,
    box: tuple[tuple[int, int], ...],
    result: NDArray[Any],
) -> None:
    inv_src = np.linalg.inv(src_affine)
    m = inv_src @ out_affine  # output index -> source index
    offset = m[:3, 3].copy()
    if order == 0:
        offset += inv_src[:3, :3] @ (tie_sign * _TIE_BIAS_MM)
    (s0, e0), (s1, e1), (s2, e2) = box
    i1 = np.arange(s1, e1, dtype=np.float64)[:, None]
    i2 = np.arange(s2, e2, dtype=np.float64)[None, :]
    # Source coordinate k of plane i0 is m[k, 0] * i0 + plane[k]; the planes are computed once.
    plane = np.stack([m[k, 1] * i1 + m[k, 2] * i2 + offset[k] for k in range(3)])
    limits = [n - 0.5 for n in data.shape]
    step = max(1, _CHUNK_POINTS // plane[0].size)
    for c0 in range(s0, e0, step):
        c1 = min(e0, c0 + step)
        i0 = np.arange(c0, c1, dtype=np.float64)[:, None, None]
        coords = np.empty((3, c1 - c0, *plane.shape[1:]), dtype=np.float64)
        inside = np.ones(coords.shape[1:], dtype=bool)
        for k in range(3):
            np.add(m[k, 0] * i0, plane[k], out=coords[k])
            inside &= coords[k] >= -0.5
            inside &= coords[k] < limits[k]
        target = result[c0:c1, s1:e1, s2:e2]
        if inside.all():
            target[...] = ndimage.map_coordinates(
                data, coords, order=order, mode="nearest", prefilter=False, output=result.dtype
            )
        elif inside.any():
            target[inside] = ndimage.map_coordinates(
                data, coords[:, inside], order=order, mode="nearest", prefilter=False, output=result.dtype
            )
