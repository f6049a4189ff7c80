"""Per-stage timings of the real path: Orthanc + plugin + worker + Triton, one study, N runs.

Starts its own Triton and Orthanc on free ports (like the tests), uploads a study, lets the
pipeline run, then retries the same job N-1 times (a retry replaces its outputs) and prints the
median, min and max of every stage the worker recorded, plus the worker's peak memory.

    .venv/bin/python bench/pipeline_stages.py [--study ../shared/data/ct/A0001-5mm] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.stack import OrthancServer, free_port  # noqa: E402
from devstack.triton_server import TritonServer  # noqa: E402

STAGES = (
    "fetch", "volume", "preprocess", "inference", "postprocess", "measure", "radiomics", "classify", "seg_encode", "sr_encode",
    "rtstruct_encode", "key_images_encode", "pdf_encode", "fhir_build", "hl7_build", "store", "store_key_images",
    "store_pdf", "total",
)  # fmt: skip
#: What each optional output kind adds to a job: its encoding stages and the storing of its instances
#: (the HL7 message is delivered later, off the job's clock, by the outbox).
OUTPUT_KINDS = {
    "key images": ("key_images_encode", "store_key_images"),
    "PDF summary": ("pdf_encode", "store_pdf"),
    "HL7 ORU": ("hl7_build",),
}


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_done(c: httpx.Client, jid: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = c.get(f"/ai/jobs/{jid}").json()
        if j["state"] in ("succeeded", "failed", "cancelled"):
            return dict(j)
        time.sleep(0.2)
    raise SystemExit(f"job {jid} did not finish in {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, action="append", help="folder(s) of DICOM files (one study)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--slices",
        type=int,
        default=0,
        help="resample the (single) study along z to this many slices first (derived)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="write a cProfile file per job attempt to this folder (the worker's ORTHANC_AI_PROFILE_DIR)",
    )
    args = p.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ["ORTHANC_AI_PROFILE_DIR"] = str(args.profile.resolve())
    folders = args.study or [ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm"]

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.slices:
            from devstack.derive import resample_z, sorted_slices

            if len(folders) != 1:
                raise SystemExit("--slices takes one --study folder")
            folders = [
                resample_z(sorted_slices(folders[0]), args.slices, tmp / "derived", f"bench-z-{args.slices}")
            ]
        triton = TritonServer(
            Path(os.environ.get("ORTHANC_AI_MODEL_REPO", ROOT / "triton_models")), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            log_file=tmp / "triton.log", backend_root=tmp / "backends",
        ).start(timeout=120)  # fmt: skip
        # The shipped pipelines (key images and PDF on) with the HL7 ORU on too, to a destination
        # that nobody listens on: its retries run in the background, off the job's clock.
        pipelines = yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())
        for pipeline in pipelines["pipelines"]:
            pipeline.setdefault("outputs", {})["hl7_oru"] = True
        (tmp / "pipelines.yaml").write_text(yaml.safe_dump(pipelines, sort_keys=False))
        ris = {"name": "ris", "host": "127.0.0.1", "port": free_port(), "receiving_application": "RIS"}
        orthanc = OrthancServer(
            tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
            workers=1, stable_age=1, log_file=tmp / "orthanc.log",
            extra_env={"ORTHANC_AI_PIPELINES": str(tmp / "pipelines.yaml"),
                       "ORTHANC_AI_HL7_DESTINATIONS": json.dumps([ris])},
        ).start(timeout=60)  # fmt: skip
        try:
            with httpx.Client(base_url=orthanc.url, timeout=120) as c:
                n_files = 0
                t0 = time.perf_counter()
                study = ""
                for folder in folders:
                    for f in sorted(folder.glob("*.dcm")):
                        r = c.post("/instances", content=f.read_bytes())
                        r.raise_for_status()
                        study = r.json()["ParentStudy"]
                        n_files += 1
                upload_s = time.perf_counter() - t0
                uid = c.get(f"/studies/{study}").json()["MainDicomTags"]["StudyInstanceUID"]
                t_uploaded = time.time()
                jobs: list = []
                while not jobs:
                    jobs = c.get("/ai/jobs", params={"study": uid}).json()
                    time.sleep(0.1)
                intake_delay = jobs[0]["created"] - t_uploaded
                runs = [wait_done(c, jobs[0]["id"])]
                for _ in range(args.runs - 1):
                    c.post(f"/ai/jobs/{jobs[0]['id']}/retry").raise_for_status()
                    runs.append(wait_done(c, jobs[0]["id"]))
                failed = [r for r in runs if r["state"] != "succeeded"]
                if failed:
                    raise SystemExit(f"job failed: {failed[0]['error']}")
                (worker,) = c.get("/ai/health").json()["workers"]["detail"]
                rss = peak_rss_mb(worker["pid"])
        finally:
            orthanc.stop()
            triton.stop()

    shape = runs[0]["outputs"]["volume"]["shape"]
    print(f"machine: {describe(machine())}")
    what = (
        f"derived from {args.study[0] if args.study else 'A0001-5mm'} by resampling along z"
        if args.slices
        else ""
    )
    print(
        f"study: {', '.join(str(f) for f in folders)} {what}: {n_files} instances, volume {shape} (z, y, x)"
    )
    print(
        f"upload over REST: {upload_s:.2f} s; intake delay after the last upload (StableAge 1 s): {intake_delay:.2f} s"
    )
    print(f"runs: {len(runs)} (first run included; later runs are retries of the same job)\n")
    print(f"{'stage':<12} {'median s':>9} {'min s':>8} {'max s':>8}")
    for stage in STAGES:
        vals = [r["timings"][stage] for r in runs if stage in r["timings"]]
        if vals:
            print(f"{stage:<12} {statistics.median(vals):9.3f} {min(vals):8.3f} {max(vals):8.3f}")
    non_inf = [r["timings"]["total"] - r["timings"]["inference"] for r in runs]
    print(
        f"{'all but inference':<12} {statistics.median(non_inf):9.3f} {min(non_inf):8.3f} {max(non_inf):8.3f}"
    )
    print("\nadded per output kind (median of the per-run sums of its stages):")
    added_all = []
    for kind, stages in OUTPUT_KINDS.items():
        sums = [sum(r["timings"].get(st, 0.0) for st in stages) for r in runs]
        print(f"  {kind:<12} {statistics.median(sums):9.3f} {min(sums):8.3f} {max(sums):8.3f}")
    for r in runs:
        added_all.append(sum(r["timings"].get(st, 0.0) for stages in OUTPUT_KINDS.values() for st in stages))
    print(
        f"  {'all three':<12} {statistics.median(added_all):9.3f} {min(added_all):8.3f} {max(added_all):8.3f}"
    )
    if rss is not None:
        print(f"\nworker peak memory (VmHWM): {rss:.0f} MB")
    figures = {
        f"{stage}_median_s": statistics.median(vals)
        for stage in STAGES
        if (vals := [r["timings"][stage] for r in runs if stage in r["timings"]])
    }
    figures["all_but_inference_median_s"] = statistics.median(non_inf)
    figures["all_but_inference_min_s"] = min(non_inf)
    for kind, stages in OUTPUT_KINDS.items():
        figures[f"added_{kind}_median_s"] = statistics.median(
            [sum(r["timings"].get(st, 0.0) for st in stages) for r in runs]
        )
    figures["added_all_output_kinds_median_s"] = statistics.median(added_all)
    figures["intake_delay_s"] = intake_delay
    if len(runs) > 1:
        # a fresh worker warms up before its first claim: its first job should cost what a warm one does
        warm = statistics.median(r["timings"]["total"] for r in runs[1:])
        figures["first_job_vs_warm_ratio"] = runs[0]["timings"]["total"] / warm
        print(
            f"\nfirst job of a fresh worker / median of the later ones: {figures['first_job_vs_warm_ratio']:.2f}x"
        )
    if rss is not None:
        figures["worker_peak_memory_mb"] = rss
    record(
        f"pipeline_stages_{shape[0]}_slices",
        figures,
        {
            "study": what or ", ".join(f.name for f in folders),
            "instances": n_files,
            "volume_zyx": shape,
            "runs": len(runs),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
