"""The fast BINARY SEG encoder (orthanc_plugin.outputs.seg_binary) against highdicom's, on the real CT."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement

from orthanc_plugin.core.results import SegmentSpec
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.outputs import seg_binary
from orthanc_plugin.outputs.seg import build_seg

from .test_seg import (
    ABNORMAL_STRUCTURE,
    ALGORITHM,
    LUNG,
    NODULE,
    SEGMENTS,
    make_seg,
    run_dciodvfy,
)

Array = NDArray[Any]
SOP_INSTANCE_UID = "2.25.1001"  # make_seg's
SPARSE_SEGMENTS = (
    SEGMENTS[0],
    SegmentSpec(7, "Nodule", ABNORMAL_STRUCTURE, NODULE, LUNG, (241, 214, 145), "nodule"),
)
THIRD = SegmentSpec(3, "Spot", ABNORMAL_STRUCTURE, NODULE, None, (10, 20, 200), "spot")

# What highdicom makes random or takes from the clock, set equal before comparing (each one
# is checked on our side by test_documented_differences):
#   InstanceCreationDate/Time: highdicom writes the time of the call; ours the content
#     creation time, so that a retry writes the same bytes.
#   ContributionDateTime of the last ContributingEquipmentSequence item (highdicom's own
#     "Software library used to create this instance" item): the same reason.
#   DimensionOrganizationUID (DimensionOrganizationSequence and every DimensionIndexSequence
#     item): random in highdicom, derived from the SOP Instance UID in ours.
#   The Pixel Data padding byte when the packed frames have an odd length: highdicom appends
#     ASCII "0" (0x30), ours a zero byte (PS3.5 8.1.1: padding is not significant).


def make_reference(
    ct: list[pydicom.Dataset], labels: Array, segments: tuple[SegmentSpec, ...] = SEGMENTS
) -> pydicom.Dataset:
    """highdicom's SEG for make_seg's arguments."""
    return make_seg(ct, labels, segments, sop_instance_uid=SOP_INSTANCE_UID, encoder="highdicom")


def written(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reread(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def flatten(ds: pydicom.Dataset, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path with tag, VR, value) of every element, sequences item by item, in file order."""
    for elem in ds:
        where = f"{path}{elem.tag}"
        if elem.VR == "SQ":
            yield where, "SQ", len(elem.value)
            for i, item in enumerate(elem.value):
                yield from flatten(item, f"{where}[{i}].")
        else:
            value = elem.value
            if isinstance(value, pydicom.multival.MultiValue):
                value = list(value)
            yield where, elem.VR, value


def equalise(reference: pydicom.Dataset, ours: pydicom.Dataset) -> None:
    """Give ``reference`` (highdicom's, read back) our values where the differences are documented."""
    reference.InstanceCreationDate = ours.InstanceCreationDate
    reference.InstanceCreationTime = ours.InstanceCreationTime
    reference.ContributingEquipmentSequence[-1].ContributionDateTime = ours.ContributingEquipmentSequence[
        -1
    ].ContributionDateTime
    uid = ours.DimensionOrganizationSequence[0].DimensionOrganizationUID
    reference.DimensionOrganizationSequence[0].DimensionOrganizationUID = uid
    for item in reference.DimensionIndexSequence:
        item.DimensionOrganizationUID = uid
    packed = (int(reference.NumberOfFrames) * int(reference.Rows) * int(reference.Columns) + 7) // 8
    if packed % 2 and reference.PixelData[packed:] == b"0":  # the padding byte, nothing else
        reference.PixelData = reference.PixelData[:packed] + ours.PixelData[packed:]


def assert_same_as_highdicom(
    ct: list[pydicom.Dataset], labels: Array, segments: tuple[SegmentSpec, ...] = SEGMENTS
) -> pydicom.Dataset:
    """Build both, compare element by element and byte for byte; return ours (as returned)."""
    ours_ds = make_seg(ct, labels, segments)
    ours_bytes = written(ours_ds)
    reference = reread(written(make_reference(ct, labels, segments)))
    ours = reread(ours_bytes)
    equalise(reference, ours)
    assert list(flatten(reference.file_meta)) == list(flatten(ours.file_meta))
    theirs_elements, our_elements = list(flatten(reference)), list(flatten(ours))
    for theirs, mine in zip(theirs_elements, our_elements, strict=False):
        assert theirs == mine, f"highdicom {theirs!r:.300} != ours {mine!r:.300}"
    assert len(theirs_elements) == len(our_elements)
    assert written(reference) == ours_bytes  # the same bytes once the differences are equal
    return ours_ds


def assert_decodes_to(seg: pydicom.Dataset, ct: list[pydicom.Dataset], expected: Array) -> None:
    decoded = hd.seg.segread(io.BytesIO(written(seg)))
    pixels = decoded.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in ct], combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels, expected)


def cropped(ct: list[pydicom.Dataset], rows: int, cols: int) -> list[pydicom.Dataset]:
    """Copies of the CT cut to rows x cols (new UIDs, so that nothing else is confused)."""
    out = []
    for i, ds in enumerate(ct):
        small = copy.deepcopy(ds)
        pixels = ds.pixel_array[:rows, :cols]
        small.Rows, small.Columns = rows, cols
        small.PixelData = np.ascontiguousarray(pixels).tobytes()
        small.SOPInstanceUID = f"2.25.{777000 + i}"
        out.append(small)
    return out


# --- equality with highdicom -------------------------------------------------------------------


def only(labels: Array, keep: Callable[[Array], Array]) -> Array:
    return np.where(keep(labels), labels, 0).astype(np.uint8)


def scattered(shape: tuple[int, ...]) -> Array:
    """Segments on non-adjacent slices, one slice with segment 2 alone, one with both."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2, 100:140, 200:260] = 1
    labels[9, 300:302, 10:11] = 1
    labels[20, 200:300, 200:300] = 1
    labels[20, 50:60, 50:60] = 2
    labels[5, 400:420, 400:470] = 2  # slice 5 has segment 2 only
    labels[13, 0:1, 0:512] = 2
    return labels


def ends(shape: tuple[int, ...]) -> Array:
    """Labels on the first and the last slice (and their corners)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[0, :3, :3] = 1
    labels[-1, -3:, -3:] = 2
    labels[-1, 0, 0] = 1
    labels[0, -1, -1] = 2
    return labels


CASES: dict[str, Callable[[Array], Array]] = {
    "synthetic": lambda labels: labels,
    "one segment": lambda labels: only(labels, lambda a: a == 1),
    "only segment 2": lambda labels: only(labels, lambda a: a == 2),
    "non-adjacent slices": lambda labels: scattered(labels.shape),
    "first and last slice": lambda labels: ends(labels.shape),
    "first slice only": lambda labels: ends(labels.shape) * (np.arange(labels.shape[0]) == 0)[:, None, None],
}


@pytest.mark.parametrize("case", list(CASES))
def test_equal_to_highdicom(ct: list[pydicom.Dataset], labels: Array, case: str) -> None:
    lab = CASES[case](labels).astype(np.uint8)
    seg = assert_same_as_highdicom(ct, lab)
    present = [k for k in (1, 2) if (lab == k).any()]
    expected = np.zeros_like(lab)
    for number, k in enumerate(present, start=1):
        expected[lab == k] = number
    assert_decodes_to(seg, ct, expected)


def test_sparse_labels_are_renumbered_as_highdicom_does(ct: list[pydicom.Dataset], labels: Array) -> None:
    sparse = labels.copy()
    sparse[labels == 2] = 7
    seg = assert_same_as_highdicom(ct, sparse, SPARSE_SEGMENTS)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    assert_decodes_to(seg, ct, labels)


def test_three_segments(ct: list[pydicom.Dataset], labels: Array) -> None:
    three = labels.copy()
    three[25:28, 10:20, 10:30] = 3
    seg = assert_same_as_highdicom(ct, three, (*SEGMENTS, THIRD))
    assert_decodes_to(seg, ct, three)


@pytest.mark.parametrize("arrange", ["reversed", "shuffled"])
@pytest.mark.parametrize("case", ["synthetic", "one segment"])
def test_source_order_does_not_matter(
    ct: list[pydicom.Dataset], labels: Array, arrange: str, case: str
) -> None:
    # highdicom orders frames along the slice normal whatever the order of the sources.
    index = (
        np.arange(len(ct))[::-1] if arrange == "reversed" else np.random.default_rng(7).permutation(len(ct))
    )
    lab = CASES[case](labels)[index]
    seg = assert_same_as_highdicom([ct[i] for i in index], lab)
    assert_decodes_to(seg, [ct[i] for i in index], lab)


@pytest.mark.parametrize(("rows", "cols", "padded"), [(101, 77, True), (96, 75, False), (63, 64, False)])
def test_frames_not_a_whole_number_of_bytes(
    ct: list[pydicom.Dataset], rows: int, cols: int, padded: bool, tmp_path: Path
) -> None:
    # 101x77 = 7777 pixels: every frame after the first starts inside a byte, and the 8
    # frames take 7777 bytes (odd: one padding byte); 96x75 = 7200: whole bytes, rows not.
    small = cropped(ct, rows, cols)
    lab = np.zeros((len(small), rows, cols), dtype=np.uint8)
    lab[3:7, 10:40, 5:30] = 1
    lab[7:9, 50 : rows - 1, 40 : cols - 1] = 2
    lab[7, 0, 0] = 1  # the first pixel of a frame that does not start on a byte
    lab[-1, -1, -1] = 2  # the last pixel of the last frame
    seg = assert_same_as_highdicom(small, lab)
    assert_decodes_to(seg, small, lab)
    assert int(seg.NumberOfFrames) == 8
    packed = (8 * rows * cols + 7) // 8
    assert (packed % 2 == 1) == padded
    assert len(seg.PixelData) == packed + padded
    if padded:
        assert seg.PixelData[-1:] == b"\x00"
    run_dciodvfy(seg, tmp_path)


def test_documented_differences(ct: list[pydicom.Dataset], labels: Array) -> None:
    seg = make_seg(ct, labels)
    assert (str(seg.InstanceCreationDate), str(seg.InstanceCreationTime)) == ("20240506", "070809")
    assert str(seg.ContributingEquipmentSequence[-1].ContributionDateTime).startswith("20240506070809")
    assert seg.ContributingEquipmentSequence[-1].ManufacturerModelName == "highdicom"
    uid = derived_uid(SOP_INSTANCE_UID, "dimension-organization")
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID == uid
    assert {item.DimensionOrganizationUID for item in seg.DimensionIndexSequence} == {uid}


def test_same_input_same_bytes(ct: list[pydicom.Dataset], labels: Array) -> None:
    first, second = written(make_seg(ct, labels)), written(make_seg(ct, labels))
    assert first == second
    assert first != written(make_seg(ct, labels, sop_instance_uid="2.25.1002"))


def test_returns_a_read_dataset_with_raw_frames(ct: list[pydicom.Dataset], labels: Array) -> None:
    seg = make_seg(ct, labels)
    assert isinstance(seg, pydicom.FileDataset)
    # The large elements stay raw until accessed, so storing it copies bytes.
    assert isinstance(seg.get_item(0x52009230), RawDataElement)
    assert isinstance(seg.get_item(0x7FE00010), RawDataElement)
    before = written(seg)
    frames = seg.PerFrameFunctionalGroupsSequence  # parses it
    assert len(frames) == int(seg.NumberOfFrames) == 23
    assert frames[0].FrameContentSequence[0].DimensionIndexValues == [1, 12]
    assert written(seg) == before


def test_dciodvfy_reports_no_error(ct: list[pydicom.Dataset], labels: Array, tmp_path: Path) -> None:
    run_dciodvfy(make_seg(ct, labels), tmp_path)
    run_dciodvfy(make_seg(ct, only(labels, lambda a: a == 1)), tmp_path)


# --- what the fast encoder leaves to highdicom ------------------------------------------------


def test_sources_it_does_not_cover_go_to_highdicom(ct: list[pydicom.Dataset], labels: Array) -> None:
    framed = copy.deepcopy(ct)
    for ds in framed:
        ds.NumberOfFrames = 1  # a multi-frame image: highdicom's business
    assert seg_binary.read_sources(ct) is not None
    assert seg_binary.read_sources(framed) is None
    seg = make_seg(framed, labels)
    ours_uid = derived_uid(SOP_INSTANCE_UID, "dimension-organization")
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID != ours_uid  # highdicom's
    assert_decodes_to(seg, framed, labels)


def test_differing_orientations_are_refused_as_before(ct: list[pydicom.Dataset], labels: Array) -> None:
    tilted = copy.deepcopy(ct)
    tilted[3].ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.1]
    assert seg_binary.read_sources(tilted) is None
    with pytest.raises(ValueError, match="shared orientation"):
        make_seg(tilted, labels)


def test_repeated_positions_are_refused_as_before(ct: list[pydicom.Dataset], labels: Array) -> None:
    twice = copy.deepcopy(ct)
    twice[3].ImagePositionPatient = twice[4].ImagePositionPatient
    assert seg_binary.read_sources(twice) is None
    with pytest.raises(ValueError, match="duplicates"):
        make_seg(twice, labels)


def test_unknown_encoder_is_refused(ct: list[pydicom.Dataset], labels: Array) -> None:
    with pytest.raises(ValueError, match="encoder must be one of fast, highdicom"):
        build_seg(ct, labels, SEGMENTS, ALGORITHM, "2.25.1", "2.25.2", 1, "x", encoder="pydicom")


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
def test_character_sets(ct: list[pydicom.Dataset], labels: Array, charset: str) -> None:
    # The header is written in the source's character set; the hand-encoded elements are
    # ASCII and stay raw (pydicom would re-encode them if the encodings did not match).
    named = copy.deepcopy(ct)
    for ds in named:
        ds.SpecificCharacterSet = charset
        ds.PatientName = "Müller^Jörg"
    seg = assert_same_as_highdicom(named, labels)
    written(seg)
    assert isinstance(seg.get_item(0x52009230), RawDataElement)
    assert reread(written(seg)).PatientName == "Müller^Jörg"


def decode_by_the_standard(
    seg: pydicom.Dataset, sources: list[pydicom.Dataset], segments: tuple[SegmentSpec, ...]
) -> Array:
    """The label map a BINARY SEG holds, read with pydicom and PS3.3 C.8.20 alone: no highdicom,
    none of our encoder's code. Frames are bit-packed one after another (LSB first, PS3.5
    8.1.1), each frame's segment and source slice come from its functional groups."""
    rows, cols = int(seg.Rows), int(seg.Columns)
    groups = seg.PerFrameFunctionalGroupsSequence
    assert int(seg.NumberOfFrames) == len(groups)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
    frames = bits[: len(groups) * rows * cols].reshape(len(groups), rows, cols)
    label_of = {int(item.SegmentNumber): item.SegmentLabel for item in seg.SegmentSequence}
    value_of = {s.name: s.label for s in segments}
    # the frame's position must be the source slice's own, and the frame must name that slice
    slice_at = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): z for z, ds in enumerate(sources)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        float(v) for v in sources[0].ImageOrientationPatient
    ]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [
        float(v) for v in sources[0].PixelSpacing
    ]
    out = np.zeros((len(sources), rows, cols), dtype=np.uint8)
    for frame, item in zip(frames, groups, strict=True):
        z = slice_at[tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)]
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert referenced == sources[z].SOPInstanceUID
        value = value_of[label_of[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]]
        assert not np.any(out[z][frame > 0]), "two segments claim one pixel"
        out[z][frame > 0] = value
    return out


@pytest.mark.parametrize("segments", [SEGMENTS, SPARSE_SEGMENTS], ids=["two", "sparse-label-values"])
def test_our_seg_decodes_by_the_standard_to_the_labels_given(
    ct: list[pydicom.Dataset], labels: Array, segments: tuple[SegmentSpec, ...]
) -> None:
    given = labels.copy()
    if segments is SPARSE_SEGMENTS:
        given[given == 2] = 7
    seg = reread(written(make_seg(ct, given, segments)))
    np.testing.assert_array_equal(decode_by_the_standard(seg, ct, segments), given)
