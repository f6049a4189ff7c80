"""Label map -> RT Structure Set (RTSTRUCT) for treatment planning systems.

One ROI per segment: its name, colour, RT ROI Interpreted Type and its coded type as the RT ROI
Identification Code. Each ROI is drawn as CLOSED_PLANAR contours on the source slices, in
patient coordinates, lying exactly on each slice's Image Position (Patient).

How a slice's region becomes contours: every boundary between the region and the background is
one contour that follows the pixel edges (the "cracks" between pixels), so the polygon encloses
exactly the centres of the region's pixels. An island is one contour; a hole is a further
contour inside it; an island inside a hole is yet another. A reader recovers the region with
the even-odd rule (XOR of the filled contours, the convention of most planning systems and
readers): a point is inside when an odd number of contours encloses it. Pixels that touch only
at a corner belong to separate contours (4-connectivity), so contours never cross.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec
from orthanc_plugin.imaging.postprocess import label_box
from orthanc_plugin.outputs import explicit_vr
from orthanc_plugin.outputs.seg import (
    algorithm_equipment,
    check_labels,
    check_new_object,
    check_source_images,
)
from orthanc_plugin.outputs.sr import _CrackGraph

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
    points, counts, on_slice = _traced_flat(mask, box)
    out: dict[int, list[NDArray[np.float64]]] = {}
    for z, corners in zip(on_slice.tolist(), np.split(points, np.cumsum(counts)[:-1]), strict=True):
        out.setdefault(z, []).append(corners)
    return out


def _traced_flat(
    mask: NDArray[np.bool_], box: tuple[slice, slice, slice]
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """:func:`_traced` as the corners of every contour one after the other (slice by slice,
    each slice's in the order traced), the number of corners of each and the slice it is on."""
    graph = _CrackGraph(mask)
    roots, _ = graph.loops()
    roots = roots[np.argsort(graph.slice_of[roots], kind="stable")]
    points, counts = graph.walks(roots.tolist())
    points += np.array([box[2].start, box[1].start], dtype=np.float64)
    return points, counts, box[0].start + graph.slice_of[roots]


def _to_patient(
    corners: NDArray[np.float64],
    slice_of: NDArray[np.int64],
    sizes: NDArray[np.int64],
    source_images: Sequence[Dataset],
) -> NDArray[np.float64]:
    """Pixel-corner (column, row) coordinates -> patient coordinates (mm) of contours one after
    the other, contour k (``sizes[k]`` points) on the plane of ``source_images[slice_of[k]]``:
    all at once, each value computed as for one image alone (``ipp + outer(col * spacing, row
    direction) + outer(row * spacing, column direction)``), so bit for bit the same."""
    slices, plane = np.unique(slice_of, return_inverse=True)
    images = [source_images[int(z)] for z in slices]
    iop = np.array([[float(v) for v in im.ImageOrientationPatient] for im in images], dtype=np.float64)
    ipp = np.array([[float(v) for v in im.ImagePositionPatient] for im in images], dtype=np.float64)
    spacing = np.array([[float(v) for v in im.PixelSpacing] for im in images], dtype=np.float64)
    where = np.repeat(plane.ravel(), sizes)
    # Image Position is the centre of the first pixel, half a pixel inside its corner.
    col = corners[:, 0] - 0.5
    row = corners[:, 1] - 0.5
    col_step = (col * spacing[where, 1])[:, None]
    row_step = (row * spacing[where, 0])[:, None]
    points: NDArray[np.float64] = ipp[where] + col_step * iop[where, :3] + row_step * iop[where, 3:]
    return points


#: (3006,0050) Contour Data, DS.
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_CONTOUR_SEQUENCE = 0x30060040
_CONTOUR_IMAGES = 0x30060016
_NUMBER_OF_POINTS = 0x30060046
#: (3006,0042) Contour Geometric Type, as encoded.
_CLOSED_PLANAR = explicit_vr.element(0x30060042, b"CS", explicit_vr.text("CLOSED_PLANAR"))


class _ContourImages:
    """The reference to slice z (an item holding the image's class and instance UIDs) and the
    Contour Image Sequence (3006,0016) of a contour on it, encoded the first time a slice is
    asked for."""

    def __init__(self, source_images: Sequence[Dataset]) -> None:
        self.source_images = source_images
        self.items: dict[int, bytes] = {}
        self.sequences: dict[int, bytes] = {}

    def item(self, z: int) -> bytes:
        found = self.items.get(z)
        if found is None:
            image = self.source_images[z]
            found = self.items[z] = explicit_vr.item(
                explicit_vr.element(0x00081150, b"UI", explicit_vr.uid(str(image.SOPClassUID)))
                + explicit_vr.element(0x00081155, b"UI", explicit_vr.uid(str(image.SOPInstanceUID)))
            )
        return found

    def __getitem__(self, z: int) -> bytes:
        found = self.sequences.get(z)
        if found is None:
            found = self.sequences[z] = explicit_vr.sequence(_CONTOUR_IMAGES, [self.item(z)])
        return found


def _decimal_strings(points: Sequence[NDArray[np.float64]], decimals: int) -> list[bytes]:
    """Contour Data of each contour as the bytes pydicom would write for these values as DS
    strings (joined by backslashes, padded to even length), encoded here: a contour set holds 10^5
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
        out.append(value)
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
    roi_items, observation_items = [], []
    roi_contours: list[tuple[Dataset, list[bytes]]] = []
    # Contour Image Sequence of a contour on each slice, encoded once.
    references = _ContourImages(source_images)
    number = 0
    for spec in sorted(segments, key=lambda s: s.label):
        box = label_box(lab, spec.label)
        if box is None:
            continue
        corners, sizes, slice_of_contour = _traced_flat(lab[box] == spec.label, box)
        if not sizes.size:
            continue
        number += 1
        # The contours in slice order, each slice's in the order traced, all converted at once.
        on_slice = slice_of_contour.tolist()
        contoured.update(on_slice)
        points = np.round(_to_patient(corners, slice_of_contour, sizes, source_images), decimals)
        texts = _decimal_strings(np.split(points, np.cumsum(sizes)[:-1]), decimals)
        contour_items = [
            explicit_vr.item(
                references[z]
                + _CLOSED_PLANAR
                + explicit_vr.element(_NUMBER_OF_POINTS, b"IS", explicit_vr.text(str(n)))
                + explicit_vr.element(_CONTOUR_DATA, b"DS", text)
            )
            for z, n, text in zip(on_slice, sizes.tolist(), texts, strict=True)
        ]
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
        roi_contour = _ds(ROIDisplayColor=list(spec.color_rgb), ReferencedROINumber=number)
        roi_contours.append((roi_contour, contour_items))
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

    series = _ds(SeriesInstanceUID=first.SeriesInstanceUID)  # its Contour Image Sequence below
    study = _ds(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Detached Study Management (retired, as PS3.3 asks)
        ReferencedSOPInstanceUID=first.StudyInstanceUID,
        RTReferencedSeriesSequence=[series],
    )
    ds.ReferencedFrameOfReferenceSequence = [
        _ds(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=[study])
    ]
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.ApprovalStatus = "UNAPPROVED"  # RT Approval: nobody has reviewed the contours yet
    # The contours (thousands of items) go in as bytes, which the writer copies: every other
    # element is settled first (no ambiguous VR left), then the whole object is marked as
    # already in its final encoding.
    explicit_vr.resolve_ambiguous_vrs(ds)
    explicit_vr.raw_sequence(series, _CONTOUR_IMAGES, [references.item(z) for z in sorted(contoured)])
    for roi_contour, items in roi_contours:
        explicit_vr.raw_sequence(roi_contour, _CONTOUR_SEQUENCE, items)
    ds.ROIContourSequence = DicomSequence([roi_contour for roi_contour, _ in roi_contours])

    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta  # type: ignore[assignment]
    explicit_vr.mark_as_written(ds)
    return ds
