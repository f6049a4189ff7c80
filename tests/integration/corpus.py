"""A corpus of bad (and awkward but valid) input, generated from the shared data.

Every kind is a new study with fresh UIDs derived from a per-run nonce, built from
``A0001-5mm`` (every other slice: 32 slices 10 mm apart, averaged 2 x 2 to 256 x 256 so that
uploads are small) or, for the wrong modality, from the GE EPI MR. Nothing is written into the
repository; the files exist only in memory.

Each :class:`Kind` says what must happen end to end: ``succeeded`` (correct outputs),
``failed`` (the job's error holds ``words``) or ``no job`` (routing refuses; the dry-run's
reasons hold ``words``).
"""

from __future__ import annotations

import copy
import functools
import io
import random
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from devstack.derive import enhanced_ct, tilted
from orthanc_plugin.core.uids import derived_uid

from ..conftest import CT_A0001, MR, require_data

Expect = Literal["succeeded", "failed", "no job"]
Series = list[Dataset]
#: One nonce per test run: the derived UIDs differ from any earlier run's.
RUN = uuid.uuid4().hex[:10]
# The kind whose outputs are the reference for the kinds that must give the same result.
REFERENCE = "16-bit unsigned (reference)"


@dataclass(frozen=True)
class Kind:
    name: str
    expect: Expect
    words: tuple[str, ...]
    build: Callable[[], list[Series]]
    #: Same anatomy as the reference: the lung volumes must match it within ``tolerance``.
    same_as_reference: bool = False
    #: Post-processing of the encoded files of the first series (e.g. truncating one).
    mangle: Callable[[list[bytes]], list[bytes]] | None = None
    #: Relative tolerance of the lung volumes against the reference: 0.5% for the same pixels,
    #: 3% where the series was resampled (tilted or uneven slices).
    tolerance: float = 0.005
    #: (Modality, instances) of our outputs; None: what ct-lung stores for single-frame slices.
    outputs: tuple[tuple[str, int], ...] | None = None


@dataclass
class Study:
    kind: Kind
    uid: str
    files: list[bytes]
    ct_instances: int  # instances of the image series Orthanc must hold once uploaded
    extra: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- base series


def _position(ds: Dataset) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return float(np.dot(np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient, float)))


@functools.cache
def downsampled_ct(
    every: int = 2, factor: int = 2, description: str = "derived test series"
) -> tuple[Dataset, ...]:
    """Every ``every``-th slice of A0001-5mm, ``factor`` times smaller in-plane (block means),
    sorted along the normal. Cached: callers copy before changing them."""
    require_data(CT_A0001)
    slices = sorted((pydicom.dcmread(f) for f in CT_A0001.glob("*.dcm")), key=_position)[::every]
    for ds in slices:
        arr = ds.pixel_array.astype(np.float32)
        small = arr.reshape(arr.shape[0] // factor, factor, arr.shape[1] // factor, factor).mean(axis=(1, 3))
        ds.PixelData = np.rint(small).astype(ds.pixel_array.dtype).tobytes()
        ds.Rows, ds.Columns = small.shape
        ds.PixelSpacing = [round(float(v) * factor, 6) for v in ds.PixelSpacing]
        ds.SeriesDescription = description
        ds.AccessionNumber = ""
    return tuple(slices)


def base() -> Series:
    """The 32 slices (deep copies: every kind changes its own)."""
    return [copy.deepcopy(ds) for ds in downsampled_ct()]


def _set_pixels(ds: Dataset, arr: np.ndarray) -> None:
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.Rows, ds.Columns = arr.shape[:2]


def _hu_signed(ds: Dataset) -> None:
    """Store Hounsfield units directly as signed 16-bit (slope 1, intercept 0)."""
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelRepresentation = 1
    ds.BitsStored, ds.HighBit = 16, 15
    _set_pixels(ds, hu.astype(np.int16))
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0


def to_jpeg2000(ds: Dataset) -> None:
    """Lossless JPEG 2000 through Pillow's OpenJPEG (pydicom itself needs pylibjpeg to encode it)."""
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint16)).save(
        buf, format="JPEG2000", irreversible=False, no_jp2=True
    )
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _jpeg_lossless(series: Series) -> Series:
    """JPEG lossless, process 14 (DCMTK's dcmcjpeg): pydicom cannot decode it here, Orthanc must."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ds in enumerate(series):
            src, dst = Path(tmp) / f"{i}.dcm", Path(tmp) / f"{i}.jpg.dcm"
            ds.save_as(src, enforce_file_format=True)
            subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(src), str(dst)], check=True, timeout=60)
            out.append(pydicom.dcmread(dst))
    return out


def _compressed(how: str) -> Callable[[], list[Series]]:
    def build() -> list[Series]:
        s = base()
        if how == "jpeg-lossless":
            return [_jpeg_lossless(s)]
        for i, ds in enumerate(s):
            kind = how if how != "mixed" else ("native", "rle", "jls", "j2k")[i % 4]
            if kind == "rle":
                ds.compress(RLELossless)
            elif kind == "jls":
                ds.compress(JPEGLSLossless)
            elif kind == "j2k":
                to_jpeg2000(ds)
        return [s]

    return build


# --------------------------------------------------------------------------- non-image objects


def _non_image(template: Dataset, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    # Patient and study attributes come from the source series (already de-identified data).
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "StudyID", "ReferringPhysicianName", "StudyDescription"):  # fmt: skip
        if kw in template:
            setattr(ds, kw, template.get(kw))
    ds.AccessionNumber = ""
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesNumber = {"SR": 60, "DOC": 61, "PR": 62}[modality]
    ds.SeriesDescription = f"derived test {modality}"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def _code(value: str, scheme: str, meaning: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return DicomSequence([item])


def sr_object(template: Dataset) -> Dataset:
    ds = _non_image(template, "1.2.840.10008.5.1.4.1.1.88.11", "SR")  # Basic Text SR
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic imaging report")
    ds.ContinuityOfContent, ds.CompletionFlag, ds.VerificationFlag = "SEPARATE", "COMPLETE", "UNVERIFIED"
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = _code("121071", "DCM", "Finding")
    text.TextValue = "Generated by the orthanc-ai test corpus."
    ds.ContentSequence = DicomSequence([text])
    return ds


def pdf_object(template: Dataset) -> Dataset:
    ds = _non_image(template, "1.2.840.10008.5.1.4.1.1.104.1", "DOC")  # Encapsulated PDF
    pdf = b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "test document"
    ds.BurnedInAnnotation = "NO"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic imaging report")
    return ds


def pr_object(template: Dataset) -> Dataset:
    ds = _non_image(template, "1.2.840.10008.5.1.4.1.1.11.1", "PR")  # Grayscale Softcopy PS
    ds.ContentLabel = "TEST"
    ds.ContentDescription = "test presentation state"
    ds.PresentationCreationDate, ds.PresentationCreationTime = "20240101", "120000"
    ds.ContentCreatorName = ""
    ref = Dataset()
    ref.SeriesInstanceUID = template.SeriesInstanceUID
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = (
        template.SOPClassUID,
        template.SOPInstanceUID,
    )
    ref.ReferencedImageSequence = DicomSequence([image])
    ds.ReferencedSeriesSequence = DicomSequence([ref])
    return ds


# --------------------------------------------------------------------------- the kinds


def _one(fn: Callable[[Series], Series | None]) -> Callable[[], list[Series]]:
    """A builder from a function that changes the base series in place (or returns a new one)."""

    def build() -> list[Series]:
        s = base()
        out = fn(s)
        return [out if out is not None else s]

    return build


def _each(fn: Callable[[Dataset], None]) -> Callable[[Series], None]:
    def apply(s: Series) -> None:
        for ds in s:
            fn(ds)

    return apply


def _drop(s: Series, k: int, *keywords: str) -> None:
    for kw in keywords:
        delattr(s[k], kw)


def _duplicate(s: Series) -> Series:
    dup = copy.deepcopy(s[12])
    dup.InstanceNumber = 99
    return [*s, dup]


def _duplicate_other_pixels(s: Series) -> Series:
    dup = copy.deepcopy(s[12])
    dup.InstanceNumber = 99
    dup.PixelData = s[13].PixelData  # the same position, another image
    return [*s, dup]


def _shift(s: Series, k: int, mm: float) -> None:
    ipp = [float(v) for v in s[k].ImagePositionPatient]
    s[k].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + mm]


def _tilt(degrees: float) -> Callable[[], list[Series]]:
    """The series re-sliced as with a gantry tilt (devstack.derive.tilted)."""
    return lambda: [tilted(base(), degrees)]


def _smaller(ds: Dataset) -> None:
    arr = ds.pixel_array
    _set_pixels(ds, arr[::2, ::2])
    ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]


def _temporal(s: Series) -> Series:
    out = []
    for t in (1, 2):
        for ds in s:
            d = copy.deepcopy(ds)
            d.TemporalPositionIdentifier, d.NumberOfTemporalPositions, d.AcquisitionNumber = t, 2, t
            out.append(d)
    return out


def _rgb(ds: Dataset) -> None:
    hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
    grey = np.clip((hu + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    _set_pixels(ds, np.repeat(grey[..., None], 3, axis=2))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0


def _huge(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 30000  # the header lies; the pixel data is still 256 x 256


def _short_pixels(s: Series) -> None:
    s[20].PixelData = s[20].PixelData[: len(s[20].PixelData) // 2]


def _sagittal(s: Series) -> Series:
    """Sagittal images resliced from the axial series: 24 planes of 32 x 256."""
    vol = np.stack([ds.pixel_array for ds in s])  # z (feet to head), y, x
    first = s[0]
    x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
    z_top = float(s[-1].ImagePositionPatient[2])
    dy, dx = (float(v) for v in first.PixelSpacing)
    dz = abs(float(s[1].ImagePositionPatient[2]) - float(s[0].ImagePositionPatient[2]))
    out = []
    for n, x in enumerate(range(8, 256, 10)[:24]):
        ds = copy.deepcopy(first)
        _set_pixels(ds, vol[::-1, :, x])  # rows from head to feet, columns anterior to posterior
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x0 + x * dx, y0, z_top]
        ds.PixelSpacing = [dz, dy]
        ds.InstanceNumber = n + 1
        out.append(ds)
    return out


def _no_rescale(ds: Dataset) -> None:
    _hu_signed(ds)
    del ds.RescaleSlope, ds.RescaleIntercept


def _without(k: int) -> Callable[[Series], Series]:
    return lambda s: s[:k] + s[k + 1 :]


def _blank(ds: Dataset) -> None:
    _set_pixels(ds, np.full((ds.Rows, ds.Columns), 1024 + 20, dtype=ds.pixel_array.dtype))  # water, 20 HU


def _scramble(s: Series) -> Series:
    rng = random.Random(5)
    for ds in s:
        ds.InstanceNumber = rng.randint(1, 500)
    rng.shuffle(s)
    return s


def _localizer(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram 0.6 T20s"


def _thick(ds: Dataset) -> None:
    ds.SliceThickness = 12


def _multiframe() -> list[Series]:
    import highdicom as hd

    s = base()
    uid = derived_uid(f"corpus-{RUN}-multiframe-source", "series")
    for ds in s:
        ds.SeriesInstanceUID = uid
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        s, series_instance_uid=uid, series_number=int(s[0].SeriesNumber or 1),
        sop_instance_uid=derived_uid(f"corpus-{RUN}-multiframe", "sop"), instance_number=1,
    )  # fmt: skip
    return [[image]]


def _enhanced() -> list[Series]:
    """The series as one Enhanced CT Image (functional groups: devstack.derive.enhanced_ct)."""
    return [[enhanced_ct(base(), derived_uid(f"corpus-{RUN}-enhanced", "sop"))]]


def _secondary_capture() -> list[Series]:
    """The Enhanced CT relabelled Multi-frame Grayscale Word Secondary Capture: not read as slices."""
    (series,) = _enhanced()
    series[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    return [series]


#: What ct-lung stores for a multi-frame source: no RTSTRUCT (see docs/pipelines.md, "Volume").
MULTIFRAME_OUTPUTS = (("DOC", 1), ("OT", 3), ("SEG", 1), ("SR", 1))


def _with_non_images() -> list[Series]:
    s = base()
    return [s, [sr_object(s[0])], [pdf_object(s[0])], [pr_object(s[0])]]


def _only(maker: Callable[[Dataset], Dataset]) -> Callable[[], list[Series]]:
    return lambda: [[maker(base()[0])]]


def _mr() -> list[Series]:
    require_data(MR)
    files = sorted((MR / "mr_0004").glob("*.dcm"))[:8]
    return [[pydicom.dcmread(f) for f in files]]


def _truncate_middle(files: list[bytes]) -> list[bytes]:
    files = list(files)
    files[16] = files[16][: len(files[16]) // 2]
    return files


KINDS: tuple[Kind, ...] = (
    # ---- processed correctly: the same lung volumes as the reference
    Kind(REFERENCE, "succeeded", (), _one(lambda s: None)),
    Kind("16-bit signed, HU stored directly", "succeeded", (), _one(_each(_hu_signed)), True),
    Kind(
        "RescaleSlope missing (identity slope)",
        "succeeded",
        (),
        _one(_each(lambda d: delattr(d, "RescaleSlope"))),
        True,
    ),
    Kind(
        "RescaleSlope and RescaleIntercept missing, values are HU",
        "succeeded",
        (),
        _one(_each(_no_rescale)),
        True,
    ),
    Kind("RLE lossless", "succeeded", (), _compressed("rle"), True),
    Kind("JPEG-LS lossless", "succeeded", (), _compressed("jls"), True),
    Kind("JPEG 2000 lossless", "succeeded", (), _compressed("j2k"), True),
    Kind(
        "JPEG lossless (process 14, decoded by Orthanc)", "succeeded", (), _compressed("jpeg-lossless"), True
    ),
    Kind("four transfer syntaxes in one series", "succeeded", (), _compressed("mixed"), True),
    Kind("file order and InstanceNumber scrambled", "succeeded", (), _one(_scramble), True),
    Kind("SR, PDF and presentation state beside the CT", "succeeded", (), _with_non_images, True),
    # ---- refused by the worker with the reason; nothing stored
    Kind(
        "ImagePositionPatient missing",
        "failed",
        ("no valid ImagePositionPatient", "position is unknown"),
        _one(lambda s: _drop(s, 7, "ImagePositionPatient")),
    ),
    Kind(
        "ImageOrientationPatient missing",
        "failed",
        ("no valid ImageOrientationPatient",),
        _one(lambda s: _drop(s, 9, "ImageOrientationPatient")),
    ),
    # The same image sent twice under another SOP Instance UID: dropped, said in the job's notes.
    Kind(
        "duplicated slice",
        "succeeded",
        ("repeating another's position and pixel data dropped",),
        _one(_duplicate),
        True,
    ),
    Kind(
        "duplicated position, other pixel data",
        "failed",
        ("duplicated slices", "same position"),
        _one(_duplicate_other_pixels),
    ),
    Kind(
        "missing slice",
        "failed",
        ("a slice is probably missing", "gap of 20.00 mm", "usual gap is 10.00 mm"),
        _one(_without(15)),
    ),
    # Gaps of 14 and 6 mm (at most 1.5 usual gaps): resampled, labels mapped back.
    Kind(
        "uneven spacing",
        "succeeded",
        ("uneven slice gaps (6.00 to 14.00 mm)", "labels mapped back onto the 32 source slices"),
        _one(lambda s: _shift(s, 10, 4.0)),
        True,
        tolerance=0.03,
    ),
    Kind(
        "uneven spacing beyond the bound",
        "failed",
        ("uneven spacing", "gap of 17.00 mm", "usual gap is 10.00 mm", "volume.max_gap_ratio"),
        _one(lambda s: _shift(s, 10, 7.0)),
    ),
    Kind(
        "mixed orientations",
        "failed",
        ("mixed orientations",),
        _one(lambda s: setattr(s[5], "ImageOrientationPatient", [1, 0, 0, 0, 0.9962, -0.0872])),
    ),
    Kind(
        "gantry tilt (20 degrees)",
        "succeeded",
        ("slices tilted 20.0 degrees", "labels mapped back onto the 32 source slices"),
        _tilt(20.0),
        True,
        tolerance=0.03,
    ),
    Kind(
        "gantry tilt beyond the bound (35 degrees)",
        "failed",
        ("gantry tilt", "35.0 degrees", "volume.max_tilt_deg"),
        _tilt(35.0),
    ),
    Kind(
        "different Rows/Columns in one series",
        "failed",
        ("different sizes", "(128, 128)", "(256, 256)"),
        _one(lambda s: _smaller(s[3])),
    ),
    Kind(
        "different PixelSpacing in one series",
        "failed",
        ("different PixelSpacing",),
        _one(lambda s: setattr(s[4], "PixelSpacing", [0.9, 0.9])),
    ),
    Kind("two temporal positions", "failed", ("2 temporal positions", "temporal_position"), _one(_temporal)),
    Kind(
        "RGB colour images",
        "failed",
        ("3 samples per pixel", "colour images cannot be used"),
        _one(_each(_rgb)),
    ),
    Kind(
        "huge dimensions in the header (30000 x 30000)",
        "failed",
        ("too large", "30000 x 30000"),
        _one(_each(_huge)),
    ),
    Kind(
        "pixel data shorter than Rows x Columns",
        "failed",
        ("pixel data cannot be decoded", "less than expected"),
        _one(_short_pixels),
    ),
    Kind(
        "truncated file (Orthanc refuses it, a slice is then missing)",
        "failed",
        ("a slice is probably missing",),
        _one(lambda s: None),
        mangle=_truncate_middle,
    ),
    Kind(
        "CT instances without pixel data",
        "failed",
        ("no pixel data", "not an image"),
        _one(_each(lambda d: delattr(d, "PixelData"))),
    ),
    Kind(
        "RescaleSlope 0", "failed", ("RescaleSlope 0",), _one(_each(lambda d: setattr(d, "RescaleSlope", 0)))
    ),
    Kind("sagittal images (not axial)", "failed", ("not axial", "needs axial images"), _one(_sagittal)),
    Kind(
        "no lungs in the images (uniform water)",
        "failed",
        ("not aerated lung",),
        _one(_each(_blank)),
    ),
    Kind(
        "enhanced multi-frame CT",
        "succeeded",
        (),
        _enhanced,
        True,
        outputs=MULTIFRAME_OUTPUTS,
    ),
    Kind(
        "enhanced (legacy converted) multi-frame CT",
        "succeeded",
        (),
        _multiframe,
        True,
        outputs=MULTIFRAME_OUTPUTS,
    ),
    # ---- refused by routing: no job, the dry-run says why
    Kind("single slice", "no job", ("ImageCount is 1, below minimum 20",), _one(lambda s: s[16:17])),
    Kind("wrong modality for the rule (MR)", "no job", ("Modality is 'MR', rule wants 'CT'",), _mr),
    Kind("SR only", "no job", ("Modality is 'SR'",), _only(sr_object)),
    Kind("encapsulated PDF only", "no job", ("Modality is 'DOC'",), _only(pdf_object)),
    Kind("presentation state only", "no job", ("Modality is 'PR'",), _only(pr_object)),
    Kind(
        "multi-frame secondary capture",
        "no job",
        ("multi-frame", "NumberOfFrames 32", "only Enhanced and Legacy Converted Enhanced CT and MR"),
        _secondary_capture,
    ),
    Kind("localizer only", "no job", ("excluded by rule on ImageType",), _one(_each(_localizer))),
    Kind(
        "slices too thick (12 mm)", "no job", ("SliceThickness is 12, above maximum 10",), _one(_each(_thick))
    ),
)


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_study(kind: Kind) -> Study:
    """The kind's files, as a new study: Study/Series/SOP UIDs derived from the run and the kind."""
    tag = f"corpus-{RUN}-{kind.name}"
    study_uid = derived_uid(tag, "study")
    files: list[bytes] = []
    ct_instances = 0
    for n, series in enumerate(kind.build()):
        series_uid = derived_uid(tag, f"series-{n}")
        encoded = []
        for i, ds in enumerate(series):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = derived_uid(tag, f"sop-{n}-{i}")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            encoded.append(encode(ds))
        if n == 0:
            if kind.mangle is not None:
                encoded = kind.mangle(encoded)
            ct_instances = len(encoded) - (1 if kind.mangle is _truncate_middle else 0)
        files += encoded
    return Study(kind, study_uid, files, ct_instances)


def empty_study_files() -> tuple[str, list[bytes]]:
    """One slice of a study that the test deletes again before it becomes stable."""
    study = make_study(Kind("empty study", "no job", (), _one(lambda s: s[:1])))
    return study.uid, study.files
