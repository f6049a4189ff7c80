"""TID 1500 SR encoder against a real CT series, and the outline tracer it uses."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.sr.codedict import codes as dcm_codes
from scipy import ndimage

from orthanc_plugin.core.results import SegmentSpec, VolumeMeasurement
from orthanc_plugin.outputs import explicit_vr
from orthanc_plugin.outputs.sr import (
    MAX_POLYGON_POINTS,
    _key_slice,
    _RegionEncoder,
    build_sr,
    device_observer_uid,
    image_regions,
    segment_outlines,
)

from .test_seg import (
    ABNORMAL_STRUCTURE,
    ALGORITHM,
    CREATED,
    LUNG,
    NODULE,
    SEGMENTS,
    make_seg,
    run_dciodvfy,
)

Array = NDArray[Any]

VOLUMES = (VolumeMeasurement(1, 1234.56), VolumeMeasurement(2, 42.5))


def make_sr(
    ct: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    labels: Array | None,
    measurements: tuple[VolumeMeasurement, ...] = VOLUMES,
    segments: tuple[SegmentSpec, ...] = SEGMENTS,
) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom notes the source's one-component patient name
        return build_sr(
            ct,
            seg,
            segments,
            measurements,
            ALGORITHM,
            series_instance_uid="2.25.2000",
            sop_instance_uid="2.25.2001",
            series_number=902,
            series_description="AI lung report",
            labels=labels,
            content_creation=CREATED,
        )


@pytest.fixture(scope="module")
def sr(ct: list[pydicom.Dataset], seg: pydicom.Dataset, labels: Array) -> pydicom.Dataset:
    return make_sr(ct, seg, labels)


def reread(ds: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    parsed = hd.sr.srread(buffer)
    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    return parsed


def groups_by_tracking_id(
    sr: hd.sr.Comprehensive3DSR,
) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return {str(g.tracking_identifier): g for g in report.get_volumetric_roi_measurement_groups()}


def test_document_header(sr: pydicom.Dataset, ct: list[pydicom.Dataset]) -> None:
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.StudyInstanceUID == ct[0].StudyInstanceUID
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.SeriesNumber) == ("2.25.2000", "2.25.2001", 902)
    assert sr.SeriesDescription == "AI lung report"
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "126000",
        "DCM",
        "Imaging Measurement Report",
    )
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_parses_with_one_group_per_segment(sr: pydicom.Dataset, seg: pydicom.Dataset) -> None:
    groups = groups_by_tracking_id(reread(sr))
    assert sorted(groups) == ["lung", "nodule"]
    seg_tracking = {s.TrackingID: s.TrackingUID for s in seg.SegmentSequence}
    for spec, volume in zip(SEGMENTS, VOLUMES, strict=True):
        group = groups[spec.tracking_id]
        assert group.tracking_uid == seg_tracking[spec.tracking_id]  # the same ROI as in the SEG
        assert group.finding_type is not None and group.finding_type.value == spec.type.value
        assert group.finding_category is not None and group.finding_category.value == spec.category.value
        (measurement,) = group.get_measurements()
        assert measurement.name == dcm_codes.SCT.Volume
        assert measurement.value == pytest.approx(volume.volume_ml)
        assert (measurement.unit.value, measurement.unit.scheme_designator) == ("ml", "UCUM")
    sites = groups["nodule"].finding_sites
    assert [s.value.value for s in sites] == [LUNG.value]
    assert groups["lung"].finding_sites == []


def test_volume_is_inferred_from_the_seg_segment(sr: pydicom.Dataset, seg: pydicom.Dataset) -> None:
    groups = groups_by_tracking_id(reread(sr))
    numbers = {s.TrackingID: int(s.SegmentNumber) for s in seg.SegmentSequence}
    for tracking_id, group in groups.items():
        (measurement,) = group.get_measurements()
        (source,) = [i for i in measurement[0].ContentSequence if i.RelationshipType == "INFERRED FROM"]
        ref = source.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPClassUID == seg.SOPClassUID
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == numbers[tracking_id]


def test_regions_outline_each_slice(sr: pydicom.Dataset, ct: list[pydicom.Dataset], labels: Array) -> None:
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(ct)}
    groups = groups_by_tracking_id(reread(sr))
    for spec in SEGMENTS:
        group = groups[spec.tracking_id]
        assert group.reference_type == dcm_codes.DCM.ImageRegion
        regions = group.roi
        assert isinstance(regions, list)
        mask = labels == spec.label
        slices = [
            index[r.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID] for r in regions
        ]
        assert sorted(slices) == list(np.flatnonzero(mask.any(axis=(1, 2))))  # one per slice
        # OHIF opens a measurement on the image of its first region: every group starts on the
        # slice where all segments are present with the largest total area, so all show at once.
        both = (labels == 1).any(axis=(1, 2)) & (labels == 2).any(axis=(1, 2))
        total = np.where(both, (labels > 0).sum(axis=(1, 2)), -1)
        assert slices[0] == int(np.argmax(total))
        for region, i in zip(regions, slices, strict=True):
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            points = region.value
            assert 4 <= len(points) <= MAX_POLYGON_POINTS
            assert np.array_equal(points[0], points[-1])  # closed
            rows, cols = np.nonzero(mask[i])
            assert points[:, 0].min() == cols.min() and points[:, 0].max() == cols.max() + 1
            assert points[:, 1].min() == rows.min() and points[:, 1].max() == rows.max() + 1


def _encoded_item(item: pydicom.Dataset, charset: Any) -> bytes:
    (encoded,) = explicit_vr.encoded_items([item], charset)
    return encoded


def _parsed_item(encoded: bytes) -> pydicom.Dataset:
    holder = pydicom.Dataset()
    explicit_vr.raw_sequence(holder, 0x0040A730, [encoded])
    items: list[pydicom.Dataset] = list(holder.ContentSequence)  # reading the element parses the bytes
    assert len(items) == 1
    return items[0]


def test_further_regions_encode_like_highdicoms(ct: list[pydicom.Dataset], labels: Array) -> None:
    """The regions after the first are encoded without highdicom: byte for byte what pydicom
    writes for hd.sr.ImageRegion of the same outline and image, and read back the same."""
    found = image_regions(labels == 2, ct)
    assert found is not None
    lead, more = found
    assert len(more) == int((labels == 2).any(axis=(1, 2)).sum()) - 1
    rng = np.random.default_rng(7)
    outlines = [outline for outline, _ in more] + [
        rng.uniform(0, 511, size=(n, 2)).astype(np.float32) for n in (2, 3, 64)
    ]
    for charset in (ct[0].get("SpecificCharacterSet"), "ISO_IR 192", None):
        encoder = _RegionEncoder(lead, charset)
        for k, outline in enumerate(outlines):
            image = ct[k % len(ct)]
            reference = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=image.SOPClassUID,
                    referenced_sop_instance_uid=image.SOPInstanceUID,
                ),
            )
            ours = encoder.encode(outline, image)
            assert ours == _encoded_item(reference, charset)
            read = hd.sr.ImageRegion.from_dataset(_parsed_item(ours))
            assert np.array_equal(read.value, outline)
    with pytest.raises(ValueError, match="outline"):
        encoder.encode(np.zeros((1, 2), dtype=np.float32), ct[0])


def test_seg_and_sources_are_evidence(
    sr: pydicom.Dataset, seg: pydicom.Dataset, ct: list[pydicom.Dataset]
) -> None:
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    series = {s.SeriesInstanceUID: s for s in study.ReferencedSeriesSequence}
    assert {i.ReferencedSOPInstanceUID for i in series[seg.SeriesInstanceUID].ReferencedSOPSequence} == {
        seg.SOPInstanceUID
    }
    assert {i.ReferencedSOPInstanceUID for i in series[ct[0].SeriesInstanceUID].ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in ct
    }


def test_observer_and_equipment_name_the_algorithm(sr: pydicom.Dataset) -> None:
    observer = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in sr.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert device_observer_uid(ALGORITHM) == observer["Device Observer UID"].UID
    assert observer["Device Observer Name"].TextValue == "lung-seg"
    assert observer["Device Observer Manufacturer"].TextValue == "orthanc-ai"
    (ours,) = [e for e in sr.ContributingEquipmentSequence if e.get("Manufacturer") == "orthanc-ai"]
    assert (ours.ManufacturerModelName, ours.SoftwareVersions) == ("lung-seg", "1.2.0")
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_without_labels_groups_reference_the_segment(ct: list[pydicom.Dataset], seg: pydicom.Dataset) -> None:
    groups = groups_by_tracking_id(reread(make_sr(ct, seg, labels=None)))
    numbers = {s.TrackingID: int(s.SegmentNumber) for s in seg.SegmentSequence}
    for tracking_id, group in groups.items():
        assert group.reference_type == dcm_codes.DCM.ReferencedSegment
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [numbers[tracking_id]]


def test_zero_volume_without_segment_is_left_out(ct: list[pydicom.Dataset], labels: Array) -> None:
    only_lung = np.where(labels == 1, labels, 0).astype(np.uint8)
    seg = make_seg(ct, only_lung)
    sr = make_sr(ct, seg, only_lung, (VolumeMeasurement(1, 1234.56), VolumeMeasurement(2, 0.0)))
    assert sorted(groups_by_tracking_id(reread(sr))) == ["lung"]
    with pytest.raises(ValueError, match="not in the SEG"):
        make_sr(ct, seg, only_lung, (VolumeMeasurement(1, 1.0), VolumeMeasurement(2, 3.0)))


def test_bad_measurements_are_refused(ct: list[pydicom.Dataset], seg: pydicom.Dataset, labels: Array) -> None:
    with pytest.raises(ValueError, match="has no segment"):
        make_sr(ct, seg, labels, (VolumeMeasurement(9, 1.0),))
    with pytest.raises(ValueError, match="two measurements"):
        make_sr(ct, seg, labels, (VolumeMeasurement(1, 1.0), VolumeMeasurement(1, 2.0)))
    with pytest.raises(ValueError, match="shape"):
        make_sr(ct, seg, labels[:-1])
    with pytest.raises(ValueError, match="no voxel in labels"):
        make_sr(ct, seg, np.where(labels == 2, 0, labels).astype(np.uint8))
    with pytest.raises(ValueError, match="volume_ml"):
        VolumeMeasurement(1, float("nan"))


def test_seg_of_another_series_is_refused(
    ct: list[pydicom.Dataset], seg: pydicom.Dataset, labels: Array
) -> None:
    other = copy.deepcopy(seg)  # the fixture is shared: never change it in place
    del other.ReferencedSeriesSequence
    with pytest.raises(ValueError, match="does not reference the series"):
        make_sr(ct, other, labels)
    nodule_only = (SegmentSpec(2, "Nodule", ABNORMAL_STRUCTURE, NODULE, LUNG, (1, 2, 3), "other-id"),)
    with pytest.raises(ValueError, match="not in the SEG"):
        make_sr(ct, seg, labels, (VolumeMeasurement(2, 1.0),), nodule_only)


def test_dciodvfy_reports_no_error(sr: pydicom.Dataset, tmp_path: Path) -> None:
    run_dciodvfy(sr, tmp_path)


# --- the outline tracer ------------------------------------------------------------------


def rasterise(polygon: Array, shape: tuple[int, int]) -> Array:
    """Pixels whose centre lies inside ``polygon`` ((x, y) on pixel corners), even-odd rule."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    inside = np.zeros(shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon[:-1], polygon[1:], strict=True):
        if y0 == y1:
            continue
        crosses = (y0 > ys) != (y1 > ys)
        inside ^= crosses & (xs < x0 + (ys - y0) * (x1 - x0) / (y1 - y0))
    return inside


def test_regions_traced_in_the_box_are_those_of_the_whole_grid() -> None:
    """image_regions traces inside the mask's box only: the outlines, their order and the key
    slice are those of the tracer run over the whole grid (the plain path), and so is
    _key_slice, which counts a few slices at a time."""
    rng = np.random.default_rng(11)
    images = [pydicom.Dataset() for _ in range(40)]
    for k, image in enumerate(images):
        image.SOPClassUID, image.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", f"2.25.{k + 1}"
    for trial in range(12):
        labels = np.zeros((40, 48, 56), dtype=np.uint8)
        z0, r0, c0 = (int(x) for x in rng.integers(0, 12, size=3))
        blob = ndimage.gaussian_filter(rng.random((20 + trial, 30, 36)), 1.5) > 0.5
        labels[z0 : z0 + blob.shape[0], r0 : r0 + 30, c0 : c0 + 36][blob] = 1 + trial % 2
        mask = labels == 1 + trial % 2
        plain = segment_outlines(mask)  # the whole grid
        first = int(np.flatnonzero(mask.any(axis=(1, 2)))[trial % 3])
        found = image_regions(mask, images, first=first if trial % 2 else None)
        assert found is not None
        lead, more = found
        area = mask.sum(axis=(1, 2))
        lead_z = first if trial % 2 else max(sorted(plain), key=lambda z: int(area[z]))
        assert (
            lead.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == f"2.25.{lead_z + 1}"
        )
        assert np.array_equal(np.asarray(lead.GraphicData, dtype=np.float32), plain[lead_z].ravel())
        rest = [z for z in sorted(plain) if z != lead_z]
        assert [image.SOPInstanceUID for _, image in more] == [f"2.25.{z + 1}" for z in rest]
        for (outline, _), z in zip(more, rest, strict=True):
            assert outline.dtype == np.float32 and np.array_equal(outline, plain[z])
        values = [1, 2] if trial % 4 == 0 else [1 + trial % 2]
        present = np.ones(40, dtype=bool)
        total = np.zeros(40, dtype=np.int64)
        for v in values:
            per_slice = (labels == v).sum(axis=(1, 2))
            present &= per_slice > 0
            total += per_slice
        expected = int(np.argmax(np.where(present, total, -1))) if present.any() else None
        assert _key_slice(labels, values) == expected
    assert image_regions(np.zeros((3, 4, 4), dtype=bool), images) is None


def filled_components(mask2d: Array) -> list[Array]:
    """4-connected components with holes filled (holes: 8-connected background), largest first."""
    components, n = ndimage.label(mask2d)
    filled = [ndimage.binary_fill_holes(components == k, structure=np.ones((3, 3))) for k in range(1, n + 1)]
    return sorted(filled, key=lambda f: -int(f.sum()))


def test_outline_of_a_box_is_its_four_corners() -> None:
    mask = np.zeros((1, 20, 30), dtype=bool)
    mask[0, 3:9, 5:25] = True
    (outline,) = segment_outlines(mask).values()
    assert {tuple(p) for p in outline} == {(5, 3), (25, 3), (25, 9), (5, 9)}
    assert len(outline) == 5 and np.array_equal(outline[0], outline[-1])


def test_outlines_trace_random_shapes_exactly() -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        shape = (3, int(rng.integers(4, 48)), int(rng.integers(4, 48)))
        mask = ndimage.gaussian_filter(rng.random(shape), (0, 1.2, 1.2)) > 0.5
        for z, outline in segment_outlines(mask, max_points=10**6).items():
            candidates = filled_components(mask[z])
            if len(candidates) > 1 and candidates[0].sum() == candidates[1].sum():
                continue  # two largest of equal area: either is right
            assert np.array_equal(rasterise(outline, mask[z].shape), candidates[0]), f"slice {z}"
            checked += 1
    assert checked > 100


def test_corner_contacts_and_holes() -> None:
    # A ring closed only through a corner contact, and a square with a hole.
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, 1, 1:4] = mask[0, 1:4, 3] = mask[0, 3, 2:4] = mask[0, 2, 1] = True
    mask[1, 1:6, 1:6] = True
    mask[1, 3, 3] = False
    outlines = segment_outlines(mask)
    assert np.array_equal(rasterise(outlines[0], (8, 8)), mask[0])
    assert np.array_equal(rasterise(outlines[1], (8, 8)), ndimage.binary_fill_holes(mask[1]))


def test_simplified_outline_stays_close() -> None:
    yy, xx = np.mgrid[0:300, 0:300]
    disc = ((yy - 150) ** 2 + (xx - 140) ** 2 < 120**2)[None]
    (outline,) = segment_outlines(disc).values()
    assert len(outline) <= MAX_POLYGON_POINTS
    area = rasterise(outline, disc.shape[1:]).sum()
    assert abs(area - disc.sum()) / disc.sum() < 0.01
    radii = np.hypot(outline[:, 0] - 140, outline[:, 1] - 150)
    assert np.all(np.abs(radii - 120) < 2.0)


def test_sr_on_a_labelmap_seg_passes_dciodvfy(
    ct: list[pydicom.Dataset], labels: Array, tmp_path: Path
) -> None:
    """A pipeline configured for LABELMAP gets an SR as conformant as with BINARY."""
    seg_ds = make_seg(ct, labels, seg_type="LABELMAP")
    assert seg_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    run_dciodvfy(make_sr(ct, seg_ds, labels), tmp_path)
