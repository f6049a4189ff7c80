"""Pixel decoding and the refusals found by the bad-input corpus, on the real CT (no services).

The end-to-end checks are in tests/integration/test_bad_input_corpus.py; these pin the
behaviour of the two modules involved: orthanc_client (who decodes) and volume (what is refused).
"""

from __future__ import annotations

import copy
import io
import json

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, RLELossless

from orthanc_plugin.imaging.volume import VolumeError, build_volume, native_pixels
from orthanc_plugin.intake.routing import SeriesInfo, StudyInfo, route
from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError, PixelDecodeError

from ..conftest import DATA, read_series
from ..integration.corpus import to_jpeg2000


@pytest.fixture
def slices(ct_b40: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in ct_b40[:6]]


def offline_client(handler: httpx.MockTransport | None = None) -> OrthancClient:
    c = OrthancClient("http://orthanc.invalid")
    if handler is not None:
        c._http = httpx.Client(base_url="http://orthanc.invalid", transport=handler)
        c._files = None  # instance files through httpx too (the http.client reader: test_orthanc_client.py)
    return c


@pytest.mark.parametrize("how", ["rle", "jpeg-ls", "jpeg2000"])
def test_lossless_syntaxes_decode_locally_to_the_same_values(slices: list[Dataset], how: str) -> None:
    ds = slices[0]
    expected = ds.pixel_array.copy()
    if how == "rle":
        ds.compress(RLELossless)
    elif how == "jpeg-ls":
        ds.compress(JPEGLSLossless)
    else:
        to_jpeg2000(ds)
    ds.orthanc_id = "never-asked"  # decoding must not need Orthanc for these syntaxes
    np.testing.assert_array_equal(offline_client().pixels(ds), expected)


def test_orthanc_decodes_without_rescale_and_undecodable_is_bad_input() -> None:
    seen: list[str] = []
    stored = np.arange(12, dtype=np.uint16).reshape(1, 3, 4, 1)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("/bad/numpy"):
            body = {"HttpStatus": 500, "OrthancStatus": 2, "Message": "Not implemented yet"}
            return httpx.Response(500, content=json.dumps(body).encode())
        buf = io.BytesIO()
        np.save(buf, stored)
        return httpx.Response(200, content=buf.getvalue())

    c = offline_client(httpx.MockTransport(handler))
    arr = c.instance_numpy("good")
    # Orthanc would apply RescaleSlope/Intercept itself; the volume applies them, once.
    assert "rescale=0" in seen[0]
    assert arr.shape == (3, 4) and arr.dtype == np.uint16
    with pytest.raises(PixelDecodeError, match="Orthanc cannot decode it"):
        c.instance_numpy("bad")


def test_instance_deleted_while_reading_says_so() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=b'{"Message": "Unknown resource"}')

    c = offline_client(httpx.MockTransport(handler))
    with pytest.raises(OrthancError, match="deleted while the job ran") as e:
        c.instance_file("abc")
    assert e.value.status == 404
    assert c.series_exists("gone") is False


def test_short_pixel_data_is_a_volume_error(slices: list[Dataset]) -> None:
    slices[2].PixelData = slices[2].PixelData[:1000]
    with pytest.raises(
        VolumeError,
        match="pixel data cannot be decoded .transfer syntax Explicit VR Little Endian.: The number of bytes",
    ):
        build_volume(slices, offline_client().pixels)


def test_huge_header_refused_before_decoding(slices: list[Dataset]) -> None:
    for ds in slices:
        ds.Rows = ds.Columns = 30000

    def never(ds: Dataset) -> np.ndarray:
        raise AssertionError("decoded a 30000 x 30000 image")

    with pytest.raises(VolumeError, match="too large: 6 slices of 30000 x 30000"):
        build_volume(slices, never)


def test_rescale_missing_is_identity_and_slope_zero_refused(slices: list[Dataset]) -> None:
    for ds in slices:
        del ds.RescaleSlope
    v = build_volume(slices)
    raw = slices[0].pixel_array.astype(np.float32) + float(slices[0].RescaleIntercept)
    np.testing.assert_allclose(
        v.voxels[[d.SOPInstanceUID for d in v.datasets].index(slices[0].SOPInstanceUID)], raw
    )
    slices[1].RescaleSlope = 0
    with pytest.raises(VolumeError, match="RescaleSlope 0"):
        build_volume(slices)


def _shift(ds: Dataset, mm: float) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + mm]


def test_uneven_gap_is_not_called_a_missing_slice(slices: list[Dataset]) -> None:
    ordered = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))
    _shift(ordered[3], 3.0)  # gaps of 8 mm become 11 and 5
    with pytest.raises(VolumeError, match="^uneven spacing"):
        build_volume(ordered)


def test_two_missing_slices_are_counted(slices: list[Dataset]) -> None:
    ordered = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))
    with pytest.raises(VolumeError, match="2 slices are probably missing: gap of 24.00 mm"):
        build_volume(ordered[:2] + ordered[4:])


def test_multi_frame_series_rejected_by_routing_with_the_reason() -> None:
    from pathlib import Path

    from orthanc_plugin.core.config import load_pipelines

    root = Path(__file__).resolve().parents[2]
    (ct_lung,) = [p for p in load_pipelines(root / "config" / "pipelines.yaml") if p.name == "ct-lung"]
    tags = {"Modality": "CT", "SliceThickness": "5", "SeriesNumber": "3", "NumberOfFrames": "64"}
    study = StudyInfo("st", "1.2.3", {}, (SeriesInfo("s", "1.2.3.4", tags, ("i",)),))
    d = route(ct_lung, study)
    assert not d.matched
    (failed,) = d.roles[0].rejected.values()
    assert any("multi-frame (NumberOfFrames 64)" in f for f in failed), failed


@pytest.mark.parametrize("folder", ["ct/A0001-5mm", "ct/A0002-B40f", "mr/nih-ge-epi/mr_0004"])
def test_native_fast_path_equals_pydicom_on_real_series(folder: str) -> None:
    for ds in read_series(DATA / folder):
        fast = native_pixels(ds)
        assert fast is not None
        expected = ds.pixel_array
        assert fast.dtype == expected.dtype and np.array_equal(fast, expected)


@pytest.mark.parametrize(("signed", "stored"), [(0, 12), (1, 12), (0, 10), (1, 10), (1, 16), (0, 16)])
def test_native_fast_path_clears_or_sign_extends_unused_bits(signed: int, stored: int) -> None:
    ds = copy.deepcopy(read_series(DATA / "ct" / "A0002-B40f")[0])
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, stored, stored - 1
    garbage = np.random.default_rng(stored + signed).integers(
        0, 65535, (ds.Rows, ds.Columns), dtype=np.uint16
    )
    ds.PixelData = garbage.tobytes()
    fast = native_pixels(ds)
    assert fast is not None and fast.dtype == ds.pixel_array.dtype
    assert np.array_equal(fast, ds.pixel_array)
