"""The SR encoder as it was before its repeated parts were encoded directly (commit 30b2372 of
``orthanc_plugin/outputs/sr.py``, unchanged but for this docstring): the reference that
``tests/unit/test_outline_encoders.py`` compares the product's SR with, byte for byte. Not used by
the product."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import DataElement, Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.valuerep import DA, TM

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
    key_slice = (
        None if lab is None else _key_slice(lab, [m.segment_label for m in measurements if m.volume_ml > 0])
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    # highdicom's document constructor deep-copies and re-reads the whole content tree (about
    # 1.5 ms per image region, 1 s for a 320-slice series): each group is given to it with its
    # first image region only, and the others (see image_regions) are put back in their place
    # afterwards. The encoded document is the same.
    more_regions: list[list[Dataset]] = []
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
        group, more = _group(
            spec, m, segment_number, tracking_uid, seg, source_images, lab, algorithm_id, key_slice,
            feature_measurements(extra) if extra is not None else [],
        )  # fmt: skip
        groups.append(group)
        more_regions.append(more)
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
    _attach_regions(sr, more_regions)
    if features:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = IBSI_SCHEME
        scheme.CodingSchemeName = IBSI_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = "orthanc-ai"
        sr.CodingSchemeIdentificationSequence = [scheme]
    sr.ContentDate = DA(created.date())
    sr.ContentTime = TM(created.time())
    return sr


def _is_image_region(item: Dataset) -> bool:
    return bool(
        item.get("ValueType") == "SCOORD"
        and item.ConceptNameCodeSequence[0].CodeValue == IMAGE_REGION_CODE_VALUE
    )


def _attach_regions(sr: Dataset, more_regions: Sequence[list[Dataset]]) -> None:
    """Put each group's further image regions back after its first one."""
    (measurements,) = [
        item
        for item in sr.ContentSequence
        if item.get("ValueType") == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS_CODE_VALUE
    ]
    # The volumetric groups come first, in the order they were made; others may follow.
    groups = [item for item in measurements.ContentSequence if item.get("ValueType") == "CONTAINER"]
    if len(groups) < len(more_regions):
        raise RuntimeError(f"the report has {len(groups)} measurement groups, {len(more_regions)} were made")
    for group, regions in zip(groups[: len(more_regions)], more_regions, strict=True):
        if not regions:
            continue
        items = list(group.ContentSequence)
        first = next(i for i, item in enumerate(items) if _is_image_region(item))
        # Through the element: highdicom's own setter would re-wrap every item as a content item.
        group["ContentSequence"].value = [*items[: first + 1], *regions, *items[first + 1 :]]


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
    key_slice: int | None = None,
    extra: Sequence[hd.sr.Measurement] = (),
) -> tuple[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, list[Dataset]]:
    """The TID 1411 group of one segment, made with its first image region, and the segment's
    further image regions (to be put after that one in the encoded document)."""
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
    more: list[Dataset] = []
    segment_ref = None
    if labels is not None:
        box = label_box(labels, spec.label)
        found = None if box is None else box_regions(labels[box] == spec.label, box, source_images, key_slice)
        if found is None:
            raise ValueError(
                f"segment {spec.tracking_id!r} is in the SEG but has no voxel in labels: "
                "labels must be the label map the SEG was made from"
            )
        regions, more = [found[0]], found[1]
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
        measurements=[volume, *extra],
        qualitative_evaluations=(
            [hd.sr.QualitativeEvaluation(COVERAGE.to_highdicom(), PARTIAL_COVERAGE.to_highdicom())]
            if measurement.partial
            else None
        ),
    )
    return group, more


#: UCUM units of the radiomics features (DICOM writes UCUM with designator "UCUM").
_UCUM_MEANINGS = {"1": "no units", "mm": "millimeter", "mm2": "square millimeter", "mm3": "cubic millimeter",
                  "/mm": "per millimeter"}  # fmt: skip


def feature_measurements(features: SegmentFeatures) -> list[hd.sr.Measurement]:
    """The finite radiomics features of one segment as TID 300 measurements."""
    return [
        hd.sr.Measurement(
            name=ibsi_feature(f.id, f.name).to_highdicom(),
            value=float(f"{f.value:.6g}"),
            unit=hd.sr.CodedConcept(f.unit, "UCUM", _UCUM_MEANINGS.get(f.unit, f.unit)),
        )
        for f in features.finite()
    ]


def _key_slice(labels: NDArray[np.uint8], values: Sequence[int]) -> int | None:
    """The slice where all ``values`` are present with the largest total area, if there is one.

    Every group starts on it, so a viewer that opens each measurement on the image of its
    first region (OHIF) shows all of them together.
    """
    if not values:
        return None
    # Per-slice counts, one value at a time: np.isin on the whole label map is ten times slower.
    present = np.ones(labels.shape[0], dtype=bool)
    area = np.zeros(labels.shape[0], dtype=np.int64)
    slabs = range(0, labels.shape[0], BOX_SLAB)  # a few slices at a time: no grid-sized mask
    for v in values:
        per_slice = np.concatenate(
            [
                np.count_nonzero((labels[z : z + BOX_SLAB] == v).reshape(-1, labels[0].size), axis=1)
                for z in slabs
            ]
        )
        present &= per_slice > 0
        area += per_slice
    if not present.any():
        return None
    area[~present] = -1
    return int(np.argmax(area))


def image_regions(
    mask: NDArray[np.bool_], source_images: Sequence[Dataset], first: int | None = None
) -> tuple[hd.sr.ImageRegion, list[Dataset]] | None:
    """The largest outline of ``mask`` on every slice as SR image regions, or None if empty.

    Slice i of ``mask`` lies on ``source_images[i]``. Slice ``first`` (when the mask is on
    it), else the slice with the largest area, comes first, because OHIF shows a measurement
    on the image of its first region; the others follow in slice order. The first region is
    made by highdicom; the others are the same content items made by :func:`_region_like`
    from it (highdicom's per-item checks and conversions cost 1 ms each, 0.5 s on a
    320-slice series; a unit test compares both encodings byte for byte).
    """
    box = label_box(mask, True)
    return None if box is None else box_regions(np.asarray(mask[box], dtype=bool), box, source_images, first)


def box_regions(
    mask: NDArray[np.bool_],
    box: tuple[slice, slice, slice],
    source_images: Sequence[Dataset],
    first: int | None = None,
) -> tuple[hd.sr.ImageRegion, list[Dataset]] | None:
    """:func:`image_regions` of a mask that is the contents of ``box`` of the series' grid, the
    rest being background: the outlines are traced inside the box only (a lung is a fifth of a
    chest CT's grid) and moved to the grid's coordinates."""
    z0, r0, c0 = box[0].start, box[1].start, box[2].start
    outlines = segment_outlines(mask)
    if not outlines:
        return None
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
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
    return lead, [_region_like(lead, outlines[i], source_images[z0 + i]) for i in order]


def _region_like(lead: Dataset, outline: NDArray[np.float32], image: Dataset) -> Dataset:
    """An image region (SCOORD POLYLINE selected from ``image``) shaped like ``lead``, one made
    by ``hd.sr.ImageRegion``: the same attributes and values but the outline and the image.

    The code items are shared with ``lead`` (read-only, and written the same wherever they
    are). The outline goes in as a list of floats, which the writer packs as FL like
    highdicom's ``tolist()`` of the same float32 array.
    """
    if outline.ndim != 2 or outline.shape[1] != 2 or outline.shape[0] < 2:
        raise ValueError(f"an outline is (n >= 2, 2) (column, row) pairs, got shape {outline.shape}")
    lead_image = lead.ContentSequence[0]
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    selected = Dataset()
    selected.ReferencedSOPSequence = [ref]
    selected.RelationshipType = lead_image.RelationshipType
    selected.ValueType = lead_image.ValueType
    selected.ConceptNameCodeSequence = lead_image.ConceptNameCodeSequence
    region = Dataset()
    region.RelationshipType = lead.RelationshipType
    region.ValueType = lead.ValueType
    region.ConceptNameCodeSequence = lead.ConceptNameCodeSequence
    region.ContentSequence = [selected]
    region.add(DataElement(GRAPHIC_DATA, "FL", outline.ravel().tolist(), already_converted=True))
    region.GraphicType = lead.GraphicType
    return region


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
    outlines = _simplify_loops([graph.corners(e) for e in chosen.values()], max_points)
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
        successor = self.successor
        order = [edge]
        e = successor[edge]
        while e != edge:
            order.append(e)
            e = successor[e]
        walk = np.asarray(order, dtype=np.int64)
        x, y = self._xy(self.end[walk[self.corner_after[walk]]])
        return np.stack([x, y], axis=1).astype(np.float64)


def _simplify_loops(
    loops: Sequence[NDArray[np.float64]], max_points: int, tolerance: float = 0.5
) -> list[NDArray[np.float64]]:
    """Douglas-Peucker on closed loops, all at once, keeping at most ``max_points`` per loop.

    Every point gets a significance: its split distance, capped by its ancestors' (so that
    "significance > t" is exactly the Douglas-Peucker result at tolerance t). A loop keeps
    its ``max_points`` most significant points above ``tolerance``. Each loop is split at
    point 0 and the point farthest from it; the result is closed (first point repeated).
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
        budget = _BudgetCut(loop_of, offsets, in_big, max_points)
        while a.size:
            live = b - a > 1
            a, b = a[live], b[live]
            if a.size == 0:
                break
            counts = b - a - 1
            # Every interior point of every live chain, vectorised across chains.
            chain = np.repeat(np.arange(a.size), counts)
            idx = a[chain] + 1 + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            pa = closed[a[chain]]
            d = closed[b[chain]] - pa
            rel = closed[idx] - pa
            length = np.hypot(d[:, 0], d[:, 1])
            cross = np.abs(d[:, 0] * rel[:, 1] - d[:, 1] * rel[:, 0])
            dist = np.where(length > 0, cross / np.maximum(length, 1e-12), np.hypot(rel[:, 0], rel[:, 1]))
            pick = _first_max_per_group(dist, chain)
            best, best_dist = idx[pick], dist[pick]
            # Neither a point below the tolerance nor one below its loop's budget so far is
            # ever kept, and significance only falls down the tree: stop those chains.
            cut = budget.cut(significance)
            split = best_dist > np.maximum(tolerance, cut[loop_of[a]])
            a, b, best, best_dist = a[split], b[split], best[split], best_dist[split]
            significance[best] = np.minimum(best_dist, np.minimum(significance[a], significance[b]))
            a, b = np.concatenate([a, best]), np.concatenate([best, b])

    # Keep each loop's max_points most significant points above the tolerance.
    order = np.lexsort((-significance, loop_of))
    rank = np.empty(len(closed), dtype=np.int64)
    rank[order] = np.arange(len(closed)) - offsets[loop_of[order]]
    keep = (significance > tolerance) & (rank < max_points)
    return [closed[o : o + s + 1][keep[o : o + s + 1]] for o, s in zip(offsets, sizes, strict=True)]


def _first_max_per_group(values: NDArray[np.float64], group: NDArray[np.int64]) -> NDArray[np.int64]:
    """Index of the first maximum of ``values`` in each run of equal, sorted ``group`` ids."""
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    peak = np.maximum.reduceat(values, starts)
    hits = np.flatnonzero(values == np.repeat(peak, np.diff(np.r_[starts, values.size])))
    first: NDArray[np.int64] = hits[np.r_[True, np.diff(group[hits]) != 0]]
    return first


class _BudgetCut:
    """Per loop, the ``max_points``-th largest significance among the points of the big loops
    found so far (0 while fewer): a table of one row per loop, partitioned at every call."""

    def __init__(
        self,
        loop_of: NDArray[np.int64],
        offsets: NDArray[np.int64],
        points: NDArray[np.int64],
        max_points: int,
    ) -> None:
        self.points = points
        self.loops, self.row = np.unique(loop_of[points], return_inverse=True)
        self.col = points - offsets[loop_of[points]]
        self.table = np.full((self.loops.size, int(np.max(self.col)) + 1), -1.0)
        self.kth = self.table.shape[1] - max_points  # ascending position of the max_points-th largest
        self.n_loops = int(loop_of[-1]) + 1

    def cut(self, significance: NDArray[np.float64]) -> NDArray[np.float64]:
        self.table[self.row, self.col] = significance[self.points]
        cut = np.zeros(self.n_loops)
        if self.kth >= 0:
            cut[self.loops] = np.maximum(np.partition(self.table, self.kth, axis=1)[:, self.kth], 0.0)
        return cut


def assessed_region(
    labels: NDArray[np.uint8], source_images: Sequence[Dataset], key_slice: int | None
) -> hd.sr.ImageRegion | None:
    """A rectangle around everything segmented on the key slice (or the fullest slice): where a
    whole-organ classification is shown. Viewers such as OHIF place every measurement group on
    an image region and fail on a group that has none."""
    # A few slices at a time: count_nonzero over an axis makes a boolean copy of what it counts.
    per_slice = np.concatenate(
        [
            np.count_nonzero(labels[z : z + BOX_SLAB].reshape(-1, labels[0].size), axis=1)
            for z in range(0, labels.shape[0], BOX_SLAB)
        ]
    )
    if not per_slice.any():
        return None
    k = key_slice if key_slice is not None and per_slice[key_slice] > 0 else int(np.argmax(per_slice))
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
