"""Quality checks: each shipped pipeline refuses what it is not for, on phantoms of known size.

Phantoms are built on the real series' grids (the brain MR's 64 x 64 x 15 slab of 3.75 x 3.75
x 5 mm, a chest CT's 0.7 x 0.7 x 8 mm slices) with masks standing in for what a network
answered: a water bottle whose inside is called brain, noise, a head, lungs in a chest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from orthanc_plugin.core.config import SegmentChecks, load_pipelines
from orthanc_plugin.core.results import VolumeMeasurement
from orthanc_plugin.imaging.quality import (
    SegmentQuality,
    confidence,
    high_percentile,
    measure_label,
    sphericity,
)
from orthanc_plugin.imaging.volume import Volume
from orthanc_plugin.worker.pipeline import BadInput, measure

from .quality_reference import measure_segment
from .test_fhir_report import ALGORITHM as FHIR_ALGORITHM
from .test_fhir_report import IDS, ISSUED, STUDY, resources
from .test_seg import SEGMENTS, make_seg
from .test_sr import make_sr

Array = NDArray[Any]
ROOT = Path(__file__).resolve().parents[2]
PIPELINES = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}
RNG = np.random.default_rng(17)


def measured(volume: Volume, mask: NDArray[np.bool_], **kw: Any) -> SegmentQuality:
    """:func:`measure_label` of a segment given as a mask."""
    return measure_label(volume, mask.astype(np.uint8), 1, **kw)


def grid(shape: tuple[int, int, int], spacing: tuple[float, float, float], voxels: Array) -> Volume:
    assert voxels.shape == shape
    return Volume(
        voxels=voxels.astype(np.float32),
        datasets=(),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        normal=(0.0, 0.0, 1.0),
    )


def mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Array, Array, Array]:
    """Voxel-centre coordinates in mm from the centre of the grid."""
    z, y, x = np.indices(shape, dtype=np.float64)
    return tuple((a - (n - 1) / 2) * s for a, n, s in zip((z, y, x), shape, spacing, strict=True))  # type: ignore[return-value]


# ---- the brain MR slab: 15 slices of 64 x 64, 3.75 x 3.75 x 5 mm (a 75 mm slab)
MR_SHAPE, MR_SPACING = (15, 64, 64), (5.0, 3.75, 3.75)


def head(slab: bool = True) -> tuple[Volume, Array]:
    """An ellipsoidal head: textured brain (grey/white matter blobs), dark CSF and skull, bright
    scalp, air outside. Without ``slab``, 40 slices cover all of it."""
    shape = MR_SHAPE if slab else (40, 64, 64)
    z, y, x = mm(shape, MR_SPACING)
    r_brain = (z / 65) ** 2 + (y / 80) ** 2 + (x / 65) ** 2
    r_head = (z / 85) ** 2 + (y / 100) ** 2 + (x / 85) ** 2
    texture = np.where(np.sin(x / 6) * np.sin(y / 7) > 0, 1400.0, 900.0)  # white vs grey matter
    image = np.where(r_head <= 1, 1600.0, 0.0)  # scalp
    image = np.where(r_head <= 0.8, 150.0, image)  # skull, CSF
    image = np.where(r_brain <= 1, texture, image) + RNG.normal(0, 40, shape)
    return grid(shape, MR_SPACING, np.abs(image)), r_brain <= 1


def bottle() -> tuple[Volume, Array]:
    """A 160 mm water bottle filling the slab, uniform signal with noise; the 'brain' is its inner
    120 mm, as a brain network outlines in such a phantom."""
    z, y, x = mm(MR_SHAPE, MR_SPACING)
    r = np.hypot(y, x)
    image = np.where(r <= 80, 2000.0, 0.0) + RNG.normal(0, 40, MR_SHAPE)
    return grid(MR_SHAPE, MR_SPACING, np.abs(image)), r <= 60


def test_ball_in_air_volume_shape_and_surroundings() -> None:
    z, y, x = mm((40, 64, 64), (2.0, 2.0, 2.0))
    ball = np.sqrt(z**2 + y**2 + x**2) <= 25
    volume = grid((40, 64, 64), (2.0, 2.0, 2.0), np.where(ball, 100.0, 0.0))
    q = measured(volume, ball)
    assert q.volume_ml == pytest.approx(4 / 3 * math.pi * 25**3 / 1000, rel=0.03)
    assert not q.partial
    assert q.enclosed == 0.0  # air all around
    assert q.contrast == pytest.approx(1.0)
    assert 0.6 < q.compactness < 0.75  # a voxelised ball (faces overcount a smooth surface)
    assert sphericity(np.ones((4, 4, 4), dtype=bool), (1.0, 1.0, 1.0)) == pytest.approx(0.806, abs=0.01)


def test_segment_on_the_first_or_last_slice_is_partial() -> None:
    volume, brain = head(slab=True)
    assert measured(volume, brain).partial
    whole, whole_brain = head(slab=False)
    q = measured(whole, whole_brain)
    assert not q.partial
    assert q.volume_ml == pytest.approx(4 / 3 * math.pi * 65 * 80 * 65 / 1000, rel=0.03)


def test_brain_pipeline_accepts_a_head() -> None:
    volume, brain = head(slab=False)
    present, (m,), quality = measure(PIPELINES["mr-brain"], volume, brain.astype(np.uint8))
    assert [s.name for s in present] == ["Brain"] and not m.partial
    assert set(quality[1].recorded()) >= {"contrast", "variation", "enclosed", "compactness"}


def test_brain_pipeline_accepts_a_slab_of_a_head_scaling_the_volume_range() -> None:
    volume, brain = head(slab=True)
    _, (m,), _ = measure(PIPELINES["mr-brain"], volume, brain.astype(np.uint8))
    assert m.partial  # 75 mm of a 130 mm brain
    h, c = 37.5, 65.0  # the slab's half-height, the ellipsoid's semi-axis along it
    slab_ml = math.pi * 80 * 65 * (2 * h - 2 * h**3 / (3 * c**2)) / 1000
    assert m.volume_ml == pytest.approx(slab_ml, rel=0.03)


def test_brain_pipeline_refuses_a_water_bottle() -> None:
    volume, inner = bottle()
    with pytest.raises(BadInput) as e:
        measure(PIPELINES["mr-brain"], volume, inner.astype(np.uint8))
    text = str(e.value)
    assert "does not look like a brain" in text
    assert "contrast against its surroundings" in text and "intensity variation inside" in text
    assert "Is this the kind of study the pipeline is for?" in text


def test_brain_pipeline_refuses_a_whole_bottle_in_air() -> None:
    volume, _ = bottle()
    z, y, x = mm(MR_SHAPE, MR_SPACING)
    with pytest.raises(BadInput, match="share of its surroundings that is tissue 0.00"):
        measure(PIPELINES["mr-brain"], volume, (np.hypot(y, x) <= 80).astype(np.uint8))


def test_brain_pipeline_refuses_noise() -> None:
    volume = grid(MR_SHAPE, MR_SPACING, np.abs(RNG.normal(0, 500, MR_SHAPE)))
    z, y, x = mm(MR_SHAPE, MR_SPACING)
    blob = np.hypot(y, x) <= 100  # 2.3 L: more than a 75 mm slab of brain can hold
    with pytest.raises(BadInput, match=r"volume 2\d\d\d mL, expected \d+ to \d+ mL \(scaled to the 75 mm"):
        measure(PIPELINES["mr-brain"], volume, blob.astype(np.uint8))


# ---- chest CT: 40 slices of 8 mm, 128 x 128 of 2.8 mm (a 320 mm chest)
CT_SHAPE, CT_SPACING = (40, 128, 128), (8.0, 2.8, 2.8)


def chest() -> tuple[Volume, Array]:
    z, y, x = mm(CT_SHAPE, CT_SPACING)
    body = (y / 120) ** 2 + (x / 170) ** 2 <= 1
    right = ((z / 130) ** 2 + (y / 80) ** 2 + ((x + 70) / 55) ** 2) <= 1
    left = ((z / 130) ** 2 + (y / 80) ** 2 + ((x - 70) / 50) ** 2) <= 1
    image = np.where(body, 40.0, -1000.0)
    vessels = np.where(np.sin(x / 5) * np.sin(y / 4) > 0.7, -600.0, -870.0)
    image = np.where(right | left, vessels, image) + RNG.normal(0, 15, CT_SHAPE)
    labels = np.zeros(CT_SHAPE, dtype=np.uint8)
    labels[right], labels[left] = 1, 2
    return grid(CT_SHAPE, CT_SPACING, image), labels


def with_ct_header(volume: Volume) -> Volume:
    ds = pydicom.Dataset()
    ds.Modality = "CT"
    return Volume(**{**volume.__dict__, "datasets": (ds,) * volume.shape[0]})


def test_lung_pipeline_accepts_lungs_in_a_chest() -> None:
    volume, labels = chest()
    present, measurements, _ = measure(PIPELINES["ct-lung"], with_ct_header(volume), labels)
    assert [s.name for s in present] == ["Right lung", "Left lung"]
    expected = [4 / 3 * math.pi * 130 * 80 * 55 / 1000, 4 / 3 * math.pi * 130 * 80 * 50 / 1000]
    assert [m.volume_ml for m in measurements] == pytest.approx(expected, rel=0.03)


def test_lung_pipeline_refuses_lungs_in_air() -> None:
    volume, labels = chest()
    air = np.full(CT_SHAPE, -1000.0) + RNG.normal(0, 15, CT_SHAPE)  # the same masks, no chest
    air[labels > 0] = volume.voxels[labels > 0]
    with pytest.raises(
        BadInput, match="share of its surroundings that is tissue 0.00, expected at least 0.7"
    ):
        measure(PIPELINES["ct-lung"], with_ct_header(grid(CT_SHAPE, CT_SPACING, air)), labels)


def test_confidence_is_recorded_and_checked() -> None:
    probabilities = np.zeros((2, 4, 4, 4), dtype=np.float32)
    probabilities[1, :2], probabilities[0, :2] = 0.9, 0.1
    probabilities[0, 2:], probabilities[1, 2:] = 0.6, 0.4
    ((mean_max, entropy),) = confidence(probabilities, [1]).values()
    assert mean_max == pytest.approx(0.9)
    assert entropy == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2), rel=1e-4)
    volume, brain = head(slab=False)
    # A network unsure of every voxel it calls brain: 0.55 against the 0.8 required.
    unsure = np.stack([np.where(brain, 0.45, 0.9), np.where(brain, 0.55, 0.1)]).astype(np.float32)
    with pytest.raises(BadInput, match=r"model confidence \(mean maximum probability\) 0.55"):
        measure(PIPELINES["mr-brain"], volume, brain.astype(np.uint8), unsure)


def test_every_shipped_pipeline_declares_checks_for_every_segment() -> None:
    for p in PIPELINES.values():
        for s in p.segments:
            assert s.checks is not None, f"{p.name}: segment {s.name} has no checks"
            assert s.checks.confidence is not None


@pytest.mark.parametrize(
    ("checks", "words"),
    [
        ({"volume_ml": [10, 5]}, "0 <= min < max"),
        ({"organ_extent_mm": 100}, "give volume_ml too"),
        ({"contrast": 1.5}, "less than or equal to 1"),
        ({"shape": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_check_definitions_are_validated(checks: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        SegmentChecks.model_validate(checks)


def test_partial_coverage_in_the_sr_and_the_fhir_report(
    ct: list[pydicom.Dataset], labels: Array, tmp_path: Path
) -> None:
    from orthanc_plugin.fhir.report import build_diagnostic_report

    from .test_source_attributes import run_dciodvfy

    seg = make_seg(ct, labels)
    measurements = (VolumeMeasurement(1, 1234.56, partial=True), VolumeMeasurement(2, 42.5))
    sr = make_sr(ct, seg, labels, measurements=measurements)
    run_dciodvfy(sr, tmp_path)
    measurements_item = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER")
    flagged = [
        any(i.ConceptNameCodeSequence[0].CodeValue == "COVERAGE" for i in group.ContentSequence)
        for group in measurements_item.ContentSequence
        if group.ValueType == "CONTAINER"
    ]
    assert flagged == [True, False]
    bundle = build_diagnostic_report(STUDY, SEGMENTS, measurements, FHIR_ALGORITHM, IDS, ISSUED)
    notes = [o.get("note") for o in resources(bundle, "Observation")]
    assert notes[0] and "partial coverage" in notes[0][0]["text"] and notes[1] is None


def test_high_percentile_is_numpys_bit_for_bit() -> None:
    """The percentile taken from the voxels above a sampled bound equals np.percentile's (on
    integer and fractional CT-like values, ties, NaN and volumes too small for the bound)."""
    rng = np.random.default_rng(3)
    checked = 0
    for trial in range(120):
        shape = (int(rng.integers(1, 40)), int(rng.integers(8, 60)), int(rng.integers(8, 60)))
        kind = trial % 4
        if kind == 0:
            v = rng.normal(0, 300, shape).astype(np.float32)
        elif kind == 1:
            v = rng.integers(-1024, 3000, shape).astype(np.float32)
        elif kind == 2:
            v = (rng.integers(-1024, 200, shape) * 0.5 + 0.25).astype(np.float32)
        else:
            v = np.round(rng.exponential(100, shape)).astype(np.float32)
        if trial == 7:
            v[0, 0, 0] = np.nan
        for q in (99.5, 99.0, 90.0):
            got, expected = high_percentile(v, q), float(np.percentile(v, q))
            assert got == expected or (math.isnan(got) and math.isnan(expected)), (trial, q)
            checked += 1
    assert checked == 360


def test_measure_label_equals_the_whole_grid_measurement() -> None:
    """The box-only measurement gives the whole-grid one's values exactly: phantoms, and blobs
    at every offset against the coarse grids (touching the ends, near the edges, too small for
    the sample, thin ones the coarse grid misses)."""
    rng = np.random.default_rng(11)
    cases = [chest(), head(slab=True), head(slab=False), bottle()]
    for _ in range(24):
        shape = (int(rng.integers(5, 30)), int(rng.integers(20, 70)), int(rng.integers(20, 70)))
        spacing = (float(rng.uniform(0.6, 6)), float(rng.uniform(0.4, 4)), float(rng.uniform(0.4, 4)))
        image = rng.normal(-300, 400, shape)
        labels = np.zeros(shape, dtype=np.uint8)
        for label in (1, 2, 3):
            lo = [int(rng.integers(0, n)) for n in shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True)]
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            labels[box][rng.random(labels[box].shape) < rng.uniform(0.2, 1)] = label
        cases.append((grid(shape, spacing, image), labels))
    checked = 0
    for volume, labels in cases:
        labels = np.asarray(labels, dtype=np.uint8)
        for label in range(int(labels.max()) + 1):
            for shell_mm, surroundings in ((10.0, True), (25.0, True), (10.0, False)):
                expected = measure_segment(
                    volume, labels == label, shell_mm=shell_mm, shape_and_surroundings=surroundings
                )
                got = measure_label(
                    volume, labels, label, shell_mm=shell_mm, shape_and_surroundings=surroundings
                )
                assert got == expected, (label, shell_mm, volume.shape)
                checked += 1
    assert checked > 200
