"""The ct_lung pipeline against a MONAI Deploy App SDK application: same files, same model, same DICOM libraries.

Three comparisons on one CT series read from files (no Orthanc in the loop), run interleaved
in one session on one machine:

1. **Per step, warm.** Both sides in a process kept alive, after one warm-up each; the same label
   map handed to both writers. *load*: MONAI Deploy's ``DICOMDataLoaderOperator`` +
   ``DICOMSeriesSelectorOperator`` + ``DICOMSeriesToVolumeOperator`` against ours
   (``pydicom.dcmread`` of each file by path + ``build_volume``): both read by path. *SEG*:
   MONAI Deploy's ``DICOMSegmentationWriterOperator.create_dicom_seg`` (highdicom BINARY SEG,
   written to a file and read back with ``pydicom.dcmread``) against ours (``build_seg``, file
   written and read back the same way). Once with Python's cyclic garbage collector on for both,
   once paused for both (our worker pauses it during a job).
2. **Per study, cold: one application process per study**, as MONAI Deploy applications run: a
   new ``bench/monai_deploy_app.py`` process (interpreter start, imports, Holoscan graph built and
   run, model loaded, DICOM read, inference, SEG written) against a new process of ours doing the
   same (``--ours-app``): wall-clock time of the whole process.
3. **Per study, our warm worker**: the same pipeline in this process, model loaded once, against
   (2)'s MONAI Deploy process per study.

Both sides run the model with ONNX Runtime in-process (the same ``ct_lung`` ONNX file and the
pipeline's own pre- and post-processing), so model code is not what is compared; the production
worker sends the tensor to Triton instead. highdicom, pydicom, numpy, scipy and ONNX Runtime are
the same versions on both sides (``bench/setup_monai_deploy.sh`` pins them to ``.venv``'s; this
script prints them, stores them in the record and stops if they differ).

Outputs are compared by decoding the SEG files with pydicom alone: every frame's position against
its source image's, the source image each frame references, ReferencedSeriesSequence, the segment
attributes, and the voxels per segment and source image (equality for (1), Dice for (2)).

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

ROOT = Path(__file__).resolve().parent.parent
MONAI_VENV = ROOT / ".venv-monai-deploy"
APP = ROOT / "bench" / "monai_deploy_app.py"
SHARED_LIBRARIES = ("highdicom", "pydicom", "numpy", "scipy", "onnxruntime")

SEGMENTS = (  # label, name, SNOMED type code, meaning: the ct_lung pipeline's two segments
    (1, "Right lung", "3341006", "Right lung"),
    (2, "Left lung", "44029006", "Left lung"),
)


def versions(names: tuple[str, ...]) -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in names}


# --------------------------------------------------------------------------- MONAI Deploy side (its venv)


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
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    sys.path.insert(0, str(APP.parent))
    import monai_deploy_app  # bench/monai_deploy_app.py: the segment descriptions and selection rules

    fragment = Fragment()
    loader = DICOMDataLoaderOperator(fragment, name="loader")
    selector = DICOMSeriesSelectorOperator(fragment, rules=monai_deploy_app.SELECTION_RULES, name="selector")
    to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")
    descriptions = monai_deploy_app.segment_descriptions()
    print(
        json.dumps(
            {
                "versions": versions(
                    (*SHARED_LIBRARIES, "monai-deploy-app-sdk", "holoscan-cu13", "monai", "torch")
                )
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        folder, out = Path(cmd["folder"]), Path(cmd["out"])
        if cmd.get("gc_paused"):
            gc.disable()
        t0 = time.perf_counter()
        studies = loader.load_data_to_studies(folder)
        selected = selector.filter(json.loads(monai_deploy_app.SELECTION_RULES), studies)
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
        writer.create_dicom_seg(mask, series, out)  # writes the file and reads it back (dcmread)
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


# --------------------------------------------------------------------------- our side (.venv)


def ours_load(folder: Path) -> Any:
    import pydicom

    from orthanc_plugin.imaging.volume import build_volume

    return build_volume([pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))])


def ours_write(volume: Any, labels: Any, out: Path) -> Path:
    """Our SEG for ``labels``, written to ``out/seg.dcm`` and read back, as MONAI Deploy's writer does."""
    import pydicom

    from orthanc_plugin.outputs import seg

    ds = seg.build_seg(
        list(volume.datasets), labels, _specs(), _algorithm(),
        series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=9901,
        series_description="AI ct-lung segmentation",
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    pydicom.dcmread(path)
    return path


def ours_step(folder: Path, labels: Any, out: Path, gc_paused: bool = False) -> dict[str, Any]:
    import gc

    if gc_paused:
        gc.disable()
    t0 = time.perf_counter()
    volume = ours_load(folder)
    t1 = time.perf_counter()
    path = ours_write(volume, labels, out)
    t2 = time.perf_counter()
    gc.enable()
    gc.collect()
    return {"load": t1 - t0, "seg": t2 - t1, "file": str(path), "volume_shape": list(volume.shape)}


def load_model() -> Any:
    import onnxruntime as ort

    model = ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def segment(session: Any, volume: Any) -> Any:
    """The ct_lung pipeline's label map for ``volume`` (slices in ``volume.datasets`` order)."""
    import numpy as np

    from orthanc_plugin.imaging import postprocess, preprocess
    from orthanc_plugin.imaging.volume import axial_flips

    flips = axial_flips(volume)
    v = np.flip(volume.voxels, flips) if flips else volume.voxels
    v = preprocess.resize(preprocess.window(v, -1024, 400), (64, 128, 128))
    name = session.get_inputs()[0].name
    probs = session.run(None, {name: np.ascontiguousarray(v[None, None], dtype=np.float32)})[0]
    labels = postprocess.labels_from_probabilities(probs[0], volume.shape, True)
    return np.ascontiguousarray(np.flip(labels, flips) if flips else labels)


def ours_pipeline(session: Any, folder: Path, out: Path) -> Path:
    """One study through our pipeline: read, volume, model, SEG written and read back."""
    import gc

    gc.disable()  # as the worker does during a job
    try:
        volume = ours_load(folder)
        return ours_write(volume, segment(session, volume), out)
    finally:
        gc.enable()
        gc.collect()


def ours_app(folder: Path, out: Path) -> int:
    """Our side of the cold comparison: everything a fresh process needs, for one study."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from orthanc_plugin.outputs.highdicom_cache import install_iod_cache

    install_iod_cache()  # as the worker does at start
    ours_pipeline(load_model(), folder, out)
    return 0


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


# --------------------------------------------------------------------------- outputs, decoded by pydicom alone


def decode_seg(path: Path) -> dict[str, Any]:
    """A BINARY SEG as plain values: frames by (segment number, source SOP Instance UID), and its header."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    frames = np.asarray(ds.pixel_array).reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    by_key: dict[tuple[int, str], Any] = {}
    positions: dict[tuple[int, str], tuple[float, ...]] = {}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        key = (number, source)
        if key in by_key:
            raise ValueError(f"{path}: two frames for segment {number} on image {source}")
        by_key[key] = frame.astype(bool)
        positions[key] = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
    segments = {
        int(s.SegmentNumber): (
            str(s.SegmentLabel),
            str(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue),
            str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue),
            str(s.SegmentAlgorithmType),
        )
        for s in ds.SegmentSequence
    }
    shared = ds.SharedFunctionalGroupsSequence[0]
    referenced = ds.ReferencedSeriesSequence[0]
    return {
        "frames": by_key,
        "positions": positions,
        "segments": segments,
        "referenced_series": str(referenced.SeriesInstanceUID),
        "referenced_instances": {
            str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence
        },
        "orientation": [
            round(float(v), 6) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient
        ],
        "pixel_spacing": [round(float(v), 6) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        "frame_of_reference": str(ds.FrameOfReferenceUID),
        "study": str(ds.StudyInstanceUID),
    }


def compare_outputs(monai: Path, ours: Path, folder: Path) -> dict[str, Any]:
    """Checks (name -> bool) and figures (Dice per segment, frame counts) of two SEGs of one series."""
    import numpy as np
    import pydicom

    sources = {}
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    first = next(iter(sources.values()))
    a, b = decode_seg(monai), decode_seg(ours)
    checks: dict[str, bool] = {}
    for side, d in (("monai", a), ("ours", b)):
        checks[f"{side}: every frame at its source image's position"] = all(
            uid in sources
            and np.allclose(pos, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
            for (_, uid), pos in d["positions"].items()
        )
        checks[f"{side}: ReferencedSeriesSequence lists the source series, every image"] = d[
            "referenced_series"
        ] == str(first.SeriesInstanceUID) and d["referenced_instances"] == set(sources)
        checks[f"{side}: frame of reference and study of the source"] = d["frame_of_reference"] == str(
            first.FrameOfReferenceUID
        ) and d["study"] == str(first.StudyInstanceUID)
    checks["same plane orientation and pixel spacing"] = (
        a["orientation"] == b["orientation"] and a["pixel_spacing"] == b["pixel_spacing"]
    )
    checks["same segments (number, label, category, type, algorithm type)"] = a["segments"] == b["segments"]
    checks["same frames (segment, source image)"] = set(a["frames"]) == set(b["frames"])
    checks["same voxels in every frame"] = checks["same frames (segment, source image)"] and all(
        np.array_equal(a["frames"][k], b["frames"][k]) for k in a["frames"]
    )
    dice = {}
    for number in sorted({n for n, _ in a["frames"]} | {n for n, _ in b["frames"]}):
        inter = size_a = size_b = 0
        for uid in sources:
            fa, fb = a["frames"].get((number, uid)), b["frames"].get((number, uid))
            size_a += int(fa.sum()) if fa is not None else 0
            size_b += int(fb.sum()) if fb is not None else 0
            if fa is not None and fb is not None:
                inter += int(np.logical_and(fa, fb).sum())
        dice[number] = 2 * inter / (size_a + size_b) if size_a + size_b else 1.0
    return {"checks": checks, "dice": dice, "frames": {"monai": len(a["frames"]), "ours": len(b["frames"])}}


def print_comparison(title: str, result: dict[str, Any]) -> bool:
    print(f"\n{title}: frames MONAI Deploy {result['frames']['monai']}, ours {result['frames']['ours']}; Dice "
          + ", ".join(f"segment {n} {d:.6f}" for n, d in result["dice"].items()))  # fmt: skip
    for name, ok in result["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return all(result["checks"].values())


# --------------------------------------------------------------------------- driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--monai-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-app", nargs=2, type=Path, metavar=("STUDY", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.monai_worker:
        return monai_worker()
    if args.ours_app:
        return ours_app(*args.ours_app)
    python = MONAI_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash bench/setup_monai_deploy.sh first")
    import warnings

    # highdicom warns about the source's PatientName format and quotes it: keep it off the console.
    warnings.filterwarnings("ignore", category=UserWarning)
    import numpy as np
    from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

    from orthanc_plugin.outputs.highdicom_cache import install_iod_cache

    install_iod_cache()  # as the worker does at start
    folder = args.study.resolve()
    session = load_model()
    volume = ours_load(folder)
    labels = segment(session, volume)
    order = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    ours_versions = versions(SHARED_LIBRARIES)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="bench-monai-") as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "mask.npy", labels)
        (tmp / "order.json").write_text(json.dumps(order))
        child = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--monai-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        hello = child.stdout.readline()
        if not hello:
            raise SystemExit("the MONAI Deploy worker stopped; run it by hand to see why")
        monai_versions: dict[str, str] = json.loads(hello)["versions"]
        differ = {k: (monai_versions[k], v) for k, v in ours_versions.items() if monai_versions.get(k) != v}
        if differ:
            child.kill()
            raise SystemExit(f"library versions differ (MONAI Deploy venv, .venv): {differ}; "
                             "run bash bench/setup_monai_deploy.sh")  # fmt: skip

        def monai_step(k: int, gc_paused: bool = False) -> dict[str, Any]:
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

        def cold(side: str, k: int) -> tuple[float, Path]:
            out = tmp / f"cold-{side}-{k}"
            if side == "monai":
                command = [str(python), str(APP), "-i", str(folder), "-o", str(out)]
            else:
                command = [sys.executable, str(Path(__file__).resolve()), "--ours-app", str(folder), str(out)]
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - t0
            files = list(out.glob("*.dcm"))
            if done.returncode != 0 or len(files) != 1:
                raise SystemExit(
                    f"{side} application failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
                )
            return elapsed, files[0]

        try:
            # 1. per step, warm: one warm-up each, then interleaved timed runs.
            monai_step(-1)
            ours_step(folder, labels, tmp / "ours--1")
            steps: dict[tuple[str, bool], list[dict[str, Any]]] = {
                (side, paused): [] for side in ("monai", "ours") for paused in (False, True)
            }
            for k in range(args.runs):
                for paused in (False, True):
                    steps["monai", paused].append(monai_step(k + 1000 * paused, paused))
                    steps["ours", paused].append(
                        ours_step(folder, labels, tmp / f"ours-{k}-{paused}", paused)
                    )
            step_result = compare_outputs(
                Path(steps["monai", False][-1]["file"]), Path(steps["ours", False][-1]["file"]), folder
            )
        finally:
            if child.stdin:
                child.stdin.write(json.dumps({"op": "quit"}) + "\n")
                child.stdin.close()
            child.wait(timeout=60)
        # 2. and 3. per study: a process per study for both; our warm pipeline in this process.
        ours_pipeline(session, folder, tmp / "warm--1")  # warm-up
        cold_times: dict[str, list[float]] = {"monai": [], "ours": []}
        warm_times: list[float] = []
        cold_files: dict[str, Path] = {}
        for k in range(args.runs):
            for side in ("monai", "ours"):
                elapsed, cold_files[side] = cold(side, k)
                cold_times[side].append(elapsed)
            t0 = time.perf_counter()
            ours_pipeline(session, folder, tmp / f"warm-{k}")
            warm_times.append(time.perf_counter() - t0)
        cold_result = compare_outputs(cold_files["monai"], cold_files["ours"], folder)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r["load"] + r["seg"] if key == "both" else r[key] for r in runs)

    print(f"machine: {describe(machine())}")
    print(f"study: {folder.name}: {len(order)} slices, volume {list(volume.shape)} (z y x)")
    print("libraries on both sides: " + ", ".join(f"{k} {v}" for k, v in ours_versions.items()))
    print("MONAI Deploy side also: " + ", ".join(
        f"{k} {v}" for k, v in monai_versions.items() if k not in ours_versions))  # fmt: skip
    print(f"runs: {args.runs} of each, interleaved; medians in seconds\n")
    print("1. per step, both warm (same label map to both writers; GC on, then paused, for both)")
    print(f"{'step':<32} {'GC':<7} {'MONAI Deploy':>12} {'ours':>8} {'ratio':>7}")
    figures: dict[str, float] = {}
    for key, label in (
        ("load", "read by path -> volume"),
        ("seg", "write SEG + read back"),
        ("both", "both"),
    ):
        for paused in (False, True):
            m, o = med(steps["monai", paused], key), med(steps["ours", paused], key)
            print(f"{label:<32} {'paused' if paused else 'on':<7} {m:12.3f} {o:8.3f} {m / o:6.1f}x")
            gc_state = "gc_paused" if paused else "gc_on"
            figures[f"step_{key}_{gc_state}_monai_s"], figures[f"step_{key}_{gc_state}_ours_s"] = m, o
            figures[f"step_{key}_{gc_state}_ratio"] = m / o
    monai_cold, ours_cold = statistics.median(cold_times["monai"]), statistics.median(cold_times["ours"])
    ours_warm = statistics.median(warm_times)
    print("\n2. and 3. per study, whole pipeline (read, volume, model, SEG written and read back)")
    print(f"{'':<46} {'MONAI Deploy':>12} {'ours':>8} {'ratio':>7}")
    print(f"{'one process per study (cold), wall clock':<46} {monai_cold:12.3f} {ours_cold:8.3f} "
          f"{monai_cold / ours_cold:6.1f}x")  # fmt: skip
    print(f"{'MONAI Deploy cold, our warm worker':<46} {monai_cold:12.3f} {ours_warm:8.3f} "
          f"{monai_cold / ours_warm:6.1f}x")  # fmt: skip
    figures.update({
        "study_cold_monai_s": monai_cold, "study_cold_ours_s": ours_cold,
        "study_cold_ratio": monai_cold / ours_cold,
        "study_warm_ours_s": ours_warm, "study_cold_monai_vs_warm_ours_ratio": monai_cold / ours_warm,
    })  # fmt: skip
    ok = print_comparison("outputs of 1 (same label map)", step_result)
    ok = print_comparison("outputs of 2 (each side ran the model)", cold_result) and ok
    for number, d in cold_result["dice"].items():
        figures[f"study_cold_dice_segment_{number}"] = d
    record(
        "monai_deploy_compare",
        figures,
        {
            "study": folder.name,
            "slices": len(order),
            "runs": args.runs,
            "libraries_both_sides": ours_versions,
            "monai_deploy_side": {k: v for k, v in monai_versions.items() if k not in ours_versions},
            "output_checks_same_label_map": step_result["checks"],
            "output_checks_each_side_ran_the_model": cold_result["checks"],
            "frames": cold_result["frames"],
        },
    )
    if not ok:
        print("MISMATCH: the two SEGs differ (see above)")
        return 1
    print("the two SEGs agree on every check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
