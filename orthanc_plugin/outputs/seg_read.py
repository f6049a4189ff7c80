"""Reading a SEG back as a label map on its source slices: ours, or one a reviewer revised.

A reviewer's SEG (OHIF's export, a script's) may number its segments differently and leave
out empty frames; what ties it to ours is the source slices its frames derive from and the
segment labels. :func:`segment_labels` maps segments to our label values by ``SegmentLabel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset


def segment_labels(seg: Dataset, labels_by_name: Mapping[str, int]) -> dict[int, int]:
    """Segment number -> our label value, for the segments whose ``SegmentLabel`` names one of
    ours (case and spaces ignored); the others are left out."""
    wanted = {_norm(k): v for k, v in labels_by_name.items()}
    out = {}
    for item in seg.get("SegmentSequence", []):
        value = wanted.get(_norm(str(item.get("SegmentLabel", ""))))
        if value is not None:
            out[int(item.SegmentNumber)] = value
    return out


def label_map(
    seg: Dataset, source_uids: Sequence[str], numbers_to_labels: Mapping[int, int]
) -> NDArray[np.uint8]:
    """The SEG as ``labels[z, y, x]`` on the slices named by ``source_uids`` (in that order).

    Frames of slices the SEG leaves out are empty. Raises ``ValueError`` when the SEG does
    not derive from those slices or its segments overlap.
    """
    if not numbers_to_labels:
        raise ValueError("the SEG has none of the pipeline's segments")
    document = hd.seg.Segmentation.from_dataset(seg, copy=False)
    numbers = sorted(numbers_to_labels)
    try:
        stack = document.get_pixels_by_source_instance(
            source_sop_instance_uids=list(source_uids),
            segment_numbers=numbers,
            combine_segments=False,
            ignore_spatial_locations=True,
        )
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"the SEG does not derive from the job's source slices: {e}") from None
    out = np.zeros(stack.shape[:3], dtype=np.uint8)
    for i, number in enumerate(numbers):
        mask = stack[..., i] > 0
        if np.any(out[mask]):
            raise ValueError(f"segment {number} overlaps another segment")
        out[mask] = numbers_to_labels[number]
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
