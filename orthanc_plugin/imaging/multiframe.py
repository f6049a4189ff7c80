# SPDX-License-Identifier: AGPL-3.0-or-later
"""Enhanced (multi-frame) CT and MR instances -> one dataset per frame, as single-frame slices.

An Enhanced CT / MR Image (or a Legacy Converted Enhanced one) holds every slice of a series as
a frame of one instance; each frame's geometry and pixel value transformation are in the
Per-Frame Functional Groups, or in the Shared ones when the same for all frames:
PlanePositionSequence (ImagePositionPatient), PlaneOrientationSequence
(ImageOrientationPatient), PixelMeasuresSequence (PixelSpacing, SliceThickness),
PixelValueTransformationSequence (RescaleSlope, RescaleIntercept), FrameContentSequence
(TemporalPositionIndex, StackID) and the CT/MR Image Frame Type Sequence (FrameType).

:func:`expand` gives each frame as a dataset with the instance's other attributes (patient,
study, equipment) and these values at the top level, so that ``imaging.volume`` builds the
volume as it does from single-frame slices. Only frames of one FrameType are used: where
several are mixed (e.g. ORIGINAL and DERIVED, or a localizer among the axial frames), the type
with the most frames, a tie going to the type of the lowest frame number; the others are left
out and said in the notes. Each frame dataset remembers its instance and frame number
(:func:`frame_number`, :func:`parent`), so that outputs reference the instance with
ReferencedFrameNumber (:func:`seg_sources`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

#: SOP classes read frame by frame
ENHANCED_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
}
_FRAME_TYPE_SEQUENCES = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")
#: multi-frame structures that a frame dataset must not carry
_DROPPED = (
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "NumberOfFrames",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "DimensionIndexSequence",
    "DimensionOrganizationSequence",
    "FrameIncrementPointer",
)

# Python attributes (not DICOM elements) of a frame dataset.
_PARENT = "_orthanc_ai_multiframe_parent"
_FRAME = "_orthanc_ai_frame_number"


class FrameError(ValueError):
    """The multi-frame instance cannot be read as frames; the message says why."""


def is_enhanced(ds: Dataset) -> bool:
    """A multi-frame instance of an (enhanced) CT/MR class with functional groups."""
    return (
        str(ds.get("SOPClassUID", "")) in ENHANCED_IMAGE_CLASSES and int(ds.get("NumberOfFrames", 1) or 1) > 1
    )


def frame_number(ds: Dataset) -> int | None:
    """The frame (1-based) a frame dataset stands for; None for an ordinary dataset."""
    value = ds.__dict__.get(_FRAME)
    return int(value) if value is not None else None


def parent(ds: Dataset) -> Dataset | None:
    """The multi-frame instance of a frame dataset; None for an ordinary dataset."""
    value = ds.__dict__.get(_PARENT)
    return value if isinstance(value, Dataset) else None


def _item(groups: Dataset | None, sequence: str) -> Dataset | None:
    if groups is None:
        return None
    seq = groups.get(sequence)
    if not seq:
        return None
    first = seq[0]
    return first if isinstance(first, Dataset) else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The item of a functional group: the frame's own, else the shared one."""
    return _item(per_frame, sequence) or _item(shared, sequence)


def _frame_type(per_frame: Dataset | None, shared: Dataset | None) -> str:
    for seq in _FRAME_TYPE_SEQUENCES:
        item = _functional(per_frame, shared, seq)
        if item is not None and item.get("FrameType"):
            return "\\".join(str(v) for v in item.FrameType)
    return ""


def expand(
    ds: Dataset, pixels: Callable[[Dataset], NDArray[np.generic]]
) -> tuple[list[Dataset], dict[int, NDArray[np.generic]], list[str]]:
    """The frame datasets of the chosen frame type, their pixels by frame number, and notes."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    sop = str(ds.get("SOPInstanceUID", "?"))
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if per_frame_seq and len(per_frame_seq) != n:
        raise FrameError(
            f"instance {sop} has {n} frames but {len(per_frame_seq)} Per-Frame Functional Groups items"
        )
    if not per_frame_seq and shared is None:
        raise FrameError(
            f"instance {sop} is multi-frame without functional groups: frame positions are unknown"
        )
    per_frame: list[Dataset | None] = list(per_frame_seq) if per_frame_seq else [None] * n

    types = [_frame_type(f, shared) for f in per_frame]
    counts = Counter(types)
    chosen = max(counts, key=lambda t: (counts[t], -types.index(t)))
    notes = []
    if len(counts) > 1:
        left = ", ".join(f"{counts[t]} {t or '(no FrameType)'}" for t in counts if t != chosen)
        notes.append(
            f"multi-frame instance {sop}: the {counts[chosen]} frames of type {chosen or '(no FrameType)'} used,"
            f" frames of other types left out ({left})"
        )

    try:
        decoded = np.asarray(pixels(ds))
    except FrameError:
        raise
    except ValueError as e:
        raise FrameError(f"instance {sop}: its pixel data cannot be decoded: {e}") from e
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if decoded.ndim == 4 and decoded.shape[-1] == 1:
        decoded = decoded[..., 0]
    if decoded.shape != (n, rows, cols):
        raise FrameError(
            f"instance {sop}: decoded pixels have shape {decoded.shape}, expected {(n, rows, cols)}"
        )

    base = Dataset()
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        base.file_meta = meta
    for element in ds:
        if element.keyword not in _DROPPED:
            base.add(element)
    frames: list[Dataset] = []
    arrays: dict[int, NDArray[np.generic]] = {}
    for index, (groups, kind) in enumerate(zip(per_frame, types, strict=True)):
        if kind != chosen:
            continue
        number = index + 1
        f = Dataset()
        if meta is not None:
            f.file_meta = meta
        f.update(base)
        _copy(f, _functional(groups, shared, "PlanePositionSequence"), ("ImagePositionPatient",))
        _copy(f, _functional(groups, shared, "PlaneOrientationSequence"), ("ImageOrientationPatient",))
        _copy(f, _functional(groups, shared, "PixelMeasuresSequence"), ("PixelSpacing", "SliceThickness"))
        _copy(
            f,
            _functional(groups, shared, "PixelValueTransformationSequence"),
            ("RescaleSlope", "RescaleIntercept", "RescaleType"),
        )
        content = _functional(groups, None, "FrameContentSequence")
        if content is not None and content.get("TemporalPositionIndex") is not None:
            f.TemporalPositionIdentifier = int(content.TemporalPositionIndex)
        f.__dict__[_PARENT] = ds
        f.__dict__[_FRAME] = number
        frames.append(f)
        arrays[number] = decoded[index]
    return frames, arrays, notes


def _copy(target: Dataset, item: Dataset | None, keywords: Sequence[str]) -> None:
    if item is None:
        return
    for kw in keywords:
        if kw in item:
            target[kw] = item[kw]


def seg_sources(datasets: Sequence[Dataset], labels: NDArray[Any]) -> tuple[list[Dataset], NDArray[Any]]:
    """What a SEG is built on: the multi-frame instance itself with a label frame for each of its
    frames (zeros for the frames left out) when ``datasets`` are its frames; otherwise as given."""
    parents = {id(p): p for p in (parent(d) for d in datasets) if p is not None}
    if not parents:
        return datasets if isinstance(datasets, list) else list(datasets), labels
    if len(parents) > 1 or any(parent(d) is None for d in datasets):
        raise FrameError("the slices come from several multi-frame instances: one SEG cannot reference them")
    (source,) = parents.values()
    n = int(source.NumberOfFrames)
    full = np.zeros((n, *labels.shape[1:]), dtype=labels.dtype)
    for z, d in enumerate(datasets):
        number = frame_number(d)
        assert number is not None
        full[number - 1] = labels[z]
    return [source], full
