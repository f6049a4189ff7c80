"""The PDF summary: one A4 page (or more) a person can read without a DICOM viewer.

It names the patient and the study as the source images do, lists the measurements, the
classifications (probability and operating point), shows the key images as thumbnails, names the
algorithm and the models with their versions, says what each model is and is not validated for,
and ends with the disclaimer. Made with ReportLab (BSD) in DejaVu Sans (Debian's
fonts-dejavu-core), so every reader shows the same glyphs and ``pdftotext`` reads the text back.

The bytes are a function of the inputs and ``created``: ReportLab's invariant mode fixes the
document id (a digest of the content) and we set its creation date to ``created``.

:func:`build_encapsulated_pdf` wraps it as an Encapsulated PDF (SOP Class
1.2.840.10008.5.1.4.1.1.104.1) in the source's study, referencing the source series.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from xml.sax.saxutils import escape

from PIL import Image as PILImage
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfdoc, pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from orthanc_plugin.core.results import (
    AlgorithmInfo,
    ClassificationResult,
    SegmentSpec,
    VolumeMeasurement,
    check_uid,
)
from orthanc_plugin.outputs.key_images import FONT_DIR, RGB

#: Encapsulated PDF Storage (PS3.4 Table B.5-1).
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.104.1"
DISCLAIMER = (
    "This report was produced by software and has not been reviewed by a physician. It is a "
    "preliminary result to support, not replace, the reading of the images by a qualified "
    "person. Do not use it alone for diagnosis or treatment decisions."
)


@dataclass(frozen=True)
class ValidatedFor:
    """What one model is (and is not) validated for, in plain words."""

    model: str
    statement: str


@cache
def _fonts() -> tuple[str, str]:
    regular, bold = FONT_DIR / "DejaVuSans.ttf", FONT_DIR / "DejaVuSans-Bold.ttf"
    if not regular.is_file() or not bold.is_file():
        raise FileNotFoundError(
            f"the PDF summary needs DejaVu Sans ({regular}): install Debian's fonts-dejavu-core"
        )
    pdfmetrics.registerFont(TTFont("OrthancAISans", str(regular)))
    pdfmetrics.registerFont(TTFont("OrthancAISans-Bold", str(bold)))
    return "OrthancAISans", "OrthancAISans-Bold"


def _text(value: object) -> str:
    return escape(str(value or "").strip()) or "-"


def _person(value: object) -> str:
    return _text(str(value or "").replace("^", " ").strip())


def _date(value: object) -> str:
    v = str(value or "")
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else _text(v)


def _thumbnail(pixels: RGB, width: float) -> Image:
    buffer = io.BytesIO()
    picture = PILImage.fromarray(pixels, "RGB")
    picture.thumbnail((256, 256 * picture.height // picture.width))
    picture.save(buffer, format="JPEG", quality=80, optimize=False)
    buffer.seek(0)
    return Image(buffer, width=width, height=width * picture.height / picture.width)


def build_pdf(
    source: Dataset,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[VolumeMeasurement],
    algorithm: AlgorithmInfo,
    *,
    created: dt.datetime,
    classifications: Sequence[ClassificationResult] = (),
    key_images: Sequence[RGB] = (),
    validated_for: Sequence[ValidatedFor] = (),
    description: str = "",
) -> bytes:
    """The PDF summary of one job's results; ``source`` is any image of the study's input series."""
    if created.tzinfo is None:
        raise ValueError("created must carry a time zone")
    regular, bold = _fonts()
    body = ParagraphStyle("body", fontName=regular, fontSize=9.5, leading=12.5)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10.5)
    heading = ParagraphStyle("heading", parent=body, fontName=bold, fontSize=12, leading=16, spaceBefore=6)
    title = ParagraphStyle("title", parent=body, fontName=bold, fontSize=15, leading=19)
    banner = ParagraphStyle(
        "banner", parent=body, fontName=bold, backColor=colors.HexColor("#ffd200"), borderPadding=4
    )
    grid = TableStyle(
        [
            ("FONT", (0, 0), (-1, -1), regular, 9.5),
            ("FONT", (0, 0), (-1, 0), bold, 9.5),
            ("GRID", (0, 0), (-1, -1), 0.4, colors.grey),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ]
    )
    width = A4[0] - 36 * mm
    story: list[object] = [
        Paragraph(f"AI result: {_text(algorithm.name)}", title),
        Spacer(1, 3 * mm),
        Paragraph("AI RESULT - UNVERIFIED - PRELIMINARY, NOT REVIEWED BY A PHYSICIAN", banner),
        Spacer(1, 4 * mm),
    ]
    ident = [
        ["Patient", _person(source.get("PatientName")), "Patient ID", _text(source.get("PatientID"))],
        ["Birth date", _date(source.get("PatientBirthDate")), "Sex", _text(source.get("PatientSex"))],
        ["Study date", _date(source.get("StudyDate")), "Accession", _text(source.get("AccessionNumber"))],
        ["Study", _text(source.get("StudyDescription")), "Series", _text(source.get("SeriesDescription"))],
    ]
    ident_table = Table(
        [[Paragraph(c, small if i % 2 == 0 else body) for i, c in enumerate(row)] for row in ident],
        colWidths=[width * 0.15, width * 0.35, width * 0.15, width * 0.35],
    )
    ident_table.setStyle(
        TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.grey), ("VALIGN", (0, 0), (-1, -1), "TOP")])
    )
    story += [
        ident_table,
        Paragraph(f"Study Instance UID: {_text(source.get('StudyInstanceUID'))}", small),
        Paragraph("Measurements", heading),
    ]
    by_label = {s.label: s for s in segments}
    rows = [["Segment", "Volume", "Unit"]]
    rows += [[by_label[m.segment_label].name, f"{m.volume_ml:.2f}", "mL"] for m in measurements]
    table = Table(rows, colWidths=[width * 0.5, width * 0.3, width * 0.2])
    table.setStyle(grid)
    story.append(table)
    if classifications:
        story.append(Paragraph("Classification", heading))
        rows = [["Finding", "Result", "Probability", "Operating point"]]
        for c in classifications:
            verdict = c.finding.meaning if c.positive else f"no {c.finding.meaning.lower()}"
            rows.append([c.name, verdict, f"{c.probability:.3f}", f"{c.threshold:.3f}"])
        table = Table(rows, colWidths=[width * 0.3, width * 0.3, width * 0.2, width * 0.2])
        table.setStyle(grid)
        story.append(table)
    if key_images:
        story.append(Paragraph("Key images", heading))
        per_row = min(3, len(key_images))
        cell = (width - 4 * mm * (per_row - 1)) / per_row
        thumbs = [_thumbnail(p, cell) for p in key_images]
        cells = [thumbs[i : i + per_row] for i in range(0, len(thumbs), per_row)]
        cells[-1] += [""] * (per_row - len(cells[-1]))
        story.append(Table(cells, colWidths=[cell + 4 * mm] * per_row))
    story.append(Paragraph("Algorithm and models", heading))
    models = [f"{algorithm.model_name} version {algorithm.model_version} (segmentation)"]
    models += [f"{c.model_name} version {c.model_version} ({c.name})" for c in classifications]
    story.append(
        Paragraph(
            f"Algorithm {_text(algorithm.name)} version {_text(algorithm.version)} by "
            f"{_text(algorithm.manufacturer)}. Models: {_text('; '.join(models))}."
            + (f" {_text(description)}." if description else ""),
            body,
        )
    )
    story.append(Paragraph("What the models are validated for", heading))
    for v in validated_for:
        story.append(Paragraph(f"<b>{_text(v.model)}</b>: {_text(v.statement)}", body))
    if not validated_for:
        story.append(Paragraph("No validation statement is configured for these models.", body))
    story += [
        Paragraph("Disclaimer", heading),
        Paragraph(DISCLAIMER, body),
        Spacer(1, 3 * mm),
        Paragraph(
            f"Created {created.astimezone(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by orthanc-ai.", small
        ),
    ]

    out = io.BytesIO()
    doc = SimpleDocTemplate(
        out,
        pagesize=A4,
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=16 * mm,
        bottomMargin=16 * mm,
        title=f"AI {algorithm.name} summary",
        author="orthanc-ai",
        creator="orthanc-ai",
        subject="AI result, unverified",
        invariant=1,
    )
    doc.build(story, canvasmaker=_canvas_at(created))
    return out.getvalue()


def _canvas_at(created: dt.datetime) -> type[Canvas]:
    """A Canvas whose document is dated ``created``: ReportLab's invariant mode dates it 2000-01-01."""

    class _Dated(Canvas):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            stamp = pdfdoc.TimeStamp(invariant=1)
            stamp.t = created.timestamp()
            stamp.lt = time.gmtime(stamp.t)
            stamp.YMDhms = tuple(stamp.lt)[:6]
            self._doc._timeStamp = stamp

    return _Dated


def build_encapsulated_pdf(
    pdf: bytes,
    source: Dataset,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    document_title: str,
    created: dt.datetime,
    source_images: Sequence[Dataset] = (),
) -> Dataset:
    """The PDF as an Encapsulated PDF instance in ``source``'s study."""
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("pdf is not a PDF document")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASS_UID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = SOP_CLASS_UID
    ds.SOPInstanceUID = sop_instance_uid
    # Patient and General Study: as the source says them.
    for keyword in (
        "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
        "AccessionNumber", "StudyDescription",
    ):  # fmt: skip
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Encapsulated Document Series, General Equipment, SC Equipment.
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.Manufacturer = algorithm.manufacturer
    ds.SoftwareVersions = [algorithm.version, algorithm.model_version]
    ds.ConversionType = "WSD"
    # Encapsulated Document.
    ds.InstanceNumber = 1
    when = created.astimezone(dt.UTC)
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = document_title[:64]
    ds.ConceptNameCodeSequence = DicomSequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if source_images:
        refs = []
        for image in source_images:
            ref = Dataset()
            ref.ReferencedSOPClassUID = image.SOPClassUID
            ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
            refs.append(ref)
        ds.SourceInstanceSequence = DicomSequence(refs)
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds
