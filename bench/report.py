"""Write the tables of docs/performance.md from the committed benchmark records.

    python bench/report.py           # rewrite the generated blocks of docs/performance.md
    python bench/report.py --check   # exit 1 if the page differs from what the records give

Each block between ``<!-- bench:NAME -->`` and ``<!-- /bench -->`` is generated; the text
around the blocks is written by hand and quotes no figure. A unit test runs ``--check``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from record import RESULTS, describe  # a sibling script: bench/ is sys.path[0]

PAGE = RESULTS.parent.parent / "docs" / "performance.md"
BLOCK = re.compile(r"(<!-- bench:([a-z_]+) -->\n)(.*?)(<!-- /bench -->)", re.S)
STAGES = (
    ("fetch", "fetch from Orthanc"),
    ("volume", "volume assembly"),
    ("preprocess", "preprocessing"),
    ("inference", "inference (Triton, CPU)"),
    ("postprocess", "post-processing"),
    ("measure", "volumes and quality checks"),
    ("radiomics", "radiomics features (IBSI)"),
    ("seg_encode", "SEG encode"),
    ("sr_encode", "SR encode"),
    ("rtstruct_encode", "RTSTRUCT encode"),
    ("key_images_encode", "key images encode"),
    ("pdf_encode", "PDF encode"),
    ("fhir_build", "FHIR build"),
    ("hl7_build", "HL7 build"),
    ("store", "store in Orthanc"),
    ("total", "**total**"),
    ("all_but_inference", "**everything except inference**"),
)


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _source(*records: dict[str, Any] | None) -> str:
    lines = []
    for r in records:
        if r is not None:
            lines.append(f"`{r['command']}`, {r['date'][:10]}: {describe(r['machine'])}.")
    return "Measured with " + " ".join(lines) if lines else ""


def _missing(name: str) -> str:
    return f"Not measured yet: `make bench` writes `bench/results/{name}.json`.\n"


def pipeline_stages() -> str:
    runs = [load("pipeline_stages_64_slices"), load("pipeline_stages_320_slices")]
    if not any(runs):
        return _missing("pipeline_stages_64_slices")
    head = "| stage | 64 slices, median s | 320 slices, median s |\n|---|---:|---:|\n"
    rows = []
    for key, label in STAGES:
        values = [r["figures"].get(f"{key}_median_s") if r else None for r in runs]
        if all(v is None for v in values):
            continue
        rows.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    extra = []
    for key, label in (
        ("worker_peak_memory_mb", "worker peak memory, MB"),
        ("intake_delay_s", "intake delay, s"),
        ("first_job_vs_warm_ratio", "first job of a fresh worker / a warm one"),
    ):
        values = [r["figures"].get(key) if r else None for r in runs]
        if any(v is not None for v in values):
            extra.append(
                f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |"
            )
    added = [
        (k.removeprefix("added_").removesuffix("_median_s"), v)
        for k, v in (runs[0] or {"figures": {}})["figures"].items()
        if k.startswith("added_")
    ]
    text = head + "\n".join(rows + extra) + "\n"
    if added:
        text += "\nAdded to a 64-slice job per output kind (its encoding and storing), median s: "
        text += ", ".join(f"{kind.replace('_', ' ')} {v:.3f}" for kind, v in added) + ".\n"
    return text + "\n" + _source(*runs) + "\n"


def time_to_result() -> str:
    r = load("time_to_result")
    if r is None:
        return _missing("time_to_result")
    f, n = r["figures"], r["notes"]
    head = (
        f"{n['study']}, {n['instances']} instances sent by {n['sent_with']}; Orthanc's StableAge "
        f"{n['stable_age_s']} s, SeriesQuietSeconds {n['series_quiet_s']}; {n['runs']} studies.\n\n"
        "| seconds after the last instance arrived | median | min | max |\n|---|---:|---:|---:|\n"
    )
    rows = [
        f"| {label} | {f[f'{key}_median_s']:.2f} | {f[f'{key}_min_s']:.2f} | {f[f'{key}_max_s']:.2f} |"
        for key, label in (
            ("started", "job started"),
            ("stored", "result stored (SEG, SR and the other outputs)"),
            ("fhir", "FHIR report delivered"),
        )
    ]
    after = n["second_series_after_s"]
    checks = [
        f"| with a second series {after:.0f} s later: result stored | {f['second_series_stored_s']:.2f} | | |",
        f"| with a second series {after:.0f} s later: report delivered | {f['second_series_fhir_s']:.2f} | | |",
        f"| late image of the series read: superseding result stored | {f['late_image_stored_s']:.2f} | | |",
        f"| late image: report updated | {f['late_image_fhir_s']:.2f} | | |",
    ]
    counts = (
        f"\nAfter the second series, the late image and Orthanc's stable study: "
        f"{f['jobs_after_second_series_late_image_and_stable_study']:.0f} jobs of the pipeline "
        f"({f['superseding_jobs']:.0f} superseding), {f['seg_series_in_study']:.0f} SEG series with "
        f"{f['seg_instances_in_study']:.0f} instance, {f['ehr_reports']:.0f} report in the EHR "
        f"(version {f['ehr_report_version']:.0f}).\n"
    )
    return head + "\n".join(rows + checks) + "\n" + counts + "\n" + _source(r) + "\n"


def _block(rows: list[str], note: str, record: dict[str, Any]) -> str:
    """A table, a sentence on what it holds and where the record came from."""
    return "\n".join(rows) + f"\n\n{note}\n\n" + _source(record) + "\n"


def triton_transport() -> str:
    r = load("triton_transport")
    if r is None:
        return _missing("triton_transport")
    f, notes = r["figures"], r["notes"]
    rows = ["| transport | median ms | against in-process |", "|---|---:|---:|"]
    for key in (k.removesuffix("_median_ms") for k in f if k.endswith("_median_ms")):
        label = key.replace("_", " ").replace("onnx runtime", "ONNX Runtime").replace("grpc", "gRPC")
        label = label.replace("triton", "Triton").replace("http", "HTTP").replace("shm", "shared memory")
        rows.append(f"| {label} | {f[key + '_median_ms']:.1f} | {f[key + '_vs_in_process']:.2f}x |")
    shape = "x".join(str(n) for n in notes["input_shape"])
    return _block(
        rows,
        f"The `ct_lung` model, input {shape} float32, median of {notes['runs']} requests after two "
        + "warm-up ones.",
        r,
    )


def model_latency() -> str:
    r = load("model_latency")
    if r is None:
        return _missing("model_latency")
    f, notes = r["figures"], r["notes"]
    rows = ["| model | requests | median ms |", "|---|---:|---:|"]
    for key, value in f.items():
        model = key.removesuffix("_median_ms")
        rows.append(f"| {model} | {notes['runs'][model]} | {value:.1f} |")
    return _block(rows, f"Served by: {notes['served_by']}.", r)


def fetch_transport() -> str:
    r = load("fetch_transport_320_slices")
    if r is None:
        return _missing("fetch_transport_320_slices")
    f, notes = r["figures"], r["notes"]
    labels = {
        "bytes_httpx_2_threads": "instance files with httpx, 2 threads",
        "bytes_httpx_4_threads": "instance files with httpx, 4 threads",
        "bytes_http_client_reader_2_threads": "instance files with the worker's reader, 2 threads",
        "bytes_http_client_reader_4_threads": "instance files with the worker's reader, 4 threads",
        "read_instances_bytes_parse_1_thread_s": "read and parsed (the worker's fetch), 1 thread",
        "read_instances_bytes_parse_2_thread_s": "read and parsed (the worker's fetch), 2 threads",
        "read_instances_bytes_parse_4_thread_s": "read and parsed (the worker's fetch), 4 threads",
        "parse_from_local_disk_no_http": "parsed from the local disk, no HTTP",
    }
    rows = ["| what | median s |", "|---|---:|"]
    for key, value in f.items():
        name = key.removesuffix("_median_s")
        rows.append(f"| {labels.get(name, name.replace('_', ' '))} | {value:.3f} |")
    return _block(
        rows, f"{notes['instances']} instances, {notes['megabytes']} MB, median of {notes['runs']} runs.", r
    )


def throughput() -> str:
    r = load("throughput")
    if r is None:
        return _missing("throughput")
    notes = r["notes"]
    rows = [
        "| workers | studies per hour | queue wait, median s | job, median s | failed | retried | "
        "exactly one SEG and SR |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in notes["rows"]:
        rows.append(
            f"| {row['workers']} | {row['per_hour']} | {row['wait_median_s']:.1f} | {row['job_median_s']:.2f} | "
            f"{row['failed']} | {row['retried']} | {row['exactly_once']} |"
        )
    return _block(
        rows,
        f"{notes['studies']} copies of {notes['series']} posted at once, a fresh stack per worker count.",
        r,
    )


def monai_deploy_compare() -> str:
    r = load("monai_deploy_compare")
    if r is None:
        return _missing("monai_deploy_compare")
    f, notes = r["figures"], r["notes"]
    if "study_cold_monai_s" not in f:
        return _missing("monai_deploy_compare")
    rows = [
        "| comparison | MONAI Deploy, median s | ours, median s | MONAI Deploy / ours |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, monai: float, ours: float) -> None:
        rows.append(f"| {label} | {monai:.3f} | {ours:.3f} | {monai / ours:.1f}x |")

    row(
        "one process per study, cold (wall clock of the process)",
        f["study_cold_monai_s"],
        f["study_cold_ours_s"],
    )
    row(
        "MONAI Deploy process per study against our warm worker",
        f["study_cold_monai_s"],
        f["study_warm_ours_s"],
    )
    for key, label in (
        ("load", "read by path -> volume"),
        ("seg", "write SEG + read it back"),
        ("both", "both"),
    ):
        for gc_state, gc_label in (("gc_on", "GC on"), ("gc_paused", "GC paused")):
            name = f"step_{key}_{gc_state}"
            row(f"per step, warm: {label} ({gc_label})", f[f"{name}_monai_s"], f[f"{name}_ours_s"])
    libraries = ", ".join(f"{k} {v}" for k, v in notes["libraries_both_sides"].items())
    monai_side = ", ".join(f"{k} {v}" for k, v in notes["monai_deploy_side"].items())
    dice = ", ".join(
        f"segment {k.rsplit('_', 1)[1]} {v:.4f}"
        for k, v in f.items()
        if k.startswith("study_cold_dice_segment_")
    )
    checks = {**notes["output_checks_same_label_map"], **notes["output_checks_each_side_ran_the_model"]}
    failed = [name for name, ok in checks.items() if not ok]
    verdict = "all checks passed" if not failed else "FAILED: " + "; ".join(failed)
    return _block(
        rows,
        f"Study {notes['study']} ({notes['slices']} slices), {notes['runs']} runs of each. Same on both "
        + f"sides: {libraries}. MONAI Deploy side: {monai_side}. Outputs of the process-per-study runs: "
        + f"Dice {dice}; frames, positions, references and segment attributes: {verdict}.",
        r,
    )


RENDERERS: dict[str, Callable[[], str]] = {
    "pipeline_stages": pipeline_stages,
    "time_to_result": time_to_result,
    "triton_transport": triton_transport,
    "model_latency": model_latency,
    "fetch_transport": fetch_transport,
    "throughput": throughput,
    "monai_deploy_compare": monai_deploy_compare,
}


def render(page: str) -> str:
    def block(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise SystemExit(f"docs/performance.md: no renderer for block '{name}'")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(block, page)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is not what the records give")
    args = p.parse_args()
    page = PAGE.read_text()
    wanted = render(page)
    if args.check:
        if wanted != page:
            print("docs/performance.md differs from bench/results/: run python bench/report.py")
            return 1
        return 0
    PAGE.write_text(wanted)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
