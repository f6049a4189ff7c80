"""Derived test studies for benchmarks and tests: copies of a real series with new UIDs, or resampled along z.

Written under a folder the caller gives (a temporary one); never into the repository. The
derived studies say so in their SeriesDescription.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from orthanc_plugin.core.uids import derived_uid


def sorted_slices(folder: Path) -> list[pydicom.Dataset]:
    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(slices, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def copy_study(slices: list[pydicom.Dataset], out: Path, tag: str) -> Path:
    """The series as a new study (new Study/Series/SOP UIDs derived from ``tag``)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = derived_uid(tag, "study"), derived_uid(tag, "series")
    for i, ds in enumerate(slices):
        ds = ds.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = derived_uid(tag, f"sop-{i}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = ""
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return out


def resample_z(slices: list[pydicom.Dataset], n: int, out: Path, tag: str) -> Path:
    """Resample the series to ``n`` slices over the same coverage (linear in z), as a new study."""
    out.mkdir(parents=True, exist_ok=True)
    stack = np.stack([ds.pixel_array.astype(np.float32) for ds in slices])
    first = np.asarray(slices[0].ImagePositionPatient, float)
    last = np.asarray(slices[-1].ImagePositionPatient, float)
    pos = np.linspace(0, len(slices) - 1, n)
    study, series = derived_uid(tag, "study"), derived_uid(tag, "series")
    thickness = float(np.linalg.norm(last - first)) / (n - 1)
    for k, p in enumerate(pos):
        lo = int(np.floor(p))
        hi = min(lo + 1, len(slices) - 1)
        w = p - lo
        pixels = np.rint((1 - w) * stack[lo] + w * stack[hi]).astype(slices[0].pixel_array.dtype)
        ds = slices[lo].copy()
        ds.PixelData = pixels.tobytes()
        ds.ImagePositionPatient = [float(v) for v in first + (last - first) * (p / (len(slices) - 1))]
        ds.SliceThickness = round(thickness, 3)
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = f"derived: {slices[0].get('SeriesDescription', '')} resampled to {n} slices"[
            :64
        ]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = derived_uid(tag, f"sop-{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return out
