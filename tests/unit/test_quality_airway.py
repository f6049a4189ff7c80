"""The airway not counted as lung: the trachea and main bronchi are air like the lung, so a lung
network may include them. A phantom chest with a trachea and two main bronchi, and the real CTs
through the real ct_lung ONNX (ONNX Runtime in-process, the worker's pre- and post-processing)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

from devstack.common import ROOT
from devstack.derive import sorted_slices
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.imaging import model_input
from orthanc_plugin.imaging.quality import airway_in_segments, find_airway
from orthanc_plugin.imaging.volume import build_volume
from orthanc_plugin.worker.pipeline import BadInput, measure

from ..conftest import CT_A0001, CT_B40, read_series, require_data
from .test_quality import CT_SHAPE, CT_SPACING, RNG, chest, grid, mm, with_ct_header

PIPELINE = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]
TRACHEA_RADIUS = 9.0  # mm


def chest_with_airway() -> tuple:
    """The phantom chest of test_quality with an air-filled trachea down the midline from above
    the lungs to a carina at z = +40 mm, and two main bronchi from there into the lungs."""
    volume, labels = chest()
    z, y, x = mm(CT_SHAPE, CT_SPACING)
    trachea = (np.hypot(y, x) <= TRACHEA_RADIUS) & (z >= 40)
    # Main bronchi: tubes of 6 mm radius from the carina (0, 40) down-and-out to (+-60, -20).
    bronchi = np.zeros(CT_SHAPE, dtype=bool)
    for side in (-1, 1):
        t = np.clip(((x * side) * 60 + (40 - z) * 60) / (60**2 + 60**2), 0, 1)
        bronchi |= np.hypot(np.hypot(x * side - 60 * t, z - (40 - 60 * t)), y) <= 6
    airway = trachea | bronchi
    image = volume.voxels.copy()
    image[airway] = -1000.0 + RNG.normal(0, 15, int(airway.sum()))
    return grid(CT_SHAPE, CT_SPACING, image), labels, trachea, airway


def test_airway_outside_the_lung_masks_passes_and_is_recorded() -> None:
    volume, labels, _, airway = chest_with_airway()
    labels = np.where(airway, 0, labels).astype(np.uint8)
    found = find_airway(volume, labels > 0)
    assert found.mask is not None  # the trachea is found, even though no lung holds it
    present, _, quality = measure(PIPELINE, with_ct_header(volume), labels)
    assert [s.name for s in present] == ["Right lung", "Left lung"]
    assert quality[1].recorded()["airway_ml"] == 0.0 and quality[2].recorded()["airway_ml"] == 0.0


def test_trachea_counted_as_lung_fails_the_job() -> None:
    volume, labels, trachea, airway = chest_with_airway()
    labels = np.where(airway, 0, labels).astype(np.uint8)
    labels[trachea] = 1  # what a network that takes the trachea for right lung answers
    # All of the trachea is in the right lung's mask now: 15 slices of 8 mm above the carina.
    measured = airway_in_segments(volume, labels, [1, 2])
    assert measured[1] == pytest.approx(np.count_nonzero(trachea) * volume.voxel_volume_ml, rel=0.02)
    assert measured[1] == pytest.approx(math.pi * TRACHEA_RADIUS**2 * 15 * 8 / 1000, rel=0.1)
    assert measured[2] == 0.0
    with pytest.raises(
        BadInput, match=r"Right lung.*mL of trachea or main bronchi counted in it, expected at most 10"
    ):
        measure(PIPELINE, with_ct_header(volume), labels)


def test_no_trachea_in_view_measures_nothing() -> None:
    volume, labels = chest()  # no airway at all
    assert airway_in_segments(volume, labels, [1, 2]) == {1: 0.0, 2: 0.0}


def test_lungs_reaching_the_top_slice_leave_the_airway_unmeasured() -> None:
    """A series that starts below the lung apices shows no trachea above the lungs: the air
    nearest the midline in the lungs' top slice is a bronchus or lung, so nothing is measured
    (and the check cannot fail the job) rather than a wrong value."""
    volume, labels, trachea, airway = chest_with_airway()
    labels = np.where(airway, 0, labels).astype(np.uint8)
    labels[trachea] = 1
    z_lungs = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    cranial_last = volume.normal[2] > 0
    cut = slice(0, int(z_lungs[-1]) - 3) if cranial_last else slice(int(z_lungs[0]) + 3, None)
    cropped = grid(labels[cut].shape, CT_SPACING, volume.voxels[cut].copy())
    assert not find_airway(cropped, labels[cut] > 0).measurable
    assert airway_in_segments(cropped, labels[cut], [1, 2]) == {}
    # the same phantom uncropped: measured (and failed), see test_trachea_counted_as_lung_fails_the_job
    assert find_airway(volume, labels > 0).measurable


def run_model(volume):  # type: ignore[no-untyped-def]
    prepared = model_input.prepare(PIPELINE, {"ct": volume})
    session = ort.InferenceSession(str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"))
    (probs,) = session.run(["probabilities"], {"image": prepared.tensor})
    return prepared, probs[0], prepared.labels(probs[0], True)


def test_a_chest_ct_without_the_apices_passes() -> None:
    """30 slices through the middle of the chest (the crop the scale-out test sends): the lungs
    reach the first and last slice, no trachea is in view, and the job is not refused for one."""
    require_data(CT_A0001)
    volume = build_volume(sorted_slices(CT_A0001)[17:47])
    prepared, probs, labels = run_model(volume)
    _, _, quality = measure(PIPELINE, prepared.reference, labels, probs)
    assert quality[1].airway_ml is None and quality[2].airway_ml is None
    assert quality[1].partial and quality[2].partial


@pytest.mark.parametrize(("folder", "most_ml"), [(CT_A0001, 6.0), (CT_B40, 0.5)], ids=["A0001", "A0002-B40f"])
def test_shipped_model_on_the_real_ct_counts_little_airway(folder, most_ml) -> None:
    """Measured with this test: A0001 (5 mm) 4.7 mL right, 1.0 mL left (the main bronchi at the
    hila, 22 mL of airway found in all); A0002 (8 mm) 0.02 and 0.08 mL (7 mL found)."""
    volume = build_volume(read_series(folder))
    prepared = model_input.prepare(PIPELINE, {"ct": volume})
    session = ort.InferenceSession(str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"))
    (probs,) = session.run(["probabilities"], {"image": prepared.tensor})
    labels = prepared.labels(probs[0], True)
    found = find_airway(prepared.reference, labels > 0)
    assert found.mask is not None and np.count_nonzero(found.mask) * volume.voxel_volume_ml > 5
    measured = airway_in_segments(prepared.reference, labels, [1, 2])
    assert max(measured.values()) <= most_ml
    _, _, quality = measure(PIPELINE, prepared.reference, labels, probs[0])
    assert quality[1].airway_ml == measured[1]
