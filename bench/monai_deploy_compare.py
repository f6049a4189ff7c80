"""Our DICOM load + SEG write against MONAI Deploy App SDK's operators, same files, same mask.

What is timed, per run, on one CT series read from files (no Orthanc, no model in the loop):

* load: MONAI Deploy ``DICOMDataLoaderOperator.load_data_to_studies`` +
  ``DICOMSeriesSelectorOperator.filter`` (no rules: the one series) +
  ``DICOMSeriesToVolumeOperator.convert_to_image``; ours: every file read whole and parsed
  from memory with ``pydicom.dcmread`` (as the worker parses the files it fetched from
  Orthanc) + ``orthanc_plugin.imaging.volume.build_volume``.
* SEG: MONAI Deploy ``DICOMSegmentationWriterOperator.create_dicom_seg`` (highdicom BINARY SEG,
  written to a file and read back, as the operator does); ours: ``orthanc_plugin.outputs.seg.build_seg``
  (BINARY, our own encoder, ``orthanc_plugin/seg_binary.py``) + writing the file.

Each comparison runs twice per round, with Python's cyclic garbage collector on for both
sides and paused for both during the timed steps (our worker pauses it during every job).

The operators' methods are called directly (no Holoscan application graph). MONAI Deploy runs
in its own venv (``bench/setup_monai_deploy.sh`` makes ``.venv-monai-deploy``) as a child
process that this script drives, so both paths run in the same session on the same machine,
run after run, interleaved. The mask is the ``ct_lung`` model's label map (ONNX Runtime
in-process, then our post-processing), handed to both writers slice by slice in the order of
the SOP instances each one uses; the two SEGs are checked to hold the same voxels per segment.

    .venv/bin/python bench/monai_deploy_compare.py [--study ../shared/data/ct/A0001-5mm] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devstack.common import ROOT

MONAI_VENV = ROOT / ".venv-monai-deploy"

SEGMENTS = (  # label, name, SNOMED type code, meaning: the ct_lung pipeline's two segments
    (1, "Right lung", "3341006", "Right lung"),
    (2, "Left lung", "44029006", "Left lung"),
)


# --------------------------------------------------------------------------- MONAI Deploy side


def monai_worker() -> int:
    """Child process (MONAI Deploy venv): read one JSON command a line, answer one JSON line."""
    import gc
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import numpy as np
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_seg_writer_operator import (
        DICOMSegmentationWriterOperator,
        SegmentDescription,
    )
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
    from pydicom.sr.coding import Code

    fragment = Fragment()
    loader = DICOMDataLoaderOperator(fragment, name="loader")
    selector = DICOMSeriesSelectorOperator(fragment, name="selector")
    to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")
    descriptions = [
        SegmentDescription(
            segment_label=name,
            segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=Code(code, "SCT", meaning),
            algorithm_name="ct_lung",
            algorithm_version="1",
        )
        for _, name, code, meaning in SEGMENTS
    ]
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        folder, out = Path(cmd["folder"]), Path(cmd["out"])
        if cmd.get("gc_paused"):
            gc.disable()
        t0 = time.perf_counter()
        studies = loader.load_data_to_studies(folder)
        selected = selector.filter(None, studies)
        image = to_volume.convert_to_image(selected)
        t1 = time.perf_counter()
        series = selected[0].selected_series[0].series
        order = [str(i.get_native_sop_instance().SOPInstanceUID) for i in series.get_sop_instances()]
        labels = np.load(cmd["mask"])
        ours = json.loads(Path(cmd["order"]).read_text())
        where = {uid: k for k, uid in enumerate(ours)}
        mask = np.ascontiguousarray(labels[[where[u] for u in order]])
        writer = DICOMSegmentationWriterOperator(
            fragment, segment_descriptions=descriptions, output_folder=out
        )
        out.mkdir(parents=True, exist_ok=True)
        t2 = time.perf_counter()
        writer.create_dicom_seg(mask, series, out)
        t3 = time.perf_counter()
        gc.enable()
        gc.collect()
        (path,) = out.glob("*.dcm")
        shape = list(np.asarray(image.asnumpy()).shape)
        print(
            json.dumps({"load": t1 - t0, "seg": t3 - t2, "file": str(path), "volume_shape": shape}),
            flush=True,
        )
    return 0


# --------------------------------------------------------------------------- our side


def ours_once(folder: Path, labels: Any, out: Path, gc_paused: bool = False) -> dict[str, Any]:
    import gc
    import io

    import pydicom

    from orthanc_plugin.imaging.volume import build_volume
    from orthanc_plugin.outputs import seg
    from orthanc_plugin.outputs.highdicom_cache import install_iod_cache

    install_iod_cache()  # as the worker does at start
    if gc_paused:
        gc.disable()
    t0 = time.perf_counter()
    # As the worker does with what it fetched from Orthanc: the whole file's bytes, parsed from memory.
    volume = build_volume([pydicom.dcmread(io.BytesIO(f.read_bytes())) for f in sorted(folder.glob("*.dcm"))])
    t1 = time.perf_counter()
    ds = seg.build_seg(
        list(volume.datasets), labels, _specs(), _algorithm(),
        series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=9901,
        series_description="AI ct-lung segmentation",
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    t2 = time.perf_counter()
    gc.enable()
    gc.collect()
    return {"load": t1 - t0, "seg": t2 - t1, "file": str(path), "volume_shape": list(volume.shape)}


def _specs() -> list[Any]:
    from orthanc_plugin.core.codes import Code
    from orthanc_plugin.core.results import SegmentSpec

    category = Code("123037004", "SCT", "Anatomical Structure")
    return [
        SegmentSpec(label=label, name=name, category=category, type=Code(code, "SCT", meaning), anatomic_region=None,
                    color_rgb=(230, 120, 50) if label == 1 else (60, 160, 230), tracking_id=name)
        for label, name, code, meaning in SEGMENTS
    ]  # fmt: skip


def _algorithm() -> Any:
    from orthanc_plugin.core.results import AlgorithmInfo

    return AlgorithmInfo(name="orthanc-ai ct-lung", version="1.0.0", model_name="ct_lung", model_version="1")


def model_labels(folder: Path) -> tuple[Any, list[str]]:
    """The ct_lung model's label map for the series (ONNX Runtime in-process) and its SOP order."""
    import numpy as np
    import onnxruntime as ort
    import pydicom

    from orthanc_plugin.imaging import postprocess, preprocess
    from orthanc_plugin.imaging.volume import axial_flips, build_volume

    volume = build_volume([pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))])
    flips = axial_flips(volume)
    v = np.flip(volume.voxels, flips) if flips else volume.voxels
    v = preprocess.resize(preprocess.window(v, -1024, 400), (64, 128, 128))
    session = ort.InferenceSession(
        str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    probs = session.run(None, {name: np.ascontiguousarray(v[None, None], dtype=np.float32)})[0]
    labels = postprocess.labels_from_probabilities(probs[0], volume.shape, True)
    labels = np.ascontiguousarray(np.flip(labels, flips))
    return labels, [str(ds.SOPInstanceUID) for ds in volume.datasets]


def voxels_per_segment(path: str) -> dict[int, int]:
    """Set voxels per segment number in a BINARY SEG file."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    frames = np.asarray(ds.pixel_array).reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    counts: dict[int, int] = {}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(np.count_nonzero(frame))
    return dict(sorted(counts.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--monai-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.monai_worker:
        return monai_worker()
    python = MONAI_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash bench/setup_monai_deploy.sh first")
    import warnings

    # highdicom warns about the source's PatientName format and quotes it: keep it off the console.
    warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
    import numpy as np
    from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

    folder = args.study.resolve()
    labels, order = model_labels(folder)
    with tempfile.TemporaryDirectory(prefix="bench-monai-") as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "mask.npy", labels)
        (tmp / "order.json").write_text(json.dumps(order))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        child = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--monai-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None

        def monai_once(k: int, gc_paused: bool = False) -> dict[str, Any]:
            cmd = {"op": "run", "folder": str(folder), "mask": str(tmp / "mask.npy"),
                   "order": str(tmp / "order.json"), "out": str(tmp / f"monai-{k}"),
                   "gc_paused": gc_paused}  # fmt: skip
            child.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            line = child.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit("the MONAI Deploy worker stopped; run it by hand to see why")
            result: dict[str, Any] = json.loads(line)
            return result

        try:
            # One warm-up each (imports, first-call caches), then interleaved timed runs.
            monai_once(-1)
            ours_once(folder, labels, tmp / "ours--1")
            runs: dict[tuple[str, bool], list[dict[str, Any]]] = {
                (side, paused): [] for side in ("monai", "ours") for paused in (False, True)
            }
            for k in range(args.runs):
                for paused in (False, True):
                    runs["monai", paused].append(monai_once(k + 1000 * paused, paused))
                    runs["ours", paused].append(ours_once(folder, labels, tmp / f"ours-{k}-{paused}", paused))
            counts_monai = voxels_per_segment(runs["monai", False][-1]["file"])
            counts_ours = voxels_per_segment(runs["ours", False][-1]["file"])
        finally:
            if child.stdin:
                child.stdin.write(json.dumps({"op": "quit"}) + "\n")
                child.stdin.close()
            child.wait(timeout=60)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r["load"] + r["seg"] if key == "both" else r[key] for r in runs)

    print(f"machine: {describe(machine())}")
    shape = runs["ours", False][0]["volume_shape"]
    print(f"study: {folder}: {len(order)} slices, volume {shape} (ours, z y x)")
    print(f"runs: {args.runs} of each, interleaved, after one warm-up each; medians in seconds")
    print("Python's cyclic garbage collector: on for both, then paused for both during the timed")
    print("steps (our worker pauses it for every job; MONAI Deploy applications do not)\n")
    print(f"{'step':<22} {'GC':<7} {'MONAI Deploy':>12} {'ours':>8} {'ratio':>7}")
    for key, label in (("load", "load series -> volume"), ("seg", "write SEG (BINARY)"), ("both", "both")):
        for paused in (False, True):
            m, o = med(runs["monai", paused], key), med(runs["ours", paused], key)
            print(f"{label:<22} {'paused' if paused else 'on':<7} {m:12.3f} {o:8.3f} {m / o:6.1f}x")
    figures = {}
    for key in ("load", "seg", "both"):
        for paused in (False, True):
            gc_state = "gc_paused" if paused else "gc_on"
            m, o = med(runs["monai", paused], key), med(runs["ours", paused], key)
            figures[f"{key}_{gc_state}_monai_s"], figures[f"{key}_{gc_state}_ours_s"] = m, o
            figures[f"{key}_{gc_state}_ratio"] = m / o
    record(
        "monai_deploy_compare", figures, {"study": str(folder.name), "slices": len(order), "runs": args.runs}
    )
    print(f"\nset voxels per segment: MONAI Deploy {counts_monai}, ours {counts_ours}")
    if counts_monai != counts_ours:
        print("MISMATCH: the two SEGs do not encode the same mask")
        return 1
    print("the two SEGs encode the same mask")
    return 0


if __name__ == "__main__":
    sys.exit(main())
