"""Volume assembly on the real CT series, shuffled and broken in the ways real series break."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from orthanc_plugin.imaging.volume import VolumeError, build_volume

from ..conftest import read_series


@pytest.fixture
def slices(ct_b40):
    return [copy.deepcopy(ds) for ds in ct_b40]


def along_normal(ds) -> float:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])))


def test_shuffled_slices_give_the_same_volume(slices):
    ordered = build_volume(slices)
    shuffled = list(slices)
    random.Random(7).shuffle(shuffled)
    again = build_volume(shuffled)
    np.testing.assert_array_equal(ordered.voxels, again.voxels)
    assert [d.SOPInstanceUID for d in ordered.datasets] == [d.SOPInstanceUID for d in again.datasets]
    pos = [along_normal(d) for d in ordered.datasets]
    assert pos == sorted(pos)
    assert ordered.shape == (30, 512, 512)
    assert ordered.spacing[0] == pytest.approx(8.0, abs=0.01)
    assert ordered.spacing[1] == pytest.approx(float(slices[0].PixelSpacing[0]))


def test_sorting_ignores_instance_number_and_file_order(slices):
    for ds in slices:
        ds.InstanceNumber = random.Random(ds.SOPInstanceUID).randint(1, 1000)
    v = build_volume(list(reversed(slices)))
    pos = [along_normal(d) for d in v.datasets]
    assert pos == sorted(pos)


def test_rescale_applied_to_hounsfield(slices):
    v = build_volume(slices)
    # Air outside the patient and soft tissue inside: HU, not stored values.
    assert v.voxels.min() < -900
    assert -100 < float(np.median(v.voxels[15, 200:300, 200:300])) < 200 or v.voxels.max() > 500
    ds = slices[3]
    raw = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    z = [d.SOPInstanceUID for d in v.datasets].index(ds.SOPInstanceUID)
    np.testing.assert_allclose(v.voxels[z], raw)


def test_missing_slice_is_refused(slices):
    ordered = sorted(slices, key=along_normal)
    del ordered[12]
    with pytest.raises(VolumeError, match="a slice is probably missing: gap of 16.00 mm"):
        build_volume(ordered)


def test_mixed_orientations_refused(slices):
    slices[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(VolumeError, match="mixed orientations"):
        build_volume(slices)


def test_missing_position_refused(slices):
    del slices[4].ImagePositionPatient
    with pytest.raises(VolumeError, match="no valid ImagePositionPatient"):
        build_volume(slices)


def test_duplicated_slice_refused(slices):
    dup = copy.deepcopy(slices[8])
    dup.SOPInstanceUID = "1.2.3.4.5"
    with pytest.raises(VolumeError, match="duplicated slices"):
        build_volume([*slices, dup])


def test_different_sizes_refused(slices):
    ds = slices[2]
    ds.Rows = 256
    with pytest.raises(VolumeError, match="different sizes"):
        build_volume(slices)


def test_gantry_tilt_refused(slices):
    for ds in slices:
        z = along_normal(ds)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * z, z]  # positions drift along y: sheared stack
    with pytest.raises(VolumeError, match="gantry tilt"):
        build_volume(slices)


def test_single_slice_refused(slices):
    with pytest.raises(VolumeError, match="1 slice"):
        build_volume(slices[:1])


def test_temporal_positions_need_a_choice(slices):
    second = []
    for ds in slices:
        ds.TemporalPositionIdentifier = 1
        d2 = copy.deepcopy(ds)
        d2.TemporalPositionIdentifier = 2
        d2.SOPInstanceUID = ds.SOPInstanceUID[:60] + ".2"
        second.append(d2)
    with pytest.raises(VolumeError, match="2 temporal positions"):
        build_volume(slices + second)
    v = build_volume(slices + second, temporal_position=2)
    assert v.temporal_positions == 2 and all(d.SOPInstanceUID.endswith(".2") for d in v.datasets)


def test_colour_and_non_image_refused(slices):
    slices[0].SamplesPerPixel = 3
    with pytest.raises(VolumeError, match="colour"):
        build_volume(slices)
    sr = copy.deepcopy(slices[1])
    del sr.PixelData
    with pytest.raises(VolumeError, match="no pixel data"):
        build_volume([sr])


def test_epi_temporal_positions_by_acquisition_order():
    """GE EPI: 10 temporal positions x 15 slices, one AcquisitionNumber, no TemporalPositionIdentifier."""
    from ..conftest import MR

    series = read_series(MR / "mr_0004")
    with pytest.raises(VolumeError, match="10 temporal positions"):
        build_volume(series)
    first = build_volume(series, temporal_position=1)
    last = build_volume(series, temporal_position=10)
    assert first.shape == (15, 64, 64) and first.temporal_positions == 10
    assert [along_normal(d) for d in first.datasets] == sorted(along_normal(d) for d in first.datasets)
    n_first = [int(d.InstanceNumber) for d in first.datasets]
    n_last = [int(d.InstanceNumber) for d in last.datasets]
    assert max(n_first) < min(n_last)  # the first time point was acquired before the last


def test_every_slice_twice_without_temporal_declaration_is_duplicates(slices):
    doubled = []
    for ds in slices:
        d2 = copy.deepcopy(ds)
        d2.SOPInstanceUID = ds.SOPInstanceUID[:60] + ".9"
        d2.InstanceNumber = int(ds.InstanceNumber) + 1000
        doubled.append(d2)
    with pytest.raises(VolumeError, match="duplicated slices"):
        build_volume(slices + doubled)
