"""SEG + volumes -> Comprehensive 3D SR, TID 1500 "Imaging Measurement Report".

One TID 1411 "Volumetric ROI Measurements" group per segment carries the segment's
tracking identifier (the same UID as in the SEG), finding type/site, the algorithm and
its volume in ml.

Why the ROI is given as image regions rather than as a reference to the SEG segment:
TID 1411 takes exactly one kind of ROI reference (highdicom enforces it, and rejects
groups that mix them when reading), and OHIF 3.13 crashes on a group whose only ROI is
a segment reference, while it displays groups made of per-slice SCOORD outlines. So the
ROI is the outer outline of the segment on each slice (closed POLYLINE in pixel
coordinates), and the SEG segment is still referenced explicitly: as the "Source of
Measurement" (INFERRED FROM) of the volume, with its Referenced Segment Number, and in
the evidence of the document. Without a label map the group falls back to the standard
segment reference (TID 1411 "Referenced Segment"), which other viewers read.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.valuerep import DA, DS, TM

from orthanc_plugin.core.codes import (
    ABSENT,
    COVERAGE,
    IBSI_SCHEME,
    IBSI_SCHEME_NAME,
    IMAGING_MEASUREMENT_REPORT,
    IMAGING_PROCEDURE,
    MILLILITER_DICOM,
    NO_UNITS,
    PARTIAL_COVERAGE,
    PRESENT,
    PROBABILITY,
    PROCEDURES_BY_MODALITY,
    THRESHOLD_VALUE,
    VOLUME,
    Code,
    ibsi_feature,
)
from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    SegmentFeatures,
    SegmentSpec,
    VolumeMeasurement,
)
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.imaging.postprocess import BOX_SLAB, label_box
from orthanc_plugin.outputs import explicit_vr
from orthanc_plugin.outputs.seg import (
    SEG_SOP_CLASS_UIDS,
    algorithm_equipment,
    check_labels,
    check_new_object,
    check_source_images,
)
from orthanc_plugin.outputs.source_attributes import clean_sources

#: Most vertices one outline may have (first == last included).
MAX_POLYGON_POINTS = 64

# Concept names (DCM) of the items the report is searched for: "Image Region", "Imaging Measurements".
IMAGE_REGION_CODE_VALUE = "111030"
IMAGING_MEASUREMENTS_CODE_VALUE = "126010"
GRAPHIC_DATA = 0x00700022
CONTENT_SEQUENCE = 0x0040A730

# Language of the content (TID 1204), RFC 5646 tag as in DICOM CID 5000.
_ENGLISH_US = hd.sr.CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)


def device_observer_uid(algorithm: AlgorithmInfo) -> str:
    """Device Observer UID of the algorithm: stable for one algorithm and model version."""
    identity = (
        algorithm.manufacturer,
        algorithm.name,
        algorithm.version,
        algorithm.model_name,
        algorithm.model_version,
    )
    return derived_uid("\x1f".join(identity), "device-observer")


def build_sr(
    source_images: Sequence[Dataset],
    seg: Dataset,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    labels: NDArray[np.integer[Any]] | None = None,
    *,
    content_creation: dt.datetime | None = None,
    procedure_reported: Code | None = None,
    classifications: Sequence[ClassificationResult] = (),
    features: Sequence[SegmentFeatures] = (),
) -> Dataset:
    """Build the TID 1500 measurement report for ``seg`` (made by :func:`~.seg.build_seg`).

    ``labels`` is the label map the SEG was made from; with it every group gets per-slice
    outlines (what OHIF needs to display it). A measurement whose segment is not in the
    SEG is left out when its volume is 0 and is an error otherwise. ``features`` (radiomics,
    per segment) become further measurements of the segment's group, named in the private
    scheme ``99IBSI`` (declared in the document's Coding Scheme Identification).
    """
    rows, cols = check_source_images(source_images)
    # The patient and study modules are copied from the first source: valid values only.
    source_images, _ = clean_sources(source_images)
    check_new_object(
        segments, algorithm, series_instance_uid, sop_instance_uid, series_number, series_description
    )
    in_seg = _seg_segments(seg, source_images[0])
    lab = None if labels is None else check_labels(labels, len(source_images), rows, cols)

    by_label = {s.label: s for s in segments}
    seen: set[int] = set()
    for m in measurements:
        if not isinstance(m, VolumeMeasurement):
            raise TypeError(f"measurements must hold VolumeMeasurement, got {type(m).__name__}")
        if m.segment_label not in by_label:
            raise ValueError(f"measurement for label {m.segment_label} has no segment")
        if m.segment_label in seen:
            raise ValueError(f"two measurements for label {m.segment_label}")
        seen.add(m.segment_label)
    features_by_label = {f.segment_label: f for f in features}

    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in algorithm.parameters.items()],
    )
    # Each segment's box and voxels per slice, found once: for the slice the groups start on
    # and for tracing the segment's outlines inside its box.
    slices = (
        {} if lab is None else {m.segment_label: _label_slices(lab, m.segment_label) for m in measurements}
    )
    key_slice = (
        None
        if lab is None
        else _key_slice_of([slices[m.segment_label][1] for m in measurements if m.volume_ml > 0])
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    # highdicom's document constructor deep-copies and re-reads the whole content tree (about
    # 1.5 ms per image region, 1 s for a 320-slice series): each group is given to it with its
    # first image region and its volume only; the further regions (see image_regions) and the
    # radiomics features are put in their place afterwards (_attach), already encoded. The
    # encoded document is the same.
    more: list[_Splice] = []
    for m in sorted(measurements, key=lambda m: m.segment_label):
        spec = by_label[m.segment_label]
        found = in_seg.get(spec.tracking_id)
        if found is None:
            if m.volume_ml > 0:
                raise ValueError(
                    f"segment {spec.tracking_id!r} has volume {m.volume_ml} ml but is not in the SEG"
                )
            continue
        segment_number, tracking_uid = found
        extra = features_by_label.get(spec.label)
        box = None if lab is None else slices[spec.label][0]
        group, lead, regions = _group(
            spec, m, segment_number, tracking_uid, seg, source_images, lab, algorithm_id, key_slice, box
        )  # fmt: skip
        groups.append(group)
        more.append((lead, regions, extra))
    if not groups:
        raise ValueError("nothing to report: no measurement refers to a segment of the SEG")
    # Only classifications are shown on it (no 84 MB count over a 320-slice label map otherwise).
    assessed = None if lab is None or not classifications else assessed_region(lab, source_images, key_slice)
    for c in classifications:
        groups.append(classification_group(c, algorithm, assessed))

    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model_name,
        ),
    )
    if procedure_reported is None:
        modality = str(source_images[0].get("Modality", ""))
        procedure_reported = PROCEDURES_BY_MODALITY.get(modality, IMAGING_PROCEDURE)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported.to_highdicom(),
        imaging_measurements=groups,
        title=IMAGING_MEASUREMENT_REPORT.to_highdicom(),
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH_US),
    )
    created = content_creation or dt.datetime.now(dt.UTC).astimezone()
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, seg],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,  # PreliminaryFlag PRELIMINARY: nobody has read it yet
        is_verified=False,  # VerificationFlag UNVERIFIED
        series_description=series_description,
        contributing_equipment=[algorithm_equipment(algorithm, created)],
    )
    explicit_vr.resolve_ambiguous_vrs(sr)
    _attach(sr, more)
    if features:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = IBSI_SCHEME
        scheme.CodingSchemeName = IBSI_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = "orthanc-ai"
        sr.CodingSchemeIdentificationSequence = [scheme]
    sr.ContentDate = DA(created.date())
    sr.ContentTime = TM(created.time())
    explicit_vr.mark_as_written(sr)
    return sr


def _is_image_region(item: Dataset) -> bool:
    return bool(
        item.get("ValueType") == "SCOORD"
        and item.ConceptNameCodeSequence[0].CodeValue == IMAGE_REGION_CODE_VALUE
    )


#: What :func:`_attach` adds to a volumetric group: its first image region, the further
#: outlines with their images, and the segment's radiomics features.
_Splice = tuple[hd.sr.ImageRegion | None, list[tuple[NDArray[np.float32], Dataset]], SegmentFeatures | None]


def _attach(
    sr: Dataset,
    more: Sequence[_Splice],
) -> None:
    """Put each volumetric group's further image regions after its first one and its radiomics
    features after its volume, all encoded as the writer would: the group's content is kept as
    bytes (explicit_vr.raw_sequence), thousands of items that the writer then only copies."""
    (measurements,) = [
        item
        for item in sr.ContentSequence
        if item.get("ValueType") == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS_CODE_VALUE
    ]
    # The volumetric groups come first, in the order they were made; others may follow.
    groups = [item for item in measurements.ContentSequence if item.get("ValueType") == "CONTAINER"]
    if len(groups) < len(more):
        raise RuntimeError(f"the report has {len(groups)} measurement groups, {len(more)} were made")
    charset = sr.get("SpecificCharacterSet")
    for group, (lead, regions, features) in zip(groups[: len(more)], more, strict=True):
        if not regions and (features is None or not features.finite()):
            continue
        items = list(group.ContentSequence)
        encoded = explicit_vr.encoded_items(items, charset)
        # What follows which item: the volume (the group's only measurement so far) is followed
        # by the features, the first image region by the others.
        after: dict[int, list[bytes]] = {}
        if features is not None and features.finite():
            volume = max(i for i, item in enumerate(items) if item.get("ValueType") == "NUM")
            after[volume] = _feature_items(features, charset)
        if regions:
            if lead is None:
                raise RuntimeError("further image regions without a first one")
            first = next(i for i, item in enumerate(items) if _is_image_region(item))
            encoder = _RegionEncoder(lead, charset)
            after[first] = [encoder.encode(outline, image) for outline, image in regions]
        parts = [part for i, own in enumerate(encoded) for part in (own, *after.get(i, ()))]
        explicit_vr.raw_sequence(group, CONTENT_SEQUENCE, parts)


def _seg_segments(seg: Dataset, source: Dataset) -> dict[str, tuple[int, str]]:
    """Map TrackingID -> (SegmentNumber, TrackingUID) after checking ``seg`` belongs to ``source``."""
    if seg.get("SOPClassUID") not in SEG_SOP_CLASS_UIDS.values():
        raise ValueError("seg is not a Segmentation Storage or Label Map Segmentation Storage instance")
    for attr in ("SOPInstanceUID", "SegmentSequence"):
        if attr not in seg:
            raise ValueError(f"seg has no {attr}")
    if seg.get("StudyInstanceUID") != source.StudyInstanceUID:
        raise ValueError("seg belongs to another study than source_images")
    referenced = {item.get("SeriesInstanceUID") for item in seg.get("ReferencedSeriesSequence", [])}
    if source.SeriesInstanceUID not in referenced:
        raise ValueError("seg does not reference the series of source_images")
    out: dict[str, tuple[int, str]] = {}
    for item in seg.SegmentSequence:
        tracking_id, tracking_uid = item.get("TrackingID"), item.get("TrackingUID")
        if not tracking_id or not tracking_uid:
            raise ValueError(f"seg segment {item.SegmentNumber} has no TrackingID/TrackingUID")
        out[str(tracking_id)] = (int(item.SegmentNumber), str(tracking_uid))
    return out


def _group(
    spec: SegmentSpec,
    measurement: VolumeMeasurement,
    segment_number: int,
    tracking_uid: str,
    seg: Dataset,
    source_images: Sequence[Dataset],
    labels: NDArray[np.uint8] | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
    key_slice: int | None,
    box: tuple[slice, slice, slice] | None,
) -> tuple[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
    hd.sr.ImageRegion | None,
    list[tuple[NDArray[np.float32], Dataset]],
]:
    """The TID 1411 group of one segment, made with its first image region and its volume
    only; that region and the segment's further outlines with their images (to be put after
    it in the encoded document). ``box`` is the segment's box in ``labels``."""
    source_of_measurement = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=seg.SOPClassUID,
        referenced_sop_instance_uid=seg.SOPInstanceUID,
    )
    # An IMAGE content item may name one segment of a SEG (Referenced Segment Number in
    # PS3.3 Table 10-3 "Image SOP Instance Reference Macro"). dciodvfy (2026-09) still counts
    # only Segmentation Storage as a segmentation there, so for a Label Map SEG the segment is
    # identified by its tracking UID alone, which the SEG's segment description carries too.
    if seg.SOPClassUID == SEG_SOP_CLASS_UIDS["BINARY"]:
        source_of_measurement.ReferencedSOPSequence[0].ReferencedSegmentNumber = segment_number
    volume = hd.sr.Measurement(
        name=VOLUME.to_highdicom(),
        value=measurement.volume_ml,
        unit=MILLILITER_DICOM.to_highdicom(),
        referenced_images=[source_of_measurement],
    )
    regions = None
    lead = None
    more: list[tuple[NDArray[np.float32], Dataset]] = []
    segment_ref = None
    if labels is not None:
        found = None if box is None else box_regions(labels[box] == spec.label, box, source_images, key_slice)
        if found is None:
            raise ValueError(
                f"segment {spec.tracking_id!r} is in the SEG but has no voxel in labels: "
                "labels must be the label map the SEG was made from"
            )
        lead, more = found
        regions = [lead]
    else:
        segment_ref = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID),
        )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=spec.tracking_id),
        referenced_regions=regions,
        referenced_segment=segment_ref,
        finding_type=spec.type.to_highdicom(),
        finding_category=spec.category.to_highdicom(),
        finding_sites=(
            [hd.sr.FindingSite(spec.anatomic_region.to_highdicom())]
            if spec.anatomic_region is not None
            else None
        ),
        algorithm_id=algorithm_id,
        measurements=[volume],
        qualitative_evaluations=(
            [hd.sr.QualitativeEvaluation(COVERAGE.to_highdicom(), PARTIAL_COVERAGE.to_highdicom())]
            if measurement.partial
            else None
        ),
    )
    return group, lead, more


#: UCUM units of the radiomics features (DICOM writes UCUM with designator "UCUM").
_UCUM_MEANINGS = {"1": "no units", "mm": "millimeter", "mm2": "square millimeter", "mm3": "cubic millimeter",
                  "/mm": "per millimeter"}  # fmt: skip


def _label_slices(
    labels: NDArray[np.uint8], value: int
) -> tuple[tuple[slice, slice, slice] | None, NDArray[np.int64]]:
    """The box of ``value`` in ``labels`` (None when it has no voxel) and its voxels per slice,
    counted inside the box only (no grid-sized mask)."""
    per_slice = np.zeros(labels.shape[0], dtype=np.int64)
    box = label_box(labels, value)
    if box is not None:
        inside = labels[box] == value
        per_slice[box[0]] = np.count_nonzero(inside.reshape(inside.shape[0], -1), axis=1)
    return box, per_slice


def _feature_items(features: SegmentFeatures, character_set: str | list[str] | None) -> list[bytes]:
    """The finite radiomics features of one segment as TID 300 measurements: the content items
    (NUM, CONTAINS) that ``hd.sr.Measurement`` makes for each, named in the private scheme
    ``99IBSI``, with its value to 6 significant digits and its UCUM unit, encoded in the bytes
    the writer writes for them. Each feature's concept name and unit are encoded once (they are
    the same in every report); the value as highdicom hands it to the writer (NumericValue
    ``DS(value, auto_format=True)``, FloatingPointValue the float)."""
    charset = (
        character_set if character_set is None or isinstance(character_set, str) else tuple(character_set)
    )
    out = []
    for f in features.finite():
        value = float(f"{f.value:.6g}")
        head, units = _feature_parts(f.id, f.name, f.unit, charset)
        number = DS(value, auto_format=True)
        text = str(getattr(number, "original_string", number))  # what the writer writes
        measured = explicit_vr.item(
            units
            + explicit_vr.element(0x0040A161, b"FD", struct.pack("<d", value))  # FloatingPointValue
            + explicit_vr.element(0x0040A30A, b"DS", explicit_vr.text(text))  # NumericValue
        )
        out.append(
            explicit_vr.item(head + explicit_vr.sequence(0x0040A300, [measured]))
        )  # MeasuredValueSequence
    return out


@functools.lru_cache(maxsize=4096)
def _feature_parts(
    feature_id: str, name: str, unit: str, character_set: str | tuple[str, ...] | None
) -> tuple[bytes, bytes]:
    """A feature's NUM item up to its Measured Value Sequence (relationship, value type,
    concept name), and its MeasurementUnitsCodeSequence, encoded."""
    item = hd.sr.NumContentItem(
        name=ibsi_feature(feature_id, name).to_highdicom(),
        value=0.0,
        unit=_ucum(unit),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    head = Dataset()
    head.RelationshipType = item.RelationshipType
    head.ValueType = item.ValueType
    head.ConceptNameCodeSequence = item.ConceptNameCodeSequence
    units = Dataset()
    units.MeasurementUnitsCodeSequence = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    charset = list(character_set) if isinstance(character_set, tuple) else character_set
    return _elements(head, charset), _elements(units, charset)


def _ucum(unit: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(unit, "UCUM", _UCUM_MEANINGS.get(unit, unit))


def _key_slice(labels: NDArray[np.uint8], values: Sequence[int]) -> int | None:
    """The slice where all ``values`` are present with the largest total area, if there is one.

    Every group starts on it, so a viewer that opens each measurement on the image of its
    first region (OHIF) shows all of them together.
    """
    return _key_slice_of([_label_slices(labels, v)[1] for v in values])


def _key_slice_of(per_slice: Sequence[NDArray[np.int64]]) -> int | None:
    """:func:`_key_slice` from each value's voxels per slice."""
    if not per_slice:
        return None
    present = np.ones(per_slice[0].shape[0], dtype=bool)
    area = np.zeros(per_slice[0].shape[0], dtype=np.int64)
    for counts in per_slice:
        present &= counts > 0
        area += counts
    if not present.any():
        return None
    area[~present] = -1
    return int(np.argmax(area))


def image_regions(
    mask: NDArray[np.bool_], source_images: Sequence[Dataset], first: int | None = None
) -> tuple[hd.sr.ImageRegion, list[tuple[NDArray[np.float32], Dataset]]] | None:
    """The largest outline of ``mask`` on every slice as SR image regions, or None if empty.

    Slice i of ``mask`` lies on ``source_images[i]``. Slice ``first`` (when the mask is on
    it), else the slice with the largest area, comes first, because OHIF shows a measurement
    on the image of its first region; the others follow in slice order. The first region is
    made by highdicom; the others are given as (outline, image) pairs, which
    :class:`_RegionEncoder` encodes as the same content items directly (highdicom's per-item
    checks and conversions cost 1 ms each, 0.5 s on a 320-slice series; a unit test compares
    both encodings byte for byte).
    """
    box = label_box(mask, True)
    return None if box is None else box_regions(np.asarray(mask[box], dtype=bool), box, source_images, first)


def box_regions(
    mask: NDArray[np.bool_],
    box: tuple[slice, slice, slice],
    source_images: Sequence[Dataset],
    first: int | None = None,
) -> tuple[hd.sr.ImageRegion, list[tuple[NDArray[np.float32], Dataset]]] | None:
    """:func:`image_regions` of a mask that is the contents of ``box`` of the series' grid, the
    rest being background: the outlines are traced inside the box only (a lung is a fifth of a
    chest CT's grid) and moved to the grid's coordinates."""
    z0, r0, c0 = box[0].start, box[1].start, box[2].start
    outlines = segment_outlines(mask)
    if not outlines:
        return None
    area = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    order = sorted(outlines)
    biggest = max(order, key=lambda i: int(area[i]))
    if first is not None and (first - z0) in outlines:
        biggest = first - z0
    order.remove(biggest)
    for outline in outlines.values():
        outline[:, 0] += c0
        outline[:, 1] += r0
    image = source_images[z0 + biggest]
    lead = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outlines[biggest],
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
        ),
    )
    return lead, [(outlines[i], source_images[z0 + i]) for i in order]


class _RegionEncoder:
    """Image regions (SCOORD POLYLINE selected from an image) shaped like ``lead``, one made by
    ``hd.sr.ImageRegion``, encoded as items of the content sequence: the same attributes and
    values but the outline and the image, in the bytes the writer writes for them.

    What is the same in every region (the lead's relationship, value type, concept names and
    graphic type) is encoded once by pydicom, in the document's character set; the image
    reference and the outline (FL, the float32 values as highdicom's ``tolist()`` gives them
    to the writer) are added per region.
    """

    def __init__(self, lead: Dataset, character_set: str | list[str] | None) -> None:
        lead_image = lead.ContentSequence[0]
        region = Dataset()
        region.RelationshipType = lead.RelationshipType
        region.ValueType = lead.ValueType
        region.ConceptNameCodeSequence = lead.ConceptNameCodeSequence
        selected = Dataset()
        selected.RelationshipType = lead_image.RelationshipType
        selected.ValueType = lead_image.ValueType
        selected.ConceptNameCodeSequence = lead_image.ConceptNameCodeSequence
        graphic_type = Dataset()
        graphic_type.GraphicType = lead.GraphicType
        # Element order: RelationshipType, ValueType, ConceptNameCodeSequence (0040,A0xx), then
        # ContentSequence (0040,A730), GraphicData (0070,0022), GraphicType (0070,0023); in the
        # selected image item ReferencedSOPSequence (0008,1199) comes before the rest.
        self.head, self.selected_tail, self.tail = (
            _elements(ds, character_set) for ds in (region, selected, graphic_type)
        )

    def encode(self, outline: NDArray[np.float32], image: Dataset) -> bytes:
        if outline.ndim != 2 or outline.shape[1] != 2 or outline.shape[0] < 2:
            raise ValueError(f"an outline is (n >= 2, 2) (column, row) pairs, got shape {outline.shape}")
        reference = explicit_vr.item(
            explicit_vr.element(0x00081150, b"UI", explicit_vr.uid(str(image.SOPClassUID)))
            + explicit_vr.element(0x00081155, b"UI", explicit_vr.uid(str(image.SOPInstanceUID)))
        )
        selected = explicit_vr.item(explicit_vr.sequence(0x00081199, [reference]) + self.selected_tail)
        return explicit_vr.item(
            self.head
            + explicit_vr.sequence(CONTENT_SEQUENCE, [selected])
            + explicit_vr.element(GRAPHIC_DATA, b"FL", np.asarray(outline, dtype="<f4").tobytes())
            + self.tail
        )


def _elements(ds: Dataset, character_set: str | list[str] | None) -> bytes:
    """The elements of ``ds`` as the writer encodes them inside a document in ``character_set``."""
    (encoded,) = explicit_vr.encoded_items([ds], character_set)
    return encoded[8:]  # without the item tag and length


def segment_outlines(
    mask: NDArray[np.bool_], max_points: int = MAX_POLYGON_POINTS
) -> dict[int, NDArray[np.float32]]:
    """The largest outline on every slice of a 3D mask (slice, row, column).

    Returns ``{slice index: outline}``. An outline is the outer boundary of a 4-connected
    component (holes ignored) as an ``(n, 2)`` array of (column, row) coordinates on pixel
    corners (DICOM SCOORD convention: (0, 0) is the top left corner of the top left pixel),
    closed (first point == last) and simplified to at most ``max_points`` points. "Largest"
    is by enclosed area. All slices are done in one vectorised pass.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (slice, row, column), got shape {mask.shape}")
    graph = _CrackGraph(np.asarray(mask, dtype=bool))
    chosen = graph.largest_outer_loops()
    points, counts = graph.walks(list(chosen.values()))
    outlines = _simplify_loops(np.split(points, np.cumsum(counts)[:-1]) if counts.size else [], max_points)
    return {z: o.astype(np.float32) for z, o in zip(chosen, outlines, strict=True)}


class _CrackGraph:
    """The pixel edges ("cracks") between object and background of a stack of 2D masks.

    An edge is a (pixel, side) pair of an object pixel whose neighbour on that side is
    background. Edges are directed clockwise on screen (object on their right), so each
    edge's successor follows from the two pixels ahead of its end: turn right if the one
    beside the pixel is background, else go straight if the one diagonal to it is
    background, else turn left. Turning right where two object pixels meet only at a
    corner keeps 4-connected components apart: the boundary then splits into loops, one
    around the outside of each 4-connected component (positive area) and one inside each
    hole (negative area).
    """

    def __init__(self, mask: NDArray[np.bool_]) -> None:
        z_, h, w = mask.shape[0], mask.shape[1] + 2, mask.shape[2] + 2
        m = np.zeros((z_, h, w), dtype=bool)  # a background frame around every slice
        m[:, 1:-1, 1:-1] = mask
        core = m[:, 1:-1, 1:-1]
        # Boundary pixels: object pixels with a background neighbour (in place: one mask-sized
        # temporary however long the series is).
        boundary = np.logical_and(core, m[:, :-2, 1:-1])
        boundary &= m[:, 2:, 1:-1]
        boundary &= m[:, 1:-1, :-2]
        boundary &= m[:, 1:-1, 2:]
        np.logical_not(boundary, out=boundary)
        boundary &= core
        # As flat indices (flatnonzero is much faster than 3D nonzero), then moved into the
        # framed stack: ascending either way.
        q = np.flatnonzero(boundary)
        del boundary
        rows, cols = mask.shape[1], mask.shape[2]
        z, rc = np.divmod(q, rows * cols)
        r, c = np.divmod(rc, cols)
        flat = m.ravel()
        pixel = (z * h + r + 1) * w + c + 1
        n_pixels = flat.size
        self.plane = h * w
        self.width = w

        # Per side (top, right, bottom, left): the neighbour across it, the pixel beside
        # and diagonal to the edge's end, and the end vertex as (row, col) offsets.
        up, down, left, right = -w, w, -1, 1
        sides = (
            (up, right, right + up, (0, 1)),
            (right, down, down + right, (1, 1)),
            (down, left, left + down, (1, 0)),
            (left, up, up + left, (0, 0)),
        )
        ids, nexts, corner, ends = [], [], [], []
        for s, (across, beside, diagonal, (er, ec)) in enumerate(sides):
            p = pixel[~flat[pixel + across]]
            b = flat[p + beside]
            a = flat[p + diagonal]
            ids.append(s * n_pixels + p)
            # Right turn: same pixel, next side. Straight: the pixel beside, same side.
            # Left turn: the diagonal pixel, previous side.
            nexts.append(
                np.where(
                    ~b,
                    ((s + 1) % 4) * n_pixels + p,
                    np.where(~a, s * n_pixels + p + beside, ((s + 3) % 4) * n_pixels + p + diagonal),
                )
            )
            corner.append(~(b & ~a))
            ends.append(p + er * w + ec)  # end vertex, as the flat index of the pixel below-right of it
        edge_id = np.concatenate(ids)  # ascending: sides in order, pixels ascending within
        self.next = np.searchsorted(edge_id, np.concatenate(nexts))
        self.corner_after = np.concatenate(corner)
        self.end = np.concatenate(ends)
        self.slice_of = edge_id % n_pixels // self.plane
        self.successor: list[int] = self.next.tolist()  # plain list: the walk is a Python loop

    def _xy(self, vertex: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(x, y) of vertices in unframed pixel-corner coordinates."""
        in_plane = vertex % self.plane
        return in_plane % self.width - 1, in_plane // self.width - 1

    def largest_outer_loops(self) -> dict[int, int]:
        """``{slice: an edge of the slice's outer loop with the largest area}``."""
        roots, area = self.loops()
        roots = roots[area[roots] > 0]
        if roots.size == 0:
            return {}
        by = roots[np.lexsort((-area[roots], self.slice_of[roots]))]
        best = by[np.r_[True, np.diff(self.slice_of[by]) != 0]]
        return {int(self.slice_of[e]): int(e) for e in best}

    def loops(self) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Every loop, as (an edge of it, by slice; twice its signed area, indexed by edge).

        Outer boundaries have a positive area, hole boundaries a negative one.
        """
        n = self.next.size
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        # Label loops by their smallest edge id, by pointer jumping: after k rounds an edge
        # has seen the 2**k edges that follow it, and no loop is longer than its slice.
        edges_per_slice = np.bincount(self.slice_of)
        loop = np.arange(n)
        jump = self.next
        span = 1
        while span < int(np.max(edges_per_slice)):
            loop = np.minimum(loop, loop[jump])
            jump = jump[jump]
            span *= 2
        # Twice the signed area (shoelace) per loop, from each edge's end and its
        # successor's end; outer loops are positive.
        x0, y0 = self._xy(self.end)
        x1, y1 = x0[self.next], y0[self.next]
        area: NDArray[np.float64] = np.bincount(
            loop, weights=(x0 * y1 - x1 * y0).astype(np.float64), minlength=n
        ).astype(np.float64)
        roots: NDArray[np.int64] = np.flatnonzero(loop == np.arange(n)).astype(np.int64)
        return roots, area

    def corners(self, edge: int) -> NDArray[np.float64]:
        """Corner points (x, y) of the loop through ``edge``, in walking order."""
        points, _ = self.walks([edge])
        return points

    def walks(self, edges: Sequence[int]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """:meth:`corners` of the loops through ``edges``, one after the other, and how many
        each has: the loops walked in one Python loop, their corners picked in one pass."""
        successor = self.successor
        order: list[int] = []
        sizes = []
        for edge in edges:
            start = len(order)
            order.append(edge)
            e = successor[edge]
            while e != edge:
                order.append(e)
                e = successor[e]
            sizes.append(len(order) - start)
        walk = np.asarray(order, dtype=np.int64)
        corner = self.corner_after[walk]
        x, y = self._xy(self.end[walk[corner]])
        loop = np.repeat(np.arange(len(sizes)), sizes)
        counts: NDArray[np.int64] = np.bincount(loop[corner], minlength=len(sizes)).astype(np.int64)
        return np.stack([x, y], axis=1).astype(np.float64), counts


def _simplify_loops(
    loops: Sequence[NDArray[np.float64]], max_points: int, tolerance: float = 0.5
) -> list[NDArray[np.float64]]:
    """Douglas-Peucker on closed loops, all at once, keeping at most ``max_points`` per loop.

    Every point gets a significance: its split distance, capped by its ancestors' (so that
    "significance > t" is exactly the Douglas-Peucker result at tolerance t). A loop keeps
    its ``max_points`` most significant points above ``tolerance``. Each loop is split at
    point 0 and the point farthest from it; the result is closed (first point repeated).

    The points are pixel corners (whole numbers): the farthest point from a chord is then the
    one with the largest cross product with it (an exact whole number; dividing by the
    chord's length keeps the order and the ties), so the distance is computed for the
    farthest point of each chord only.
    """
    if not loops:
        return []
    # A long pixel outline is first thinned to every k-th corner (down to 8-16 corners per
    # output point): the result is bound by the point budget, not by single pixel steps,
    # and the search below costs in proportion to the points it starts from.
    loops = [p[:: max(1, len(p) // (8 * max_points))] for p in loops]
    sizes = np.array([len(p) for p in loops], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    closed = np.concatenate([np.vstack([p, p[:1]]) for p in loops])
    if not np.array_equal(closed, np.round(closed)):
        raise ValueError("the outline's points must be pixel corners (whole numbers)")
    x, y = np.ascontiguousarray(closed[:, 0]), np.ascontiguousarray(closed[:, 1])
    loop_of = np.repeat(np.arange(len(loops)), sizes + 1)
    significance = np.full(len(closed), -1.0)
    small = sizes + 1 <= max_points
    significance[small[loop_of]] = np.inf

    big = np.flatnonzero(~small)
    if big.size:
        in_big = np.flatnonzero(~small[loop_of])
        d2 = ((closed[in_big] - closed[offsets[loop_of[in_big]]]) ** 2).sum(axis=1)
        far = in_big[_first_max_per_group(d2, loop_of[in_big])]
        first, last = offsets[big], offsets[big] + sizes[big]
        significance[np.concatenate([first, far, last])] = np.inf
        a = np.concatenate([first, far])
        b = np.concatenate([far, last])
        budget = _BudgetCut(loop_of, offsets, sizes, big, max_points)
        while a.size:
            live = b - a > 1
            a, b = a[live], b[live]
            if a.size == 0:
                break
            counts = b - a - 1
            # Every interior point of every live chain, vectorised across chains.
            chain = np.repeat(np.arange(a.size), counts)
            idx = np.arange(counts.sum()) + np.repeat(a + 1 - (np.cumsum(counts) - counts), counts)
            dx, dy = x[b] - x[a], y[b] - y[a]
            # |d x rel| = |dx (y - ya) - dy (x - xa)|, exact in whole numbers.
            cross = np.abs(
                np.repeat(dx, counts) * y[idx]
                - np.repeat(dy, counts) * x[idx]
                - np.repeat(dx * y[a] - dy * x[a], counts)
            )
            pick = _first_max_per_group(cross, chain)
            best = idx[pick]
            length = np.hypot(dx, dy)
            # A chord of length 0 (its ends on one point): the distance from that point.
            best_dist = np.where(length > 0, cross[pick] / np.maximum(length, 1e-12), 0.0)
            point = length == 0
            if point.any():
                best[point], best_dist[point] = _farthest_from_point(x, y, a[point], b[point])
            # Neither a point below the tolerance nor one below its loop's budget so far is
            # ever kept, and significance only falls down the tree: stop those chains.
            cut = budget.cut(significance)
            split = best_dist > np.maximum(tolerance, cut[loop_of[a]])
            a, b, best, best_dist = a[split], b[split], best[split], best_dist[split]
            significance[best] = np.minimum(best_dist, np.minimum(significance[a], significance[b]))
            budget.found(loop_of[best])
            a, b = np.concatenate([a, best]), np.concatenate([best, b])

    # Keep each loop's max_points most significant points above the tolerance (the others
    # are never kept: only these are ranked).
    candidates = np.flatnonzero(significance > tolerance)
    order = candidates[np.lexsort((-significance[candidates], loop_of[candidates]))]
    starts = np.searchsorted(loop_of[order], np.arange(len(loops)))
    keep = np.zeros(len(closed), dtype=bool)
    keep[order[np.arange(order.size) - starts[loop_of[order]] < max_points]] = True
    return [closed[o : o + s + 1][keep[o : o + s + 1]] for o, s in zip(offsets, sizes, strict=True)]


def _farthest_from_point(
    x: NDArray[np.float64], y: NDArray[np.float64], a: NDArray[np.int64], b: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """For chains whose ends are one point: the first interior point farthest from it, and its distance."""
    counts = b - a - 1
    chain = np.repeat(np.arange(a.size), counts)
    idx = np.arange(counts.sum()) + np.repeat(a + 1 - (np.cumsum(counts) - counts), counts)
    dist = np.hypot(x[idx] - np.repeat(x[a], counts), y[idx] - np.repeat(y[a], counts))
    pick = _first_max_per_group(dist, chain)
    return idx[pick], dist[pick]


def _first_max_per_group(values: NDArray[np.float64], group: NDArray[np.int64]) -> NDArray[np.int64]:
    """Index of the first maximum of ``values`` in each run of equal, sorted ``group`` ids."""
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    peak = np.maximum.reduceat(values, starts)
    hits = np.flatnonzero(values == np.repeat(peak, np.diff(np.r_[starts, values.size])))
    first: NDArray[np.int64] = hits[np.r_[True, np.diff(group[hits]) != 0]]
    return first


class _BudgetCut:
    """Per loop, the ``max_points``-th largest significance among the points of the big loops
    found so far (0 while fewer): by partitioning a table of one row per loop, for the loops
    that have that many points found and found more since it was last computed (a loop's
    answer changes only then)."""

    def __init__(
        self,
        loop_of: NDArray[np.int64],
        offsets: NDArray[np.int64],
        sizes: NDArray[np.int64],
        big: NDArray[np.int64],
        max_points: int,
    ) -> None:
        self.max_points = max_points
        self.big = big
        # Row r: the points of loop big[r] (first to last, closing point included), then padding
        # (index -1: a significance of -1 appended when reading).
        width = int(np.max(sizes[big])) + 1
        col = np.arange(width)
        self.points = np.where(col < sizes[big, None] + 1, offsets[big, None] + col, -1)
        self.kth = width - max_points  # ascending position of the max_points-th largest
        n_loops = int(loop_of[-1]) + 1
        self.found_in = np.zeros(n_loops, dtype=np.int64)
        self.found_in[big] = 3  # first, farthest, last (at most: they may coincide)
        self.changed = np.zeros(n_loops, dtype=bool)
        self.changed[big] = True
        self.answer = np.zeros(n_loops)

    def found(self, loops: NDArray[np.int64]) -> None:
        """Points of ``loops`` (one entry per point) got their significance."""
        np.add.at(self.found_in, loops, 1)
        self.changed[loops] = True

    def cut(self, significance: NDArray[np.float64]) -> NDArray[np.float64]:
        rows = np.flatnonzero((self.found_in[self.big] >= self.max_points) & self.changed[self.big])
        if rows.size:
            table = np.append(significance, -1.0)[self.points[rows]]
            self.answer[self.big[rows]] = np.maximum(np.partition(table, self.kth, axis=1)[:, self.kth], 0.0)
            self.changed[self.big[rows]] = False
        return self.answer


def assessed_region(
    labels: NDArray[np.uint8], source_images: Sequence[Dataset], key_slice: int | None
) -> hd.sr.ImageRegion | None:
    """A rectangle around everything segmented on the key slice (or the fullest slice): where a
    whole-organ classification is shown. Viewers such as OHIF place every measurement group on
    an image region and fail on a group that has none."""
    if key_slice is not None and labels[key_slice].any():
        k = key_slice
    else:
        # A few slices at a time: count_nonzero over an axis makes a boolean copy of what it counts.
        per_slice = np.concatenate(
            [
                np.count_nonzero(labels[z : z + BOX_SLAB].reshape(-1, labels[0].size), axis=1)
                for z in range(0, labels.shape[0], BOX_SLAB)
            ]
        )
        if not per_slice.any():
            return None
        k = int(np.argmax(per_slice))
    rows = np.flatnonzero(labels[k].any(axis=1))
    cols = np.flatnonzero(labels[k].any(axis=0))
    r0, r1 = max(0, int(rows[0]) - 2), min(labels.shape[1] - 1, int(rows[-1]) + 2)
    c0, c1 = max(0, int(cols[0]) - 2), min(labels.shape[2] - 1, int(cols[-1]) + 2)
    # SCOORD (column, row) pixel coordinates, the outline closed on its first point.
    box = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)
    image = source_images[k]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
        ),
    )


def classification_group(
    result: ClassificationResult, algorithm: AlgorithmInfo, region: hd.sr.ImageRegion | None = None
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    """The finding as a qualitative evaluation (present/absent at the operating point) with the
    model's probability and the threshold it was compared with: a TID 1410 planar ROI group on
    ``region`` (the assessed organs on the key slice), or a TID 1501 group without one."""
    if not isinstance(result, ClassificationResult):
        raise TypeError(f"classifications must hold ClassificationResult, got {type(result).__name__}")
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=f"{algorithm.name} / {result.name}"[:64],
        version=algorithm.version,
        parameters=[f"model={result.model_name}", f"model_version={result.model_version}"],
    )
    value = (PRESENT if result.positive else (result.absent or ABSENT)).to_highdicom()
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=derived_uid(f"{device_observer_uid(algorithm)}/{result.tracking_id}", "classification"),
            identifier=result.tracking_id,
        ),
        "finding_type": result.finding.to_highdicom(),
        "finding_sites": [hd.sr.FindingSite(result.finding_site.to_highdicom())]
        if result.finding_site
        else None,
        "algorithm_id": algorithm_id,
        "measurements": [
            hd.sr.Measurement(
                name=PROBABILITY.to_highdicom(),
                value=round(result.probability, 4),
                unit=NO_UNITS.to_highdicom(),
                algorithm_id=algorithm_id,
            ),
            hd.sr.Measurement(
                name=THRESHOLD_VALUE.to_highdicom(),
                value=round(result.threshold, 4),
                unit=NO_UNITS.to_highdicom(),
            ),
        ],
        "qualitative_evaluations": [hd.sr.QualitativeEvaluation(result.finding.to_highdicom(), value)],
    }
    if region is not None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
