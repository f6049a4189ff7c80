"""Series of single-frame DICOM images -> a correctly ordered 3D volume, or a clear refusal.

Slices are sorted by their position along the slice normal, never by file name or
InstanceNumber. Everything that would make the voxel grid a lie (mixed orientations or
sizes, uneven gaps, tilted gantry, repeated positions) is refused with a reason an admin
can act on, unless the caller allows a tilt or uneven gaps within a bound: the volume of such
a series holds its slices as they are and says what makes it irregular (:attr:`Volume.tilt_deg`,
:attr:`Volume.slice_thickness_mm`); ``imaging.resample`` makes a regular grid of it for a model
and maps the labels back onto the slices.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from orthanc_plugin.imaging import multiframe

PixelReader = Callable[[Dataset], NDArray[np.generic]]
#: A volume's voxels: int16 where every value is an integer in its range (CT in HU), else float32.
Voxels = NDArray[np.float32] | NDArray[np.int16]

ORIENTATION_TOL = 1e-3  # direction cosines
SPACING_REL_TOL = 0.05  # gaps may differ by 5% (scanner rounding), no more
MIN_SLICES = 3
# 1024 slices of 512 x 512: 1 GiB as float32 voxels, several GiB in the worker once preprocessed.
# Anything larger is refused before a pixel is decoded (a header can claim 30000 x 30000).
MAX_VOXELS = 512 * 512 * 1024


class VolumeError(ValueError):
    """The series cannot be made into a volume; the message says why, for an admin."""


@dataclass(frozen=True)
class Geometry:
    """What a pipeline accepts beyond a regular stack (``volume:`` options of its config)."""

    #: largest angle (degrees) between the slices' normal and their stacking direction that is
    #: resampled onto a regular grid; ``None``: any tilt is refused
    max_tilt_deg: float | None = None
    #: largest gap, in median gaps, that is resampled; ``None``: uneven gaps are refused
    max_gap_ratio: float | None = None


@dataclass(frozen=True)
class SourceGeometry:
    """How a regular-grid volume relates to the source slices it was resampled from."""

    #: the source slices as a volume: ``voxels[z]`` and ``datasets[z]`` per source slice
    volume: Volume
    #: ImagePositionPatient of each source slice (z order)
    positions: NDArray[np.float64]
    #: the regular grid: patient position of voxel (0, 0, 0) and its axes (slice, row, column)
    origin: NDArray[np.float64]
    axes: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


def slice_shares(gaps: NDArray[np.float64]) -> NDArray[np.float64]:
    """Each slice's thickness: half the gap to each neighbour (the end slices: their one gap)."""
    g = np.asarray(gaps, dtype=np.float64)
    left = np.concatenate([[g[0]], g])
    right = np.concatenate([g, [g[-1]]])
    out: NDArray[np.float64] = (left + right) / 2.0
    return out


@dataclass(frozen=True)
class Volume:
    """A 3D image: ``voxels[z, y, x]`` with ``datasets[z]`` the source slice of plane z.

    The voxels are the rescaled values (Modality LUT) as int16 when they are all integers within
    its range (CT in HU: 168 MB instead of 335 MB for 320 slices of 512 x 512), else float32. A
    consumer that computes in float32 converts what it reads (a slab, a sample), which gives the
    same float32 values the whole volume in float32 would hold."""

    voxels: Voxels
    datasets: tuple[Dataset, ...]
    spacing: tuple[float, float, float]  # (between slices, between rows, between columns) in mm
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice
    row_direction: tuple[float, float, float]  # direction of increasing column index
    column_direction: tuple[float, float, float]  # direction of increasing row index
    normal: tuple[float, float, float]
    temporal_positions: int = 1
    #: what was done to make the series a volume (e.g. identical duplicates dropped), for the job
    notes: tuple[str, ...] = ()
    #: each slice's share of the gaps (mm) when they are uneven; ``spacing[0]`` is then their median
    slice_thickness_mm: tuple[float, ...] | None = None
    #: angle between the slices' normal and the direction they are stacked in (gantry tilt)
    tilt_deg: float = 0.0
    #: set when the voxels are a regular grid resampled from sheared or unevenly spaced slices
    #: (``datasets`` is then empty): the source slices, to map labels back (imaging.resample)
    source: SourceGeometry | None = None

    @property
    def irregular(self) -> bool:
        """Sheared or unevenly spaced slices, not yet resampled onto a regular grid."""
        return self.source is None and (self.tilt_deg > 0 or self.slice_thickness_mm is not None)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.voxels.shape
        return int(z), int(y), int(x)

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0


def _fits_int16(arr: NDArray[np.generic], intercept: int) -> bool:
    """Whether the stored values ``arr`` plus ``intercept`` are integers within int16's range."""
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return arr.size == 0
    ints = cast(NDArray[np.integer[Any]], arr)  # its kind says so
    return int(np.min(ints)) + intercept >= -(1 << 15) and int(np.max(ints)) + intercept < 1 << 15


def _floats(ds: Dataset, keyword: str, n: int) -> NDArray[np.float64] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "?"))


def _rescale(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"instance {_sop(ds)} has an invalid {keyword} {value!r}") from None


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"transfer syntax {uid.name}" if uid is not None else "transfer syntax unknown"


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def native_pixels(ds: Dataset) -> NDArray[np.generic] | None:
    """Pixels of an uncompressed little-endian single-frame grey image read straight from the
    bytes (what pydicom's ``pixel_array`` gives, without its per-instance overhead: 320 slices
    0.29 -> 0.03 s); ``None`` for anything else. Bits above BitsStored are cleared (unsigned)
    or filled with the sign bit (signed), as pydicom does."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    allocated, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtypes = {8: ("<i1", "<u1"), 16: ("<i2", "<u2")}
    if allocated not in dtypes or not 1 <= stored <= allocated:
        return None
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * cols * allocated // 8 or rows < 1 or cols < 1:
        return None  # let pydicom explain what is wrong
    arr = np.frombuffer(data, dtype=dtypes[allocated][0 if signed else 1], count=rows * cols).reshape(
        rows, cols
    )
    unused = allocated - stored
    if unused and signed:
        shifted: NDArray[np.generic] = (arr << unused) >> unused  # the sign bit fills the unused bits
        return shifted
    if unused:
        masked: NDArray[np.generic] = arr & np.array((1 << stored) - 1, dtype=arr.dtype)
        return masked
    return arr


def default_pixels(ds: Dataset) -> NDArray[np.generic]:
    """Decode pixels with pydicom (native and the compressed syntaxes its plugins handle)."""
    fast = native_pixels(ds)
    return fast if fast is not None else np.asarray(ds.pixel_array)


def _check_image(ds: Dataset) -> None:
    if multiframe.frame_number(ds) is not None:
        return  # a frame of an enhanced instance (checked as a whole by multiframe.expand)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise VolumeError(
            f"instance {_sop(ds)} has no pixel data (SOP class {ds.get('SOPClassUID', '?')}): not an image"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise VolumeError(
            f"instance {_sop(ds)} is multi-frame ({frames} frames) of SOP class {ds.get('SOPClassUID', '?')}:"
            " only Enhanced and Legacy Converted Enhanced CT and MR multi-frame images are read"
        )
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise VolumeError(
            f"instance {_sop(ds)} has {spp} samples per pixel ({ds.get('PhotometricInterpretation', '?')}):"
            " colour images cannot be used"
        )


def _temporal_groups(datasets: Sequence[Dataset], positions: NDArray[np.float64]) -> list[list[int]] | None:
    """Split into temporal positions when the series has several; None when it has one."""
    tpi = [ds.get("TemporalPositionIdentifier") for ds in datasets]
    if all(t is not None for t in tpi) and len(set(tpi)) > 1:
        keys: list[object] = [int(t) for t in tpi]
    else:
        rounded = Counter(np.round(positions, 2).tolist())
        if max(rounded.values()) == 1:
            return None
        acq = [ds.get("AcquisitionNumber") for ds in datasets]
        if all(a is not None for a in acq) and len(set(acq)) > 1:
            keys = [int(a) for a in acq]
        else:
            return _groups_by_instance_order(datasets, np.round(positions, 2).tolist(), rounded)
    groups: dict[object, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return [groups[k] for k in sorted(groups, key=lambda k: int(str(k)))]


def _groups_by_instance_order(
    datasets: Sequence[Dataset], positions: list[float], counts: Counter[float]
) -> list[list[int]] | None:
    """Temporal positions told apart only by acquisition order (e.g. GE EPI: one AcquisitionNumber).

    Used when every position repeats the same k times and the series itself says it has k
    temporal positions; otherwise the repeats are duplicates and the caller refuses them.
    """
    (k, *others) = set(counts.values())
    declared = datasets[0].get("NumberOfTemporalPositions")
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    if others or declared is None or int(declared) != k or any(n is None for n in numbers):
        return None
    if len({int(n) for n in numbers}) != len(numbers):
        return None
    by_position: dict[float, list[int]] = defaultdict(list)
    for i, p in enumerate(positions):
        by_position[p].append(i)
    groups: list[list[int]] = [[] for _ in range(k)]
    for indices in by_position.values():
        for rank, i in enumerate(sorted(indices, key=lambda i: int(numbers[i]))):
            groups[rank].append(i)
    return groups


def build_volume(
    datasets: Sequence[Dataset],
    pixels: PixelReader = default_pixels,
    temporal_position: int | None = None,
    min_slices: int = MIN_SLICES,
    duplicates: str = "refuse",
    geometry: Geometry = Geometry(),
) -> Volume:
    """Assemble the volume; raises :class:`VolumeError` with the reason when it cannot.

    ``duplicates``: ``"refuse"`` any two instances at one position, or ``"drop_identical"``:
    drop an instance whose position and pixel data repeat another's (the same image sent twice
    under another SOP Instance UID), keeping the one with the lowest UID, and say so in the
    volume's notes; differing ones are still refused.

    ``geometry``: which tilted or unevenly spaced series to accept (as they are, marked
    :attr:`Volume.irregular`, for ``imaging.resample``) rather than refuse (see :class:`Geometry`).
    """
    if not datasets:
        raise VolumeError("the series has no instances")
    datasets, pixels, frame_notes = _frames(datasets, pixels)
    for ds in datasets:
        _check_image(ds)

    iops = []
    ipps = []
    for ds in datasets:
        iop = _floats(ds, "ImageOrientationPatient", 6)
        ipp = _floats(ds, "ImagePositionPatient", 3)
        if iop is None:
            raise VolumeError(
                f"instance {_sop(ds)} has no valid ImageOrientationPatient: its orientation is unknown"
            )
        if ipp is None:
            raise VolumeError(
                f"instance {_sop(ds)} has no valid ImagePositionPatient: its position is unknown"
            )
        iops.append(iop)
        ipps.append(ipp)
    iop0 = iops[0]
    for ds, iop in zip(datasets, iops, strict=True):
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOL:
            raise VolumeError(
                f"mixed orientations in one series: instance {_sop(ds)} has ImageOrientationPatient "
                f"{np.round(iop, 4).tolist()}, the first has {np.round(iop0, 4).tolist()}"
            )
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2 or abs(float(np.dot(row_dir, col_dir))) > 1e-2:
        raise VolumeError(f"ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    positions = np.array([float(np.dot(p, normal)) for p in ipps])

    n_temporal = 1
    groups = _temporal_groups(datasets, positions)
    indices = list(range(len(datasets)))
    if groups is not None:
        n_temporal = len(groups)
        if temporal_position is None:
            raise VolumeError(
                f"the series has {n_temporal} temporal positions; the pipeline must declare which one to use"
                " (input 'temporal_position')"
            )
        if not 1 <= temporal_position <= n_temporal:
            raise VolumeError(
                f"the pipeline asks for temporal position {temporal_position}, the series has {n_temporal}"
            )
        indices = groups[temporal_position - 1]

    if len(indices) < min_slices:
        raise VolumeError(
            f"the series has {len(indices)} slice(s); at least {min_slices} are needed for a volume"
        )

    shapes = {(int(datasets[i].get("Rows") or 0), int(datasets[i].get("Columns") or 0)) for i in indices}
    if len(shapes) > 1:
        raise VolumeError(f"slices of different sizes in one series (Rows x Columns): {sorted(shapes)}")
    (rows, cols) = next(iter(shapes))
    if rows < 1 or cols < 1:
        raise VolumeError(f"the images have no size (Rows {rows}, Columns {cols})")
    if rows * cols * len(indices) > MAX_VOXELS:
        raise VolumeError(
            f"the series is too large: {len(indices)} slices of {rows} x {cols} pixels are"
            f" {rows * cols * len(indices) / 1e6:.0f} million voxels, the limit is {MAX_VOXELS / 1e6:.0f} million"
        )
    spacings = set()
    exact_spacing: NDArray[np.float64] | None = None
    for i in indices:
        ps = _floats(datasets[i], "PixelSpacing", 2)
        if ps is None or min(ps) <= 0:
            raise VolumeError(f"instance {_sop(datasets[i])} has no valid PixelSpacing")
        spacings.add(tuple(np.round(ps, 4).tolist()))
        exact_spacing = ps if exact_spacing is None else exact_spacing
    if len(spacings) > 1:
        raise VolumeError(f"slices with different PixelSpacing in one series: {sorted(spacings)}")

    order = sorted(indices, key=lambda i: (positions[i], _sop(datasets[i])))
    notes: list[str] = list(frame_notes)
    if duplicates == "drop_identical":
        order, dropped = _drop_identical(datasets, order, positions)
        if dropped:
            notes.append(
                f"{len(dropped)} instance(s) repeating another's position and pixel data dropped: "
                + ", ".join(dropped)
            )
    elif duplicates != "refuse":
        raise ValueError(f"duplicates must be 'refuse' or 'drop_identical', got {duplicates!r}")
    pos = positions[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise VolumeError(
            f"duplicated slices: instances {_sop(datasets[order[k]])} and {_sop(datasets[order[k + 1]])}"
            f" are at the same position ({pos[k]:.2f} mm along the normal)"
        )
    step = float(np.median(gaps))
    uneven = np.abs(gaps - step) > SPACING_REL_TOL * step
    bound = geometry.max_gap_ratio
    if np.any(uneven):
        k = int(np.argmax(uneven))
        beyond = bound is not None and gaps > bound * (1 + SPACING_REL_TOL) * step
        if bound is not None and np.any(beyond):
            k = int(np.argmax(beyond))
        if bound is None or np.any(beyond):
            # A gap of about two (three...) usual gaps is one (two...) slice(s) missing; 1.4 gaps is not.
            ratio = float(gaps[k]) / step
            missing = round(ratio) - 1
            if missing >= 1 and abs(ratio - round(ratio)) <= 0.25:
                what = (
                    "a slice is probably missing"
                    if missing == 1
                    else f"{missing} slices are probably missing"
                )
            else:
                what = "uneven spacing"
            limit = (
                f"; the pipeline resamples gaps up to {bound:g} times the usual one (volume.max_gap_ratio)"
                if bound is not None
                else ""
            )
            raise VolumeError(
                f"{what}: gap of {gaps[k]:.2f} mm between positions {pos[k]:.2f} and {pos[k + 1]:.2f} mm,"
                f" the series' usual gap is {step:.2f} mm{limit}"
            )
    # The in-plane offset between consecutive slices must be along the normal; otherwise the
    # slices are sheared (gantry tilt) and a rectangular grid would misplace every voxel.
    first, last = ipps[order[0]], ipps[order[-1]]
    travel = last - first
    along = float(np.dot(travel, normal))
    sideways = float(np.linalg.norm(travel - along * normal))
    tilted = sideways > 0.01 * abs(along) + 0.5
    tilt = 0.0
    if tilted:
        tilt = float(np.degrees(np.arctan2(sideways, abs(along))))
        if geometry.max_tilt_deg is None or tilt > geometry.max_tilt_deg:
            limit = (
                f", more than the {geometry.max_tilt_deg:g} degrees the pipeline resamples (volume.max_tilt_deg)"
                if geometry.max_tilt_deg is not None
                else ": resample the series before analysis"
            )
            raise VolumeError(
                f"slice positions drift {sideways:.1f} mm sideways over {abs(along):.1f} mm (gantry tilt or sheared"
                f" acquisition, {tilt:.1f} degrees){limit}"
            )
        # A tilt moves every slice the same way: the sideways offsets grow linearly along the normal.
        side = np.array([ipps[i] - first - float(np.dot(ipps[i] - first, normal)) * normal for i in order])
        expected = np.outer((pos - pos[0]) / (pos[-1] - pos[0]), travel - along * normal)
        worst = float(np.max(np.linalg.norm(side - expected, axis=1)))
        if worst > 0.5 + 0.01 * sideways:
            raise VolumeError(
                f"slice positions drift sideways irregularly (up to {worst:.1f} mm off a straight line): not a"
                " gantry tilt, the series cannot be made into a volume"
            )

    rescale = []
    for i in order:
        ds = datasets[i]
        # Modality LUT: without RescaleSlope/RescaleIntercept the stored values are the values
        # (identity), as the standard's Modality LUT module says when they are absent.
        slope, intercept = _rescale(ds, "RescaleSlope", 1.0), _rescale(ds, "RescaleIntercept", 0.0)
        if slope == 0:
            raise VolumeError(
                f"instance {_sop(ds)} has RescaleSlope 0: every pixel would have the same value"
            )
        rescale.append((slope, intercept))
    # Integer values (CT in HU: slope 1, an integer intercept) are kept as int16, half the memory
    # of float32 and the same values; anything else, or a slice beyond int16's range, as float32.
    integral = all(s == 1.0 and abs(b) < 1 << 16 and b == int(b) for s, b in rescale)
    voxels: Voxels = (
        np.empty((len(order), rows, cols), dtype=np.int16)
        if integral
        else np.empty((len(order), rows, cols), dtype=np.float32)
    )
    for z, i in enumerate(order):
        ds = datasets[i]
        try:
            arr = pixels(ds)
        except VolumeError:
            raise
        except ValueError as e:  # corrupt, truncated, or no codec: the same on every retry
            raise VolumeError(
                f"instance {_sop(ds)}: its pixel data cannot be decoded ({_transfer_syntax(ds)}): {e}"
            ) from e
        if arr.shape != (rows, cols):
            raise VolumeError(
                f"instance {_sop(ds)}: decoded pixels have shape {arr.shape}, expected {(rows, cols)}"
            )
        slope, intercept = rescale[z]
        if voxels.dtype == np.int16 and not _fits_int16(arr, int(intercept)):
            wider = np.empty(voxels.shape, dtype=np.float32)
            wider[:z] = voxels[:z]
            voxels = wider
        if voxels.dtype == np.int16:
            # In int32 (a uint16 slice and a negative intercept), exact: the sum is in range.
            np.add(arr, np.int32(intercept), out=voxels[z], casting="unsafe")
        elif slope == 1.0:  # the usual CT case: one pass instead of two
            np.add(arr, np.float32(intercept), out=voxels[z], casting="unsafe")
        else:
            np.multiply(arr, slope, out=voxels[z], casting="unsafe")
            voxels[z] += intercept

    assert exact_spacing is not None
    ps = exact_spacing
    is_uneven = bool(np.any(uneven))
    return Volume(
        voxels=voxels,
        datasets=tuple(datasets[i] for i in order),
        spacing=(step, float(ps[0]), float(ps[1])),
        origin=(float(first[0]), float(first[1]), float(first[2])),
        row_direction=(float(row_dir[0]), float(row_dir[1]), float(row_dir[2])),
        column_direction=(float(col_dir[0]), float(col_dir[1]), float(col_dir[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        temporal_positions=n_temporal,
        notes=tuple(notes),
        slice_thickness_mm=tuple(float(t) for t in slice_shares(gaps)) if is_uneven else None,
        tilt_deg=tilt,
    )


def _frames(
    datasets: Sequence[Dataset], pixels: PixelReader
) -> tuple[Sequence[Dataset], PixelReader, list[str]]:
    """Enhanced multi-frame instances replaced by their frames (imaging.multiframe), and a pixel
    reader that knows the frames' pixels."""
    if not any(multiframe.is_enhanced(ds) for ds in datasets):
        return datasets, pixels, []
    out: list[Dataset] = []
    notes: list[str] = []
    arrays: dict[int, NDArray[np.generic]] = {}
    for ds in datasets:
        if not multiframe.is_enhanced(ds):
            out.append(ds)
            continue
        try:
            frames, by_number, frame_notes = multiframe.expand(ds, pixels)
        except multiframe.FrameError as e:
            raise VolumeError(str(e)) from None
        for f in frames:
            number = multiframe.frame_number(f)
            assert number is not None
            arrays[id(f)] = by_number[number]
        out += frames
        notes += frame_notes

    def read(ds: Dataset) -> NDArray[np.generic]:
        frame = arrays.get(id(ds))
        return frame if frame is not None else pixels(ds)

    return out, read, notes


def _drop_identical(
    datasets: Sequence[Dataset], order: list[int], positions: NDArray[np.float64]
) -> tuple[list[int], list[str]]:
    """``order`` without the instances whose position and stored pixels (and rescale) repeat the
    instance kept before them; and the SOP Instance UIDs dropped."""
    kept: list[int] = []
    dropped: list[str] = []
    for i in order:
        if (
            kept
            and abs(positions[i] - positions[kept[-1]]) < 1e-3
            and _same_image(datasets[i], datasets[kept[-1]])
        ):
            dropped.append(_sop(datasets[i]))
            continue
        kept.append(i)
    return kept, dropped


def _same_image(a: Dataset, b: Dataset) -> bool:
    keys = ("Rows", "Columns", "BitsAllocated", "PixelRepresentation", "RescaleSlope", "RescaleIntercept")
    if any(str(a.get(k, "")) != str(b.get(k, "")) for k in keys):
        return False
    pa, pb = a.get("PixelData"), b.get("PixelData")
    return isinstance(pa, bytes) and pa == pb


def axial_flips(volume: Volume) -> tuple[int, ...]:
    """Axes to flip so that slices run toward the head, rows toward posterior, columns toward patient left.

    That is the orientation the models are trained in (DICOM's LPS frame, as a supine head-first
    axial CT is stored); feet-first or prone series are flipped into it and the labels flipped
    back. Sagittal or coronal series are refused: a model trained on axial slices would see
    nonsense.
    """
    normal = np.asarray(volume.normal)
    if int(np.argmax(np.abs(normal))) != 2 or abs(float(normal[2])) < 0.8:
        raise VolumeError(
            f"the slices are not axial (slice normal {np.round(normal, 2).tolist()}); this pipeline needs axial images"
        )
    flips = []
    if normal[2] < 0:
        flips.append(0)
    if volume.column_direction[1] < 0:
        flips.append(1)
    if volume.row_direction[0] < 0:
        flips.append(2)
    return tuple(flips)
