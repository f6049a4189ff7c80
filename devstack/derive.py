"""Derived test studies for benchmarks and tests: copies of a real series with new UIDs, or resampled along z.

Written under a folder the caller gives (a temporary one); never into the repository. The
derived studies say so in their SeriesDescription.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

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


def as_new_series(src: Path, dest: Path, study: str, description: str | None = None) -> list[Path]:
    """The files of ``src`` as a new series of ``study`` (new Series and SOP Instance UIDs; with
    ``description``, that SeriesDescription and SeriesNumber 99), in slice order along z."""
    series = generate_uid()
    dest.mkdir(parents=True)
    out = []
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if description is not None:
            ds.SeriesDescription, ds.SeriesNumber = description, 99
        ds.save_as(dest / f.name, enforce_file_format=True)
        out.append((float(ds.ImagePositionPatient[2]), dest / f.name))
    return [f for _, f in sorted(out)]


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


def tilted(slices: list[pydicom.Dataset], degrees: float) -> list[pydicom.Dataset]:
    """The axial series ``slices`` re-sliced as a CT with a gantry tilt of ``degrees`` about the
    patient's left-right axis: planes through the same table positions (the centre of each
    original slice), leaning by ``degrees``, sampled from the original voxels (cubic spline) (air,
    -1024 HU, outside them); ImagePositionPatient sheared accordingly, GantryDetectorTilt set.
    Same UIDs as the source: the caller gives new ones."""
    slices = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = slices[0]
    rows, cols = int(first.Rows), int(first.Columns)
    dy, dx = (float(v) for v in first.PixelSpacing)
    iop = np.asarray(first.ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    if not (np.allclose(row, [1, 0, 0], atol=1e-4) and np.allclose(col, [0, 1, 0], atol=1e-4)):
        raise ValueError("tilted() takes an axial head-first supine series")
    from scipy import ndimage

    slope, intercept = float(first.get("RescaleSlope", 1)), float(first.get("RescaleIntercept", 0))
    stack = np.stack([ds.pixel_array.astype(np.float32) * slope + intercept for ds in slices])
    ipps = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in slices])
    zs = ipps[:, 2]
    t = np.radians(degrees)
    new_col = np.array([0.0, np.cos(t), -np.sin(t)])
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    coefficients = ndimage.spline_filter(stack, order=3)  # cubic: the derivation adds little blur
    out = []
    for k, ds in enumerate(slices):
        centre = ipps[k] + (cols - 1) / 2 * dx * row + (rows - 1) / 2 * dy * col
        ipp = centre - (cols - 1) / 2 * dx * row - (rows - 1) / 2 * dy * new_col
        p = ipp[:, None, None] + c * dx * row[:, None, None] + r * dy * new_col[:, None, None]
        f = np.interp(p[2], zs, np.arange(len(zs), dtype=np.float64), left=-1.0, right=float(len(zs)))
        coords = np.stack([f, (p[1] - ipps[0][1]) / dy, (p[0] - ipps[0][0]) / dx])
        hu = ndimage.map_coordinates(
            coefficients, coords, order=3, mode="constant", cval=-1024.0, prefilter=False
        )
        stored = np.clip(
            np.rint((hu - intercept) / slope), 0 if ds.PixelRepresentation == 0 else -32768, 32767
        )
        d = ds.copy()
        d.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
        d.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        d.ImageOrientationPatient = [*map(float, row), *(round(float(v), 8) for v in new_col)]
        d.GantryDetectorTilt = degrees
        d.SeriesDescription = f"derived: gantry tilt {degrees:g} degrees"
        out.append(d)
    return out


def enhanced_ct(
    slices: list[pydicom.Dataset], sop_instance_uid: str, derived_frames: int = 0
) -> pydicom.Dataset:
    """The single-frame CT slices as one Enhanced CT Image (multi-frame, functional groups):
    shared PixelMeasures, PlaneOrientation, PixelValueTransformation and CT Image Frame Type;
    per frame FrameContent and PlanePosition. ``derived_frames`` extra frames (copies of the
    first ones, FrameType DERIVED) are appended, as a scanner appends reformats. Same Study and
    Series UIDs as the slices."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, ExplicitVRLittleEndian

    enhanced_ct_storage = UID("1.2.840.10008.5.1.4.1.1.2.1")
    first = slices[0]
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = enhanced_ct_storage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    for kw in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
        "SeriesInstanceUID", "SeriesNumber", "Modality", "Manufacturer", "ManufacturerModelName",
        "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined", "KVP", "ConvolutionKernel",
        "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
        "HighBit", "PixelRepresentation", "PatientPosition",
    ):  # fmt: skip
        if kw in first:
            ds[kw] = first[kw]
    ds.SOPClassUID, ds.SOPInstanceUID = enhanced_ct_storage, sop_instance_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesDescription = "derived: enhanced multi-frame CT"
    ds.ContentDate, ds.ContentTime = first.get("StudyDate", ""), first.get("StudyTime", "")
    ds.AcquisitionDateTime = f"{first.get('StudyDate', '')}{first.get('StudyTime', '')}"
    ds.ContentQualification, ds.ImageComments = "RESEARCH", ""
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "VOLUME", "NONE"
    ds.PixelPresentation = "MONOCHROME"
    dim_uid = derived_uid(sop_instance_uid, "dimension-organisation")
    org = pydicom.Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    dim = pydicom.Dataset()
    dim.DimensionOrganizationUID = dim_uid
    dim.DimensionIndexPointer = 0x00200032
    dim.FunctionalGroupPointer = 0x00209113
    dim.DimensionDescriptionLabel = "Image Position"
    ds.DimensionIndexSequence = Sequence([dim])

    shared = pydicom.Dataset()
    measures = pydicom.Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.get("SliceThickness", 1)
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    transform = pydicom.Dataset()
    transform.RescaleIntercept = first.get("RescaleIntercept", 0)
    transform.RescaleSlope = first.get("RescaleSlope", 1)
    transform.RescaleType = "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames = [(s, "ORIGINAL") for s in slices] + [(s, "DERIVED") for s in slices[:derived_frames]]
    per_frame = []
    pixels = []
    for k, (s, kind) in enumerate(frames):
        item = pydicom.Dataset()
        content = pydicom.Dataset()
        content.DimensionIndexValues = [k + 1]
        content.FrameAcquisitionNumber = 1
        position = pydicom.Dataset()
        position.ImagePositionPatient = s.ImagePositionPatient
        frame_type = pydicom.Dataset()
        frame_type.FrameType = [kind, "PRIMARY", "AXIAL", "NONE"]
        frame_type.PixelPresentation, frame_type.VolumetricProperties = "MONOCHROME", "VOLUME"
        frame_type.VolumeBasedCalculationTechnique = "NONE"
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        item.CTImageFrameTypeSequence = Sequence([frame_type])
        per_frame.append(item)
        pixels.append(s.pixel_array)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(pixels).astype(first.pixel_array.dtype).tobytes()
    return ds
