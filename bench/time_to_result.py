"""Time to result as a radiologist feels it: from the last image's arrival to the SEG and SR
stored in Orthanc and to the FHIR report delivered, with Orthanc's StableAge at a site's 60 s.

Starts its own Triton, a FHIR server standing in for the EHR (devstack/ehr_server.py) and
Orthanc with the plugin (StableAge 60 s, the shipped SeriesQuietSeconds) on free ports, then
sends the 64-slice CT (A0001-5mm) as a scanner does, with dcmtk's ``storescu`` (C-STORE):

1. ``--runs`` times as a new study (new UIDs): median, min and max of the time from the end
   of the C-STORE association (the last instance has arrived) to the job's result stored
   (SEG, SR and the other outputs; the job's ``finished``) and to the report delivered to the
   EHR (the outbox's ``delivered_at``);
2. once more with its last slice held back and a second series (the same images under a new
   Series Instance UID) sent 30 s after the first: the first job's time must match step 1,
   and the pipeline must keep one job when Orthanc finally calls the study stable;
3. then the held-back slice, a late image of the series the job read: the result is
   superseded exactly once (the SEG/SR replaced, the EHR's report updated in place).

    .venv/bin/python bench/time_to_result.py [--runs 5] [--study ../shared/data/ct/A0001-5mm]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import generate_uid
from record import describe, machine, record  # a sibling script: bench/ is sys.path[0]

from devstack.common import ROOT
from devstack.derive import as_new_series
from devstack.stack import OrthancServer, free_port  # noqa: E402
from devstack.triton_server import TritonServer  # noqa: E402

STABLE_AGE = 60
SECOND_SERIES_AFTER_S = 30.0
PIPELINE = "ct-lung"
URI_SYSTEM = "urn:ietf:rfc:3986"


def storescu(port: int, files: list[Path]) -> float:
    """Send ``files`` in one association; returns when it ended (time.time())."""
    exe = shutil.which("storescu")
    if exe is None:
        raise SystemExit("dcmtk's storescu is missing (Debian package dcmtk)")
    subprocess.run(
        [exe, "-aet", "SCANNER", "-aec", "ORTHANC_AI", "127.0.0.1", str(port), *map(str, files)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return time.time()


def until(what: str, fn: Any, timeout: float = 300, period: float = 0.05) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(period)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def jobs_of(c: httpx.Client, uid: str) -> list[dict[str, Any]]:
    return [j for j in c.get("/ai/jobs", params={"study": uid}).json() if j["pipeline"] == PIPELINE]


def reported(c: httpx.Client, jid: str) -> dict[str, Any] | None:
    """The job once it succeeded and its report was delivered; exits on a failed job."""
    job = dict(c.get(f"/ai/jobs/{jid}").json())
    if job["state"] in ("failed", "cancelled"):
        raise SystemExit(f"job {jid} {job['state']}: {job['error']}")
    delivery = job.get("delivery") or {}
    return job if job["state"] == "succeeded" and delivery.get("state") == "delivered" else None


def result_times(c: httpx.Client, uid: str, arrived: float) -> dict[str, float]:
    """Seconds from ``arrived`` to the job's start, result stored and report delivered."""
    (job,) = until("the job", lambda: jobs_of(c, uid))
    job = until("the result stored and reported", lambda: reported(c, job["id"]))
    return {
        "started": job["started"] - arrived,
        "stored": job["finished"] - arrived,
        "fhir": job["delivery"]["delivered_at"] - arrived,
        "id": job["id"],
    }


def stable_handled(c: httpx.Client, study_id: str) -> bool:
    """Orthanc called the study stable and the intake has read that change."""
    changes = c.get("/changes", params={"since": 0, "limit": 100000}).json()["Changes"]
    stable = [ch["Seq"] for ch in changes if ch["ChangeType"] == "StableStudy" and ch["ID"] == study_id]
    position = c.get("/ai/health").json()["intake"]["last_change"]
    return bool(stable) and position is not None and position >= stable[-1]


class ReuseRetry(httpx.HTTPTransport):
    """Sends a request once more when Orthanc closed the kept-alive connection under it (Orthanc
    1.10 drops idle connections after about a second); every request here is a read."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.RemoteProtocolError:
            return super().handle_request(request)


class Ehr:
    """``python -m devstack.ehr_server`` on a free port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "devstack.ehr_server", "--port", str(self.port)],
            cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        until("the EHR", self._up, timeout=30, period=0.1)

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/metadata", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def reports(self, ident: str) -> list[dict[str, Any]]:
        r = httpx.get(
            f"{self.url}/DiagnosticReport", params={"identifier": f"{URI_SYSTEM}|{ident}"}, timeout=10
        )
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
        self._log.close()


def report_identifier(job: dict[str, Any]) -> str:
    (report,) = [
        e["resource"] for e in job["fhir"]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    (ident,) = [i["value"] for i in report["identifier"] if i["system"] == URI_SYSTEM]
    return str(ident)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, default=ROOT.parent / "shared" / "data" / "ct" / "A0001-5mm")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if not args.study.is_dir():
        raise SystemExit(f"{args.study}: no such folder (the shared CT data)")

    with tempfile.TemporaryDirectory(prefix="bench-ttr-") as tmp_name:
        tmp = Path(tmp_name)
        triton = TritonServer(
            ROOT / "triton_models", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            log_file=tmp / "triton.log", backend_root=tmp / "backends",
        ).start(timeout=120)  # fmt: skip
        ehr = Ehr(tmp / "ehr.log")
        orthanc = OrthancServer(
            tmp / "storage", http_port=free_port(), dicom_port=free_port(), triton_grpc_port=triton.grpc_port,
            workers=1, stable_age=STABLE_AGE, log_file=tmp / "orthanc.log",
            extra_env={"ORTHANC_AI_FHIR_URL": ehr.url, "ORTHANC_AI_DELIVERY_MAX_BACKOFF": "2"},
        ).start(timeout=60)  # fmt: skip
        try:
            with httpx.Client(base_url=orthanc.url, timeout=60, transport=ReuseRetry()) as c:
                quiet = c.get("/ai/health").json().get("intake", {}).get("series_quiet_seconds")
                runs = []
                for i in range(args.runs):
                    uid = generate_uid()
                    files = as_new_series(args.study, tmp / f"run-{i}", uid)
                    arrived = storescu(orthanc.dicom_port, files)
                    runs.append(result_times(c, uid, arrived))
                    print(
                        f"run {i + 1}: started {runs[-1]['started']:.2f} s, stored {runs[-1]['stored']:.2f} s, "
                        f"report delivered {runs[-1]['fhir']:.2f} s after the last instance"
                    )

                # A second series 30 s later, then a late image of the first one.
                uid = generate_uid()
                first = as_new_series(args.study, tmp / "first", uid)
                late = first.pop()
                second = as_new_series(args.study, tmp / "second", uid, description="second series")
                arrived = storescu(orthanc.dicom_port, first)
                sender = threading.Timer(
                    arrived + SECOND_SERIES_AFTER_S - time.time(), storescu, (orthanc.dicom_port, second)
                )
                sender.start()
                with_second = result_times(c, uid, arrived)
                sender.join()
                print(
                    f"with a second series {SECOND_SERIES_AFTER_S:.0f} s later: stored {with_second['stored']:.2f} s, "
                    f"report delivered {with_second['fhir']:.2f} s"
                )
                first_job = reported(c, with_second["id"])
                assert first_job is not None
                ident = report_identifier(first_job)
                late_arrived = storescu(orthanc.dicom_port, [late])
                newer = until(
                    "the superseding job",
                    lambda: next(
                        (j for j in jobs_of(c, uid) if j.get("supersedes") == with_second["id"]), None
                    ),
                )
                newer = until("its result stored and reported", lambda: reported(c, newer["id"]))
                late_stored = newer["finished"] - late_arrived
                late_fhir = newer["delivery"]["delivered_at"] - late_arrived
                print(
                    f"late image: superseded, stored {late_stored:.2f} s, report updated {late_fhir:.2f} s after it"
                )
                study_id = c.post("/tools/lookup", content=uid).json()[0]["ID"]
                until(
                    "Orthanc's stable study and the intake past it",
                    lambda: stable_handled(c, study_id),
                    240,
                    1,
                )
                final_jobs = jobs_of(c, uid)
                seg_series = [
                    s
                    for s in c.get(f"/studies/{study_id}/series").json()
                    if s["MainDicomTags"].get("Modality") == "SEG"
                ]
                ehr_reports = ehr.reports(ident)
        finally:
            orthanc.stop()
            ehr.stop()
            triton.stop()

    superseded = [j for j in final_jobs if j.get("supersedes")]
    checks = {
        "jobs_after_second_series_late_image_and_stable_study": len(final_jobs),
        "superseding_jobs": len(superseded),
        "seg_series_in_study": len(seg_series),
        "seg_instances_in_study": sum(len(s["Instances"]) for s in seg_series),
        "ehr_reports": len(ehr_reports),
        "ehr_report_version": int(ehr_reports[0]["meta"]["versionId"]) if ehr_reports else 0,
    }
    print(f"\nmachine: {describe(machine())}")
    print(
        f"study: {args.study.name}, {len(files)} instances by C-STORE; StableAge {STABLE_AGE} s, SeriesQuietSeconds {quiet}"
    )
    print(f"{'seconds after the last instance':<34} {'median':>7} {'min':>7} {'max':>7}")
    figures: dict[str, float] = {}
    for key, label in (
        ("started", "job started"),
        ("stored", "SEG + SR stored"),
        ("fhir", "FHIR report delivered"),
    ):
        vals = [r[key] for r in runs]
        print(f"{label:<34} {statistics.median(vals):7.2f} {min(vals):7.2f} {max(vals):7.2f}")
        figures[f"{key}_median_s"] = statistics.median(vals)
        figures[f"{key}_min_s"] = min(vals)
        figures[f"{key}_max_s"] = max(vals)
    figures["second_series_stored_s"] = with_second["stored"]
    figures["second_series_fhir_s"] = with_second["fhir"]
    figures["late_image_stored_s"] = late_stored
    figures["late_image_fhir_s"] = late_fhir
    figures.update({k: float(v) for k, v in checks.items()})
    print(f"checks: {checks}")
    wanted = {
        "jobs_after_second_series_late_image_and_stable_study": 2,
        "superseding_jobs": 1,
        "seg_series_in_study": 1,
        "seg_instances_in_study": 1,
        "ehr_reports": 1,
        "ehr_report_version": 2,
    }
    record(
        "time_to_result",
        figures,
        {
            "study": args.study.name,
            "instances": len(files),
            "runs": len(runs),
            "stable_age_s": STABLE_AGE,
            "series_quiet_s": quiet,
            "second_series_after_s": SECOND_SERIES_AFTER_S,
            "sent_with": "storescu (C-STORE), one association per series",
        },
    )
    wrong = {k: (checks[k], v) for k, v in wanted.items() if checks[k] != v}
    if wrong:
        print(f"FAILED checks (found, wanted): {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
