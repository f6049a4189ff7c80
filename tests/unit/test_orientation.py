"""Orientation: the same anatomy stored mirrored must give the same, correctly sided, lungs.

Runs the real ct_lung ONNX in-process (ONNX Runtime) with the worker's own pre- and
post-processing, so a change that swaps left and right fails here without any server.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest

from devstack.common import ROOT
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.imaging import model_input
from orthanc_plugin.imaging.volume import Volume, VolumeError, axial_flips, build_volume


@pytest.fixture(scope="module")
def pipeline():
    return {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"))


def mirrored_left_right(slices):
    """The same slices stored with columns running toward patient RIGHT (row direction -x)."""
    out = []
    for ds in slices:
        m = copy.deepcopy(ds)
        px = ds.pixel_array[:, ::-1].copy()
        m.PixelData = px.tobytes()
        iop = [float(v) for v in ds.ImageOrientationPatient]
        m.ImageOrientationPatient = [-iop[0], -iop[1], -iop[2], *iop[3:]]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        m.ImagePositionPatient = [x + (int(ds.Columns) - 1) * float(ds.PixelSpacing[1]), y, z]
        out.append(m)
    return out


def run_model(volume: Volume, pipeline, session) -> np.ndarray:
    """What the worker does: prepare (flip into the model's orientation), infer, map back."""
    prepared = model_input.prepare(pipeline, {pipeline.inputs[0].role: volume})
    (probs,) = session.run(["probabilities"], {"image": prepared.tensor})
    return prepared.labels(probs[0], True)


def patient_x(volume: Volume, labels: np.ndarray, value: int) -> float:
    cols = np.nonzero(labels == value)[2]
    return volume.origin[0] + float(np.mean(cols)) * volume.spacing[2] * volume.row_direction[0]


def test_standard_orientation_needs_no_flip(ct_b40):
    assert axial_flips(build_volume(ct_b40)) == ()


def test_mirrored_series_gives_the_same_lungs(ct_b40, pipeline, session):
    normal = build_volume(ct_b40)
    mirrored = build_volume(mirrored_left_right(ct_b40))
    # Negating the row direction flips the slice normal too (normal = row x column): the slices
    # now sort feet-first, so both the slice and the column axis need flipping.
    assert axial_flips(mirrored) == (0, 2)
    a = run_model(normal, pipeline, session)
    b = run_model(mirrored, pipeline, session)
    # Right lung (1) at patient right (smaller x in LPS), left lung (2) at patient left, both times.
    for vol, lab in ((normal, a), (mirrored, b)):
        assert patient_x(vol, lab, 1) < patient_x(vol, lab, 2) - 50
    same = np.flip(b, (0, 2))
    for v in (1, 2):
        dice = 2 * np.sum((a == v) & (same == v)) / (np.sum(a == v) + np.sum(same == v))
        assert dice > 0.97, f"label {v}: Dice {dice:.3f} between normal and mirrored storage"


def test_non_axial_refused(ct_b40):
    vol = build_volume(ct_b40)
    sagittal = Volume(
        vol.voxels, vol.datasets, vol.spacing, vol.origin, (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)
    )
    with pytest.raises(VolumeError, match="not axial"):
        axial_flips(sagittal)
