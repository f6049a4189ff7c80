"""`make demo`: upload the demo chest CT to the running stack, wait for the AI job, show the results.

Safe to run again: the same instances give the same job key, so no second set of results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from devstack.common import ROOT

DATA = ROOT.parent / "shared" / "data" / "ct"
SERIES = ("A0002-B70f", "A0002-B40f")


def upload(client: httpx.Client, folder: Path) -> tuple[str, int]:
    """POST every file; returns (Orthanc study id, instances sent)."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        sys.exit(f"no DICOM files in {folder}: the shared data must sit beside the repository")
    study = ""
    for f in files:
        r = client.post("/instances", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        body = r.json()
        study = body["ParentStudy"]
    return study, len(files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    port = os.environ.get("ORTHANC_AI_HTTP_PORT") or "8042"
    p.add_argument("--orthanc", default=f"http://127.0.0.1:{port}")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    client = httpx.Client(base_url=args.orthanc, timeout=60)
    try:
        client.get("/system").raise_for_status()
    except httpx.HTTPError as e:
        sys.exit(f"Orthanc is not answering at {args.orthanc} ({e}); start it with `make up`")

    print("== Uploading the demo study (chest CT, two reconstructions of one acquisition)")
    study_id = ""
    known_series = set(client.get("/series").json())
    for name in SERIES:
        study_id, sent = upload(client, DATA / name)
        print(f"   {name}: {sent} instance(s) sent")
    again = [s for s in client.get(f"/studies/{study_id}").json()["Series"] if s in known_series]
    if again:
        print("   (sent before: same UIDs, so Orthanc replaces them and the job key is unchanged)")
    study = client.get(f"/studies/{study_id}").json()
    study_uid = study["MainDicomTags"]["StudyInstanceUID"]
    print(f"   study {study_id} (StudyInstanceUID {study_uid})")

    print("== Waiting for the AI job (Orthanc marks the study stable, then the worker runs)")
    deadline = time.time() + args.timeout
    job: dict = {}
    while time.time() < deadline:
        jobs = client.get("/ai/jobs", params={"study": study_uid}).json()
        if jobs and all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
            job = client.get(f"/ai/jobs/{jobs[0]['id']}").json()
            break
        state = (
            ", ".join(f"{j['pipeline']}: {j['state']} ({j['stage'] or 'waiting'})" for j in jobs)
            or "no job yet"
        )
        print(f"   ... {state}", flush=True)
        time.sleep(3)
    if not job:
        sys.exit(f"no finished job after {args.timeout:.0f} s; see var/log/ and {args.orthanc}/ai/jobs")

    print(f"\n== Job {job['id']}: {job['state'].upper()}  (pipeline {job['pipeline']} {job['pipeline_version']},"
          f" attempt {job['attempts']} of {job['max_attempts']})")  # fmt: skip
    for role, s in job["series"].items():
        print(f"   input '{role}': {s['series_description']!r}, {s['instances']} instances")
        print(f"      why: {s['reason']}")
    if job["error"]:
        print(f"   error: {job['error']}")
    if job["timings"]:
        print("   timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items()))

    print("\n== Series now in the study")
    for s in client.get(f"/studies/{study_id}/series").json():
        t = s["MainDicomTags"]
        print(f"   {t.get('Modality', '?'):4} #{t.get('SeriesNumber', '?'):>5}  {t.get('SeriesDescription', '')!r}"
              f"  ({len(s['Instances'])} instance(s))")  # fmt: skip

    outputs = job.get("outputs") or {}
    if outputs.get("measurements"):
        print(f"\n== Measurements (model {outputs['model']['name']} version {outputs['model']['version']})")
        for m in outputs["measurements"]:
            print(f"   {m['segment']:12} {m['volume_ml'] / 1000:6.2f} L  ({m['volume_ml']:.1f} mL)")

    base = base_url = args.orthanc
    stored = outputs.get("stored") or {}
    if stored:
        print("\n== Outputs stored in the study")
        for kind, value in stored.items():
            for s in value if isinstance(value, list) else [value]:
                print(
                    f"   {kind:11} SOP Instance UID {s['SOPInstanceUID']}  ({base_url}/instances/{s['ID']})"
                )
        if "pdf" in stored:
            print(f"   PDF summary:    {base_url}/instances/{stored['pdf']['ID']}/pdf")
    for d in job.get("hl7") or []:
        print(f"\n== HL7 ORU^R01 to {d['destination']}: {d['state']}"
              + (f", last error: {d['last_error']}" if d.get("last_error") else ""))  # fmt: skip

    fhir = job.get("fhir")
    if fhir:
        report = next(
            (
                e["resource"]
                for e in fhir.get("entry", [])
                if e["resource"]["resourceType"] == "DiagnosticReport"
            ),
            None,
        )
        print("\n== FHIR DiagnosticReport (R4, in a transaction Bundle of "
              f"{len(fhir.get('entry', []))} entries; full bundle at /ai/jobs/{job['id']})")  # fmt: skip
        if report is not None and report.get("presentedForm"):
            # the PDF is in the report as base64: name it instead of printing it
            report = dict(report)
            report["presentedForm"] = [
                {**f, "data": f"<{f.get('size', '?')} bytes of {f.get('contentType')}>"}
                for f in report["presentedForm"]
            ]
        print(json.dumps(report, indent=2)[:3000])

    delivery = job.get("delivery") or {}
    if delivery:
        print(f"\n== Delivery to the EHR ({delivery.get('destination')}): {delivery.get('state')}"
              + (f", last error: {delivery['last_error']}" if delivery.get("last_error") else ""))  # fmt: skip
        if delivery.get("state") != "delivered":
            for _ in range(20):
                time.sleep(1)
                delivery = client.get(f"/ai/jobs/{job['id']}").json().get("delivery") or {}
                if delivery.get("state") == "delivered":
                    print("   delivered")
                    break

    print("\n== Look at it")
    print(
        f"   Viewer (OHIF):    http://127.0.0.1:{os.environ.get('ORTHANC_AI_VIEWER_PORT') or 3000}/viewer?StudyInstanceUIDs={study_uid}"
    )
    print(
        "                     double-click the SEG (series 9901) for the overlay, the SR (9902) for the volumes,"
        "\n                     the key images (9903); the PDF summary is series 9904"
    )
    print(f"   Orthanc Explorer: {base}/app/explorer.html#study?uuid={study_id}")
    print(f"   Job (JSON):       {base}/ai/jobs/{job['id']}")
    print(f"   All jobs:         {base}/ai/jobs")
    print(f"   Health:           {base}/ai/health")
    print(f"   DICOMweb:         {base}/dicom-web/studies/{study_uid}/series")
    print(f"   Reports (ours):   {base}/ai/fhir/DiagnosticReport?study={study_uid}")
    if delivery.get("destination"):
        print(f"   Reports (EHR):    {delivery['destination']}/DiagnosticReport?study={study_uid}")
    return 0 if job["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
