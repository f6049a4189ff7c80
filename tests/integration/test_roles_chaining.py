# SPDX-License-Identifier: AGPL-3.0-or-later
"""Pipelines beyond one series and one model, on real Orthanc + real Triton.

- Series in roles, delivered as channels in the pipeline's order: the CT study's two
  reconstructions (B40f, B70f) and the MR study's two EPI series. The model is a probe whose
  answer depends on the channel order (label 1 where channel 0 > channel 1), so the stored SEG
  proves which series went into which channel.
- A required role that is missing, and a role that two series fit equally: failed jobs that
  name the role and the series.
- Sliding-window inference: ct_lung on a grid twice as long as its input, in batched windows.
- Chaining: segmentation then classification (ct-lung-attenuation, shipped disabled in
  config/pipelines.yaml, enabled here), with the finding, probability and operating point in
  the SR and in FHIR.

Own Triton (a temporary repository: ct_lung, lung_attenuation and the probe) and own Orthanc
with a pipelines file written here; each pipeline is pinned to its study by StudyInstanceUID.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import yaml

from devstack.small_models import write_onnx_model
from devstack.stack import ROOT, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.core.config import load_pipelines
from orthanc_plugin.imaging import model_input
from orthanc_plugin.imaging.volume import build_volume
from orthanc_plugin.models.onnx_proto import attr_int, model, node, tensor, value_info

from ..conftest import CT_A0001, CT_B40, CT_B70, MR, read_series, require_data
from .conftest import TERMINAL, make_orthanc, series_by_modality, study_uid, upload_folder, wait_for

pytestmark = pytest.mark.integration

MR_A, MR_B = MR / "mr_0004", MR / "mr_0005"
SHARPNESS = 20.0  # the probe's logit scale


def probe_onnx() -> bytes:
    """[N, 2, D, H, W] -> softmax over (SHARPNESS * ch1, SHARPNESS * ch0): label 1 where ch0 > ch1."""
    consts = {
        "c0": np.array([0], np.int64),
        "c1": np.array([1], np.int64),
        "c2": np.array([2], np.int64),
        "axis1": np.array([1], np.int64),
        "k": np.array(SHARPNESS, np.float32),
    }
    nodes = [
        node("Slice", ["image", "c0", "c1", "axis1"], ["ch0"]),
        node("Slice", ["image", "c1", "c2", "axis1"], ["ch1"]),
        node("Concat", ["ch1", "ch0"], ["swapped"], [attr_int("axis", 1)]),
        node("Mul", ["swapped", "k"], ["logits"]),
        node("Softmax", ["logits"], ["probabilities"], [attr_int("axis", 1)]),
    ]
    return model(
        nodes,
        inputs=[value_info("image", 1, ["batch", 2, "d", "h", "w"])],
        outputs=[value_info("probabilities", 1, ["batch", 2, "d", "h", "w"])],
        initializers=[tensor(k, v) for k, v in consts.items()],
    )


def probe_numpy(x: np.ndarray) -> np.ndarray:
    logits = SHARPNESS * np.stack([x[1], x[0]])
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def _uid(folder: Path) -> str:
    first = sorted(folder.glob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _segment(label: int, name: str) -> dict[str, Any]:
    return {
        "label": label,
        "name": name,
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
        "tracking_id": name.lower().replace(" ", "-"),
    }


def _probe_pipeline(
    name: str, study: str, roles: list[dict[str, Any]], pre: dict[str, Any], number: int
) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "algorithm_name": f"orthanc-ai {name}",
        "model": {"name": "channel_probe"},
        "inputs": roles,
        "study_where": {"StudyInstanceUID": {"equals": study}},
        "preprocess": pre,
        "largest_component": False,
        "segments": [_segment(1, "Channel 0 brighter")],
        "outputs": {"series_number": number},
    }


def write_pipelines(path: Path) -> dict[str, str]:
    ct, mr, a1 = _uid(CT_B40), _uid(MR_A), _uid(CT_A0001)
    shipped = {
        p["name"]: p for p in yaml.safe_load((ROOT / "config" / "pipelines.yaml").read_text())["pipelines"]
    }
    ct_lung_a1 = {**shipped["ct-lung"], "study_where": {"StudyInstanceUID": {"equals": a1}}}
    sliding = {
        **ct_lung_a1,
        "name": "ct-lung-sliding",
        "preprocess": {"grid": "spacing", "window": [-1024, 400], "spacing_mm": [2.5, 3.3671875, 3.3671875]},
        "inference": {"mode": "sliding_window", "roi": [64, 128, 128], "overlap": 0.25, "batch": 2},
        "outputs": {"series_number": 9961},
    }
    attenuation = {**shipped["ct-lung-attenuation"], "enabled": True}
    kernel = {"Modality": {"equals": "CT"}}
    pipelines = [
        _probe_pipeline(
            "ct-channels", ct,
            [{"role": "soft", "where": {**kernel, "ConvolutionKernel": {"matches": "^B[1-4]"}}},
             {"role": "sharp", "where": {**kernel, "ConvolutionKernel": {"matches": "^B[5-9]"}}}],
            {"window": [-1024, 400], "shape": [30, 64, 64]}, 9931,
        ),
        _probe_pipeline(
            "mr-channels", mr,
            [{"role": "sequential", "where": {"SeriesDescription": {"matches": "Sequential"}}, "temporal_position": 1},
             {"role": "interleaved", "where": {"SeriesDescription": {"matches": "Interleaved"}}, "temporal_position": 1}],
            {"minmax": True, "shape": [15, 64, 64]}, 9941,
        ),
        _probe_pipeline(
            "ct-missing-role", ct,
            [{"role": "ct", "where": kernel},
             {"role": "flair", "where": {"Modality": {"equals": "MR"}, "SeriesDescription": {"matches": "(?i)flair"}}}],
            {"window": [-1024, 400], "shape": [30, 64, 64]}, 9951,
        ),
        {**ct_lung_a1, "name": "ct-ambiguous", "study_where": {"StudyInstanceUID": {"equals": ct}},
         "inputs": [{"role": "ct", "where": kernel}], "outputs": {"series_number": 9955}},
        ct_lung_a1,
        sliding,
        attenuation,
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
    load_pipelines(path)  # a typo here should fail loudly, not as a job error
    return {"ct": ct, "mr": mr, "a1": a1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_data(CT_B40, CT_B70, CT_A0001, MR_A, MR_B)
    tmp = tmp_path_factory.mktemp("roles")
    repo = tmp / "models"
    repo.mkdir()
    for name in ("ct_lung", "lung_attenuation"):
        shutil.copytree(ROOT / "triton_models" / name, repo / name)
    write_onnx_model(repo, "channel_probe", 1, probe_onnx(), [2, -1, -1, -1], [2, -1, -1, -1])
    uids = write_pipelines(tmp / "pipelines.yaml")
    triton = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp / "triton.log", backend_root=tmp / "backends",
    )  # fmt: skip
    triton.start(timeout=120)
    orthanc = make_orthanc(
        tmp, triton.grpc_port, extra_env={"ORTHANC_AI_PIPELINES": str(tmp / "pipelines.yaml")}
    )
    try:
        orthanc.start(timeout=60)
        with httpx.Client(base_url=orthanc.url, timeout=60) as api:
            ids = {
                "ct": (upload_folder(api, CT_B70), upload_folder(api, CT_B40))[1],
                "mr": (upload_folder(api, MR_B), upload_folder(api, MR_A))[1],
                "a1": upload_folder(api, CT_A0001),
            }
            assert study_uid(api, ids["ct"]) == uids["ct"]
            expected = {"ct": 4, "mr": 1, "a1": 3}  # jobs per study

            def all_done() -> dict[str, dict[str, Any]] | None:
                jobs: dict[str, dict[str, Any]] = {}
                for key, uid in uids.items():
                    listed = api.get("/ai/jobs", params={"study": uid}).json()
                    if len(listed) < expected[key] or any(j["state"] not in TERMINAL for j in listed):
                        return None
                    for j in listed:
                        jobs[j["pipeline"]] = api.get(f"/ai/jobs/{j['id']}").json()
                return jobs

            jobs = wait_for("every job of the three studies", all_done, timeout=300, orthanc=orthanc)
            yield {
                "api": api,
                "ids": ids,
                "uids": uids,
                "jobs": jobs,
                "pipelines": load_pipelines(tmp / "pipelines.yaml"),
            }
    finally:
        orthanc.stop()
        triton.stop()


def _pipeline(stack: dict[str, Any], name: str) -> Any:
    return {p.name: p for p in stack["pipelines"]}[name]


def _seg_labels(api: httpx.Client, study_id: str, number: int, source_uids: list[str]) -> np.ndarray:
    (series,) = [
        s
        for s in series_by_modality(api, study_id, "SEG")
        if int(s["MainDicomTags"]["SeriesNumber"]) == number
    ]
    (iid,) = series["Instances"]
    seg = hd.seg.segread(io.BytesIO(api.get(f"/instances/{iid}/file").content))
    return np.asarray(
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids, combine_segments=True, skip_overlap_checks=True
        )
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def _expected_probe_labels(
    stack: dict[str, Any], name: str, folders: dict[str, Path], order: list[str]
) -> tuple[np.ndarray, list[str]]:
    """What the probe must give when the roles are fed in ``order``; returns labels and source UIDs."""
    p = _pipeline(stack, name)
    volumes = {
        r.role: build_volume(read_series(folders[r.role]), temporal_position=r.temporal_position)
        for r in p.inputs
    }
    reordered = p.model_copy(update={"inputs": [next(r for r in p.inputs if r.role == k) for k in order]})
    prepared = model_input.prepare(reordered, volumes)
    labels = prepared.labels(probe_numpy(prepared.tensor[0]), False)
    return labels, [str(ds.SOPInstanceUID) for ds in prepared.reference.datasets]


@pytest.mark.parametrize(
    ("name", "study", "folders", "order"),
    [
        ("ct-channels", "ct", {"soft": CT_B40, "sharp": CT_B70}, ["soft", "sharp"]),
        ("mr-channels", "mr", {"sequential": MR_B, "interleaved": MR_A}, ["sequential", "interleaved"]),
    ],
)
def test_roles_arrive_as_channels_in_the_declared_order(stack, name, study, folders, order) -> None:
    job = stack["jobs"][name]
    assert job["state"] == "succeeded", job["error"]
    assert job["outputs"]["inputs"]["channels"] == order
    for role, folder in folders.items():
        first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
        assert job["series"][role]["series_uid"] == first.SeriesInstanceUID
    expected, uids = _expected_probe_labels(stack, name, folders, order)
    swapped, _ = _expected_probe_labels(stack, name, folders, order[::-1])
    p = _pipeline(stack, name)
    got = _seg_labels(stack["api"], stack["ids"][study], p.outputs.series_number, uids)
    assert got.shape == expected.shape
    right, wrong = _dice(got == 1, expected == 1), _dice(got == 1, swapped == 1)
    print(f"{name}: Dice with the declared order {right:.4f}, with the channels swapped {wrong:.4f}")
    assert right > 0.99
    assert wrong < 0.5


def test_missing_role_fails_the_job_naming_the_role(stack) -> None:
    job = stack["jobs"]["ct-missing-role"]
    assert job["state"] == "failed"
    assert job["attempts"] == 1  # retrying cannot help
    assert "role 'flair' is missing: no series satisfies the rule" in job["error"]
    assert "Modality is 'CT', rule wants 'MR'" in job["error"]
    assert not [
        s
        for s in series_by_modality(stack["api"], stack["ids"]["ct"], "SEG")
        if s["MainDicomTags"]["SeriesNumber"] == "9951"
    ]


def test_ambiguous_role_fails_the_job_naming_the_series(stack) -> None:
    job = stack["jobs"]["ct-ambiguous"]
    assert job["state"] == "failed"
    assert "role 'ct' ambiguous: 2 series fit equally well" in job["error"]
    assert "B40f" in job["error"] and "B70f" in job["error"]
    assert "prefer" in job["error"]


def test_sliding_window_matches_whole_volume_inference(stack) -> None:
    whole, sliding = stack["jobs"]["ct-lung"], stack["jobs"]["ct-lung-sliding"]
    assert whole["state"] == "succeeded", whole["error"]
    assert sliding["state"] == "succeeded", sliding["error"]
    assert sliding["outputs"]["inputs"]["grid"] == [128, 128, 128]  # twice the model's 64 slices
    v_whole = {m["segment"]: m["volume_ml"] for m in whole["outputs"]["measurements"]}
    v_sliding = {m["segment"]: m["volume_ml"] for m in sliding["outputs"]["measurements"]}
    print(f"lung volumes whole {v_whole}, sliding windows {v_sliding}")
    assert set(v_sliding) == {"Right lung", "Left lung"}
    for k, v in v_whole.items():
        assert abs(v_sliding[k] - v) / v < 0.10
    uids = [str(ds.SOPInstanceUID) for ds in build_volume(read_series(CT_A0001)).datasets]
    a = _seg_labels(stack["api"], stack["ids"]["a1"], 9901, uids)
    b = _seg_labels(stack["api"], stack["ids"]["a1"], 9961, uids)
    for label in (1, 2):
        d = _dice(a == label, b == label)
        print(f"label {label}: Dice whole vs sliding {d:.3f}")
        assert d > 0.9


def _sr_group(api: httpx.Client, study_id: str, number: int) -> dict[str, Any]:
    (series,) = [
        s
        for s in series_by_modality(api, study_id, "SR")
        if int(s["MainDicomTags"]["SeriesNumber"]) == number
    ]
    (iid,) = series["Instances"]
    sr = pydicom.dcmread(io.BytesIO(api.get(f"/instances/{iid}/file").content))
    out: dict[str, Any] = {}

    def walk(items: Any) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM":
                out[name] = float(it.MeasuredValueSequence[0].NumericValue)
            elif it.ValueType == "CODE":
                out.setdefault("codes", {})[name] = it.ConceptCodeSequence[0].CodeMeaning
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    return out


@pytest.mark.parametrize(("study", "positive"), [("a1", False), ("ct", True)])
def test_chained_classification_reports_finding_probability_and_threshold(stack, study, positive) -> None:
    api = stack["api"]
    (listed,) = [
        j
        for j in api.get("/ai/jobs", params={"study": stack["uids"][study]}).json()
        if j["pipeline"] == "ct-lung-attenuation"
    ]
    job = api.get(f"/ai/jobs/{listed['id']}").json()
    assert job["state"] == "succeeded", job["error"]
    (c,) = job["outputs"]["classifications"]
    assert c["threshold"] == pytest.approx(1 / 3, abs=1e-4)  # costs FN 2 : FP 1
    assert c["positive"] is positive
    assert (c["probability"] >= c["threshold"]) is positive
    assert c["model"]["name"] == "lung_attenuation"
    assert "classify" in job["timings"]
    found = _sr_group(stack["api"], stack["ids"][study], 9922)
    assert found["Probability"] == pytest.approx(c["probability"], abs=1e-4)
    assert found["Threshold Value"] == pytest.approx(1 / 3, abs=1e-4)
    assert found["codes"]["Abnormal"] == ("Present" if positive else "Absent")
    bundle = job["fhir"]
    (obs,) = [
        e["resource"] for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation" and e["resource"]["code"].get("text") == "Dense lung share"
    ]  # fmt: skip
    assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if positive else "NEG")
    assert obs["valueCodeableConcept"]["coding"][0]["display"] == ("Present" if positive else "Absent")
    comps = {x["code"]["coding"][0]["code"]: x["valueQuantity"]["value"] for x in obs["component"]}
    assert comps["122157"] == pytest.approx(c["probability"], abs=1e-4)
    assert comps["122411"] == pytest.approx(1 / 3, abs=1e-4)
