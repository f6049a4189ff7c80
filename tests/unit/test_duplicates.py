"""Identical duplicate instances (same position, same pixels, another UID) on the shared CT."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from orthanc_plugin.core.config import VolumeOptions
from orthanc_plugin.imaging.volume import VolumeError, build_volume


def _again(ds: pydicom.Dataset, pixels_of: pydicom.Dataset | None = None) -> pydicom.Dataset:
    dup = copy.deepcopy(ds)
    dup.SOPInstanceUID = generate_uid()
    if pixels_of is not None:
        dup.PixelData = pixels_of.PixelData
    return dup


def test_identical_duplicate_is_dropped_with_a_note(ct: list[pydicom.Dataset]) -> None:
    reference = build_volume(ct)
    dup = _again(ct[12])
    volume = build_volume([*ct, dup], duplicates="drop_identical")
    assert volume.shape == reference.shape
    assert np.array_equal(volume.voxels, reference.voxels)
    (note,) = volume.notes
    assert "1 instance(s) repeating another's position and pixel data dropped" in note
    kept = {str(ds.SOPInstanceUID) for ds in volume.datasets}
    # the lower UID of the two is kept, whichever came first
    assert min(str(dup.SOPInstanceUID), str(ct[12].SOPInstanceUID)) in kept
    assert len(kept) == len(ct)


def test_duplicate_with_other_pixels_is_still_refused(ct: list[pydicom.Dataset]) -> None:
    with pytest.raises(VolumeError, match="duplicated slices"):
        build_volume([*ct, _again(ct[12], pixels_of=ct[13])], duplicates="drop_identical")


def test_refuse_refuses_even_identical_ones(ct: list[pydicom.Dataset]) -> None:
    with pytest.raises(VolumeError, match="duplicated slices"):
        build_volume([*ct, _again(ct[12])], duplicates="refuse")


def test_pipelines_drop_identical_duplicates_by_default() -> None:
    assert VolumeOptions().duplicates == "drop_identical"
