"""The worker's pre-processing, post-processing and quality-check stages with the earlier imaging
code (``tests/unit/imaging_reference.py``, patched in) and the current code, in one process,
run alternately on the real chest CT: medians, the ratio, the peak of NumPy's allocations
(``tracemalloc``), and whether the outputs are identical.

    .venv/bin/python bench/imaging_stages.py [--slices 64 320] [--pairs 9]

The 320-slice volume is derived from ``A0001-5mm`` along z in memory, as the unit tests do; the
probabilities come from the ``ct_lung`` ONNX model in ONNX Runtime. Prints a table, records
nothing (the stages' full-stack figures are ``bench/pipeline_stages.py``'s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import onnxruntime as ort
from record import machine  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT

sys.path.insert(0, str(ROOT))
from orthanc_plugin.core.config import load_pipelines  # noqa: E402
from orthanc_plugin.imaging import model_input, postprocess, preprocess  # noqa: E402
from orthanc_plugin.imaging.volume import Volume, build_volume  # noqa: E402
from orthanc_plugin.worker import pipeline  # noqa: E402
from tests.conftest import CT_A0001, read_series  # noqa: E402
from tests.unit import imaging_reference as ref  # noqa: E402
from tests.unit.test_imaging_equivalence import derived  # noqa: E402

PIPELINE = {p.name: p for p in load_pipelines(ROOT / "config" / "pipelines.yaml")}["ct-lung"]
#: The earlier functions, where the stages look them up.
EARLIER = [
    (preprocess, "resize", ref.resize),
    (preprocess, "window", ref.window),
    (postprocess, "labels_from_probabilities", ref.labels_from_probabilities),
    (pipeline, "measure_label", ref.measure_label),
    (pipeline, "airway_in_segments", ref.airway_in_segments),
    (pipeline, "confidence", ref.confidence),
]


@contextlib.contextmanager
def earlier() -> Iterator[None]:
    saved = [(m, a, getattr(m, a)) for m, a, _ in EARLIER]
    for m, a, f in EARLIER:
        setattr(m, a, f)
    try:
        yield
    finally:
        for m, a, f in saved:
            setattr(m, a, f)


def peak_mb(f: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def same(name: str, a: Any, b: Any) -> bool:
    if name == "preprocess":
        return bool(a.tensor.tobytes() == b.tensor.tobytes())
    if name == "postprocess":
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    return bool(a == b)


def stages(n: int, ct: Volume, session: ort.InferenceSession, pairs: int) -> None:
    """One table row per stage for the CT at ``n`` slices."""
    volume = ct if n == ct.shape[0] else derived(ct, n)
    prepared = model_input.prepare(PIPELINE, {"ct": volume})
    (probs,) = session.run(["probabilities"], {"image": prepared.tensor})
    labels = prepared.labels(probs[0], True)
    runs: dict[str, Callable[[], Any]] = {
        "preprocess": lambda: model_input.prepare(PIPELINE, {"ct": volume}),
        "postprocess": lambda: prepared.labels(probs[0], True),
        "measure": lambda: pipeline.measure(PIPELINE, volume, labels, probs[0]),
    }
    for name, f in runs.items():
        with earlier():
            before = f()
        identical = same(name, before, f())
        old: list[float] = []
        new: list[float] = []
        gc.disable()
        for _ in range(pairs):
            with earlier():
                t = time.perf_counter()
                f()
                old.append(time.perf_counter() - t)
            gc.collect()
            t = time.perf_counter()
            f()
            new.append(time.perf_counter() - t)
            gc.collect()
        gc.enable()
        with earlier():
            peak_old = peak_mb(f)
        peak_new = peak_mb(f)
        mo, mn = statistics.median(old), statistics.median(new)
        pair_ratio = statistics.median(b / a for a, b in zip(old, new, strict=True))
        print(
            f"| {n} | {name} | {mo * 1000:.1f} ({min(old) * 1000:.1f}) | {mn * 1000:.1f} ({min(new) * 1000:.1f}) | "
            f"{mn / mo:.2f} | {pair_ratio:.2f} | {peak_old:.0f} | {peak_new:.0f} | {'yes' if identical else 'NO'} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, nargs="+", default=[64, 320])
    p.add_argument("--pairs", type=int, default=9)
    args = p.parse_args()
    ct = build_volume(read_series(CT_A0001))
    session = ort.InferenceSession(str(ROOT / "triton_models" / "ct_lung" / "1" / "model.onnx"))
    m = machine()
    print(
        f"{m['cpu']}, {m['cores']} CPU(s), Python {m['python']}, Debian {m['debian']}, "
        f"load average {os.getloadavg()[0]:.2f} at the start; {args.pairs} pairs run alternately, medians"
    )
    print(
        "| slices | stage | earlier ms (fastest) | current ms (fastest) | current/earlier | "
        "median of the pairs' ratios | peak MB earlier | current | identical |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for n in args.slices:
        stages(n, ct, session, args.pairs)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
