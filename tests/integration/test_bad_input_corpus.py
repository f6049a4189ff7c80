"""The bad-input corpus end to end on the real Orthanc + Triton (``tests/integration/corpus.py``).

Every kind is uploaded as its own study to the session's Orthanc (all at once, the worker takes
them in turn) and must end as processed correctly (one SEG, one SR, the same lung volumes as
the untouched series where the pixels are the same), as failed at its first attempt with a
reason an admin understands and nothing of ours in the study, or, where routing refuses it,
with no job and a dry-run that names why. Orthanc keeps answering throughout. 45-60 s on the
shared 2-core machine (generation 8-16 s, uploads 3-7 s, then the jobs one after another).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.derive import copy_study, sorted_slices
from devstack.stack import OrthancServer
from orthanc_plugin.core.uids import derived_uid
from orthanc_plugin.intake.routing import OWN_MANUFACTURER

from ..conftest import CT_A0001, require_data
from .conftest import TERMINAL, client, last_change, wait_for, wait_intake_handled_stable
from .corpus import KINDS, REFERENCE, RUN, Kind, Study, empty_study_files, make_study

pytestmark = pytest.mark.integration

PIPELINE = "ct-lung"
EMPTY = "empty study (its instances deleted before it became stable)"
DELETED = "study deleted while its job runs"


@dataclass
class Outcome:
    study: Study
    orthanc_id: str | None
    refused: list[int]  # HTTP status of every upload Orthanc refused
    job: dict[str, Any] | None
    jobs: int
    series: list[dict[str, Any]]
    decision: dict[str, Any] | None  # the ct-lung entry of the dry-run


def post(api: httpx.Client, data: bytes) -> httpx.Response:
    return api.post("/instances", content=data, headers={"Content-Type": "application/dicom"})


def pipeline_jobs(api: httpx.Client, uid: str) -> list[dict[str, Any]]:
    return [j for j in api.get("/ai/jobs", params={"study": uid}).json() if j["pipeline"] == PIPELINE]


def our_series(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Series written by orthanc-ai (SEG/SR), whatever their number."""
    return [s for s in series if s["MainDicomTags"].get("Manufacturer") == OWN_MANUFACTURER]


def reasons(decision: dict[str, Any]) -> str:
    """Everything the dry-run says about a pipeline, as one text."""
    parts = [decision["reason"], decision.get("problem") or ""]
    for role in decision["roles"]:
        parts.append(role["reason"])
        for label, failed in role["rejected"].items():
            parts.append(f"{label}: {'; '.join(failed)}")
    return " | ".join(parts)


@pytest.fixture(scope="module")
def corpus(orthanc: OrthancServer) -> dict[str, Outcome]:
    t0 = time.time()
    studies = [make_study(k) for k in KINDS]
    empty_uid, empty_files = empty_study_files()
    generated = time.time() - t0

    def upload(study: Study) -> tuple[str | None, list[int]]:
        sid, refused = None, []
        with client(orthanc.url) as c:
            for data in study.files:
                r = post(c, data)
                if r.status_code == 200:
                    sid = str(r.json()["ParentStudy"])
                else:
                    refused.append(r.status_code)
        return sid, refused

    api = client(orthanc.url)
    before = last_change(api)
    with ThreadPoolExecutor(max_workers=4) as pool:
        uploaded = list(pool.map(upload, studies))
    # The "empty study": Orthanc keeps no study without instances, so the nearest a sender
    # gets is a study whose instances are all deleted before it becomes stable.
    (r,) = [post(api, data) for data in empty_files]
    empty_id = str(r.json()["ParentStudy"])
    assert api.delete(f"/studies/{empty_id}").status_code == 200
    uploads = time.time() - t0 - generated
    assert api.get("/system").status_code == 200

    by_uid = {s.uid: s for s in studies}
    want_job = [s.uid for s in studies if s.kind.expect != "no job"]

    def jobs_done() -> bool:
        for uid in want_job:
            jobs = pipeline_jobs(api, uid)
            if not jobs or any(j["state"] not in TERMINAL for j in jobs):
                return False
        return True

    try:
        wait_for(f"the jobs of {len(want_job)} corpus studies", jobs_done, timeout=600, orthanc=orthanc)
    except BaseException:
        # Which kinds were not done, and where their jobs stood.
        for uid in want_job:
            states = [(j["state"], j.get("stage"), j.get("attempts")) for j in pipeline_jobs(api, uid)]
            if not states or any(st not in TERMINAL for st, _, _ in states):
                print(f"not done: {by_uid[uid].kind.name}: {states}")
        raise
    ids = {s.uid: sid for s, (sid, _) in zip(studies, uploaded, strict=True)}
    no_job = [ids[s.uid] for s in studies if s.kind.expect == "no job"]
    for sid in no_job:  # stable, and the intake has read past that change: their routing is done
        if sid:
            wait_intake_handled_stable(api, sid, before, timeout=60, orthanc=orthanc)

    out: dict[str, Outcome] = {}
    for (uid, study), (sid, refused) in zip(by_uid.items(), uploaded, strict=True):
        jobs = pipeline_jobs(api, uid)
        job = api.get(f"/ai/jobs/{jobs[0]['id']}").json() if jobs else None
        series = api.get(f"/studies/{sid}/series").json() if sid else []
        decision = None
        if study.kind.expect == "no job" and sid:
            r = api.post("/ai/routes/dry-run", json={"study": sid})
            assert r.status_code == 200, r.text
            (decision,) = [d for d in r.json() if d["pipeline"] == PIPELINE]
        out[study.kind.name] = Outcome(study, sid, refused, job, len(jobs), series, decision)
    out[EMPTY] = Outcome(
        Study(Kind(EMPTY, "no job", (), list), empty_uid, empty_files, 0), empty_id, [], None,
        len(pipeline_jobs(api, empty_uid)), [], None,
    )  # fmt: skip
    total = time.time() - t0
    print(
        f"corpus: {len(out)} kinds, generated in {generated:.1f} s, uploaded in {uploads:.1f} s, "
        f"all settled after {total:.1f} s"
    )
    api.close()
    return out


#: What docs/operations.md says the corpus shows, kind by kind: the corpus must hold exactly these.
CLAIMED = {
    "succeeded": {
        "16-bit unsigned (reference)", "16-bit signed, HU stored directly", "RescaleSlope missing (identity slope)",
        "RescaleSlope and RescaleIntercept missing, values are HU", "RLE lossless", "JPEG-LS lossless",
        "JPEG 2000 lossless", "JPEG lossless (process 14, decoded by Orthanc)", "four transfer syntaxes in one series",
        "file order and InstanceNumber scrambled", "SR, PDF and presentation state beside the CT", "duplicated slice",
        "uneven spacing", "gantry tilt (20 degrees)", "enhanced multi-frame CT",
        "enhanced (legacy converted) multi-frame CT",
    },
    "failed": {
        "ImagePositionPatient missing", "ImageOrientationPatient missing", "duplicated position, other pixel data",
        "missing slice", "uneven spacing beyond the bound", "mixed orientations",
        "gantry tilt beyond the bound (35 degrees)", "different Rows/Columns in one series",
        "different PixelSpacing in one series", "two temporal positions", "RGB colour images",
        "huge dimensions in the header (30000 x 30000)", "pixel data shorter than Rows x Columns",
        "truncated file (Orthanc refuses it, a slice is then missing)", "CT instances without pixel data",
        "RescaleSlope 0", "sagittal images (not axial)", "no lungs in the images (uniform water)",
    },
    "no job": {
        "single slice", "wrong modality for the rule (MR)", "SR only", "encapsulated PDF only",
        "presentation state only", "multi-frame secondary capture", "localizer only",
        "slices too thick (12 mm)",
    },
}  # fmt: skip


def test_corpus_holds_exactly_the_kinds_documented() -> None:
    names = [k.name for k in KINDS] + [EMPTY, DELETED]
    assert len(set(names)) == len(names), names
    for expect, claimed in CLAIMED.items():
        assert {k.name for k in KINDS if k.expect == expect} == claimed, expect


@pytest.mark.parametrize(
    "kind",
    KINDS,
    ids=[k.name for k in KINDS],
)
def test_kind_ends_processed_or_refused_clearly(corpus: dict[str, Outcome], kind: Kind) -> None:
    o = corpus[kind.name]
    assert o.orthanc_id is not None, f"{kind.name}: nothing was stored by Orthanc"
    # The study holds what was sent (less what Orthanc itself refused), and nothing partial of ours.
    sent = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in o.series}
    first_series = derived_uid(f"corpus-{RUN}-{kind.name}", "series-0")
    assert sent.get(first_series) == o.study.ct_instances, (sent, o.study.ct_instances)
    ours = our_series(o.series)
    if kind.expect == "succeeded":
        assert o.job is not None and o.jobs == 1, o.jobs
        assert o.job["state"] == "succeeded", o.job["error"]
        assert o.job["attempts"] == 1
        assert o.job["series"]["ct"]["series_uid"] == first_series, o.job["series"]
        # what the shipped ct-lung stores: PDF summary, 3 key images, RTSTRUCT, SEG, SR
        # (no RTSTRUCT for a multi-frame source)
        expected_outputs = kind.outputs or (("DOC", 1), ("OT", 3), ("RTSTRUCT", 1), ("SEG", 1), ("SR", 1))
        assert sorted((s["MainDicomTags"]["Modality"], len(s["Instances"])) for s in ours) == list(
            expected_outputs
        ), ours
        volumes = {m["segment"]: m["volume_ml"] for m in o.job["outputs"]["measurements"]}
        assert set(volumes) == {"Right lung", "Left lung"}, volumes
        assert all(v > 500 for v in volumes.values()), volumes  # an adult lung, not a speck
        notes = " ".join(o.job["outputs"]["inputs"]["notes"])
        for words in kind.words:  # what was done to make a volume of it
            assert words in notes, f"{words!r} not in the job's notes: {notes!r}"
        if kind.same_as_reference:
            ref = corpus[REFERENCE].job
            assert ref is not None
            expected = {m["segment"]: m["volume_ml"] for m in ref["outputs"]["measurements"]}
            for name, v in volumes.items():
                assert v == pytest.approx(expected[name], rel=kind.tolerance), (name, v, expected[name])
    elif kind.expect == "failed":
        assert o.job is not None and o.jobs == 1, o.jobs
        assert o.job["state"] == "failed", (o.job["state"], o.job["outputs"])
        # Bad input is not retried: the first attempt says why, for good.
        assert o.job["attempts"] == 1, o.job["events"]
        error = o.job["error"] or ""
        assert error.startswith("input not usable:"), error
        for words in kind.words:
            assert words in error, f"{words!r} not in the job's error: {error!r}"
        assert ours == [], f"partial outputs left in a failed study: {ours}"
        assert o.job["outputs"] in (None, {}), o.job["outputs"]
    else:
        assert o.jobs == 0, f"routing should have refused {kind.name}: {o.job}"
        assert o.decision is not None and o.decision["matched"] is False
        text = reasons(o.decision)
        for words in kind.words:
            assert words in text, f"{words!r} not in the dry-run's reasons: {text!r}"
        assert ours == []
    if o.refused:
        # Only the truncated file is refused, by Orthanc itself, with 400 Bad Request.
        assert o.refused == [400], o.refused


#: Kinds made into a volume by resampling or from frames: their SEG must still reference the
#: instances that were sent, aligned with them, and pass dciodvfy.
GEOMETRY_KINDS = (
    "uneven spacing",
    "gantry tilt (20 degrees)",
    "enhanced multi-frame CT",
    "enhanced (legacy converted) multi-frame CT",
)


@pytest.mark.parametrize("name", GEOMETRY_KINDS)
def test_seg_of_a_resampled_or_multiframe_series_references_what_was_sent(
    corpus: dict[str, Outcome], orthanc: OrthancServer, tmp_path: Path, name: str
) -> None:
    import io

    import pydicom

    from ..unit.test_seg import run_dciodvfy

    o = corpus[name]
    assert o.job is not None and o.job["state"] == "succeeded", o.job
    first_series = derived_uid(f"corpus-{RUN}-{name}", "series-0")
    sent = {derived_uid(f"corpus-{RUN}-{name}", f"sop-0-{i}") for i in range(o.study.ct_instances)}
    (seg_series,) = [s for s in our_series(o.series) if s["MainDicomTags"]["Modality"] == "SEG"]
    with client(orthanc.url) as api:
        (iid,) = seg_series["Instances"]
        seg = pydicom.dcmread(io.BytesIO(api.get(f"/instances/{iid}/file").content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first_series
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0] for f in seg.PerFrameFunctionalGroupsSequence]
    assert {str(r.ReferencedSOPInstanceUID) for r in refs} <= sent
    if name.startswith("enhanced"):
        # one instance: each SEG frame names the frame of it that it lies on
        frames = {int(r.ReferencedFrameNumber) for r in refs}
        assert frames and frames <= set(range(1, 33)), frames
    else:
        assert len({str(r.ReferencedSOPInstanceUID) for r in refs}) >= 10
    run_dciodvfy(seg, tmp_path)


def test_truncated_file_is_refused_by_orthanc(corpus: dict[str, Outcome]) -> None:
    (o,) = [o for name, o in corpus.items() if name.startswith("truncated file")]
    assert o.refused == [400]


def test_empty_study_gets_no_job_and_dry_run_says_not_found(
    corpus: dict[str, Outcome], orthanc: OrthancServer
) -> None:
    o = corpus[EMPTY]
    assert o.jobs == 0
    with client(orthanc.url) as api:
        assert api.get(f"/studies/{o.orthanc_id}").status_code == 404
        r = api.post("/ai/routes/dry-run", json={"study": o.orthanc_id})
        assert r.status_code == 404, r.text
        assert f"study {o.orthanc_id}" in r.json()["error"], r.text


def test_orthanc_and_workers_keep_answering(corpus: dict[str, Outcome], orthanc: OrthancServer) -> None:
    with client(orthanc.url) as api:
        assert api.get("/system").status_code == 200
        assert api.get("/dicom-web/studies", params={"limit": "5"}).status_code == 200
        health = api.get("/ai/health").json()
        assert health["workers"]["alive"] == health["workers"]["expected"], health
        assert health["queue"].get("running", 0) == 0, health


#: When the study is deleted: the job just claimed (it fails reading the instances), or the
#: volume already built (it fails at the check before storing).
DELETE_AT = {
    "at once": ("claimed", "fetch"),
    "after the volume": ("volume", "preprocess", "inference", "postprocess", "measure"),
}


@pytest.mark.parametrize("when", list(DELETE_AT))
def test_study_deleted_while_its_job_runs(orthanc: OrthancServer, tmp_path: Path, when: str) -> None:
    """Deleted through the REST API while its job runs: failed with the reason, nothing left behind.

    The full 64-slice series (not the corpus' small one), so the job runs long enough to be caught.
    """
    require_data(CT_A0001)
    tag = f"corpus-{RUN}-deleted-while-running-{when}"
    folder = copy_study(sorted_slices(CT_A0001), tmp_path / "deleted", tag)
    uid = derived_uid(tag, "study")
    with client(orthanc.url) as api:
        sid = ""
        for f in sorted(folder.glob("*.dcm")):
            sid = str(post(api, f.read_bytes()).json()["ParentStudy"])

        def at_stage() -> dict[str, Any] | None:
            jobs = pipeline_jobs(api, uid)
            if jobs and jobs[0]["state"] in TERMINAL:
                pytest.fail(f"the job ended before it could be caught {when}: {jobs[0]['state']}")
            return (
                jobs[0]
                if jobs and jobs[0]["state"] == "running" and jobs[0]["stage"] in DELETE_AT[when]
                else None
            )

        job = wait_for(f"the job to run ({when})", at_stage, timeout=120, period=0.02, orthanc=orthanc)
        assert api.delete(f"/studies/{sid}").status_code == 200

        def finished() -> dict[str, Any] | None:
            jobs = pipeline_jobs(api, uid)
            return jobs[0] if jobs and jobs[0]["state"] in TERMINAL else None

        done = wait_for("the job to end", finished, timeout=120, orthanc=orthanc)
        detail = api.get(f"/ai/jobs/{done['id']}").json()
        print(f"deleted {when} (last stage done: {job['stage']!r}): {detail['state']}: {detail['error']}")
        assert detail["state"] == "failed", detail
        assert "deleted" in (detail["error"] or ""), detail["error"]
        assert detail["attempts"] == 1, detail["events"]
        # Nothing stored: no SEG/SR brought the study back to life.
        assert api.post("/tools/lookup", content=uid.encode()).json() == []
        assert api.get("/system").status_code == 200
