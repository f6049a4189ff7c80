"""Tilted and unevenly spaced series: resampled onto a regular grid, labels mapped back (phantoms).

An ellipsoid of known volume is "scanned" with tilted image planes (a gantry tilt about the
patient's left-right axis: the table advances along the patient, the planes lean) or with
uneven gaps; each pixel holds the fraction of it inside the ellipsoid (4 x 4 sub-samples). The
volume is built, thresholded on the regular grid as a model would segment it, the labels are
mapped back onto the source slices and compared with the analytic mask of those slices.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from orthanc_plugin.imaging import resample
from orthanc_plugin.imaging.volume import Geometry, VolumeError, axial_flips, build_volume, slice_shares

CENTRE = np.array([3.0, -8.0, 40.0])
SEMI = np.array([30.0, 22.0, 26.0])  # semi-axes along x, y, z (mm)
TRUE_ML = 4 / 3 * np.pi * float(np.prod(SEMI)) / 1000.0
ROWS = COLS = 64
PIXEL = 1.6  # mm


def inside(p: np.ndarray) -> np.ndarray:
    """Whether patient points p[..., 3] lie in the ellipsoid."""
    return np.sum(((p - CENTRE) / SEMI) ** 2, axis=-1) < 1.0


def plane_points(ipp: np.ndarray, row: np.ndarray, col: np.ndarray, sub: int = 1) -> np.ndarray:
    """Patient positions of every pixel (sub x sub samples each): [ROWS*sub, COLS*sub, 3]."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    r = (np.arange(ROWS)[:, None] + offsets[None, :]).reshape(-1)
    c = (np.arange(COLS)[:, None] + offsets[None, :]).reshape(-1)
    return ipp + r[:, None, None] * PIXEL * col + c[None, :, None] * PIXEL * row


def scan(z_positions: list[float], tilt_deg: float = 0.0) -> tuple[list[Dataset], list[np.ndarray]]:
    """Slices at table positions ``z_positions`` with planes tilted by ``tilt_deg`` about x; and
    the analytic mask (pixel centres inside) of each."""
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    uid = generate_uid()
    out, masks = [], []
    for k, z in enumerate(z_positions):
        centre = np.array([0.0, 0.0, z])  # the plane passes through the gantry's centre at table position z
        ipp = centre - (COLS - 1) / 2 * PIXEL * row - (ROWS - 1) / 2 * PIXEL * col
        frac = inside(plane_points(ipp, row, col, 4)).reshape(ROWS, 4, COLS, 4).mean(axis=(1, 3))
        masks.append(inside(plane_points(ipp, row, col)))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, generate_uid(), uid
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [*map(float, row), *map(float, col)]
        ds.GantryDetectorTilt = tilt_deg
        ds.PixelSpacing = [PIXEL, PIXEL]
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1000, 1
        ds.PixelData = np.rint(frac * 1000).astype(np.int16).tobytes()  # -1000 outside, 0 HU inside
        out.append(ds)
    return out, masks


def segment_and_map_back(datasets: list[Dataset], geometry: Geometry):
    vol = resample.build_regular(datasets, geometry=geometry)
    labels = (vol.voxels > -500).astype(np.uint8)  # what a model would find on the regular grid
    source, back = resample.to_source(vol, labels)
    return vol, source, back


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("tilt", [12.0, 25.0])
def test_tilted_phantom_volume_and_labels_on_the_source_slices(tilt: float) -> None:
    zs = [float(z) for z in np.arange(0.0, 82.0, 2.5)]
    datasets, masks = scan(zs, tilt)
    vol, source, back = segment_and_map_back(datasets, Geometry(max_tilt_deg=30))
    assert vol.source is not None and vol.datasets == ()
    assert any("gantry tilt" in n and f"{tilt:.1f} degrees" in n for n in vol.notes), vol.notes
    # The regular grid is axial again (slices perpendicular to the table's travel).
    assert np.allclose(vol.normal, (0, 0, 1), atol=1e-9)
    assert axial_flips(vol) == ()
    # Labels lie on the source slices, which are the instances sent, in order.
    assert [d.SOPInstanceUID for d in source.datasets] == [d.SOPInstanceUID for d in datasets]
    assert back.shape == (len(zs), ROWS, COLS)
    truth = np.stack(masks)
    assert dice(back.astype(bool), truth) > 0.97
    # Volume from the source geometry (slice gap along the normal: 2.5 mm x cos(tilt)).
    assert source.spacing[0] == pytest.approx(2.5 * np.cos(np.radians(tilt)), rel=1e-6)
    ml = resample.segment_volumes_ml(source, back, [1])[1]
    assert ml == pytest.approx(TRUE_ML, rel=0.03), (ml, TRUE_ML)


def test_tilt_beyond_the_bound_and_without_resampling_refused() -> None:
    datasets, _ = scan([float(z) for z in np.arange(0.0, 40.0, 5.0)], 35.0)
    with pytest.raises(VolumeError, match=r"35\.0 degrees\), more than the 30 degrees .*max_tilt_deg"):
        build_volume(datasets, geometry=Geometry(max_tilt_deg=30))
    with pytest.raises(VolumeError, match="gantry tilt"):
        build_volume(datasets)  # the default refuses every tilt


def test_irregular_sideways_drift_is_not_a_tilt() -> None:
    datasets, _ = scan([float(z) for z in np.arange(0.0, 40.0, 5.0)], 10.0)
    x, y, z = (float(v) for v in datasets[3].ImagePositionPatient)
    datasets[3].ImagePositionPatient = [x + 6.0, y, z]
    with pytest.raises(VolumeError, match="irregularly"):
        build_volume(datasets, geometry=Geometry(max_tilt_deg=30))


def uneven_positions() -> list[float]:
    zs = [float(z) for z in np.arange(0.0, 82.0, 2.5)]
    # Drop every fourth slice in the middle (gaps of 5 mm, twice the usual 2.5 mm) and shift one.
    zs = [z for i, z in enumerate(zs) if not (8 <= i <= 24 and i % 4 == 0)]
    zs[3] += 0.8
    return zs


def test_uneven_spacing_within_the_bound_is_resampled() -> None:
    datasets, masks = scan(uneven_positions())
    vol, source, back = segment_and_map_back(datasets, Geometry(max_gap_ratio=2.0))
    assert vol.source is not None
    assert any("uneven slice gaps" in n for n in vol.notes), vol.notes
    assert source.slice_thickness_mm is not None
    assert vol.spacing[0] == pytest.approx(2.5)
    assert dice(back.astype(bool), np.stack(masks)) > 0.98
    # Each slice counts for its share of the gaps: the missing slices' volume is not lost.
    ml = resample.segment_volumes_ml(source, back, [1])[1]
    assert ml == pytest.approx(TRUE_ML, rel=0.03), (ml, TRUE_ML)
    unweighted = float(np.count_nonzero(back)) * source.voxel_volume_ml
    assert unweighted < 0.92 * TRUE_ML  # what counting voxels of the median gap would report


def test_uneven_spacing_beyond_the_bound_or_not_allowed_refused() -> None:
    datasets, _ = scan(uneven_positions())
    with pytest.raises(VolumeError, match=r"a slice is probably missing.*max_gap_ratio"):
        build_volume(datasets, geometry=Geometry(max_gap_ratio=1.5))
    with pytest.raises(VolumeError, match="uneven spacing: gap of 3.30 mm"):
        build_volume(datasets)  # the default refuses uneven gaps (the first one found is said)
    zs = [float(z) for z in np.arange(0.0, 40.0, 2.5)]
    del zs[5:8]  # three slices missing: a gap of 4 usual gaps
    datasets, _ = scan(zs)
    with pytest.raises(VolumeError, match="3 slices are probably missing"):
        build_volume(datasets, geometry=Geometry(max_gap_ratio=2.0))


def test_tilted_and_uneven_together() -> None:
    datasets, masks = scan(uneven_positions(), 15.0)
    vol, source, back = segment_and_map_back(datasets, Geometry(max_tilt_deg=30, max_gap_ratio=2.0))
    assert dice(back.astype(bool), np.stack(masks)) > 0.97
    assert resample.segment_volumes_ml(source, back, [1])[1] == pytest.approx(TRUE_ML, rel=0.03)


def test_regular_series_is_not_resampled() -> None:
    datasets, _ = scan([float(z) for z in np.arange(0.0, 40.0, 2.5)])
    vol = resample.build_regular(datasets, geometry=Geometry(max_tilt_deg=30, max_gap_ratio=2.0))
    assert vol.source is None and vol.slice_thickness_mm is None
    labels = np.zeros(vol.shape, dtype=np.uint8)
    assert resample.to_source(vol, labels) == (vol, labels)


def test_slice_shares() -> None:
    np.testing.assert_allclose(slice_shares(np.array([2.0, 2.0, 4.0, 2.0])), [2, 2, 3, 3, 2])


def test_volume_options_defaults_and_bounds() -> None:
    from pydantic import ValidationError

    from orthanc_plugin.core.config import VolumeOptions

    o = VolumeOptions()
    assert (o.max_tilt_deg, o.max_gap_ratio, o.duplicates) == (30.0, 1.5, "drop_identical")
    assert VolumeOptions(max_tilt_deg=None, max_gap_ratio=None).max_tilt_deg is None
    for bad in ({"max_tilt_deg": 60}, {"max_tilt_deg": 0}, {"max_gap_ratio": 1.0}, {"max_gap_ratio": 9}):
        with pytest.raises(ValidationError):
            VolumeOptions(**bad)
