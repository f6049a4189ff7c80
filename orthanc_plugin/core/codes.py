"""Coded concepts shared by the DICOM (SEG, SR) and FHIR encoders.

One :class:`Code` renders to both worlds: a highdicom ``CodedConcept`` (scheme designator
as in DICOM PS3.16 Section 8) and a FHIR ``Coding`` (system URI as in HL7's terminology
registry). Keeping one object for both means a concept cannot be spelt differently in the
SR and in the EHR report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from highdicom.sr import CodedConcept

# Scheme designator (DICOM PS3.16 Table 8-1) -> FHIR system URI (terminology.hl7.org).
SYSTEM_URIS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
}

# DICOM limits: Code Value is SH (16 chars; longer values go to Long Code Value, which
# highdicom handles), Coding Scheme Designator is SH, Code Meaning is LO (64 chars).
_MAX_SCHEME = 16
_MAX_MEANING = 64


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: ``value`` in coding ``scheme`` (e.g. "SCT", "DCM", "UCUM", "LN").

    ``system`` is the FHIR system URI; leave it ``None`` for the schemes in
    :data:`SYSTEM_URIS`, give it for any other scheme.
    """

    value: str
    scheme: str
    meaning: str
    system: str | None = None

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            item = getattr(self, name)
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"Code.{name} must be a non-empty string, got {item!r}")
            if item != item.strip():
                raise ValueError(f"Code.{name} must not have leading or trailing spaces: {item!r}")
        if len(self.scheme) > _MAX_SCHEME:
            raise ValueError(f"Code.scheme {self.scheme!r} is longer than {_MAX_SCHEME} characters")
        if len(self.meaning) > _MAX_MEANING:
            raise ValueError(f"Code.meaning {self.meaning!r} is longer than {_MAX_MEANING} characters")
        if self.system is None:
            if self.scheme not in SYSTEM_URIS:
                raise ValueError(
                    f"Code.scheme {self.scheme!r} is not one of {sorted(SYSTEM_URIS)}; "
                    "give its FHIR system URI in Code.system"
                )
        elif not isinstance(self.system, str) or ":" not in self.system:
            raise ValueError(f"Code.system must be an absolute URI, got {self.system!r}")

    @property
    def system_uri(self) -> str:
        """The FHIR system URI of this code's scheme."""
        return self.system if self.system is not None else SYSTEM_URIS[self.scheme]

    def to_highdicom(self) -> CodedConcept:
        """This code as a highdicom ``CodedConcept`` (usable wherever highdicom takes a code)."""
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)

    def to_fhir(self) -> dict[str, str]:
        """This code as a FHIR ``Coding`` (plain JSON dict)."""
        return {"system": self.system_uri, "code": self.value, "display": self.meaning}


# --- Codes used by the encoders, with where each comes from -------------------------------

#: DICOM PS3.16 CID 7162 "Surface Processing Algorithm Families" (the family highdicom uses
#: for AI, ``pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence``).
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

#: SNOMED CT 118565006 "Volume" (DICOM CID 7469 "Generic Intensity and Size Measurements";
#: ``codes.SCT.Volume``).
VOLUME = Code("118565006", "SCT", "Volume")

#: UCUM milliliter for the SR's NUM content item (TID 300 takes any UCUM unit; "ml" is UCUM
#: "m" + "l", the prefix and UCUM's liter symbol).
MILLILITER_DICOM = Code("ml", "UCUM", "milliliter")

#: UCUM milliliter as FHIR writes it (the case-sensitive UCUM print form used in FHIR
#: examples and US Core; "ml" and "mL" are both valid UCUM for the same unit).
MILLILITER_FHIR = Code("mL", "UCUM", "milliliter")

#: DICOM PS3.16 CID 7021 "Measurement Report Document Titles" (``codes.cid7021``).
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")

#: DICOM PS3.16 CID 7005 "Contributing Equipment Purposes of Reference"; PS3.16 Annex D
#: defines it as equipment that processed composite instances to create new ones, which
#: is what an AI algorithm writing a SEG/SR from CT images does (``codes.DCM.ProcessingEquipment``).
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

#: DICOM PS3.16 CID 100 "Quantitative Diagnostic Imaging Procedures" (``codes.cid100``),
#: keyed by DICOM Modality; anything else falls back to SCT "Imaging procedure".
PROCEDURES_BY_MODALITY: dict[str, Code] = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
    "NM": Code("49118-3", "LN", "NM unspecified body region"),
    "CR": Code("43468-8", "LN", "XR unspecified body region"),
    "DX": Code("43468-8", "LN", "XR unspecified body region"),
}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")

#: The classification outputs (SR TID 1501 group, FHIR Observation).
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: UCUM "1": a dimensionless ratio (DICOM writes the meaning "no units").
NO_UNITS = Code("1", "UCUM", "no units")


#: Private coding scheme of radiomics feature names: the code value is the IBSI feature
#: identifier (the subscript of the feature's symbol in the IBSI reference manual, e.g.
#: ``morph.vol`` for F_morph.vol), the meaning its IBSI name. No standard terminology codes
#: these features; DICOM reserves designators beginning with "99" for private schemes.
IBSI_SCHEME = "99IBSI"
IBSI_SYSTEM = "urn:orthanc-ai:ibsi-feature"
IBSI_SCHEME_NAME = "IBSI feature identifiers (Zwanenburg et al., arXiv:1612.07003)"


def ibsi_feature(feature_id: str, name: str) -> Code:
    """The coded concept of one radiomics feature in the private scheme :data:`IBSI_SCHEME`."""
    return Code(feature_id, IBSI_SCHEME, name, system=IBSI_SYSTEM)


#: The code of an observation that groups the radiomics features of one segment.
RADIOMICS_PANEL = Code("radiomics", IBSI_SCHEME, "Radiomics features (IBSI)", system=IBSI_SYSTEM)


#: A segment cut by the first or last slice of its series: the volume is that of the covered
#: part. No standard code says so; these are the product's own (a private scheme, "99" prefix).
PRIVATE_SCHEME = "99ORTHANCAI"
_PRIVATE_SYSTEM = "urn:orthanc-ai:codes"
COVERAGE = Code("COVERAGE", PRIVATE_SCHEME, "Coverage of the segment by the series", _PRIVATE_SYSTEM)
PARTIAL_COVERAGE = Code(
    "PARTIAL", PRIVATE_SCHEME, "Partial: the segment extends beyond the series", _PRIVATE_SYSTEM
)
#: What the SR, the FHIR report and the job say about such a segment.
PARTIAL_COVERAGE_TEXT = (
    "partial coverage: the segment touches the first or last slice of the series, so it extends "
    "beyond it and the volume is that of the covered part only"
)
