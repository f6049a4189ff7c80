"""The pre-processing, post-processing and quality checks give what their earlier, plainer code
(``imaging_reference``) gives, bit for bit: the model's input tensor, the label map and every
quality value, on the real chest CT (64 slices, and 320 slices derived from it along z, through
the real ``ct_lung`` ONNX model in ONNX Runtime) and on edge cases (empty, one voxel, on the
border, two components, odd grids, probabilities outside [0, 1])."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from devstack.common import ROOT
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.imaging import model_input, postprocess, preprocess, quality
from orthanc_plugin.imaging.volume import Volume, build_volume

from ..conftest import CT_A0001, read_series
from . import imaging_reference as ref
from .test_quality import grid

PIPELINE = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]
CHECKS = {s.label: s.checks for s in PIPELINE.segments}


def derived(volume: Volume, n: int) -> Volume:
    """``volume`` resampled linearly along z to ``n`` slices over the same coverage, rounded to
    whole HU, as ``devstack.derive.resample_z`` writes the 320-slice study (no files)."""
    stack = volume.voxels.astype(np.float32)
    pos = np.linspace(0, volume.shape[0] - 1, n)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, volume.shape[0] - 1)
    w = (pos - lo)[:, None, None]
    voxels = np.rint((1 - w) * stack[lo] + w * stack[hi]).astype(np.int16)
    dz = volume.spacing[0] * (volume.shape[0] - 1) / (n - 1)
    return replace(volume, voxels=voxels, datasets=(), spacing=(dz, *volume.spacing[1:]))


@pytest.fixture(scope="module")
def real() -> dict[int, tuple[Volume, NDArray[np.float32], NDArray[np.float32]]]:
    """Per slice count: the volume, the model's input tensor and its probabilities."""
    ct = build_volume(read_series(CT_A0001))
    session = ort.InferenceSession(str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"))
    out = {}
    for volume in (ct, derived(ct, 320)):
        prepared = model_input.prepare(PIPELINE, {"ct": volume})
        (probs,) = session.run(["probabilities"], {"image": prepared.tensor})
        out[volume.shape[0]] = (volume, prepared.tensor, probs[0])
    return out


def reference_tensor(voxels: NDArray[np.generic], shape: tuple[int, int, int]) -> NDArray[np.float32]:
    return ref.resize(voxels, shape, 1, lambda x: ref.window(x, -1024, 400))


def same_quality(
    volume: Volume, labels: NDArray[np.uint8], values: list[int], every_variant: bool = True
) -> None:
    assert quality.airway_in_segments(volume, labels, values) == ref.airway_in_segments(
        volume, labels, values
    )
    for v in values:
        checks = CHECKS.get(v)
        variants = [{"shell_mm": checks.shell_mm, "tissue_above": checks.tissue_above} if checks else {}]
        if every_variant:
            variants += [{}, {"shell_mm": 3.0}, {"shape_and_surroundings": False}]
        for kw in variants:
            got = quality.measure_label(volume, labels, v, **kw)
            assert got == ref.measure_label(volume, labels, v, **kw), (v, kw)


@pytest.mark.parametrize("slices", [64, 320])
def test_real_ct_tensor_labels_and_quality_equal_the_reference(real, slices: int) -> None:
    """The pipeline's steps on the real CT; the variants (no component filter, logits, other
    quality settings) on the 64 slices only, to keep the test quick."""
    volume, tensor, probs = real[slices]
    expected = reference_tensor(volume.voxels, PIPELINE.preprocess.shape)
    assert tensor.shape == (1, 1, *expected.shape) and tensor[0, 0].tobytes() == expected.tobytes()
    labels = postprocess.labels_from_probabilities(probs, volume.shape, True)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert labels.tobytes() == ref.labels_from_probabilities(probs, volume.shape, True).tobytes()
    same_quality(volume, labels, [1, 2], every_variant=slices == 64)
    assert repr(quality.confidence(probs, [1, 2])) == repr(ref.confidence(probs, [1, 2]))
    if slices == 64:
        plain = postprocess.labels_from_probabilities(probs, volume.shape, False)
        assert plain.tobytes() == ref.labels_from_probabilities(probs, volume.shape, False).tobytes()
        # Logits instead of probabilities: the margin's scale is then measured, not known to be 1.
        logits = np.log(probs + np.float32(1e-6))
        got = postprocess.labels_from_probabilities(logits, volume.shape, True)
        assert got.tobytes() == ref.labels_from_probabilities(logits, volume.shape, True).tobytes()


def test_resize_with_a_window_equals_the_reference_on_odd_grids() -> None:
    rng = np.random.default_rng(23)
    shapes = [
        (16, 24, 24),
        (40, 96, 20),
        (33, 64, 64),
        (7, 7, 7),
        (1, 3, 2),
        (66, 10, 128),
        (5, 64, 80),
        (33, 20, 64),
    ]
    checked = 0
    for source in ((33, 64, 64), (7, 5, 9), (1, 1, 1)):
        for dtype in (np.float32, np.int16, np.float64):
            v = rng.normal(-300, 700, source).astype(dtype)
            v.flat[:: max(1, v.size // 7)] = 400  # values on the window's edges
            for shape in shapes:
                for scaled in (False, True):
                    got = preprocess.resize(
                        v, shape, 1, (lambda x: preprocess.window(x, -1024, 400)) if scaled else None
                    )
                    want = ref.resize(v, shape, 1, (lambda x: ref.window(x, -1024, 400)) if scaled else None)
                    assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), (source, dtype, shape)
                    checked += 1
            assert preprocess.window(v, -1024, 400).tobytes() == ref.window(v, -1024, 400).tobytes()
    assert checked == 144


def test_labels_equal_the_reference_on_odd_grids_ties_and_scales() -> None:
    rng = np.random.default_rng(29)
    checked = 0
    for trial in range(30):
        n = int(rng.integers(2, 5))
        model = tuple(int(s) for s in rng.integers(1, 12, 3))
        shape = tuple(int(s) for s in rng.integers(1, 40, 3))
        raw = ndimage.gaussian_filter(rng.random((n, *model)), (0, 1, 1, 1))
        variants = [
            raw.astype(np.float32),
            (raw / raw.sum(axis=0)).astype(np.float32),
            raw * 3 - 1,  # float64, outside [0, 1]
            (np.round(raw * 4) / 4).astype(np.float32),  # exact ties
            rng.random((n, *model), dtype=np.float32),  # rough: many cells interpolated
            np.round(rng.random((n, *model)), 1).astype(np.float32),  # rough, with ties
        ]
        for p in variants:
            slab = int(rng.integers(1, 20))
            for largest in (False, True):
                got = postprocess.labels_from_probabilities(p, shape, largest, slab)
                want = ref.labels_from_probabilities(p, shape, largest, slab)
                assert got.tobytes() == want.tobytes(), (trial, p.dtype, shape, slab)
                checked += 1
    # A cell on each side of the image: same grid, one in-plane axis only, NaN.
    p = np.zeros((3, 4, 5, 6), np.float32)
    p[1, :, 2:] = 0.5
    p[2, 1:, :, 3:] = 0.5
    nan = p.copy()
    nan[0, 0, 0, 0] = np.nan
    for probs, shape in (
        (p, (9, 17, 13)),
        (p, (4, 5, 6)),
        (p, (4, 20, 6)),
        (p, (4, 5, 24)),
        (nan, (9, 17, 13)),
    ):
        got = postprocess.labels_from_probabilities(probs, shape, True)
        assert got.tobytes() == ref.labels_from_probabilities(probs, shape, True).tobytes(), shape
        checked += 1
    assert checked == 365


def edge_cases() -> list[tuple[str, NDArray[np.uint8]]]:
    """Label maps of a 24 x 40 x 36 grid: empty, one voxel, touching every border, two
    components of each label, a thin sheet, a label filling the grid."""
    shape = (24, 40, 36)
    cases = [("empty", np.zeros(shape, np.uint8))]
    one = np.zeros(shape, np.uint8)
    one[7, 20, 11] = 1
    cases.append(("one voxel", one))
    border = np.zeros(shape, np.uint8)
    border[:, :, :6] = 1
    border[-1, -5:, 20:] = 2
    border[0, :3, -4:] = 2
    cases.append(("on the borders", border))
    two = np.zeros(shape, np.uint8)
    two[2:10, 5:15, 4:14] = 1
    two[14:22, 25:35, 4:14] = 1
    two[3:20, 10:30, 20:32] = 2
    two[11, 2, 33] = 2
    cases.append(("two components", two))
    sheet = np.zeros(shape, np.uint8)
    sheet[12, 4:36, 3:33] = 1
    sheet[:, 20, 18] = 2
    cases.append(("thin", sheet))
    cases.append(("full", np.ones(shape, np.uint8)))
    return cases


@pytest.mark.parametrize(("name", "labels"), edge_cases(), ids=[c[0] for c in edge_cases()])
def test_quality_and_components_equal_the_reference_on_edge_cases(
    name: str, labels: NDArray[np.uint8]
) -> None:
    rng = np.random.default_rng(31)
    image = rng.normal(-800, 200, labels.shape)
    image[:, 18:22, 16:20] = -1000  # an air tube down the midline, for the airway search
    for spacing in ((2.0, 0.8, 0.8), (5.0, 1.7, 1.3)):
        volume = grid(labels.shape, spacing, image)
        same_quality(volume, labels, [1, 2])
    kept, want = labels.copy(), labels.copy()
    postprocess.keep_largest_components(kept, [1, 2])
    ref.keep_largest_components(want, [1, 2])
    assert np.array_equal(kept, want)


def test_dilation_by_rows_of_the_disc_equals_scipys() -> None:
    rng = np.random.default_rng(37)
    for trial in range(200):
        shape = tuple(int(x) for x in rng.integers(1, 30, 3))
        mask = rng.random(shape) < rng.choice([0.001, 0.05, 0.5])
        ry, rx = (int(x) for x in rng.integers(0, 8, 2))
        dy, dx = rng.uniform(0.3, 3, 2)
        yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
        disc = ((yy * dy) ** 2 + (xx * dx) ** 2) <= rng.uniform(0.5, 15) ** 2 + 1e-9
        if trial % 7 == 0:
            disc = rng.random(disc.shape) < 0.5  # not a disc: the general dilation
        expected = ndimage.binary_dilation(mask, structure=disc[np.newaxis])
        assert np.array_equal(quality._dilate_in_plane(mask, disc), expected), trial


def test_is_one_of_equals_isin() -> None:
    rng = np.random.default_rng(41)
    for dtype in (np.uint8, np.uint16, np.int16):
        labels = rng.integers(0, 256, (5, 6, 7)).astype(dtype)
        for values in ([1, 2], [2], [0], [0, 1, 2, 3], [255], [1, 3], [], [254, 255], [3, 2, 1, 2]):
            assert np.array_equal(quality.is_one_of(labels, values), np.isin(labels, values)), (dtype, values)


def test_margin_scale_equals_the_whole_resampled_maximum() -> None:
    """The scale of the margin that decides which cells are interpolated is the original's
    ``max(1, nanmax(|probabilities resampled along the slices|))``, whether it is known from the
    range (probabilities) or measured a few slices at a time (logits, NaN)."""
    rng = np.random.default_rng(47)
    for trial in range(40):
        model = tuple(int(s) for s in rng.integers(1, 9, 3))
        nz = int(rng.integers(1, 60))
        p = rng.random((3, *model)).astype(np.float32)
        if trial % 2:
            p = p * np.float32(rng.uniform(-8, 8)) + np.float32(rng.uniform(-3, 3))
        if trial % 5 == 0:
            p[0, 0, 0, 0] = np.nan
        stacked = np.stack([ref.resize(p[c], (nz, *model[1:])) for c in range(3)])
        expected = max(1.0, float(np.nanmax(np.abs(stacked))))
        assert postprocess._AlongSlices(p, nz).largest_magnitude() == expected, trial


def test_confidence_equals_the_reference_with_ties_and_nan() -> None:
    rng = np.random.default_rng(53)
    for trial in range(60):
        p: NDArray[np.floating] = rng.random((int(rng.integers(2, 5)), 4, 5, 6)).astype(np.float32)
        if trial % 3 == 0:
            p = np.round(p, 1).astype(np.float32)  # ties: the first channel wins
        if trial % 5 == 0:
            p[int(rng.integers(0, p.shape[0])), 1, 2, 3] = np.nan
        if trial % 7 == 0:
            p = p.astype(np.float64)
        labels = [0, 1, 2, 3, 7]
        assert repr(quality.confidence(p, labels)) == repr(ref.confidence(p, labels)), trial
