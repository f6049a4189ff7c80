"""Key images: a few source slices with the segments drawn on them, for PACS that cannot show SEG.

Each key image is a single-frame Secondary Capture Image (SOP Class 1.2.840.10008.5.1.4.1.1.7),
RGB, one instance per slice, all in one series of the study. Single-frame rather than multi-frame
True Color SC: every PACS and viewer reads single-frame SC, while multi-frame SC is still refused
or shown as a movie by several.

The picture is the windowed source slice at its own size, pixel for pixel (row r, column c of the
key image is row r, column c of the slice), with each segment drawn as a coloured outline (the
segment's voxels that touch a voxel outside it) or a translucent fill. Below it a panel holds the
legend (segment name, colour, volume) and a banner that says what the image is: an AI result,
unverified, with the algorithm's and the model's names and versions. Nothing is drawn over the
anatomy but the segments.

Slices are chosen by segment area: the slices holding any segment are split into ``count``
consecutive runs, and each run gives the slice with the largest segmented area.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from scipy import ndimage

from orthanc_plugin.core.results import AlgorithmInfo, SegmentSpec, VolumeMeasurement, check_uid
from orthanc_plugin.imaging.postprocess import BOX_SLAB

#: Secondary Capture Image Storage (PS3.4 Table B.5-1).
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"
#: Debian's fonts-dejavu-core.
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
BANNER_COLOR = (255, 210, 0)
BANNER_TEXT = "AI RESULT - UNVERIFIED - NOT FOR DIAGNOSIS WITHOUT REVIEW"

RGB = NDArray[np.uint8]


@dataclass(frozen=True)
class KeyImage:
    """One rendered key image: the slice index in the volume, its source dataset and the RGB picture."""

    index: int
    source: Dataset
    pixels: RGB  # rows x columns x 3; the source slice occupies rows [0, source.Rows)


@lru_cache(maxsize=8)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (Debian's fonts-dejavu-core); Pillow's own font when it is missing."""
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def choose_slices(labels: NDArray[np.uint8], values: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` slice indices, ascending: the largest segmented area of each of ``count``
    consecutive runs of the slices that hold a segment."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    # Per-slice counts a few slices at a time (np.isin on the whole label map makes grid-sized
    # temporaries: 240 MB more at the peak of a 320-slice series).
    area = np.zeros(labels.shape[0], dtype=np.int64)
    for z in range(0, labels.shape[0], BOX_SLAB):
        slab = labels[z : z + BOX_SLAB].reshape(min(BOX_SLAB, labels.shape[0] - z), -1)
        for v in set(values):
            area[z : z + BOX_SLAB] += np.count_nonzero(slab == v, axis=1)
    holding = np.flatnonzero(area)
    if holding.size == 0:
        return []
    chosen = []
    for run in np.array_split(holding, min(count, holding.size)):
        chosen.append(int(run[np.argmax(area[run])]))
    return sorted(set(chosen))


def window_of(
    ds: Dataset, voxels: NDArray[np.float32], window: tuple[float, float] | None
) -> tuple[float, float]:
    """[low, high] shown black to white: the configured one, the source's first window, or percentiles."""
    if window is not None:
        return window
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
        if w > 1:
            return c - w / 2, c + w / 2
    low, high = (float(x) for x in np.percentile(voxels, [1, 99]))
    return (low, high) if high > low else (low, low + 1)


#: Outline width in pixels, drawn inside the segment (a drawn pixel is always one of its voxels).
OUTLINE_PX = 2


def outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The voxels of ``mask`` within ``OUTLINE_PX`` steps (4-neighbourhood) of a voxel outside it."""
    inner: NDArray[np.bool_] = ndimage.binary_erosion(mask, iterations=OUTLINE_PX, border_value=0)
    return mask & ~inner


def render(
    slice_voxels: NDArray[np.float32],
    slice_labels: NDArray[np.uint8],
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    window: tuple[float, float],
    style: str = "outline",
    fill_opacity: float = 0.35,
    caption: str = "",
) -> RGB:
    """The key image of one slice: the windowed slice with the segments drawn, then legend and banner."""
    low, high = window
    grey = np.clip((slice_voxels.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    picture = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., np.newaxis], 3, axis=2)
    for spec in segments:
        mask = slice_labels == spec.label
        if not mask.any():
            continue
        color = np.asarray(spec.color_rgb, dtype=np.float32)
        if style == "fill":
            blended = picture[mask].astype(np.float32) * (1 - fill_opacity) + color * fill_opacity
            picture[mask] = (blended + 0.5).astype(np.uint8)
        picture[outline(mask)] = spec.color_rgb
    rows, cols = slice_voxels.shape
    volumes = {m.segment_label: m.volume_ml for m in measurements}
    size = max(11, cols // 40)
    line = int(size * 1.5)
    lines = [
        BANNER_TEXT,
        f"{algorithm.name} {algorithm.version} - model {algorithm.model_name} {algorithm.model_version}",
    ]
    legend = [s for s in segments if s.label in volumes]
    panel_rows = line * (len(lines) + len(legend) + (1 if caption else 0)) + line // 2
    canvas = Image.new("RGB", (cols, rows + panel_rows), (0, 0, 0))
    canvas.paste(Image.fromarray(picture, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = rows + line // 4
    draw.rectangle((0, rows, cols - 1, rows + line - 1), fill=BANNER_COLOR)
    draw.text((size // 2, y), lines[0], fill=(0, 0, 0), font=font(size, bold=True))
    y += line
    draw.text((size // 2, y), lines[1], fill=(255, 255, 255), font=font(size))
    y += line
    for spec in legend:
        draw.rectangle((size // 2, y + 2, size // 2 + size, y + size + 2), fill=spec.color_rgb)
        draw.text(
            (size * 2, y),
            f"{spec.name}: {volumes[spec.label]:.1f} mL (whole volume)",
            fill=(255, 255, 255),
            font=font(size),
        )
        y += line
    if caption:
        draw.text((size // 2, y), caption, fill=(200, 200, 200), font=font(size))
    return np.asarray(canvas, dtype=np.uint8)


def render_key_images(
    voxels: NDArray[np.float32] | NDArray[np.int16],
    datasets: Sequence[Dataset],
    labels: NDArray[np.uint8],
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    count: int = 3,
    style: str = "outline",
    window: tuple[float, float] | None = None,
    fill_opacity: float = 0.35,
) -> list[KeyImage]:
    """The key images of a volume (``voxels[z]`` is ``datasets[z]``, ``labels`` on the same grid)."""
    if style not in ("outline", "fill"):
        raise ValueError(f"style must be 'outline' or 'fill', got {style!r}")
    if labels.shape != voxels.shape or len(datasets) != voxels.shape[0]:
        raise ValueError(
            f"labels {labels.shape}, voxels {voxels.shape} and {len(datasets)} source slices do not agree"
        )
    chosen = choose_slices(labels, [s.label for s in segments], count)
    out = []
    for n, z in enumerate(chosen, start=1):
        plane = np.asarray(voxels[z], dtype=np.float32)  # an int16 CT's slice, as float32 values
        pixels = render(
            plane, labels[z], segments, measurements, algorithm,
            window_of(datasets[z], plane, window), style, fill_opacity,
            caption=f"Key image {n} of {len(chosen)} - slice {z + 1} of {len(datasets)}",
        )  # fmt: skip
        out.append(KeyImage(z, datasets[z], pixels))
    return out


def build_key_images(
    images: Sequence[KeyImage],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    series_number: int,
    series_description: str,
    content_time: dt.datetime | None = None,
) -> list[Dataset]:
    """One Secondary Capture instance per key image, in the source's study, in one series."""
    check_uid(series_instance_uid, "series_instance_uid")
    if len(sop_instance_uids) < len(images):
        raise ValueError(
            f"{len(images)} key images need as many SOP Instance UIDs, got {len(sop_instance_uids)}"
        )
    when = content_time or dt.datetime.now(dt.UTC)
    out = []
    for n, (image, uid) in enumerate(zip(images, sop_instance_uids, strict=False), start=1):
        check_uid(uid, f"sop_instance_uids[{n - 1}]")
        src = image.source
        with warnings.catch_warnings():
            # highdicom warns about the source's own patient name form (copied as it is)
            warnings.simplefilter("ignore", UserWarning)
            sc = _sc_image(src, image.pixels, series_instance_uid, series_number, uid, n, algorithm)
        sc.SeriesDescription = series_description[:64]
        sc.Modality = "OT"
        sc.ConversionType = "WSD"
        # Both sides or none (Image Laterality "B"): the slice is not of one side of a paired organ.
        if "Laterality" in sc:
            del sc.Laterality
        sc.ImageLaterality = "B"
        sc.BurnedInAnnotation = "YES"  # the banner and legend are part of the pixels
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = (
            f"Segments by {algorithm.name} {algorithm.version} (model {algorithm.model_name} "
            f"{algorithm.model_version}) drawn on the source slice"
        )[:1024]
        sc.ContentDate, sc.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        sc.SeriesDate, sc.SeriesTime = sc.ContentDate, sc.ContentTime
        sc.SoftwareVersions = [algorithm.version, algorithm.model_version]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
        if "PixelSpacing" in src:
            sc.NominalScannedPixelSpacing = list(src.PixelSpacing)
        out.append(sc)
    return out


def _sc_image(
    src: Dataset,
    pixels: RGB,
    series_uid: str,
    series_number: int,
    uid: str,
    number: int,
    algorithm: AlgorithmInfo,
) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        src,
        pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=uid,
        instance_number=number,
        manufacturer=algorithm.manufacturer,
        patient_orientation=_orientation(src),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def _orientation(src: Dataset) -> tuple[str, str]:
    """PatientOrientation (row, column directions as letters) from the source's ImageOrientationPatient."""
    iop = src.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return ("", "")

    def letters(v: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(np.asarray(v, dtype=float)))
        out = ""
        for axis in order:
            if abs(float(v[axis])) > 0.3:
                out += names[axis][0] if float(v[axis]) > 0 else names[axis][1]
        # The dominant direction only: highdicom takes one letter per direction, so an oblique
        # one (e.g. "PF" of a 20 degree gantry tilt) would fail the whole job.
        return out[:1] or "L"

    return letters([float(x) for x in iop[:3]]), letters([float(x) for x in iop[3:]])
