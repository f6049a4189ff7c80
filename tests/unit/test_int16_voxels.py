"""A CT volume kept as int16 gives every consumer what the same volume in float32 gave.

The float32 reference is the volume assembled from the same slices with a pixel reader that
hands out float32 pixels (the path of any non-integer series): the voxel values are equal, and
every result computed from them must be equal bit for bit (quality values, the percentile,
radiomics features, the model's input tensor, key images, the regular grid of a tilted series).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from orthanc_plugin.core.config import load_pipelines, segment_specs
from orthanc_plugin.core.results import AlgorithmInfo, VolumeMeasurement
from orthanc_plugin.imaging import preprocess, resample
from orthanc_plugin.imaging.model_input import prepare
from orthanc_plugin.imaging.quality import airway_in_segments, high_percentile, measure_label
from orthanc_plugin.imaging.radiomics import RadiomicsSettings, label_features
from orthanc_plugin.imaging.volume import Geometry, Volume, build_volume, default_pixels
from orthanc_plugin.outputs.key_images import render_key_images
from orthanc_plugin.worker.pipeline import measure

from .test_resample import scan

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}


def float_pixels(ds: Dataset) -> NDArray[Any]:
    return np.asarray(default_pixels(ds), dtype=np.float32)


@pytest.fixture(scope="module")
def ct(ct_b40: list[Dataset]) -> tuple[Volume, Volume, NDArray[np.uint8]]:
    """The real CT as int16 and as float32, and lung-like labels (air inside the body, by half)."""
    small = build_volume(ct_b40)
    wide = build_volume(ct_b40, pixels=float_pixels)
    assert small.voxels.dtype == np.int16 and wide.voxels.dtype == np.float32
    np.testing.assert_array_equal(small.voxels, wide.voxels)
    v = wide.voxels
    body = np.zeros(v.shape, dtype=bool)
    body[:, 120:400, 80:440] = True
    lungs = body & (v < -400)
    labels = np.zeros(v.shape, dtype=np.uint8)
    labels[:, :, :256][lungs[:, :, :256]] = 1
    labels[:, :, 256:][lungs[:, :, 256:]] = 2
    return small, wide, labels


def test_integer_rescale_is_int16_and_anything_else_float32(ct_b40: list[Dataset]) -> None:
    slices = [copy.deepcopy(ds) for ds in ct_b40[:5]]
    assert build_volume(slices).voxels.dtype == np.int16
    for ds in slices:
        ds.RescaleIntercept = -1024.5
    half = build_volume(slices)
    assert half.voxels.dtype == np.float32
    first = half.datasets[0].pixel_array
    np.testing.assert_array_equal(half.voxels[0], first.astype(np.float32) - np.float32(1024.5))
    for ds in slices:
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 0.5
    assert build_volume(slices).voxels.dtype == np.float32


def test_a_slice_beyond_int16_makes_the_volume_float32_with_the_same_values(ct_b40: list[Dataset]) -> None:
    slices = [copy.deepcopy(ds) for ds in ct_b40[:5]]
    last = build_volume(slices).datasets[-1]  # the others are int16 already when it is read
    last.RescaleIntercept = 32768 - int(last.pixel_array.max())  # its brightest pixel: one too many
    got = build_volume(slices)
    expected = build_volume(slices, pixels=float_pixels)
    assert got.voxels.dtype == np.float32 and float(got.voxels.max()) > 32767
    np.testing.assert_array_equal(got.voxels, expected.voxels)


def test_percentile_is_equal() -> None:
    """Between two different order statistics too (the real CT's 99.5th percentile falls
    between equal values): interpolated in float32 as for a float32 volume."""
    rng = np.random.default_rng(5)
    for trial in range(40):
        shape = (int(rng.integers(10, 40)), int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        small = rng.integers(-1024, 3072, shape).astype(np.int16)
        wide = small.astype(np.float32)
        for q in (99.5, 99.0, 97.3, 90.0):
            assert high_percentile(small, q) == high_percentile(wide, q), (trial, q)


def test_quality_values_are_equal(ct: tuple[Volume, Volume, NDArray[np.uint8]]) -> None:
    small, wide, labels = ct
    for q in (99.5, 99.0, 90.0, 50.0):
        assert high_percentile(small.voxels, q) == high_percentile(wide.voxels, q)
    for label in (1, 2):
        assert measure_label(small, labels, label) == measure_label(wide, labels, label)
    assert airway_in_segments(small, labels, [1, 2]) == airway_in_segments(wide, labels, [1, 2])
    # The pipeline's checks and measurements, the plausible mean among them.
    header = Dataset()
    header.Modality = "CT"
    with_header = [replace(v, datasets=(header,) * v.shape[0]) for v in (small, wide)]
    got = [measure(PIPELINES["ct-lung"], v, labels) for v in with_header]
    assert got[0] == got[1]


def test_plausible_mean_is_taken_in_float32(ct: tuple[Volume, Volume, NDArray[np.uint8]]) -> None:
    """A bound on the float32 mean of a segment: the int16 volume passes it as the float32 one
    does (its mean in float64 differs in the last digits, and lies beyond the bound)."""
    small, wide, labels = ct
    sample = wide.voxels[::2, ::2, ::2][labels[::2, ::2, ::2] == 1]
    in_float32, in_float64 = float(sample.mean()), float(sample.astype(np.float64).mean())
    assert in_float32 != in_float64  # the bound below lies between them
    p = PIPELINES["ct-lung"]
    bound = (-2000.0, in_float32) if in_float64 > in_float32 else (in_float32, 0.0)
    segments = [s.model_copy(update={"plausible_mean": bound}) if s.label == 1 else s for s in p.segments]
    strict = p.model_copy(update={"segments": segments})
    header = Dataset()
    header.Modality = "CT"
    for v in (small, wide):
        present, _, _ = measure(strict, replace(v, datasets=(header,) * v.shape[0]), labels)
        assert [s.label for s in present] == [1, 2]


def test_radiomics_features_are_equal(ct: tuple[Volume, Volume, NDArray[np.uint8]]) -> None:
    small, wide, labels = ct
    radiomics = PIPELINES["ct-lung"].outputs.radiomics
    assert radiomics is not None
    settings = RadiomicsSettings(**radiomics.model_dump())
    # Re-segmented by a range that is not an integer: compared in float64 in both.
    for s in (
        settings,
        replace(settings, resegment=(-1000.5, 400.25)),
        replace(settings, resegment=(-1000.0, math.inf)),  # a bound beyond int16's range
    ):
        for label in (1, 2):
            expected = label_features(wide.voxels, labels, label, wide.spacing, s)
            assert label_features(small.voxels, labels, label, small.spacing, s) == expected


def test_model_input_is_equal(ct: tuple[Volume, Volume, NDArray[np.uint8]]) -> None:
    small, wide, _ = ct
    p = PIPELINES["ct-lung"]
    role = p.inputs[0].role
    np.testing.assert_array_equal(prepare(p, {role: small}).tensor, prepare(p, {role: wide}).tensor)
    for shape in ((16, 100, 90), (40, 512, 512), (30, 600, 256)):
        for order in (0, 1):
            for pointwise in (None, lambda x: preprocess.window(x, -1024, 400)):
                a = preprocess.resize(small.voxels, shape, order=order, pointwise=pointwise)
                b = preprocess.resize(wide.voxels, shape, order=order, pointwise=pointwise)
                assert a.dtype == np.float32
                np.testing.assert_array_equal(a, b)
    assert preprocess.resize(small.voxels, small.shape).dtype == np.float32


def test_key_images_are_equal(ct: tuple[Volume, Volume, NDArray[np.uint8]]) -> None:
    small, _, labels = ct
    segments = segment_specs(PIPELINES["ct-lung"])
    measurements = [VolumeMeasurement(1, 1000.0), VolumeMeasurement(2, 900.0)]
    algorithm = AlgorithmInfo(name="test", version="1", model_name="m", model_version="1")
    # Without a window in the headers, each slice's is its 1st and 99th percentile.
    bare = [copy.deepcopy(ds) for ds in small.datasets]
    for ds in bare:
        del ds.WindowCenter, ds.WindowWidth
    # Noise too: its percentiles fall between different values, interpolated in float32.
    noise = np.random.default_rng(9).integers(-1024, 3072, small.shape).astype(np.int16)
    for window, voxels in ((None, small.voxels), ((-1350.0, 150.0), small.voxels), (None, noise)):
        a, b = (
            render_key_images(v, bare, labels, segments, measurements, algorithm, window=window)
            for v in (voxels, voxels.astype(np.float32))
        )
        assert [k.index for k in a] == [k.index for k in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.pixels, y.pixels)


def test_regular_grid_of_a_tilted_int16_series_is_equal() -> None:
    datasets, _ = scan([2.5 * k for k in range(-14, 15)], tilt_deg=20.0)
    geometry = Geometry(max_tilt_deg=30)
    small = resample.build_regular(datasets, geometry=geometry)
    wide = resample.build_regular(datasets, float_pixels, geometry=geometry)
    assert small.source is not None and small.source.volume.voxels.dtype == np.int16
    assert small.voxels.dtype == np.float32
    np.testing.assert_array_equal(small.voxels, wide.voxels)
