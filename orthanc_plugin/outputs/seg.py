"""Label map -> DICOM Segmentation, the overlay that OHIF shows.

Two encodings, chosen per pipeline (``outputs.seg_type``): ``BINARY`` (Segmentation
Storage, a 1-bit frame per segment and slice, what every SEG reader knows) and
``LABELMAP`` (Label Map Segmentation Storage, DICOM 2024b: one 8-bit frame per slice
holding every segment's number, smaller and faster to load, read only by recent viewers).
Both carry the same segment numbers, descriptions, references and equipment. highdicom
encodes LABELMAP; BINARY is written by :mod:`orthanc_plugin.outputs.seg_binary` (the same object as
highdicom's, several times faster), highdicom remaining the reference (``encoder=``).

The SEG references its source series (ReferencedSeriesSequence, which OHIF needs to
make a display set), describes every segment with codes, a tracking identifier and a
recommended CIELab colour (OHIF's segment colour), and names the algorithm in
ContributingEquipmentSequence as IHE AI Results asks.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.valuerep import DA, TM

from orthanc_plugin.core.codes import PROCESSING_EQUIPMENT
from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec, check_uid
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.outputs import seg_binary
from orthanc_plugin.outputs.source_attributes import clean_sources

#: DeviceSerialNumber (Type 1 in the Enhanced General Equipment module): software has none.
DEVICE_SERIAL_NUMBER = "n/a"

#: The SEG encodings :func:`build_seg` writes (``SegmentationType``).
SEG_TYPES = ("BINARY", "LABELMAP")
#: SOP Class UIDs of the two encodings: Segmentation Storage and Label Map Segmentation
#: Storage (DICOM PS3.4 Table B.5-1, the latter added in 2024b).
SEG_SOP_CLASS_UIDS = {
    "BINARY": seg_binary.SOP_CLASS_UID,
    "LABELMAP": "1.2.840.10008.5.1.4.1.1.66.7",
}
#: Who encodes a BINARY SEG (:func:`build_seg`'s ``encoder``): ``"fast"`` is
#: :mod:`orthanc_plugin.outputs.seg_binary` (the same object, several times faster), ``"highdicom"``
#: is ``highdicom.seg.Segmentation``, kept as the reference the tests compare with.
SEG_ENCODERS = ("fast", "highdicom")

#: Voxels per step of :func:`label_counts` (4 MB of labels).
_COUNT_CHUNK = 1 << 22
_CS_UNSAFE = re.compile(r"[^A-Z0-9_]+")


class EmptySegmentationError(ValueError):
    """No segment has a single voxel: there is nothing to encode (the caller decides what then)."""


def segment_tracking_uid(seg_sop_instance_uid: str, label: int) -> str:
    """Tracking UID of segment ``label``: a pure function of the SEG's UID, so retries agree."""
    return derived_uid(seg_sop_instance_uid, f"segment-tracking-{label}")


def content_label(name: str) -> str:
    """``ContentLabel`` (CS: upper case, digits and "_", at most 16 chars) from a name."""
    body = _CS_UNSAFE.sub("_", name.upper()).strip("_")
    if not body.startswith("AI_"):
        body = f"AI_{body}" if body else "AI"
    return body[:16].rstrip("_")


def check_source_images(source_images: Sequence[Dataset]) -> tuple[int, int]:
    """Check one series of same-sized images with distinct UIDs; return (Rows, Columns)."""
    if len(source_images) == 0:
        raise ValueError("source_images is empty")
    first = source_images[0]
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns"):
        if attr not in first:
            raise ValueError(f"source_images[0] has no {attr}")
    rows, cols = int(first.Rows), int(first.Columns)
    seen: set[str] = set()
    for i, ds in enumerate(source_images):
        if ds.get("SeriesInstanceUID") != first.SeriesInstanceUID:
            raise ValueError(f"source_images[{i}] belongs to another series than source_images[0]")
        if ds.get("StudyInstanceUID") != first.StudyInstanceUID:
            raise ValueError(f"source_images[{i}] belongs to another study than source_images[0]")
        if (int(ds.get("Rows", -1)), int(ds.get("Columns", -1))) != (rows, cols):
            raise ValueError(f"source_images[{i}] is not {rows}x{cols} like source_images[0]")
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in seen:
            raise ValueError(f"source_images[{i}] repeats SOPInstanceUID of an earlier image")
        seen.add(uid)
    return rows, cols


def check_segments(segments: Sequence[SegmentSpec]) -> None:
    """Raise ``ValueError`` unless segments are non-empty with unique labels and tracking ids."""
    if len(segments) == 0:
        raise ValueError("segments is empty")
    for s in segments:
        if not isinstance(s, SegmentSpec):
            raise TypeError(f"segments must hold SegmentSpec, got {type(s).__name__}")
    labels = [s.label for s in segments]
    if len(set(labels)) != len(labels):
        raise ValueError(f"segments repeat a label: {sorted(labels)}")
    ids = [s.tracking_id for s in segments]
    if len(set(ids)) != len(ids):
        raise ValueError(f"segments repeat a tracking_id: {sorted(ids)}")


def check_series_description(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` fits SeriesDescription (LO, at most 64 chars)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
        raise ValueError(f"series_description must be 1..64 characters without a backslash, got {value!r}")


def check_new_object(
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
) -> None:
    """What every writer of a new object checks of its arguments: the segments, the algorithm,
    the object's UIDs, series number and description."""
    check_segments(segments)
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError("algorithm must be an AlgorithmInfo")
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    if not isinstance(series_number, int) or not 0 <= series_number < 2**31:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    check_series_description(series_description)


def check_labels(labels: NDArray[np.integer[Any]], n_images: int, rows: int, cols: int) -> NDArray[np.uint8]:
    """Return ``labels`` as uint8 after checking shape ``(n_images, rows, cols)`` and range."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy array, got {type(labels).__name__}")
    if labels.shape != (n_images, rows, cols):
        raise ValueError(
            f"labels has shape {labels.shape}, expected {(n_images, rows, cols)} "
            "(one slice per source image, Rows x Columns)"
        )
    if labels.dtype != np.uint8 and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype (uint8), got {labels.dtype}")
    if labels.dtype != np.uint8 and labels.size and (int(np.min(labels)) < 0 or int(np.max(labels)) > 255):
        raise ValueError("labels values must lie in 0..255")
    return labels.astype(np.uint8, copy=False)


def label_counts(labels: NDArray[np.uint8], values: Sequence[int]) -> tuple[dict[int, int], int]:
    """Voxels equal to each of ``values``, and voxels not 0.

    One comparison per value and a nonzero count, a few MB at a time: a bincount of the whole
    label map (converted to intp) costs ten times more (it is only needed to name unknown
    values), and whole-volume temporaries three times more than these, which stay in cache.
    """
    flat = labels.reshape(-1)
    counts = dict.fromkeys(values, 0)
    nonzero = 0
    for start in range(0, flat.size, _COUNT_CHUNK):
        part = flat[start : start + _COUNT_CHUNK]
        nonzero += int(np.count_nonzero(part))
        for k in counts:
            counts[k] += int(np.count_nonzero(part == k))
    return counts, nonzero


def build_seg(
    source_images: Sequence[Dataset],
    labels: NDArray[np.integer[Any]],
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    content_creation: dt.datetime | None = None,
    seg_type: str = "BINARY",
    encoder: str = "fast",
) -> Dataset:
    """Encode ``labels`` (slice i aligned with ``source_images[i]``) as a DICOM SEG.

    ``seg_type`` is ``"BINARY"`` (Segmentation Storage) or ``"LABELMAP"`` (Label Map
    Segmentation Storage). Segments are numbered 1..K in the order of their labels, over
    the segments that have at least one voxel, whatever the type; segments without voxels
    are left out (an empty segment has no frames, and viewers handle that badly). Slices
    without any segment get no frame. Raises :class:`EmptySegmentationError` when no
    segment has a voxel, ``ValueError`` for inconsistent input.

    ``encoder`` (BINARY only; LABELMAP is always highdicom's): ``"fast"`` writes the SEG
    with :mod:`orthanc_plugin.outputs.seg_binary` where it covers the sources (single-frame images
    in a patient frame of reference; highdicom otherwise), ``"highdicom"`` with
    ``highdicom.seg.Segmentation``. Both give the same object but for the values highdicom
    makes random or takes from the clock (see :mod:`orthanc_plugin.outputs.seg_binary`).
    """
    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {', '.join(SEG_TYPES)}, got {seg_type!r}")
    if encoder not in SEG_ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(SEG_ENCODERS)}, got {encoder!r}")
    rows, cols = check_source_images(source_images)
    # The patient and study modules are copied from the first source: valid values only.
    source_images, _ = clean_sources(source_images)
    check_new_object(
        segments, algorithm, series_instance_uid, sop_instance_uid, series_number, series_description
    )
    # A single multi-frame source (an Enhanced CT/MR): one label slice per frame.
    frames = int(source_images[0].get("NumberOfFrames", 1) or 1) if len(source_images) == 1 else 1
    lab = check_labels(labels, len(source_images) * frames, rows, cols)

    by_label = {s.label: s for s in segments}
    counts, nonzero = label_counts(lab, list(by_label))
    if sum(counts.values()) != nonzero:
        every = np.bincount(lab.ravel(), minlength=256)
        unknown = sorted(int(v) for v in np.flatnonzero(every[1:]) + 1 if int(v) not in by_label)
        raise ValueError(f"labels contain values with no segment: {unknown}")
    present = [by_label[k] for k in sorted(by_label) if counts[k] > 0]
    if not present:
        raise EmptySegmentationError("no segment has any voxel in labels")

    created = content_creation or dt.datetime.now(dt.UTC).astimezone()
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm.family.to_highdicom(),
        version=algorithm.version,
        parameters=algorithm.parameters,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name,
            segmented_property_category=spec.category.to_highdicom(),
            segmented_property_type=spec.type.to_highdicom(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=segment_tracking_uid(sop_instance_uid, spec.label),
            tracking_id=spec.tracking_id,
            anatomic_regions=(
                [spec.anatomic_region.to_highdicom()] if spec.anatomic_region is not None else None
            ),
            display_color=hd.color.CIELabColor.from_rgb(*spec.color_rgb),
        )
        for number, spec in enumerate(present, start=1)
    ]
    header = seg_binary.SegHeader(
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        series_description=series_description,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=content_label(algorithm.name),
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        created=created,
    )
    equipment = [algorithm_equipment(algorithm, created)]
    seg: Dataset | None = None
    if seg_type == "BINARY" and encoder == "fast":
        sources = seg_binary.read_sources(source_images)
        if sources is not None:
            # Segment k is the voxels labelled present[k - 1].label: no renumbered copy.
            labels_in_order = [s.label for s in present]
            seg = seg_binary.encode(
                source_images, sources, lab, labels_in_order, descriptions, equipment, header
            )
    if seg is None:
        seg = _highdicom_seg(source_images, lab, present, seg_type, descriptions, equipment, header)
    # DA/TM values (the fast encoder's, read back, are strings), whichever encoder wrote it.
    seg.ContentDate = DA(created.date())
    seg.ContentTime = TM(created.time())
    return seg


def _highdicom_seg(
    source_images: Sequence[Dataset],
    lab: NDArray[np.uint8],
    present: Sequence[SegmentSpec],
    seg_type: str,
    descriptions: Sequence[hd.seg.SegmentDescription],
    equipment: Sequence[hd.ContributingEquipment],
    header: seg_binary.SegHeader,
) -> Dataset:
    """The SEG encoded by ``highdicom.seg.Segmentation`` (LABELMAP, and BINARY as the reference)."""
    # Segment numbers 1..K: highdicom's label-map input wants them for BINARY, and OHIF 3.13
    # needs them for LABELMAP too (it pairs SegmentSequence items with pixel values by
    # position), although the standard allows any numbers there. Remap only when needed.
    if [s.label for s in present] == list(range(1, len(present) + 1)):
        pixel_array = lab
    else:
        lut = np.zeros(256, dtype=np.uint8)
        for number, spec in enumerate(present, start=1):
            lut[spec.label] = number
        pixel_array = lut[lab]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        # LABELMAP: 8-bit frames, MONOCHROME2 (no palette), so that the colours stay the
        # segments' RecommendedDisplayCIELabValue as in BINARY.
        segmentation_type=hd.seg.SegmentationTypeValues(seg_type),
        segment_descriptions=descriptions,
        series_instance_uid=header.series_instance_uid,
        series_number=header.series_number,
        sop_instance_uid=header.sop_instance_uid,
        instance_number=1,
        manufacturer=header.manufacturer,
        manufacturer_model_name=header.manufacturer_model_name,
        software_versions=header.software_versions,
        device_serial_number=header.device_serial_number,
        content_description=header.content_description,
        content_label=header.content_label,
        series_description=header.series_description,
        omit_empty_frames=True,
        contributing_equipment=equipment,
    )
    if seg_type == "LABELMAP":
        # highdicom describes pixel value 0 with a "Background" item (Segment Number 0).
        # OHIF 3.13 pairs SegmentSequence items with label values by position, so with that
        # item every segment is drawn in the colour of the one before it (Lung in black) and
        # a "Background" segment is listed. Without it, dciodvfy (which checks the LABELMAP
        # rules) reports no error and highdicom reads the SEG back the same.
        seg.SegmentSequence = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != 0]
    return seg


def algorithm_equipment(algorithm: AlgorithmInfo, when: dt.datetime) -> hd.ContributingEquipment:
    """ContributingEquipmentSequence item naming the algorithm (IHE AI Results).

    Purpose of reference is (109102, DCM, "Processing Equipment"), from DICOM PS3.16
    CID 7005 "Contributing Equipment Purposes of Reference": equipment that processed
    composite instances to create new ones (see :data:`orthanc_plugin.core.codes.PROCESSING_EQUIPMENT`).
    """
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT.to_highdicom(),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_datetime=when,
        contribution_description=f"AI model {algorithm.model_name} version {algorithm.model_version}"[:1024],
    )
