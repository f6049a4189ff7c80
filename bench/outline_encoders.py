"""SR and RTSTRUCT encoding, the product's against the previous encoders, in process.

On the chest CT ``A0001-5mm`` (64 slices) and the 320-slice series derived from it by resampling
along z (``devstack.derive.resample_z``), its lungs labelled by the classical labeller the
``ct_lung`` model is trained to reproduce (``triton_models/ct_lung/reference_labels.py``):
``build_sr`` (with the volumes, 61 radiomics features per lung and a classification, as the
``ct-lung`` pipeline reports them) and ``build_rtstruct``, each followed by writing the file as
the store stage does (``save_as``). Old (``tests/unit/sr_reference.py``,
``rtstruct_reference.py``: the encoders before their repeated parts were encoded directly) and
new run alternately, ``--pairs`` times, with Python's cyclic garbage collector paused and
collected between runs as the worker does during a job. Prints the medians and their ratio,
and whether the written files are byte-identical (the clock's time stamps set equal); exits 1
when they are not.

    .venv/bin/python bench/outline_encoders.py [--pairs 7] [--slices 64 320]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from devstack.common import ROOT
from devstack.derive import resample_z, sorted_slices

sys.path.insert(0, str(ROOT))
from orthanc_plugin.core.codes import Code  # noqa: E402
from orthanc_plugin.core.config import load_pipelines, segment_specs  # noqa: E402
from orthanc_plugin.core.results import (  # noqa: E402
    ClassificationResult,
    FeatureValue,
    SegmentFeatures,
    VolumeMeasurement,
)
from orthanc_plugin.imaging.radiomics import FEATURES_BY_ID  # noqa: E402
from orthanc_plugin.outputs import rtstruct, seg, sr  # noqa: E402
from tests.unit import rtstruct_reference, sr_reference  # noqa: E402

# The byte comparison of the unit tests: the same algorithm, creation time and clock-free bytes.
from tests.unit.test_outline_encoders import ALGORITHM, CREATED, written  # noqa: E402
from triton_models.ct_lung.reference_labels import reference_labels  # noqa: E402

CT = ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm"


def inputs(images: list[pydicom.Dataset]) -> dict[str, Any]:
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in images])
    spacing = (
        abs(float(images[1].ImagePositionPatient[2]) - float(images[0].ImagePositionPatient[2])),
        *(float(v) for v in images[0].PixelSpacing),
    )
    labels = reference_labels(hu, spacing)
    for ds in images:
        del ds.PixelData  # as the worker holds them once the volume is built
    (pipeline,) = [p for p in load_pipelines(ROOT / "config" / "pipelines.yaml") if p.name == "ct-lung"]
    segments = segment_specs(pipeline)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000
    rng = np.random.default_rng(5)
    features = [
        SegmentFeatures(
            s.label,
            tuple(
                FeatureValue(k, f.name, f.unit, float(rng.normal(100, 50))) for k, f in FEATURES_BY_ID.items()
            ),
        )
        for s in segments
    ]
    classification = ClassificationResult(
        name="dense lung", tracking_id="dense-lung-share", finding=Code("263681008", "SCT", "Abnormal"),
        probability=0.55, threshold=0.3333, classes=("negative", "positive"), probabilities=(0.45, 0.55),
        model_name="dense_lung", model_version="1", finding_site=Code("39607008", "SCT", "Lung"),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg_ds = seg.build_seg(
            images, labels, segments, ALGORITHM, series_instance_uid="2.25.1000", sop_instance_uid="2.25.1001",
            series_number=901, series_description="AI segmentation", content_creation=CREATED,
        )  # fmt: skip
    measurements = [
        VolumeMeasurement(s.label, round(float(np.count_nonzero(labels == s.label)) * voxel_ml, 2))
        for s in segments
    ]
    return {
        "images": images, "labels": labels, "seg": seg_ds, "segments": segments,
        "measurements": measurements, "features": features, "classifications": [classification],
    }  # fmt: skip


def build_sr(module: Any, d: dict[str, Any]) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds: pydicom.Dataset = module.build_sr(
            d["images"], d["seg"], d["segments"], d["measurements"], ALGORITHM,
            series_instance_uid="2.25.2000", sop_instance_uid="2.25.2001", series_number=902,
            series_description="AI report", labels=d["labels"], content_creation=CREATED,
            classifications=d["classifications"], features=d["features"],
        )  # fmt: skip
    return ds


def build_rtstruct(module: Any, d: dict[str, Any]) -> pydicom.Dataset:
    ds: pydicom.Dataset = module.build_rtstruct(
        d["images"], d["labels"], d["segments"], ALGORITHM, series_instance_uid="2.25.3000",
        sop_instance_uid="2.25.3001", series_number=903, series_description="AI contours", content_creation=CREATED,
    )  # fmt: skip
    return ds


def paired(old: Callable[[], bytes], new: Callable[[], bytes], pairs: int) -> tuple[float, float]:
    """Median seconds of old and new, run alternately (encode and write)."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    gc.disable()
    try:
        for _ in range(pairs):
            for name, fn in (("old", old), ("new", new)):
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return statistics.median(times["old"]), statistics.median(times["new"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 320])
    args = parser.parse_args()
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.slices:
            folder = (
                CT
                if n == 64
                else resample_z(sorted_slices(CT), n, Path(tmp) / f"ct{n}", f"bench-outlines-{n}")
            )
            d = inputs(sorted_slices(folder))
            for name, build, old_module, new_module in (
                ("SR", build_sr, sr_reference, sr),
                ("RTSTRUCT", build_rtstruct, rtstruct_reference, rtstruct),
            ):

                def old(build: Any = build, module: Any = old_module, d: dict[str, Any] = d) -> bytes:
                    return written(build(module, d))

                def new(build: Any = build, module: Any = new_module, d: dict[str, Any] = d) -> bytes:
                    return written(build(module, d))

                identical = old() == new()
                same &= identical
                t_old, t_new = paired(old, new, args.pairs)
                print(
                    f"{n} slices, {name} encode + write: old {t_old * 1000:.0f} ms, new {t_new * 1000:.0f} ms, "
                    f"ratio {t_new / t_old:.2f}; files byte-identical: {'yes' if identical else 'NO'}",
                    flush=True,
                )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
