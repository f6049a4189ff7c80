"""A verified version of our TID 1500 SR: what a review stores in the study.

The AI's SR is ``UNVERIFIED``. After a review a new SR instance follows in the same series
(PS3.3 C.17.2, SR Document General Module):

- ``VerificationFlag`` ``VERIFIED`` with ``VerifyingObserverSequence`` (the reviewer's name,
  the organization, the date and time) and ``CompletionFlag`` ``COMPLETE``;
- ``PredecessorDocumentsSequence`` naming the SRs it replaces (the AI's SR and the previous
  reviewed version, if any), so a reader follows the trail back;
- for a rejection, a root-level TEXT item (121106, DCM, "Comment") saying the result must not
  be used and why; the AI's SEG and SR stay in the study unchanged, marked by this document.

The content of an accepted SR is the AI's; an edit's SR is built on the revised SEG by
:func:`~orthanc_plugin.outputs.sr.build_sr` and then verified here.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from orthanc_plugin.core.results import check_uid

#: DCM 121106 "Comment", the concept of the rejection note.
COMMENT = ("121106", "DCM", "Comment")
MAX_PN = 64


def verified_sr(
    document: Dataset,
    predecessors: Sequence[Dataset],
    reviewer: str,
    organization: str,
    when: dt.datetime,
    sop_instance_uid: str,
    instance_number: int,
    comment: str | None = None,
) -> Dataset:
    """A copy of ``document`` marked as verified by ``reviewer``, replacing ``predecessors``.

    ``sop_instance_uid`` must derive from the job and the review (a retry writes the same
    object). ``comment``, when given, is added as a root-level TEXT item.
    """
    check_uid(sop_instance_uid, "sop_instance_uid")
    if not reviewer.strip():
        raise ValueError("reviewer must not be empty")
    if not predecessors:
        raise ValueError("a verified version needs the SR it replaces in predecessors")
    if when.utcoffset() is None:
        raise ValueError("when must carry a time zone")
    ds = copy.deepcopy(document)
    ds.SOPInstanceUID = sop_instance_uid
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.InstanceNumber = instance_number
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    if "PreliminaryFlag" in ds:
        ds.PreliminaryFlag = "FINAL"
    observer = Dataset()
    observer.VerifyingObserverName = _person_name(reviewer)
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence()
    observer.VerifyingOrganization = organization[:MAX_PN]
    observer.VerificationDateTime = when.strftime("%Y%m%d%H%M%S%z")
    ds.VerifyingObserverSequence = DicomSequence([observer])
    ds.PredecessorDocumentsSequence = DicomSequence(_hierarchical(predecessors))
    if comment is not None:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = COMMENT
        item.ConceptNameCodeSequence = DicomSequence([concept])
        item.TextValue = comment
        ds.ContentSequence.append(item)
    return ds


def _person_name(who: str) -> str:
    # A user name is not a DICOM person name; as the family-name component it stays readable.
    return who.replace("^", " ").replace("\\", " ")[:MAX_PN]


def _hierarchical(documents: Sequence[Dataset]) -> list[Dataset]:
    """SOP Instance Reference Macro, hierarchical (study -> series -> instances)."""
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    for d in documents:
        by_study.setdefault(str(d.StudyInstanceUID), {}).setdefault(str(d.SeriesInstanceUID), []).append(d)
    out = []
    for study_uid, series in by_study.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        refs = []
        for series_uid, docs in series.items():
            s = Dataset()
            s.SeriesInstanceUID = series_uid
            instances = []
            for d in docs:
                i = Dataset()
                i.ReferencedSOPClassUID = d.SOPClassUID
                i.ReferencedSOPInstanceUID = d.SOPInstanceUID
                instances.append(i)
            s.ReferencedSOPSequence = DicomSequence(instances)
            refs.append(s)
        study.ReferencedSeriesSequence = DicomSequence(refs)
        out.append(study)
    return out
