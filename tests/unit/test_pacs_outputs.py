"""Key images, the PDF summary and the HL7 ORU on the real CT: conformance, pixels, text, structure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from numpy.typing import NDArray
from scipy import ndimage

from orthanc_plugin.core.config import Hl7Destination
from orthanc_plugin.core.results import VolumeMeasurement
from orthanc_plugin.hl7.message import build_oru
from orthanc_plugin.hl7.mllp import classify_ack
from orthanc_plugin.outputs.key_images import OUTLINE_PX, build_key_images, render_key_images
from orthanc_plugin.outputs.pdf_report import ValidatedFor, build_encapsulated_pdf, build_pdf

from .test_seg import ALGORITHM, CREATED, SEGMENTS, run_dciodvfy

Array = NDArray[Any]
MEASUREMENTS = [VolumeMeasurement(1, 1234.56), VolumeMeasurement(2, 7.89)]


def hu(ct: list[pydicom.Dataset]) -> NDArray[np.float32]:
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ct]).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def images(ct: list[pydicom.Dataset], labels: Array) -> list[Any]:
    return render_key_images(
        hu(ct), ct, labels, SEGMENTS, MEASUREMENTS, ALGORITHM, count=3, window=(-1350, 150)
    )


def test_key_image_slices_are_chosen_by_segment_area(images: list[Any], labels: Array) -> None:
    area = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    chosen = [i.index for i in images]
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert int(np.argmax(area)) in chosen  # the largest segmented slice is always one of them
    assert all(area[z] > 0 for z in chosen)


def test_key_image_outline_lies_on_the_segment_boundary(images: list[Any], labels: Array) -> None:
    for image in images:
        rows, cols = labels.shape[1:]
        picture = image.pixels[:rows]  # the slice, pixel for pixel; the legend panel is below
        for spec in SEGMENTS:
            mask = labels[image.index] == spec.label
            drawn = np.all(picture == np.asarray(spec.color_rgb, dtype=np.uint8), axis=2)
            if not mask.any():
                assert not drawn.any()
                continue
            band = mask & ~ndimage.binary_erosion(mask, iterations=OUTLINE_PX, border_value=0)
            assert drawn[band].mean() > 0.99, f"{spec.name}: outline not drawn"
            assert not drawn[~band].any() or drawn[~band].sum() < 0.001 * band.sum(), (
                f"{spec.name}: colour outside the segment's boundary"
            )


def test_key_images_are_valid_secondary_capture(
    images: list[Any], ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    uids = ["2.25.11", "2.25.12", "2.25.13"]
    datasets = build_key_images(
        images, ALGORITHM, series_instance_uid="2.25.10", sop_instance_uids=uids,
        series_number=9903, series_description="AI key images", content_time=CREATED,
    )  # fmt: skip
    for ds, image in zip(datasets, images, strict=True):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "RGB"
        assert ds.StudyInstanceUID == ct[0].StudyInstanceUID and ds.SeriesInstanceUID == "2.25.10"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == image.source.SOPInstanceUID
        assert ds.BurnedInAnnotation == "YES"
        assert np.array_equal(ds.pixel_array, image.pixels)
        warnings = run_dciodvfy(ds, tmp_path)
        assert all("Laterality" in w or "DICOMDIR" in w or "Person Name" in w for w in warnings)
    assert [d.SOPInstanceUID for d in datasets] == uids


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    tool = shutil.which("pdftotext")
    if tool is None:
        pytest.fail("pdftotext is missing: install Debian's poppler-utils (scripts/install.sh)")
    path = tmp_path / "summary.pdf"
    path.write_bytes(pdf)
    return subprocess.run(
        [tool, "-layout", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout


def test_pdf_reads_back_with_measurements_versions_and_validation(
    images: list[Any], ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    kw: dict[str, Any] = {
        "created": CREATED,
        "key_images": [i.pixels for i in images],
        "validated_for": [ValidatedFor("lung_unet 3", "Adult chest CT. Not validated for children.")],
    }
    pdf = build_pdf(ct[0], SEGMENTS, MEASUREMENTS, ALGORITHM, **kw)
    assert pdf == build_pdf(ct[0], SEGMENTS, MEASUREMENTS, ALGORITHM, **kw), "not deterministic"
    text = " ".join(pdf_text(pdf, tmp_path).split())
    for expected in (
        "1234.56", "7.89", "Lung", "Nodule", "UNVERIFIED", str(ct[0].PatientID), "2007-04-25",
        "lung-seg version 1.2.0", "lung_unet version 3", "Not validated for children", "not been reviewed",
    ):  # fmt: skip
        assert expected in text, f"{expected!r} not in the PDF's text"
    assert b"/CreationDate (D:20240506070809" in pdf


def test_encapsulated_pdf_is_valid(ct: list[pydicom.Dataset], tmp_path: Path) -> None:
    pdf = build_pdf(ct[0], SEGMENTS, MEASUREMENTS, ALGORITHM, created=CREATED)
    ds = build_encapsulated_pdf(
        pdf, ct[0], ALGORITHM, series_instance_uid="2.25.20", sop_instance_uid="2.25.21", series_number=9904,
        series_description="AI summary", document_title="AI summary", created=CREATED, source_images=ct,
    )  # fmt: skip
    assert ds.Modality == "DOC" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.PatientID == ct[0].PatientID and ds.StudyInstanceUID == ct[0].StudyInstanceUID
    run_dciodvfy(ds, tmp_path)


DESTINATION = Hl7Destination(
    name="ris", host="127.0.0.1", port=2575, receiving_application="RIS", receiving_facility="RAD"
)


def test_oru_parses_and_validates_at_2_5(ct: list[pydicom.Dataset]) -> None:
    text = build_oru(
        ct[0], SEGMENTS, MEASUREMENTS, ALGORITHM, DESTINATION, control_id="a1b2c3", observed=CREATED
    )
    m = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert m.validate() and m.msh.msh_12.value == "2.5" and m.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert m.msh.msh_10.value == "a1b2c3" and m.msh.msh_5.to_er7() == "RIS"
    result = m.ORU_R01_PATIENT_RESULT
    assert result.ORU_R01_PATIENT.PID.pid_3.to_er7().split("^")[0] == ct[0].PatientID
    order = result.ORU_R01_ORDER_OBSERVATION
    assert order.OBR.obr_25.value == "P"
    obx = [o.OBX for o in order.ORU_R01_OBSERVATION]
    assert obx[0].obx_5.to_er7() == ct[0].StudyInstanceUID
    volumes = [o for o in obx if o.obx_2.value == "NM"]
    assert [v.obx_5.to_er7() for v in volumes] == ["1234.56", "7.89"]
    assert all(v.obx_6.to_er7() == "mL^milliliter^UCUM" for v in volumes)
    assert all(o.obx_11.value == "P" for o in obx)


def test_ack_codes_are_sorted() -> None:
    def ack(code: str, cid: str = "X1", text: str = "") -> str:
        return f"MSH|^~\\&|RIS||ORTHANC-AI||20240101||ACK^R01|9|P|2.5\rMSA|{code}|{cid}|{text}"

    assert classify_ack(ack("AA"), "X1", "ris").outcome == "accepted"
    refused = classify_ack(ack("AE", text="unknown patient"), "X1", "ris")
    assert refused.outcome == "refused" and "unknown patient" in refused.message
    assert classify_ack(ack("AR"), "X1", "ris").outcome == "refused"
    assert classify_ack(ack("AA", cid="OTHER"), "X1", "ris").outcome == "retry"
    assert classify_ack("garbage", "X1", "ris").outcome == "retry"


def test_new_output_kinds_are_off_unless_a_pipeline_turns_them_on() -> None:
    from orthanc_plugin.core.config import Outputs, load_pipelines

    defaults = Outputs()
    assert not defaults.key_images.enabled and not defaults.pdf_report and not defaults.hl7_oru
    shipped = {
        p.name: p.outputs for p in load_pipelines(Path(__file__).parents[2] / "config" / "pipelines.yaml")
    }
    for name in ("ct-lung", "mr-brain"):
        assert shipped[name].key_images.enabled and shipped[name].pdf_report, name
    with pytest.raises(ValueError, match="window"):
        Outputs.model_validate({"key_images": {"enabled": True, "window": [100, -100]}})
    with pytest.raises(ValueError, match="names must be unique"):
        from orthanc_plugin.core.config import Settings

        Settings.model_validate({
            "PipelinesFile": "p.yaml",
            "Hl7Destinations": [DESTINATION.model_dump(), DESTINATION.model_dump()],
        })  # fmt: skip
