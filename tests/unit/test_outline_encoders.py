"""The SR and the RTSTRUCT, whose repeated parts are encoded as bytes directly, against the
encoders as they were before (``sr_reference.py``, ``rtstruct_reference.py``): the written
files must be the same byte for byte (but for the time stamps highdicom takes from the clock),
on the real chest CT labelled by the classical lung labeller and on edge cases."""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.filebase import DicomBytesIO
from scipy import ndimage

from orthanc_plugin.core.codes import Code
from orthanc_plugin.core.config import load_pipelines, segment_specs
from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    FeatureValue,
    SegmentFeatures,
    SegmentSpec,
    VolumeMeasurement,
)
from orthanc_plugin.imaging.radiomics import FEATURES_BY_ID
from orthanc_plugin.outputs import rtstruct, sr
from triton_models.ct_lung.reference_labels import reference_labels

from ..conftest import CT_A0001, read_series
from . import rtstruct_reference, sr_reference
from .test_seg import make_seg, sort_along_normal

Array = NDArray[Any]
ROOT = Path(__file__).resolve().parents[2]
ALGORITHM = AlgorithmInfo(name="orthanc-ai ct-lung", version="1.0.0", model_name="ct_lung", model_version="1")
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
(CT_LUNG,) = [p for p in load_pipelines(ROOT / "config" / "pipelines.yaml") if p.name == "ct-lung"]
LUNGS: tuple[SegmentSpec, ...] = tuple(segment_specs(CT_LUNG))
CLASSIFICATION = ClassificationResult(
    name="dense lung",
    tracking_id="dense-lung-share",
    finding=Code("263681008", "SCT", "Abnormal"),
    probability=0.55,
    threshold=0.3333,
    classes=("negative", "positive"),
    probabilities=(0.45, 0.55),
    model_name="dense_lung",
    model_version="1",
    finding_site=Code("39607008", "SCT", "Lung"),
)


def written(ds: pydicom.Dataset) -> bytes:
    """The file as stored, the clock's time stamps set to one value (highdicom writes the time
    of the call as the SR's creation time and its own contribution's time)."""
    if "InstanceCreationTime" in ds:
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20240506", "070809"
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20240506070809"
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


#: Feature values of every kind the DS formatting tells apart (sign, zero, magnitudes, digits).
ODD_VALUES = (0.0, -0.0, 1.0, -7.0, 0.1, 1e-12, 2.5e-5, -3.25e-300, 123456789.0, 99999.95, -3.5e20, 1.7e308)


def features(labels: tuple[int, ...], odd: bool = False) -> list[SegmentFeatures]:
    rng = np.random.default_rng(5)
    out = []
    for label in labels:
        values = rng.normal(100, 80, len(FEATURES_BY_ID))
        values[::17] = np.nan  # a ratio over zero: left out of the SR
        if odd:
            values[1 : 1 + len(ODD_VALUES)] = ODD_VALUES
        out.append(
            SegmentFeatures(
                label,
                tuple(
                    FeatureValue(k, f.name, f.unit, float(v))
                    for (k, f), v in zip(FEATURES_BY_ID.items(), values, strict=True)
                ),
            )
        )
    return out


def build_both(
    build: Callable[..., pydicom.Dataset],
    reference: Callable[..., pydicom.Dataset],
    *args: Any,
    **kwargs: Any,
) -> tuple[bytes, bytes]:
    """Both encoders' files for the same call; when the reference refuses the call, the same
    error from both (raised again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom notes the source's one-component patient name
        try:
            expected = written(reference(*args, **kwargs))
        except ValueError as e:
            with pytest.raises(type(e)) as raised:
                build(*args, **kwargs)
            assert str(raised.value) == str(e)
            raise
        return written(build(*args, **kwargs)), expected


def compare_sr(
    images: list[pydicom.Dataset],
    labels: Array | None,
    segments: tuple[SegmentSpec, ...] = LUNGS,
    seg_labels: Array | None = None,
    classified: bool = True,
    odd: bool = False,
) -> bytes:
    """The SR of ``labels`` by both encoders, with volumes, radiomics features and a
    classification; asserts they are equal and returns the file."""
    counted = labels if seg_labels is None else seg_labels
    assert counted is not None
    present = tuple(s.label for s in segments if (counted == s.label).any())
    seg = make_seg(images, counted, tuple(s for s in segments if s.label in present))
    measurements = [
        VolumeMeasurement(s.label, round(float(np.count_nonzero(counted == s.label)) * 0.7, 2))
        for s in segments
    ]
    ours, expected = build_both(
        sr.build_sr, sr_reference.build_sr,
        images, seg, segments, measurements, ALGORITHM,
        series_instance_uid="2.25.2000", sop_instance_uid="2.25.2001", series_number=902,
        series_description="AI report", labels=labels, content_creation=CREATED,
        classifications=[CLASSIFICATION] if classified else [], features=features(present, odd),
    )  # fmt: skip
    assert ours == expected
    return ours


def compare_rtstruct(
    images: list[pydicom.Dataset], labels: Array, segments: tuple[SegmentSpec, ...] = LUNGS
) -> bytes:
    ours, expected = build_both(
        rtstruct.build_rtstruct, rtstruct_reference.build_rtstruct,
        images, labels, segments, ALGORITHM,
        series_instance_uid="2.25.3000", sop_instance_uid="2.25.3001", series_number=903,
        series_description="AI contours", content_creation=CREATED,
    )  # fmt: skip
    assert ours == expected
    return ours


@pytest.fixture(scope="module")
def chest() -> tuple[list[pydicom.Dataset], Array]:
    """The 64-slice chest CT and its lungs as the classical labeller finds them."""
    images = sort_along_normal(read_series(CT_A0001))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in images])
    spacing = (
        abs(float(images[1].ImagePositionPatient[2]) - float(images[0].ImagePositionPatient[2])),
        *(float(v) for v in images[0].PixelSpacing),
    )
    return images, reference_labels(hu, spacing)


def test_real_ct_gives_the_same_files(chest: tuple[list[pydicom.Dataset], Array]) -> None:
    images, labels = chest
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    written_sr = compare_sr(images, labels)
    assert len(written_sr) > 100_000  # outlines on every slice of both lungs, 2 x 61 features
    compare_sr(images, None, seg_labels=labels)  # without a label map: segment references
    compare_sr(images, labels, classified=False)
    compare_rtstruct(images, labels)


def grid(ct: list[pydicom.Dataset]) -> Array:
    return np.zeros((len(ct), int(ct[0].Rows), int(ct[0].Columns)), dtype=np.uint8)


def one_voxel(ct: list[pydicom.Dataset]) -> Array:
    labels = grid(ct)
    labels[3, 100, 100] = 1
    labels[5:9, 200:203, 300:302] = 2
    return labels


def at_the_borders(ct: list[pydicom.Dataset]) -> Array:
    labels = grid(ct)
    labels[0, :5, :7] = 1  # the first slice, row and column
    labels[-1, -3:, -4:] = 1  # the last ones
    labels[len(ct) // 2] = 2  # a whole slice
    labels[len(ct) // 2, 200:210, 200:210] = 0  # with a hole
    return labels


def two_components(ct: list[pydicom.Dataset]) -> Array:
    labels = grid(ct)
    labels[4:12, 100:180, 60:140] = 1
    labels[6:10, 300:340, 300:340] = 1  # a smaller second one
    labels[4:12, 100:140, 300:340] = 2
    labels[4:12, 300:340, 100:140] = 2  # two of the same size
    labels[8, 150:155, 150:155] = 2
    labels[8, 155:160, 155:160] = 2  # touching the previous square at a corner only
    return labels


def odd_shapes(ct: list[pydicom.Dataset]) -> Array:
    """Random blobs with holes and islands, a ring with an island in its hole, and a grid of
    single pixels."""
    rng = np.random.default_rng(11)
    labels = grid(ct)
    blobs = ndimage.gaussian_filter(rng.random((len(ct) - 4, 120, 150)), (0, 2.0, 2.0)) > 0.5
    labels[2:-2, 50:170, 40:190][blobs] = 1
    _, y, x = np.ogrid[: len(ct), :512, :512]
    r = np.hypot(y - 330, x - 330)
    labels[10:20][np.broadcast_to((r <= 60) & (r >= 30), (10, 512, 512))] = 2
    labels[10:20, 325:336, 325:336] = 2
    labels[12, 100:150:3, 300:350:3] = 2
    return labels


def long_contour(ct: list[pydicom.Dataset]) -> Array:
    """A square with a notch at every other pixel of its edges: a contour of about 4000 points,
    whose Contour Data (more than 64 KB) the writer writes as UN, with a 32-bit length."""
    labels = grid(ct)
    labels[7, 6:506, 6:506] = 1
    for edge in (np.s_[7, 6, 7:505:2], np.s_[7, 505, 7:505:2], np.s_[7, 7:505:2, 6], np.s_[7, 7:505:2, 505]):
        labels[edge] = 0
    labels[8:10, 10:20, 10:20] = 2
    return labels


CASES = [one_voxel, at_the_borders, two_components, odd_shapes, long_contour]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_edge_cases_give_the_same_files(ct: list[pydicom.Dataset], case: Callable[..., Array]) -> None:
    labels = case(ct)
    compare_sr(ct, labels)
    written_rt = compare_rtstruct(ct, labels)
    if case is long_contour:
        assert b"\x06\x30\x50\x00UN" in written_rt  # Contour Data too long for DS's 16-bit length


def test_one_segment_and_a_missing_one_give_the_same_files(ct: list[pydicom.Dataset]) -> None:
    labels = two_components(ct)
    labels[labels == 2] = 0  # the second segment has no voxel: its measurement is 0, it gets no ROI
    compare_sr(ct, labels)
    compare_rtstruct(ct, labels)


def test_empty_labels_give_the_same_errors(ct: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="no voxel in labels"):
        compare_sr(ct, grid(ct), seg_labels=one_voxel(ct))
    with pytest.raises(ValueError, match="nothing to contour"):
        compare_rtstruct(ct, grid(ct))


def random_loops(rng: np.random.Generator) -> list[NDArray[np.float64]]:
    """Loops of pixel corners around the point budget's sizes: scattered points, random walks
    (long straight runs, many ties) and loops that keep coming back to one point."""
    loops = []
    for _ in range(int(rng.integers(1, 12))):
        n = int(rng.choice([1, 2, 3, 4, 10, 62, 63, 64, 65, 100, 511, 512, 513, 1025, 3000]))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            points = rng.integers(0, 600, (n, 2)).astype(np.float64)
        elif kind == 1:
            points = np.cumsum(rng.integers(-1, 2, (n, 2)), axis=0).astype(np.float64) + 300
        else:
            points = np.full((n, 2), 7.0)
            points[::3] += rng.integers(0, 3, (len(points[::3]), 2))
        loops.append(points)
    return loops


def test_simplification_keeps_the_same_points(chest: tuple[list[pydicom.Dataset], Array]) -> None:
    """Douglas-Peucker with the point budget, done with whole-number cross products and the
    budget recomputed only where it can change: the same points as before, on the lungs'
    outlines and on random loops."""
    _, labels = chest
    cases = []
    for label in (1, 2):
        graph = sr._CrackGraph(labels == label)
        roots, _ = graph.loops()
        cases.append([graph.corners(int(e)) for e in roots])  # every loop, holes included
    rng = np.random.default_rng(1)
    cases += [random_loops(rng) for _ in range(300)]
    for k, loops in enumerate(cases):
        for max_points in (4, 10, sr.MAX_POLYGON_POINTS) if k >= 2 else (sr.MAX_POLYGON_POINTS,):
            ours = sr._simplify_loops(loops, max_points)
            expected = sr_reference._simplify_loops(loops, max_points)
            assert len(ours) == len(expected)
            for a, b in zip(ours, expected, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), f"case {k}, max_points {max_points}"
    with pytest.raises(ValueError, match="whole numbers"):
        sr._simplify_loops([np.array([[0.0, 0.0], [1.5, 0.0], [1.0, 1.0]])], 64)


def test_feature_values_of_every_kind_give_the_same_files(ct: list[pydicom.Dataset]) -> None:
    compare_sr(ct, two_components(ct), odd=True)
