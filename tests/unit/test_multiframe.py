"""Enhanced multi-frame CT read frame by frame, and real CT re-sliced with a gantry tilt.

The shared A0002 B40f series (30 slices of 512 x 512) is written as one Enhanced CT Image
(functional groups built by ``devstack.derive.enhanced_ct``) and as a Legacy Converted Enhanced
CT (highdicom); both must give the volume of the single-frame series, and the SEG built on
them references the instance with ReferencedFrameNumber and passes dciodvfy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import generate_uid

from devstack.derive import enhanced_ct, tilted
from orthanc_plugin.imaging import multiframe, resample
from orthanc_plugin.imaging.volume import Geometry, VolumeError, build_volume
from orthanc_plugin.outputs.seg import build_seg

from .test_seg import ALGORITHM, CREATED, SEGMENTS, run_dciodvfy


@pytest.fixture(scope="module")
def single(ct_b40):
    return build_volume([copy.deepcopy(ds) for ds in ct_b40])


def test_enhanced_ct_gives_the_volume_of_the_single_frame_series(ct_b40, single) -> None:
    mf = enhanced_ct(list(ct_b40), generate_uid())
    vol = build_volume([mf])
    np.testing.assert_array_equal(vol.voxels, single.voxels)
    assert vol.spacing == pytest.approx(single.spacing)
    assert vol.origin == pytest.approx(single.origin)
    assert [multiframe.frame_number(d) for d in vol.datasets] == sorted(
        range(1, 31), key=lambda n: float(ct_b40[n - 1].ImagePositionPatient[2])
    )
    assert all(multiframe.parent(d) is mf for d in vol.datasets)
    assert vol.notes == ()


def test_mixed_frame_types_one_type_chosen_by_rule(ct_b40, single) -> None:
    mf = enhanced_ct(list(ct_b40), generate_uid(), derived_frames=4)
    vol = build_volume([mf])  # the 4 DERIVED copies would be duplicated positions if they were read
    np.testing.assert_array_equal(vol.voxels, single.voxels)
    assert any("30 frames of type ORIGINAL\\PRIMARY\\AXIAL\\NONE used" in n for n in vol.notes), vol.notes
    assert any("4 DERIVED\\PRIMARY\\AXIAL\\NONE" in n for n in vol.notes), vol.notes


def test_per_frame_rescale_overrides_shared(ct_b40, single) -> None:
    mf = enhanced_ct(list(ct_b40), generate_uid())
    item = mf.PerFrameFunctionalGroupsSequence[0]
    transform = copy.deepcopy(mf.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence)
    transform[0].RescaleIntercept = float(transform[0].RescaleIntercept) + 100
    item.PixelValueTransformationSequence = transform
    vol = build_volume([mf])
    z = [multiframe.frame_number(d) for d in vol.datasets].index(1)
    np.testing.assert_array_equal(vol.voxels[z], single.voxels[z] + 100)


def test_legacy_converted_enhanced_ct(ct_b40, single) -> None:
    slices = [copy.deepcopy(ds) for ds in ct_b40]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
        instance_number=1,
    )  # fmt: skip
    np.testing.assert_array_equal(build_volume([mf]).voxels, single.voxels)


def test_broken_functional_groups_refused(ct_b40) -> None:
    mf = enhanced_ct(list(ct_b40), generate_uid())
    del mf.PerFrameFunctionalGroupsSequence[3]
    with pytest.raises(VolumeError, match="30 frames but 29 Per-Frame Functional Groups items"):
        build_volume([mf])
    other = enhanced_ct(list(ct_b40), generate_uid())
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    with pytest.raises(VolumeError, match="only Enhanced and Legacy Converted Enhanced CT and MR"):
        build_volume([other])


def test_seg_references_the_multiframe_instance_with_frame_numbers(ct_b40, tmp_path: Path) -> None:
    mf = enhanced_ct(list(ct_b40), generate_uid())
    vol = build_volume([mf])
    labels = np.zeros(vol.shape, dtype=np.uint8)
    labels[10:14, 200:260, 150:220] = 1
    sources, frames = multiframe.seg_sources(vol.datasets, labels)
    assert sources == [mf] and frames.shape == (30, 512, 512)
    seg = build_seg(
        sources, frames, SEGMENTS[:1], ALGORITHM, series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), series_number=300, series_description="AI test",
        content_creation=CREATED,
    )  # fmt: skip
    referenced = sorted(
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    )
    expected = sorted(multiframe.frame_number(vol.datasets[z]) for z in range(10, 14))
    assert referenced == expected
    assert {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    } == {str(mf.SOPInstanceUID)}
    run_dciodvfy(seg, tmp_path)


def test_real_ct_tilted_comes_back_onto_an_axial_grid(ct_b40, single) -> None:
    """A0002 re-sliced with a 15 degree gantry tilt: resampled back onto an axial grid, the
    voxels match the untilted series where both have data."""
    slices = tilted([copy.deepcopy(ds) for ds in ct_b40], 15.0)
    vol = resample.build_regular(slices, geometry=Geometry(max_tilt_deg=30))
    assert vol.source is not None
    assert np.allclose(vol.normal, (0, 0, 1), atol=1e-6)
    # The regular grid's voxel (k, i, j) at the position of the untilted voxel (z, i, j).
    dz = round((single.origin[2] - vol.origin[2]) / vol.spacing[0])
    dy = round((single.origin[1] - vol.origin[1]) / vol.spacing[1])
    assert vol.spacing[1:] == pytest.approx(single.spacing[1:])
    inner = slice(8, 22)  # slices where the tilted planes cover the original's field of view
    a = single.voxels[inner, 100:400, 100:400]
    b = vol.voxels[inner.start + dz : inner.stop + dz, 100 + dy : 400 + dy, 100:400]
    assert float(np.median(np.abs(a - b))) < 30.0  # HU (two linear interpolations of 8 mm slices)
    assert float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) > 0.95

    # Aerated lung (-1000 to -400 HU) in that region: about as much on both grids.
    def aerated(v: np.ndarray) -> int:
        return int(np.count_nonzero((v > -1000) & (v < -400)))

    assert aerated(b) == pytest.approx(aerated(a), rel=0.03)


def test_routing_counts_the_frames_of_an_enhanced_series() -> None:
    from devstack.common import ROOT
    from orthanc_plugin.core.config import load_pipelines
    from orthanc_plugin.intake.routing import SeriesInfo, StudyInfo, route

    ct_lung = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]

    def one_instance(sop_class: str, frames: str) -> StudyInfo:
        tags = {
            "Modality": "CT", "SeriesDescription": "Chest", "SliceThickness": "5", "SeriesNumber": "1",
            "SOPClassUID": sop_class, "NumberOfFrames": frames,
        }  # fmt: skip
        return StudyInfo("st", "1.2.3", {}, (SeriesInfo("s", "1.2.3.1", tags, ("i",)),))

    d = route(ct_lung, one_instance("1.2.840.10008.5.1.4.1.1.2.1", "64"))
    assert d.matched, d.roles[0].rejected
    assert d.chosen()["ct"].value("ImageCount") == "64"
    # Other multi-frame classes are still refused with the reason; few frames are too few slices.
    d = route(ct_lung, one_instance("1.2.840.10008.5.1.4.1.1.7.2", "64"))
    assert not d.matched
    assert "only Enhanced and Legacy Converted Enhanced CT and MR" in str(d.roles[0].rejected)
    d = route(ct_lung, one_instance("1.2.840.10008.5.1.4.1.1.2.1", "8"))
    assert not d.matched and "ImageCount is 8, below minimum 20" in str(d.roles[0].rejected)


def test_intake_reads_slice_thickness_of_an_enhanced_instance_from_its_functional_groups() -> None:
    from orthanc_plugin.intake.changes import _pixel_measure

    shared = {"SharedFunctionalGroupsSequence": [{"PixelMeasuresSequence": [{"SliceThickness": "5"}]}]}
    assert _pixel_measure(shared, "SliceThickness") == "5"
    per_frame = {
        "PerFrameFunctionalGroupsSequence": [{"PixelMeasuresSequence": [{"PixelSpacing": "0.7\\0.7"}]}]
    }
    assert _pixel_measure(per_frame, "PixelSpacing") == "0.7\\0.7"
    assert _pixel_measure(shared, "KVP") is None
    assert _pixel_measure({}, "SliceThickness") is None


def test_key_image_orientation_of_a_tilted_slice_is_one_letter_per_direction() -> None:
    from pydicom.dataset import Dataset

    from orthanc_plugin.outputs.key_images import _orientation

    ds = Dataset()
    t = np.radians(20)
    ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))]
    assert _orientation(ds) == ("L", "P")  # not "PF": highdicom takes one letter per direction
