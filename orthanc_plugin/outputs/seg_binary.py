"""BINARY DICOM SEG written directly: the object highdicom writes, without its per-frame cost.

:func:`~.seg.build_seg` used ``highdicom.seg.Segmentation`` for every SEG. For a BINARY SEG
(one 1-bit frame per segment and slice) most of its time, and most of pydicom's time to
write the result, goes into building and encoding one pydicom ``Dataset`` per frame
(PerFrameFunctionalGroupsSequence) and the pixels frame by frame. Here the small header is
built with pydicom (and highdicom's own base class, content classes and spatial helpers,
so it holds exactly what highdicom writes), while the two large elements are encoded by
hand as Explicit VR Little Endian bytes with defined lengths:

* PerFrameFunctionalGroupsSequence (5200,9230): per frame, in highdicom's element order,
  DerivationImageSequence (SourceImageSequence with PurposeOfReferenceCodeSequence,
  DerivationCodeSequence), FrameContentSequence (DimensionIndexValues: segment, position),
  PlanePositionSequence (ImagePositionPatient) and SegmentIdentificationSequence
  (ReferencedSegmentNumber; in the shared groups instead when there is one segment);
* PixelData (7FE0,0010): frames ordered by segment, then by position along the slice
  normal (as highdicom orders them), bit-packed with numpy (least significant bit first)
  and concatenated bit-contiguously (PS3.5 8.1.1), padded to even length with a zero byte.

The header and the sequences are written to bytes once and read back with
``pydicom.dcmread``, and Pixel Data is added to that as a raw element: callers get an
ordinary ``Dataset`` whose elements stay raw until accessed, so writing it again (to store
it) copies the bytes instead of re-encoding hundreds of items.

What differs from highdicom's object, on purpose: DimensionOrganizationUID (random in
highdicom) is derived from the SOP Instance UID, and InstanceCreationDate/Time and the
ContributionDateTime of highdicom's own Contributing Equipment item (the time of the call in
highdicom) are the content creation time, so that a retry writes an identical object; the
Pixel Data padding byte (when there is one) is 0x00 where highdicom appends ASCII "0".
``tests/unit/test_seg_binary.py`` compares both element by element.

Sources this encoder does not cover (multi-frame images, no patient frame of reference,
differing orientations, repeated positions) make :func:`read_sources` answer ``None``;
the caller then uses highdicom, which handles (or refuses) them as before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DS, DT, TM, format_number_as_ds

from orthanc_plugin.core.uids import derived_uid

#: Segmentation Storage (the BINARY encoding's SOP Class).
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"

_REFERENCED_SERIES = 0x00081115  # ReferencedSeriesSequence
_SOURCE_IMAGES = 0x00082112  # SourceImageSequence
_PER_FRAME_GROUPS = 0x52009230  # PerFrameFunctionalGroupsSequence
_PIXEL_DATA = 0x7FE00010  # PixelData
# NumberOfFrames, SharedFunctionalGroupsSequence, PerFrameFunctionalGroupsSequence
_MULTI_FRAME_TAGS = (0x00280008, 0x52009229, 0x52009230)
_ITEM_TAG = b"\xfe\xff\x00\xe0"
# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@dataclass(frozen=True)
class SegHeader:
    """The values of a SEG that do not come from the source images or the label map."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    content_label: str
    content_description: str
    #: ContentDate/Time, and here also InstanceCreationDate/Time and the contribution times.
    created: dt.datetime


@dataclass(frozen=True)
class Sources:
    """What the encoder needs from the source images, read once (pydicom access is slow)."""

    sop_class_uids: list[str]
    sop_instance_uids: list[str]
    series_instance_uids: list[str]
    #: ImagePositionPatient values as read (the DS text is derived from them).
    image_positions: list[Sequence[Any]]
    #: The same as floats, shape (n, 3).
    positions: NDArray[np.float64]
    #: Source indices sorted by distance along the slice normal (highdicom's frame order).
    order: NDArray[np.intp]


def read_sources(source_images: Sequence[Dataset]) -> Sources | None:
    """The sources' references and geometry, or ``None`` when :func:`encode` does not cover them.

    Covered: single-frame images (no NumberOfFrames, no functional groups) in one patient
    frame of reference, with one ImageOrientationPatient, an ImagePositionPatient each, at
    distinct positions along the normal, with PixelSpacing and SliceThickness. Anything
    else goes to highdicom, which encodes or refuses it as before.
    """
    first = source_images[0]
    if hd.spatial.get_image_coordinate_system(first) != hd.CoordinateSystemNames.PATIENT:
        return None
    if "PixelSpacing" not in first or "SliceThickness" not in first:
        return None
    n = len(source_images)
    classes, instances, series, image_positions = [], [], [], []
    positions = np.empty((n, 3), dtype=np.float64)
    try:
        # Tags, not keywords: this runs once per slice, and keyword lookups cost 10x more.
        orientation = first[0x00200037].value  # ImageOrientationPatient
        frame_of_reference = first[0x00200052].value  # FrameOfReferenceUID
        for i, ds in enumerate(source_images):
            if any(tag in ds for tag in _MULTI_FRAME_TAGS):
                return None
            if ds[0x00200052].value != frame_of_reference or ds[0x00200037].value != orientation:
                return None  # highdicom refuses differing orientations
            classes.append(str(ds[0x00080016].value))  # SOPClassUID
            instances.append(str(ds[0x00080018].value))  # SOPInstanceUID
            series.append(str(ds[0x0020000E].value))  # SeriesInstanceUID
            position = ds[0x00200032].value  # ImagePositionPatient
            image_positions.append(position)
            positions[i] = [float(v) for v in position]
        cosines = [float(v) for v in orientation]
    except (KeyError, TypeError, ValueError):
        return None
    if len(cosines) != 6 or not all(uid.isascii() for uid in (*classes, *instances, *series)):
        return None
    normal = hd.spatial.get_normal_vector(cosines, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION)
    distances = (normal[None] @ positions.T).squeeze(0)  # as highdicom computes them
    _, order = np.unique(distances, return_index=True)
    if len(order) != n:
        return None  # repeated positions: highdicom refuses them
    return Sources(classes, instances, series, image_positions, positions, order.astype(np.intp))


def encode(
    source_images: Sequence[Dataset],
    sources: Sources,
    labels: NDArray[np.uint8],
    segment_labels: Sequence[int],
    descriptions: Sequence[hd.seg.SegmentDescription],
    contributing_equipment: Sequence[hd.ContributingEquipment],
    header: SegHeader,
) -> Dataset:
    """Encode the BINARY SEG of ``labels`` (slice i on ``source_images[i]``).

    Segment number k (1-based) is the voxels equal to ``segment_labels[k - 1]``, described
    by ``descriptions[k - 1]``; every segment must have a voxel (the caller checked). Frames
    are written only where a segment has voxels. ``sources`` is :func:`read_sources` of
    ``source_images``.
    """
    _, rows, cols = labels.shape
    if len(segment_labels) != len(descriptions) or not segment_labels:
        raise ValueError("one description per segment label is needed")
    planes, pixel_data = _pack_frames(labels, segment_labels, sources.order)
    seg = _header(source_images[0], sources, planes, descriptions, contributing_equipment, header)
    seg.Rows, seg.Columns = rows, cols
    seg.NumberOfFrames = sum(len(p) for p in planes)
    # Without ambiguous VRs ("US or SS") and with this encoding recorded as the original
    # one, pydicom writes the raw elements below as they are (it would parse them otherwise).
    correct_ambiguous_vr(seg, True)
    references, referenced_series = _source_references(sources)
    for tag, value in (
        (_REFERENCED_SERIES, referenced_series),
        (_SOURCE_IMAGES, references),
        (_PER_FRAME_GROUPS, _per_frame_groups(sources, planes)),
    ):
        seg[tag] = _raw(tag, "SQ", value)
    charset = seg.get("SpecificCharacterSet")
    seg.set_original_encoding(False, True, convert_encodings(charset) if charset else "iso8859")
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    # Read back, every element stays raw until accessed. Pixel Data is added raw afterwards
    # (3 copies fewer of the largest value), and written verbatim in its place as well: pydicom
    # writes elements in tag order, wherever they sort (nothing in the header sorts after
    # (5200,9230) today, the tests compare the whole file with highdicom's).
    result = pydicom.dcmread(BytesIO(buffer.getvalue()))
    result[_PIXEL_DATA] = _raw(_PIXEL_DATA, "OB", pixel_data)
    return result


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as pydicom holds one read from Explicit VR Little Endian bytes."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _pack_frames(
    labels: NDArray[np.uint8], segment_labels: Sequence[int], order: NDArray[np.intp]
) -> tuple[list[NDArray[np.intp]], bytes]:
    """Per segment the source indices of its frames (position order), and the Pixel Data.

    Frames follow each other without padding, bit after bit (PS3.5 8.1.1, and what
    highdicom writes): when Rows*Columns is not a multiple of 8 a frame starts inside a byte.
    Slice by slice, so that the temporaries stay in the CPU cache (whole-volume masks cost
    about three times more, mostly in page faults).
    """
    _, rows, cols = labels.shape
    aligned = (rows * cols) % 8 == 0
    planes: list[list[int]] = [[] for _ in segment_labels]
    frames: list[list[NDArray[Any]]] = [[] for _ in segment_labels]
    for i in order.tolist():
        image = labels[i]
        if not image.any():
            continue
        for k, value in enumerate(segment_labels):
            mask = image == value
            if aligned:
                frame = np.packbits(mask, bitorder="little")
                if not frame.any():
                    continue
            elif mask.any():
                frame = mask.reshape(-1)  # bits, packed all together below
            else:
                continue
            planes[k].append(i)
            frames[k].append(frame)
    chunks = [frame for per_segment in frames for frame in per_segment]
    # Whole frames: joined as they are; otherwise the bits of all frames packed together.
    bits = np.concatenate(chunks)
    data = bits.tobytes() if aligned else np.packbits(bits, bitorder="little").tobytes()
    if len(data) % 2:
        data += b"\x00"
    return [np.asarray(p, dtype=np.intp) for p in planes], data


def _header(
    src: Dataset,
    sources: Sources,
    planes: Sequence[NDArray[np.intp]],
    descriptions: Sequence[hd.seg.SegmentDescription],
    contributing_equipment: Sequence[hd.ContributingEquipment],
    header: SegHeader,
) -> hd.SOPClass:
    """The header as ``hd.seg.Segmentation`` sets it, but for the four elements :func:`encode` adds.

    Those are ReferencedSeriesSequence and SourceImageSequence (one item per source image),
    PerFrameFunctionalGroupsSequence and PixelData, encoded by hand.
    """
    created = header.created
    seg = hd.SOPClass(
        study_instance_uid=src.StudyInstanceUID,
        series_instance_uid=header.series_instance_uid,
        series_number=header.series_number,
        sop_instance_uid=header.sop_instance_uid,
        instance_number=1,
        sop_class_uid=SOP_CLASS_UID,
        manufacturer=header.manufacturer,
        modality="SEG",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=src.PatientID,
        patient_name=src.PatientName,
        patient_birth_date=src.PatientBirthDate,
        patient_sex=src.PatientSex,
        accession_number=src.AccessionNumber,
        study_id=src.StudyID,
        study_date=src.StudyDate,
        study_time=src.StudyTime,
        referring_physician_name=getattr(src, "ReferringPhysicianName", None),
        manufacturer_model_name=header.manufacturer_model_name,
        device_serial_number=header.device_serial_number,
        software_versions=header.software_versions,
        specific_character_set=src.get("SpecificCharacterSet"),
        series_description=header.series_description,
        content_date=created.date(),
        content_time=created.time(),
    )
    seg.InstanceCreationDate = DA(created.date())  # highdicom: the time of the call
    seg.InstanceCreationTime = TM(created.time())
    seg.copy_specimen_information(src)
    seg.copy_patient_and_study_information(src)
    seg.ContributingEquipmentSequence = _equipment(src, contributing_equipment, created)

    seg.SegmentationType = "BINARY"
    seg.ContentLabel = header.content_label
    seg.ContentDescription = header.content_description
    seg.FrameOfReferenceUID = src.FrameOfReferenceUID
    seg.PositionReferenceIndicator = getattr(src, "PositionReferenceIndicator", None)
    seg.BitsAllocated = 1
    seg.SamplesPerPixel = 1
    seg.PhotometricInterpretation = "MONOCHROME2"
    seg.BitsStored = 1
    seg.HighBit = 0
    seg.PixelRepresentation = 0
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.PresentationLUTShape = "IDENTITY"
    seg.LossyImageCompression = getattr(src, "LossyImageCompression", "00")
    if seg.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in src:
                setattr(seg, keyword, src[keyword].value)

    dimension_uid = derived_uid(header.sop_instance_uid, "dimension-organization")
    seg.DimensionIndexSequence = [
        _dimension_index(0x0062000B, 0x0062000A, dimension_uid, "Referenced Segment Number"),
        _dimension_index(0x00200032, 0x00209113, dimension_uid, "Image Position Patient"),
    ]
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    seg.DimensionOrganizationSequence = [organization]
    seg.SharedFunctionalGroupsSequence = [_shared_groups(src, sources, len(descriptions))]
    if len(descriptions) == 1 and _is_regular_volume(sources, planes[0], src):
        # highdicom calls frames differing only in position "3D", which needs one segment.
        seg.DimensionOrganizationType = "3D"

    seg.SegmentSequence = list(descriptions)
    seg.SegmentsOverlap = "NO"  # one label per voxel
    return seg


def _equipment(
    src: Dataset, given: Sequence[hd.ContributingEquipment], created: dt.datetime
) -> list[hd.ContributingEquipment]:
    """The acquisition equipment of the source (when it names one), ``given``, and highdicom."""
    items: list[hd.ContributingEquipment] = []
    with contextlib.suppress(Exception):  # highdicom leaves it out for any reason, as here
        items.append(hd.ContributingEquipment.for_image_acquisition(src))
    items.extend(given)
    library = hd.ContributingEquipment.for_highdicom()
    library.ContributionDateTime = DT(created)  # highdicom: the time of the call
    items.append(library)
    return items


def _dimension_index(pointer: int, group: int, uid: str, label: str) -> Dataset:
    item = Dataset()
    item.DimensionIndexPointer = pointer
    item.FunctionalGroupPointer = group
    item.DimensionOrganizationUID = uid
    item.DimensionDescriptionLabel = label
    return item


def _shared_groups(src: Dataset, sources: Sources, n_segments: int) -> Dataset:
    """Plane orientation, pixel measures (with the slice spacing) and, for one segment, its number."""
    orientation = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT, image_orientation=src.ImageOrientationPatient
    )
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=src.PixelSpacing,
        slice_thickness=src.SliceThickness,
        spacing_between_slices=src.get("SpacingBetweenSlices", None),
    )
    if "SpacingBetweenSlices" not in measures[0]:
        spacing, _ = hd.spatial.get_volume_positions(
            image_positions=sources.positions.tolist(),
            image_orientation=orientation[0].ImageOrientationPatient,
        )
        if spacing is not None:
            measures[0].SpacingBetweenSlices = format_number_as_ds(spacing)
    item = Dataset()
    item.PlaneOrientationSequence = orientation
    item.PixelMeasuresSequence = measures
    if n_segments == 1:
        identification = Dataset()
        identification.ReferencedSegmentNumber = 1
        item.SegmentIdentificationSequence = [identification]
    return item


def _is_regular_volume(sources: Sources, planes: NDArray[np.intp], src: Dataset) -> bool:
    """Whether the frames' positions (source order) are evenly spaced along the normal."""
    if len(planes) < 2:
        return False
    spacing, _ = hd.spatial.get_volume_positions(
        image_positions=sources.positions[np.sort(planes)].tolist(),
        image_orientation=[float(v) for v in src.ImageOrientationPatient],
        sort=False,
    )
    return spacing is not None and spacing > 0.0


# --- hand-encoded Explicit VR Little Endian -------------------------------------------------------


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _item(content: bytes) -> bytes:
    return _ITEM_TAG + struct.pack("<I", len(content)) + content


def _sequence(tag: int, *items: bytes) -> bytes:
    return _element(tag, b"SQ", b"".join(_item(i) for i in items))


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _uid(value: str) -> bytes:
    return _text(value, b"\x00")


def _encoded(ds: Dataset) -> bytes:
    """A small dataset's elements, encoded by pydicom (for the constant code items)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _ds_text(value: Any, cache: dict[tuple[Any, ...], str]) -> str:
    """A DS value as highdicom's ``DS(value, auto_format=True)`` writes it.

    ``cache`` holds the answers so far: slices share most coordinates, and ``DS`` is slow.
    The key keeps the text as read, so that "80" and "80.0" stay apart.
    """
    key = (type(value), getattr(value, "original_string", None), repr(value))
    text = cache.get(key)
    if text is None:
        number = DS(value, auto_format=True)
        text = cache[key] = str(getattr(number, "original_string", number))
    return text


def _source_references(sources: Sources) -> tuple[bytes, bytes]:
    """SourceImageSequence (every source, in order) and ReferencedSeriesSequence (by series).

    Both hold the same items (ReferencedSOPClassUID, ReferencedSOPInstanceUID), as highdicom
    writes them.
    """
    items = [
        _item(_element(0x00081150, b"UI", _uid(c)) + _element(0x00081155, b"UI", _uid(i)))
        for c, i in zip(sources.sop_class_uids, sources.sop_instance_uids, strict=True)
    ]
    by_series: dict[str, list[bytes]] = defaultdict(list)
    for series, item in zip(sources.series_instance_uids, items, strict=True):
        by_series[series].append(item)
    referenced_series = b"".join(
        _item(_element(0x0008114A, b"SQ", b"".join(refs)) + _element(0x0020000E, b"UI", _uid(series)))
        for series, refs in by_series.items()
    )  # ReferencedInstanceSequence, SeriesInstanceUID
    return b"".join(items), referenced_series


def _per_frame_groups(sources: Sources, planes: Sequence[NDArray[np.intp]]) -> bytes:
    """The value of PerFrameFunctionalGroupsSequence: one item per frame, highdicom's layout."""
    purpose = _encoded(hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation))
    derivation_code = _sequence(
        0x00089215, _encoded(hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation))
    )  # DerivationCodeSequence
    purpose_sequence = _sequence(0x0040A170, purpose)  # PurposeOfReferenceCodeSequence
    preserved = _element(0x0028135A, b"CS", b"YES ")  # SpatialLocationsPreserved

    # Dimension index of a position: its rank among the positions holding any frame.
    n = len(sources.order)
    used = np.zeros(n, dtype=bool)
    for p in planes:
        used[p] = True
    ranked = sources.order[used[sources.order]]
    rank = np.zeros(n, dtype=np.int64)
    rank[ranked] = np.arange(1, len(ranked) + 1)

    derivation: dict[int, bytes] = {}
    position: dict[int, bytes] = {}
    texts: dict[tuple[Any, ...], str] = {}
    for i in ranked.tolist():
        source_item = (
            _element(0x00081150, b"UI", _uid(sources.sop_class_uids[i]))
            + _element(0x00081155, b"UI", _uid(sources.sop_instance_uids[i]))
            + preserved
            + purpose_sequence
        )
        # DerivationImageSequence > SourceImageSequence, DerivationCodeSequence
        derivation[i] = _sequence(0x00089124, _sequence(0x00082112, source_item) + derivation_code)
        ipp = "\\".join(_ds_text(v, texts) for v in sources.image_positions[i])
        # PlanePositionSequence > ImagePositionPatient
        position[i] = _sequence(0x00209113, _element(0x00200032, b"DS", _text(ipp)))

    frames: list[bytes] = []
    several = len(planes) > 1  # one segment: its number is in the shared groups instead
    for number, chosen in enumerate(planes, start=1):
        # SegmentIdentificationSequence > ReferencedSegmentNumber
        identification = _sequence(0x0062000A, _element(0x0062000B, b"US", struct.pack("<H", number)))
        for i in chosen.tolist():
            # FrameContentSequence > DimensionIndexValues (segment, position)
            content = _sequence(0x00209111, _element(0x00209157, b"UL", struct.pack("<II", number, rank[i])))
            body = derivation[i] + content + position[i] + (identification if several else b"")
            frames.append(_ITEM_TAG + struct.pack("<I", len(body)) + body)
    return b"".join(frames)
