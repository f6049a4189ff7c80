"""The attributes every writer copies from the source: checked, and repaired or dropped when invalid.

A SEG, an SR or any other output of ours repeats the source's Patient, General Study, Patient
Study, Clinical Trial Subject/Study and Specimen modules (highdicom copies them from the first
source image). Scanners and archives send values that break the standard (an empty Type 1
sequence item, ``2020-01-01`` as a DA, ``45 years`` as an AS, 70 characters in an LO, two
values where one is allowed, an attribute encoded with another VR than the dictionary's), and
a copy would make our output invalid through no fault of ours. :func:`clean_source` returns a
copy of a source image in which those modules hold only valid values:

* a value of the wrong VR is re-encoded with the dictionary's VR when its text is valid there;
* a value longer than its VR allows is cut to the maximum (texts, names), a date written with
  separators is rewritten ``YYYYMMDD``, a code string is upper-cased, extra values beyond the
  dictionary's multiplicity are dropped;
* what cannot be repaired is emptied (Type 2: the attribute must be present) or dropped
  (Type 3 and conditional);
* a sequence item missing a Type 1 attribute is dropped, and an empty sequence that may not be
  empty is dropped with it.

``PatientID`` and ``StudyInstanceUID`` are never changed: Orthanc files an instance under the
study named by both, so a repaired value would put our results beside the study instead of in
it. The rules come from the module tables highdicom ships (``highdicom._standard_utils``) and
pydicom's value checks (``pydicom.valuerep.validate_value``). Every writer calls
:func:`clean_sources` on its sources before it copies anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import validate_value

#: The modules highdicom copies from the first source image (Patient and Study IEs, Specimen).
COPIED_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
    "specimen",
)
#: Orthanc's identity of a study: never changed (see the module docstring).
UNTOUCHABLE = frozenset({"PatientID", "StudyInstanceUID"})

#: Maximum length of a value by VR where truncation keeps its meaning (PS3.5 Table 6.2-1).
_TRUNCATE = {"LO": 64, "SH": 16, "ST": 1024, "LT": 10240, "AE": 16}
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_DATE_SEPARATED = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")


@dataclass
class Repairs:
    """What :func:`clean_source` changed, by attribute keyword (never a value: no patient data)."""

    repaired: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.repaired or self.emptied or self.dropped)

    def summary(self) -> str:
        parts = []
        for what, names in (
            ("repaired", self.repaired),
            ("emptied", self.emptied),
            ("dropped", self.dropped),
        ):
            if names:
                parts.append(f"{what} {', '.join(sorted(set(names)))}")
        return "; ".join(parts)


@cache
def _attribute_types() -> dict[tuple[str, ...], str]:
    """(path..., keyword) -> Type ('1', '1C', '2', '2C', '3') over the copied modules."""
    from highdicom._standard_utils import get_module_attribute_map  # the standard's tables

    table = get_module_attribute_map()
    types: dict[tuple[str, ...], str] = {}
    for module in COPIED_MODULES:
        for item in table.get(module, []):
            key = (*item["path"], item["keyword"])
            # The strictest type wins where two modules share an attribute.
            old = types.get(key)
            types[key] = item["type"] if old is None else min(old, item["type"])
    return types


def _root_keywords() -> list[str]:
    return sorted({key[0] for key in _attribute_types() if len(key) == 1})


def clean_sources(source_images: Sequence[Dataset]) -> tuple[list[Dataset], Repairs]:
    """``source_images`` with the first replaced by its cleaned copy (writers copy from it)."""
    if not source_images:
        return [], Repairs()
    first, repairs = clean_source(source_images[0])
    return [first, *source_images[1:]], repairs


def clean_source(ds: Dataset) -> tuple[Dataset, Repairs]:
    """A shallow copy of ``ds`` whose copied-module attributes are valid (see the module docstring)."""
    out = Dataset()
    out.update(ds)  # shares the elements; only replaced or removed ones differ
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    repairs = Repairs()
    types = _attribute_types()
    for keyword in _root_keywords():
        if keyword in UNTOUCHABLE or keyword not in ds:
            continue
        elem = ds[keyword]
        fixed = _clean_element(elem, (), types, repairs)
        kind = types[(keyword,)]
        if fixed is None:
            if kind == "2":
                vr = dictionary_VR(elem.tag)
                out[keyword] = DataElement(elem.tag, vr, DicomSequence([]) if vr == "SQ" else None)
                repairs.emptied.append(keyword)
            else:
                del out[keyword]
                repairs.dropped.append(keyword)
        elif fixed is not elem:
            out[keyword] = fixed
    return out, repairs


def _clean_element(
    elem: DataElement, path: tuple[str, ...], types: dict[tuple[str, ...], str], repairs: Repairs
) -> DataElement | None:
    """The element itself when valid, a repaired copy, or None when it cannot be kept."""
    keyword = keyword_for_tag(elem.tag)
    if not keyword:
        return None  # private or unknown: no rule to check it against
    vr = dictionary_VR(elem.tag)
    if vr == "SQ":
        return _clean_sequence(elem, (*path, keyword), types, repairs)
    encoded_as = str(elem.VR)
    if encoded_as == "SQ" or vr not in _TEXT_VRS and vr not in ("US", "SS", "UL", "SL", "FL", "FD"):
        return elem if encoded_as == vr else None
    values = _values(elem)
    if values is None:
        return None
    changed = encoded_as != vr
    if not values:
        return elem if not changed else DataElement(elem.tag, vr, None)
    max_vm = _max_vm(elem.tag)
    if max_vm is not None and len(values) > max_vm:
        values = values[:max_vm]
        changed = True
    fixed_values = []
    for v in values:
        good = _valid_value(vr, v)
        if good is None:
            return None
        changed |= good != v
        fixed_values.append(good)
    if changed:
        repairs.repaired.append(".".join((*path, keyword)))
        return DataElement(elem.tag, vr, fixed_values[0] if len(fixed_values) == 1 else fixed_values)
    return elem


def _values(elem: DataElement) -> list[Any] | None:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii").rstrip("\x00 ")
        except UnicodeDecodeError:
            return None
        return [v for v in value.split("\\")] if value else []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _max_vm(tag: Any) -> int | None:
    vm = dictionary_VM(tag)
    return int(vm) if vm.isdigit() else None


def _valid_value(vr: str, value: Any) -> Any | None:
    """``value`` (or its repair) valid for ``vr``, or None."""
    if vr not in _TEXT_VRS:
        return value if isinstance(value, (int, float)) else None
    text = str(value)
    if _ok(vr, text):
        return value if isinstance(value, str) or vr in ("PN", "DS", "IS") else text
    if vr in _TRUNCATE:
        cut = text[: _TRUNCATE[vr]].rstrip()
        return cut if _ok(vr, cut) else None
    if vr == "PN":
        groups = [
            "^".join(component[:64] for component in group.split("^"))[:64] for group in text.split("=")
        ]
        cut = "=".join(groups)
        return cut if _ok(vr, cut) else None
    if vr == "DA":
        m = _DATE_SEPARATED.match(text.strip())
        if m:
            date = "".join(m.groups())
            return date if _ok(vr, date) else None
        return None
    if vr == "CS":
        upper = text.strip().upper()
        return upper if _ok(vr, upper) else None
    if vr == "DS":
        try:
            from pydicom.valuerep import format_number_as_ds

            number = format_number_as_ds(float(text))
        except (ValueError, OverflowError):
            return None
        return number if _ok(vr, number) else None
    return None


def _ok(vr: str, text: str) -> bool:
    if vr in ("LO", "SH", "PN", "CS", "AE", "DA", "TM", "DT", "AS", "DS", "IS", "UI") and "\\" in text:
        return False
    try:
        validate_value(vr, text, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _clean_sequence(
    elem: DataElement, path: tuple[str, ...], types: dict[tuple[str, ...], str], repairs: Repairs
) -> DataElement | None:
    """Items with every Type 1 attribute present and valid; None when none is left and the
    sequence may not be empty (every sequence of these modules but Type 2 ones)."""
    if elem.VR != "SQ":
        return None
    kind = types.get(path, "3")
    items: list[Dataset] = []
    changed = False
    for item in elem.value:
        cleaned = _clean_item(item, path, types, repairs)
        if cleaned is None:
            changed = True
            repairs.dropped.append(".".join(path) + "[item]")
            continue
        changed |= cleaned is not item
        items.append(cleaned)
    if not items:
        return DataElement(elem.tag, "SQ", DicomSequence([])) if kind == "2" else None
    if not changed:
        return elem
    return DataElement(elem.tag, "SQ", DicomSequence(items))


def _required_in(path: tuple[str, ...], types: dict[tuple[str, ...], str]) -> Iterable[str]:
    n = len(path)
    return (key[-1] for key, kind in types.items() if len(key) == n + 1 and key[:n] == path and kind == "1")


def _clean_item(
    item: Dataset, path: tuple[str, ...], types: dict[tuple[str, ...], str], repairs: Repairs
) -> Dataset | None:
    out = Dataset()
    changed = False
    for elem in item:
        keyword = keyword_for_tag(elem.tag)
        fixed = _clean_element(elem, path, types, repairs) if keyword else None
        if fixed is None:
            changed = True
            if keyword:
                repairs.dropped.append(".".join((*path, keyword)))
            continue
        changed |= fixed is not elem
        out.add(fixed)
    for keyword in _required_in(path, types):
        if (
            keyword not in out
            or out[keyword].value in (None, "", b"")
            or (out[keyword].VR == "SQ" and len(out[keyword].value) == 0)
        ):
            return None
    # Code sequence items (the Code Sequence macro): value, scheme and meaning are Type 1.
    if any(k in out for k in ("CodeValue", "LongCodeValue", "URNCodeValue", "CodeMeaning")):
        has_value = any(out.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
        if not has_value or not out.get("CodeMeaning"):
            return None
        if "CodeValue" in out and not out.get("CodingSchemeDesignator"):
            return None
    if not len(out):
        return None
    return out if changed else item
