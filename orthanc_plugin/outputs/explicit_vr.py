"""Explicit VR Little Endian elements, items and sequences as bytes, as pydicom writes them.

For the parts of the SR and the RTSTRUCT that repeat hundreds of times (an image region per
slice, a contour per boundary): building a pydicom ``Dataset`` for each and letting pydicom's
writer encode it costs milliseconds per hundred items, most of it in per-element checks. The
bytes here are the same that ``pydicom.dcmwrite`` writes (defined lengths, values padded to
even length, a value too long for a 16-bit length written as UN), and they are handed to the
writer as raw sequence values (:func:`raw_sequence`), which it copies as they are.
``tests/unit/test_sr.py`` and ``tests/unit/test_rtstruct.py`` compare whole documents with
pydicom's encoding byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_sequence_item
from pydicom.tag import Tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_LONG_VRS = frozenset(v.encode("ascii") for v in EXPLICIT_VR_LENGTH_32)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element; a value longer than a 16-bit length allows goes as UN, as pydicom does."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr not in _LONG_VRS and len(value) > 0xFFFF:
        vr = b"UN"
    if vr in _LONG_VRS:
        return head + vr + struct.pack("<HI", 0, len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def item(content: bytes) -> bytes:
    """A sequence item of defined length."""
    return _ITEM + struct.pack("<I", len(content)) + content


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence of defined length holding the encoded ``items`` (each made by :func:`item`)."""
    return element(tag, b"SQ", b"".join(items))


def text(value: str, pad: bytes = b" ") -> bytes:
    """A value of a VR whose characters are the default repertoire (CS, IS, DS, ...)."""
    raw = value.encode(default_encoding)
    return raw + pad if len(raw) % 2 else raw


def uid(value: str) -> bytes:
    return text(value, b"\x00")


def encoded_items(items: Iterable[Dataset], character_set: str | list[str] | None) -> list[bytes]:
    """``items`` encoded by pydicom as items of a sequence of a dataset whose Specific Character
    Set is ``character_set`` (what the writer would write in their place)."""
    encodings = convert_encodings(character_set or default_encoding)
    out = []
    for ds in items:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_sequence_item(fp, ds, encodings)
        out.append(fp.getvalue())
    return out


def raw_sequence(ds: Dataset, tag: int, items: Iterable[bytes]) -> None:
    """Set ``ds[tag]`` to a sequence of already encoded items, kept as bytes.

    ``ds`` is then marked as read from Explicit VR Little Endian in its own character set, so
    that the writer copies the raw value instead of parsing and re-encoding it (reading the
    element, e.g. ``ds.ContentSequence``, still parses it into datasets).
    """
    value = b"".join(items)
    ds[tag] = RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)
    ds.set_original_encoding(False, True, ds._character_set)


def resolve_ambiguous_vrs(ds: Dataset) -> None:
    """Give every element with an ambiguous VR ("US or SS", ...) its VR for little endian now,
    as the writer would at each level of the document (call it before any raw sequence is set,
    which it would otherwise parse)."""
    correct_ambiguous_vr(ds, True)


def mark_as_written(ds: Dataset) -> None:
    """Mark ``ds`` and every dataset in its (non-raw) sequences as read from Explicit VR Little
    Endian in its own character set, once :func:`resolve_ambiguous_vrs` ran: the writer then
    writes them without looking for ambiguous VRs again at every level of the tree (and copies
    raw sequences as they are)."""
    stack = [ds]
    while stack:
        current = stack.pop()
        current.set_original_encoding(False, True, current._character_set)
        for elem in current.elements():
            if elem.VR == "SQ" and not isinstance(elem, RawDataElement):
                stack.extend(elem.value)
