"""The ``ct_lung`` pipeline as a MONAI Deploy App SDK application: one process per study, as such apps run.

Runs in the MONAI Deploy venv (``bench/setup_monai_deploy.sh``), from the repository root::

    .venv-monai-deploy/bin/python bench/monai_deploy_app.py -i STUDY_FOLDER -o OUTPUT_FOLDER

The graph is the SDK's usual DICOM chain with one model operator written here:
DICOM loader -> series selector (CT, axial, original) -> series to volume -> ``CtLungOperator``
-> DICOM SEG writer. ``CtLungOperator`` loads the same ONNX model as the ``ct_lung`` pipeline
with ONNX Runtime when the graph starts, and runs the pipeline's own pre- and post-processing
(``orthanc_plugin.imaging.preprocess`` / ``postprocess``, imported from this checkout), so
that both sides of ``bench/monai_deploy_compare.py`` give the model the same input and turn its
answer into the same label map: what differs is the framework around the model (process model,
DICOM reading, volume assembly, SEG writing).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"
MODEL_GRID = (64, 128, 128)  # the ct_lung model's input grid (z, y, x), as in its pipeline
WINDOW = (-1024.0, 400.0)

SEGMENTS = (  # label, name, SNOMED type code, meaning: the ct_lung pipeline's two segments
    (1, "Right lung", "3341006", "Right lung"),
    (2, "Left lung", "44029006", "Left lung"),
)

SELECTION_RULES = """{"selections": [{"name": "CT series", "conditions": {
    "Modality": "(?i)CT", "ImageType": ["PRIMARY", "ORIGINAL"]}}]}"""


def flips_from_orientation(dataset: Any, normal_sign: float) -> tuple[int, ...]:
    """Axes of a (slice, row, column) array to flip into the model's orientation (LPS, feet to head).

    ``normal_sign`` is the sign of the z component of the vector from the first slice to the last
    in the order the array holds them.
    """
    row = [float(v) for v in dataset.ImageOrientationPatient[:3]]
    col = [float(v) for v in dataset.ImageOrientationPatient[3:]]
    flips = []
    if normal_sign < 0:
        flips.append(0)
    if col[1] < 0:
        flips.append(1)
    if row[0] < 0:
        flips.append(2)
    return tuple(flips)


def segment_lungs(session: Any, voxels: Any, datasets: list[Any]) -> Any:
    """Label map (uint8, same shape as ``voxels`` [slice, row, column]) of the ct_lung model."""
    import numpy as np

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from orthanc_plugin.imaging import postprocess, preprocess

    first = float(datasets[0].ImagePositionPatient[2])
    last = float(datasets[-1].ImagePositionPatient[2])
    flips = flips_from_orientation(datasets[0], last - first)
    v = np.asarray(voxels, dtype=np.float32)
    v = np.flip(v, flips) if flips else v
    v = preprocess.resize(preprocess.window(v, *WINDOW), MODEL_GRID)
    name = session.get_inputs()[0].name
    probabilities = session.run(None, {name: np.ascontiguousarray(v[None, None], dtype=np.float32)})[0]
    labels = postprocess.labels_from_probabilities(probabilities[0], tuple(voxels.shape), True)
    return np.ascontiguousarray(np.flip(labels, flips) if flips else labels)


def load_model() -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def segment_descriptions() -> list[Any]:
    from monai.deploy.operators.dicom_seg_writer_operator import SegmentDescription
    from pydicom.sr.coding import Code

    return [
        SegmentDescription(
            segment_label=name,
            segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=Code(code, "SCT", meaning),
            algorithm_name="ct_lung",
            algorithm_version="1",
        )
        for _, name, code, meaning in SEGMENTS
    ]


def volume_array(image: Any) -> Any:
    """The series-to-volume operator's voxels as [slice, row, column], slices in the series' order."""
    import numpy as np

    return np.asarray(image.asnumpy())


def build_app(argv: list[str]) -> Any:
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application, Fragment, Operator, OperatorSpec
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    class CtLungOperator(Operator):  # type: ignore[misc]
        """Image (and its series) in, label map out; the model is loaded when the graph starts."""

        def __init__(self, fragment: Fragment, *args: Any, **kwargs: Any) -> None:
            self.session: Any = None
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec: OperatorSpec) -> None:
            spec.input("image")
            spec.input("study_selected_series_list")
            spec.output("seg_image")

        def start(self) -> None:
            self.session = load_model()

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            image = op_input.receive("image")
            selected = op_input.receive("study_selected_series_list")
            series = selected[0].selected_series[0].series
            datasets = [i.get_native_sop_instance() for i in series.get_sop_instances()]
            op_output.emit(segment_lungs(self.session, volume_array(image), datasets), "seg_image")

    class CtLungApp(Application):  # type: ignore[misc]
        def compose(self) -> None:
            context = Application.init_app_context(argv)
            loader = DICOMDataLoaderOperator(
                self, CountCondition(self, 1), input_folder=Path(context.input_path), name="dicom_loader"
            )
            selector = DICOMSeriesSelectorOperator(self, rules=SELECTION_RULES, name="series_selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            lung = CtLungOperator(self, name="ct_lung")
            writer = DICOMSegmentationWriterOperator(
                self,
                segment_descriptions=segment_descriptions(),
                output_folder=Path(context.output_path),
                name="seg_writer",
            )
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, lung, {("image", "image")})
            self.add_flow(selector, lung, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(lung, writer, {("seg_image", "seg_image")})
            self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})

    return CtLungApp(argv)


def main() -> int:
    import warnings

    # highdicom warns about the source's PatientName format and quotes it: keep it off the console.
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.disable(logging.WARNING)
    build_app(sys.argv).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
