"""RTSTRUCT writer: DICOM conformance (dciodvfy) and a round trip through an independent reader.

The reader is dcmrtstruct2nii (MIT; SimpleITK + scikit-image): it rasterises each contour by
pixel-centre inclusion and combines the contours of a slice by XOR (even-odd), the convention
our writer documents. Its mask is compared with our label map voxel by voxel (Dice).
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from numpy.typing import NDArray
from pydicom.filebase import DicomBytesIO

from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec
from orthanc_plugin.imaging.postprocess import label_box
from orthanc_plugin.outputs.rtstruct import _decimal_strings, build_rtstruct, slice_contours
from orthanc_plugin.outputs.sr import _CrackGraph
from triton_models.ct_lung.reference_labels import reference_labels

from ..conftest import CT_A0001, CT_B40, read_series
from .test_seg import run_dciodvfy, sort_along_normal

Array = NDArray[Any]
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
LUNGS = (
    SegmentSpec(
        1, "Right lung", ANATOMY, Code("3341006", "SCT", "Right lung"), None, (230, 120, 50), "right-lung"
    ),
    SegmentSpec(
        2, "Left lung", ANATOMY, Code("44029006", "SCT", "Left lung"), None, (60, 160, 230), "left-lung"
    ),
)
SHAPES = (
    SegmentSpec(1, "Ring", ANATOMY, Code("27925004", "SCT", "Nodule"), None, (255, 0, 0), "ring", "GTV"),
    SegmentSpec(2, "Islands", ANATOMY, Code("39607008", "SCT", "Lung"), None, (0, 255, 0), "islands"),
)
ALGORITHM = AlgorithmInfo(name="lung-seg", version="1.2.0", model_name="lung_unet", model_version="3")
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


def third_party_masks(rtstruct: pydicom.Dataset, source: Path, tmp_path: Path) -> dict[str, Array]:
    """Each ROI rasterised by dcmrtstruct2nii onto the source grid, as [slice, row, col] along our order."""
    from dcmrtstruct2nii import dcmrtstruct2nii

    if not hasattr(pydicom, "read_file"):
        # dcmrtstruct2nii 5 calls pydicom's pre-3.0 name of dcmread.
        pydicom.read_file = pydicom.dcmread  # type: ignore[attr-defined]
    path = tmp_path / "rtstruct.dcm"
    rtstruct.save_as(path, enforce_file_format=True)
    out = tmp_path / "masks"
    dcmrtstruct2nii(str(path), str(source), str(out), convert_original_dicom=False)
    masks = {}
    for roi in rtstruct.StructureSetROISequence:
        name = str(roi.ROIName)
        image = sitk.ReadImage(str(out / f"mask_{name.replace(' ', '-')}.nii.gz"))
        array = sitk.GetArrayFromImage(image) > 0  # [z, y, x] in SimpleITK's slice order
        # Map SimpleITK's slices onto ours by their position in space.
        z_positions = [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(array.shape[0])]
        masks[name] = (array, np.asarray(z_positions))
    return masks  # type: ignore[return-value]


def in_our_order(found: tuple[Array, Array], images: list[pydicom.Dataset]) -> Array:
    array, positions = found
    ours = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in images])
    order = [int(np.argmin(np.linalg.norm(positions - p, axis=1))) for p in ours]
    assert sorted(order) == list(range(len(images)))
    return array[order]


def dice(a: Array, b: Array) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def write_series(images: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir()
    for i, ds in enumerate(images):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return folder


def shapes(shape: tuple[int, int, int]) -> Array:
    """A ring (a hole) with an island in its hole, and several separate islands, incl. 1-pixel ones
    and two squares touching only at a corner."""
    labels = np.zeros(shape, dtype=np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = np.hypot(y - 200, x - 200)
    ring = (r <= 60) & (r >= 30) & (z >= 5) & (z <= 20)
    labels[ring] = 1
    labels[5:21, 195:206, 195:206] = 1  # an island in the ring's hole
    labels[8:15, 320:340, 100:130] = 2
    labels[8:15, 350:352, 140:141] = 2
    labels[10, 400, 400] = 2  # single pixel
    labels[10:12, 410:420, 410:420] = 2
    labels[10:12, 420:430, 420:430] = 2  # touches the previous square at one corner only
    labels[12, 100:150:3, 300:350:3] = 2  # a grid of single pixels
    return labels


@pytest.fixture(scope="module")
def ct() -> list[pydicom.Dataset]:
    return sort_along_normal(read_series(CT_B40))


def make(images: list[pydicom.Dataset], labels: Array, segments: tuple[SegmentSpec, ...]) -> pydicom.Dataset:
    return build_rtstruct(
        images, labels, segments, ALGORITHM, series_instance_uid="2.25.2000", sop_instance_uid="2.25.2001",
        series_number=9903, series_description="AI lung contours", content_creation=CREATED,
    )  # fmt: skip


def test_synthetic_holes_and_islands_round_trip(ct: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = shapes((len(ct), int(ct[0].Rows), int(ct[0].Columns)))
    rt = make(ct, labels, SHAPES)
    masks = third_party_masks(rt, write_series(ct, tmp_path / "ct"), tmp_path)
    for spec in SHAPES:
        theirs = in_our_order(masks[spec.name], ct)  # type: ignore[arg-type]
        d = dice(theirs, labels == spec.label)
        assert d >= 0.99, f"{spec.name}: Dice {d:.4f}"
    # The hole and the island in it are contours of their own.
    ring_slice = slice_contours(labels[10:11] == 1)[0]
    assert len(ring_slice) == 3


def test_contours_lie_on_the_source_slices(ct: list[pydicom.Dataset]) -> None:
    labels = shapes((len(ct), int(ct[0].Rows), int(ct[0].Columns)))
    rt = make(ct, labels, SHAPES)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct}
    iop = np.asarray(ct[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    for roi in rt.ROIContourSequence:
        for c in roi.ContourSequence:
            image = by_uid[str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            points = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            offset = (points - np.asarray(image.ImagePositionPatient, dtype=float)) @ normal
            assert np.abs(offset).max() < 1e-3
            assert c.NumberOfContourPoints == len(points) and c.ContourGeometricType == "CLOSED_PLANAR"
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    assert types == {1: "GTV", 2: "ORGAN"}
    assert rt.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0].CodeValue == "27925004"


@pytest.mark.parametrize("folder", [CT_B40, CT_A0001], ids=["A0002", "A0001"])
def test_real_ct_lungs_round_trip_and_conform(folder: Path, tmp_path: Path) -> None:
    images = sort_along_normal(read_series(folder))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in images])
    spacing = (
        abs(float(images[1].ImagePositionPatient[2]) - float(images[0].ImagePositionPatient[2])),
        *(float(v) for v in images[0].PixelSpacing),
    )
    labels = reference_labels(hu, spacing)
    rt = make(images, labels, LUNGS)
    run_dciodvfy(rt, tmp_path)
    masks = third_party_masks(rt, folder, tmp_path)
    for spec in LUNGS:
        theirs = in_our_order(masks[spec.name], images)  # type: ignore[arg-type]
        d = dice(theirs, labels == spec.label)
        assert d >= 0.97, f"{folder.name} {spec.name}: Dice {d:.4f}"
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for i in rt.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    contoured = {str(ds.SOPInstanceUID) for ds, z in zip(images, labels, strict=True) if z.any()}
    assert referenced == contoured


def test_same_input_same_object(ct: list[pydicom.Dataset]) -> None:
    labels = shapes((len(ct), int(ct[0].Rows), int(ct[0].Columns)))
    a, b = make(ct, labels, SHAPES), make(ct, labels, SHAPES)
    assert a == b


def test_nothing_to_contour_is_an_error(ct: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="nothing to contour"):
        make(ct, np.zeros((len(ct), int(ct[0].Rows), int(ct[0].Columns)), np.uint8), SHAPES)


def plain_slice_contours(mask: Array) -> dict[int, list[Array]]:
    """The boundaries traced over the whole grid, one contour at a time (the plain way)."""
    graph = _CrackGraph(mask)
    roots, _ = graph.loops()
    out: dict[int, list[Array]] = {}
    for edge in roots.tolist():
        out.setdefault(int(graph.slice_of[edge]), []).append(graph.corners(edge))
    return out


def test_contours_traced_in_the_box_equal_those_of_the_whole_grid() -> None:
    labels = shapes((24, 512, 512))
    labels[0, :5, :7] = 2  # touching the grid's first row, column and slice
    labels[-1, -3:, -4:] = 1  # and its last ones
    for label in (1, 2):
        mask = labels == label
        ours, plain = slice_contours(mask), plain_slice_contours(mask)
        assert list(ours) == list(plain)
        for z in plain:
            assert len(ours[z]) == len(plain[z])
            for a, b in zip(ours[z], plain[z], strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)
    assert slice_contours(np.zeros((3, 4, 5), dtype=bool)) == {}


def test_bounding_box_of_a_label() -> None:
    labels = shapes((40, 512, 512))  # more slices than a step of the search
    labels[37, 500, 3] = 3
    for label in (1, 2, 3):
        where = np.argwhere(labels == label)
        expected = tuple(
            slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0), strict=True)
        )
        assert label_box(labels, label) == expected
        assert label_box(labels == label, True) == expected
    assert label_box(labels, 4) is None


def test_contour_data_text_is_each_value_formatted_alone() -> None:
    rng = np.random.default_rng(7)
    points: list[NDArray[np.float64]] = [
        np.round(rng.integers(-600, 600, (n, 3)) * 0.841796875 + rng.normal(0, 1e-4, (n, 3)), 3).astype(
            np.float64
        )
        for n in (1, 5, 200)
    ]
    points.append(np.array([[-0.0, 0.0, 1.5], [-2.25, 123456.789, -0.001]]))
    for decimals in (3, 1):
        for written, p in zip(_decimal_strings(points, decimals), points, strict=True):
            text = "\\".join(f"{v:.{decimals}f}".rstrip("0").rstrip(".") or "0" for v in p.ravel())
            assert written == text.encode() + (b" " if len(text) % 2 else b"")
    assert _decimal_strings(points, 3)[-1] == b"-0\\0\\1.5\\-2.25\\123456.789\\-0.001"


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_raw_contour_data_is_written_as_pydicom_writes_the_values(ct: list[pydicom.Dataset]) -> None:
    rt = make(ct, shapes((len(ct), int(ct[0].Rows), int(ct[0].Columns))), SHAPES)
    plain = copy.deepcopy(rt)
    for roi in plain.ROIContourSequence:
        for item in roi.ContourSequence:
            item.set_original_encoding(None, None)  # pydicom decodes each DS value and writes it again
            assert isinstance(item.ContourData[0], pydicom.valuerep.DSfloat)
    assert encoded(rt) == encoded(plain)
    assert rt.ROIContourSequence[0].ContourSequence[0].get_item(0x30060050).is_raw
