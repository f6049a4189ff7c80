"""Series volumes -> the model's input tensor, and the model's output -> labels on the source grid.

A pipeline's input roles become the channels of one tensor, in the order the pipeline lists
them. The first role's series gives the grid: a series of another role that lies on the same
voxel grid is used as it is, one that does not is resampled onto it by patient position. An
optional role without a series gets a channel of zeros (said in the notes).

Then ``preprocess.grid`` decides the model's grid (see :class:`~.config.Preprocess`):
``resize`` and ``spacing`` stretch the axially oriented volume, ``conform`` resamples it in
patient space to a fixed, centred, isotropic grid (brain networks). :meth:`Prepared.labels`
undoes whichever it was, so the labels lie on the first role's source slices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from orthanc_plugin.core.config import PipelineConfig, Preprocess
from orthanc_plugin.imaging import conform, postprocess, preprocess
from orthanc_plugin.imaging.volume import Volume, Voxels, axial_flips

Float32Array = NDArray[np.float32]


@dataclass
class Prepared:
    """The model input ``tensor`` [1, C, *grid] and how to bring an output back to ``reference``."""

    tensor: Float32Array
    reference: Volume
    notes: list[str] = field(default_factory=list)
    flips: tuple[int, ...] = ()
    conformed: conform.Conformed | None = None

    def labels(self, probabilities: NDArray[np.floating[Any]], largest_component: bool) -> NDArray[np.uint8]:
        """``probabilities`` [K, *grid] -> uint8 labels (argmax) on the reference's source grid."""
        if probabilities.ndim != 4 or probabilities.shape[1:] != self.tensor.shape[2:]:
            raise ValueError(
                f"the model answered an array shaped {probabilities.shape}, expected "
                f"(classes, {', '.join(map(str, self.tensor.shape[2:]))})"
            )
        if self.conformed is not None:
            back = conform.to_source(
                self.conformed, np.asarray(probabilities, dtype=np.float32), self.reference, 1
            )
            labels: NDArray[np.uint8] = np.argmax(back, axis=0).astype(np.uint8)
            if largest_component:
                postprocess.keep_largest_components(labels, range(1, probabilities.shape[0]))
            return labels
        labels = np.asarray(
            postprocess.labels_from_probabilities(probabilities, self.reference.shape, largest_component),
            dtype=np.uint8,
        )
        if self.flips:
            labels = np.ascontiguousarray(np.flip(labels, self.flips), dtype=np.uint8)
        return labels


def source_channels(
    p: PipelineConfig, volumes: Mapping[str, Volume]
) -> tuple[Volume, list[Voxels], list[str]]:
    """One array per input role on the first role's grid, in the pipeline's order (a volume's
    own voxels, int16 or float32, where it lies on that grid)."""
    first = p.inputs[0].role
    if first not in volumes:
        raise ValueError(f"the first role '{first}' has no volume")
    reference = volumes[first]
    channels: list[Voxels] = []
    notes: list[str] = [f"role '{r}': {n}" for r, v in volumes.items() for n in v.notes]
    for role in p.inputs:
        v = volumes.get(role.role)
        if v is None:
            channels.append(np.zeros(reference.shape, dtype=np.float32))
            notes.append(f"optional role '{role.role}' has no series: its channel is zeros")
        elif v is reference or conform.same_grid(v, reference):
            channels.append(v.voxels)
        else:
            channels.append(conform.resample_to(v, reference))
            notes.append(
                f"role '{role.role}' resampled onto the grid of role '{first}' (patient coordinates)"
            )
    return reference, channels, notes


def prepare(p: PipelineConfig, volumes: Mapping[str, Volume]) -> Prepared:
    """Build the model input of pipeline ``p`` from the volumes of its roles."""
    reference, channels, notes = source_channels(p, volumes)
    pre = p.preprocess
    if pre.grid == "conform":
        assert pre.shape is not None and pre.spacing_mm is not None
        if len(set(pre.spacing_mm)) != 1:
            raise ValueError("grid 'conform' takes one isotropic spacing")
        out: list[Float32Array] = []
        conformed: conform.Conformed | None = None
        for chan in channels:
            src = preprocess.window(chan, *pre.window) if pre.window is not None else chan
            conformed = conform.conform(
                replace(reference, voxels=np.asarray(src, dtype=np.float32)),
                shape=pre.shape, spacing_mm=pre.spacing_mm[0], orientation=pre.orientation,
            )  # fmt: skip
            img = conformed.image
            out.append(preprocess.minmax(img) if pre.minmax else img)
        tensor = np.ascontiguousarray(np.stack(out)[np.newaxis], dtype=np.float32)
        return Prepared(tensor, reference, notes, (), conformed)

    flips = axial_flips(reference)
    if pre.grid == "resize":
        assert pre.shape is not None
        shape = pre.shape
    else:
        assert pre.spacing_mm is not None
        shape = grid_for_spacing(reference, pre.spacing_mm)
    out = []
    for chan in channels:
        v = np.flip(chan, flips) if flips else chan
        out.append(preprocess.resize(v, shape, order=1, pointwise=_scaling(pre, v)))
    tensor = np.ascontiguousarray(np.stack(out)[np.newaxis], dtype=np.float32)
    return Prepared(tensor, reference, notes, flips)


def _scaling(pre: Preprocess, v: NDArray[Any]) -> Callable[[Float32Array], Float32Array] | None:
    """The intensity scaling of ``pre`` as an element-wise function (min-max uses ``v``'s range)."""
    if pre.window is not None:
        low, high = pre.window
        return lambda x: preprocess.window(x, low, high)
    if pre.minmax:
        lo, hi = float(np.min(v)), float(np.max(v))
        if hi <= lo:
            return np.zeros_like
        return lambda x: (x - np.float32(lo)) / np.float32(hi - lo)
    return None


def grid_for_spacing(volume: Volume, spacing_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Size of ``volume``'s field of view in voxels of ``spacing_mm`` (slice, row, column)."""
    sizes = [
        max(1, round(n * s / t)) for n, s, t in zip(volume.shape, volume.spacing, spacing_mm, strict=True)
    ]
    return sizes[0], sizes[1], sizes[2]
