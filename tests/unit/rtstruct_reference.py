"""The RTSTRUCT encoder as it was before its contours were encoded directly (commit 30b2372 of
``orthanc_plugin/outputs/rtstruct.py``, unchanged but for this docstring and the import of the
tracer): the reference that ``tests/unit/test_outline_encoders.py`` compares the product's
RTSTRUCT with, byte for byte. Not used by the product."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec
from orthanc_plugin.imaging.postprocess import label_box
from orthanc_plugin.outputs.seg import (
    algorithm_equipment,
    check_labels,
    check_new_object,
    check_source_images,
)

from .sr_reference import _CrackGraph

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"

#: RT ROI Interpreted Type (PS3.3 C.8.8.8) values a pipeline may give a segment.
RT_ROI_TYPES = (
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS", "AVOIDANCE",
    "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL",
    "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION",
    "CONTROL", "DOSE_MEASUREMENT",
)  # fmt: skip

# Attributes of the source copied into the structure set (Patient, General Study modules).
_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)  # fmt: skip


def slice_contours(mask: NDArray[np.bool_]) -> dict[int, list[NDArray[np.float64]]]:
    """Every boundary of a 3D mask (slice, row, column), per slice.

    Returns ``{slice: [contour, ...]}``; a contour is an ``(n, 2)`` array of (column, row)
    pixel-corner coordinates ((0, 0) is the top left corner of the top left pixel), open (the
    first point is not repeated), with a vertex only where the boundary turns.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (slice, row, column), got shape {mask.shape}")
    mask = np.asarray(mask, dtype=bool)
    box = label_box(mask, True)
    return {} if box is None else _traced(mask[box], box)


def _traced(mask: NDArray[np.bool_], box: tuple[slice, slice, slice]) -> dict[int, list[NDArray[np.float64]]]:
    """The boundaries of ``mask``, the contents of ``box`` of a larger grid, in that grid's
    coordinates. Slices are independent and the box's frame is background as the grid's is, so
    the loops, their order and their corners are those of the whole grid, moved by the box's
    corner (a lung is a fifth of a chest CT's grid)."""
    graph = _CrackGraph(mask)
    roots, _ = graph.loops()
    shift = np.array([box[2].start, box[1].start], dtype=np.float64)
    out: dict[int, list[NDArray[np.float64]]] = {}
    for edge in roots.tolist():
        corners = graph.corners(edge)
        corners += shift
        out.setdefault(box[0].start + int(graph.slice_of[edge]), []).append(corners)
    return out


def _to_patient(corners: NDArray[np.float64], image: Dataset) -> NDArray[np.float64]:
    """Pixel-corner (column, row) coordinates -> patient coordinates (mm) on ``image``'s plane."""
    iop = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    ipp = np.asarray(image.ImagePositionPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in image.PixelSpacing)
    # Image Position is the centre of the first pixel, half a pixel inside its corner.
    col = corners[:, 0] - 0.5
    row = corners[:, 1] - 0.5
    points: NDArray[np.float64] = (
        ipp + np.outer(col * col_spacing, iop[:3]) + np.outer(row * row_spacing, iop[3:])
    )
    return points


#: (3006,0050) Contour Data, DS.
_CONTOUR_DATA = Tag(0x3006, 0x0050)


def _decimal_strings(points: Sequence[NDArray[np.float64]], decimals: int) -> list[RawDataElement]:
    """Contour Data of each contour as the bytes pydicom would write for these values as DS
    strings (joined by backslashes, padded to even length), kept raw: a contour set holds 10^5
    numbers, and pydicom validates each DS value it is given one by one (a second on a 64-slice
    chest CT). A contour set takes few distinct values (a coordinate is a pixel corner on one
    of the slices), so each distinct value is formatted once."""
    if not points:
        return []
    flat = np.concatenate([p.ravel() for p in points])
    # Distinct by bit pattern: -0.0 and 0.0 are written differently ("-0" and "0").
    distinct, which = np.unique(flat.view(np.int64), return_inverse=True)
    text = np.array(
        [f"{v:.{decimals}f}".rstrip("0").rstrip(".") or "0" for v in distinct.view(np.float64).tolist()],
        dtype=object,
    )[which.ravel()].tolist()
    out = []
    start = 0
    for p in points:
        value = "\\".join(text[start : start + p.size]).encode("ascii")
        start += p.size
        if len(value) % 2:
            value += b" "
        out.append(RawDataElement(_CONTOUR_DATA, "DS", len(value), value, 0, False, True))
    return out


def _ds(**attrs: Any) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def build_rtstruct(
    source_images: Sequence[Dataset],
    labels: NDArray[np.integer[Any]],
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    *,
    content_creation: dt.datetime | None = None,
    decimals: int = 3,
) -> Dataset:
    """The RT Structure Set of ``labels`` (slice i lies on ``source_images[i]``).

    Segments without a voxel get no ROI; it is an error when none has one.
    """
    rows, cols = check_source_images(source_images)
    check_new_object(
        segments, algorithm, series_instance_uid, sop_instance_uid, series_number, series_description
    )
    lab = check_labels(labels, len(source_images), rows, cols)
    first = source_images[0]
    for attr in ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if attr not in first:
            raise ValueError(f"source_images[0] has no {attr}: contours need the image plane")
    for s in segments:
        if s.rt_roi_type not in RT_ROI_TYPES:
            raise ValueError(
                f"segment {s.name!r}: RT ROI Interpreted Type {s.rt_roi_type!r} is not one of {RT_ROI_TYPES}"
            )
    frame_uid = str(first.FrameOfReferenceUID)
    created = content_creation or dt.datetime.now(dt.UTC).astimezone()

    ds = Dataset()
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_instance_uid
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    for attr in _COPIED:
        ds.add_new(attr, first[attr].VR, first[attr].value) if attr in first else setattr(ds, attr, "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    # Frame of Reference module (in the RT Structure Set IOD since DICOM 2023): the source's.
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Manufacturer = algorithm.manufacturer
    ds.ManufacturerModelName = algorithm.name
    ds.SoftwareVersions = algorithm.version
    ds.InstanceNumber = 1
    ds.InstanceCreationDate = DA(created.date())
    ds.InstanceCreationTime = TM(created.time())
    ds.StructureSetLabel = "AI contours"
    ds.StructureSetName = algorithm.name[:64]
    ds.StructureSetDate = DA(created.date())
    ds.StructureSetTime = TM(created.time())
    ds.ContributingEquipmentSequence = [algorithm_equipment(algorithm, created)]

    contoured: set[int] = set()
    roi_items, contour_items, observation_items = [], [], []
    number = 0
    for spec in sorted(segments, key=lambda s: s.label):
        box = label_box(lab, spec.label)
        per_slice = {} if box is None else _traced(lab[box] == spec.label, box)
        if not per_slice:
            continue
        number += 1
        contours, all_points = [], []
        for z in sorted(per_slice):
            image = source_images[z]
            contoured.add(z)
            for corners in per_slice[z]:
                points = np.round(_to_patient(corners, image), decimals)
                all_points.append(points)
                contours.append(
                    _ds(
                        ContourImageSequence=[
                            _ds(
                                ReferencedSOPClassUID=image.SOPClassUID,
                                ReferencedSOPInstanceUID=image.SOPInstanceUID,
                            )
                        ],
                        ContourGeometricType="CLOSED_PLANAR",
                        NumberOfContourPoints=len(points),
                    )
                )
        for item, data in zip(contours, _decimal_strings(all_points, decimals), strict=True):
            item[_CONTOUR_DATA] = data
            # Written as explicit VR little endian in the default character set, as created:
            # pydicom then writes the raw Contour Data as it is instead of decoding each value.
            item.set_original_encoding(False, True, default_encoding)
        roi_items.append(
            _ds(
                ROINumber=number,
                ReferencedFrameOfReferenceUID=frame_uid,
                ROIName=spec.name,
                ROIDescription=spec.type.meaning,
                ROIGenerationAlgorithm="AUTOMATIC",
                ROIGenerationDescription=f"{algorithm.name} {algorithm.version}"[:64],
            )
        )
        contour_items.append(
            _ds(ROIDisplayColor=list(spec.color_rgb), ContourSequence=contours, ReferencedROINumber=number)
        )
        identification = _ds(
            CodeValue=spec.type.value,
            CodingSchemeDesignator=spec.type.scheme,
            CodeMeaning=spec.type.meaning,
            MappingResource="DCMR",
            ContextGroupVersion="20240101",
            ContextIdentifier="7151",
            ContextUID="1.2.840.10008.6.1.1137",
        )
        observation_items.append(
            _ds(
                ObservationNumber=number,
                ReferencedROINumber=number,
                ROIObservationLabel=spec.tracking_id[:16],
                RTROIIdentificationCodeSequence=[identification],
                RTROIInterpretedType=spec.rt_roi_type,
                ROIInterpreter="",
            )
        )
    if not roi_items:
        raise ValueError("nothing to contour: no segment has a voxel in labels")

    images = [
        _ds(
            ReferencedSOPClassUID=source_images[z].SOPClassUID,
            ReferencedSOPInstanceUID=source_images[z].SOPInstanceUID,
        )
        for z in sorted(contoured)
    ]
    series = _ds(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=images)
    study = _ds(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Detached Study Management (retired, as PS3.3 asks)
        ReferencedSOPInstanceUID=first.StudyInstanceUID,
        RTReferencedSeriesSequence=[series],
    )
    ds.ReferencedFrameOfReferenceSequence = [
        _ds(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=[study])
    ]
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.ApprovalStatus = "UNAPPROVED"  # RT Approval: nobody has reviewed the contours yet

    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta  # type: ignore[assignment]
    return ds
