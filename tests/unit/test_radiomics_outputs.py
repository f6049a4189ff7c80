"""Radiomics features where they go: the SR's measurement groups, the FHIR report's Observations,
the job's versioned outputs and the research export (JSON and CSV)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from orthanc_plugin.core.codes import IBSI_SCHEME, IBSI_SYSTEM
from orthanc_plugin.core.config import Radiomics, load_pipelines
from orthanc_plugin.core.handoff import JobOutputs
from orthanc_plugin.core.results import FeatureValue, SegmentFeatures, StudyRef
from orthanc_plugin.core.uids import output_uids
from orthanc_plugin.fhir.report import build_diagnostic_report
from orthanc_plugin.imaging.radiomics import FEATURES_BY_ID, RadiomicsSettings, compute_features
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.outputs.sr import build_sr
from orthanc_plugin.server.api import Api, TextAnswer
from orthanc_plugin.worker.pipeline import features_output

from .jobs_helpers import NO_INPUT, outputs
from .test_intake import FakeOrthanc, make_intake
from .test_seg import ALGORITHM, CREATED, SEGMENTS, run_dciodvfy
from .test_sr import VOLUMES

Array = NDArray[Any]
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Radiomics(bin_width=25, resegment=(-1000, 400))


@pytest.fixture(scope="module")
def features(ct: list[pydicom.Dataset], labels: Array) -> list[SegmentFeatures]:
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ct])
    dz = abs(float(ct[1].ImagePositionPatient[2]) - float(ct[0].ImagePositionPatient[2]))
    spacing = (dz, *(float(v) for v in ct[0].PixelSpacing))
    out = []
    for spec in SEGMENTS:
        values = compute_features(
            hu, labels == spec.label, spacing, RadiomicsSettings(**SETTINGS.model_dump())
        )
        out.append(
            SegmentFeatures(
                spec.label,
                tuple(
                    FeatureValue(k, FEATURES_BY_ID[k].name, FEATURES_BY_ID[k].unit, v)
                    for k, v in values.items()
                ),
            )
        )
    return out


def test_mesh_volume_agrees_with_the_voxel_volume(
    features: list[SegmentFeatures], ct: list[pydicom.Dataset], labels: Array
) -> None:
    dz = abs(float(ct[1].ImagePositionPatient[2]) - float(ct[0].ImagePositionPatient[2]))
    voxel_ml = dz * float(ct[0].PixelSpacing[0]) * float(ct[0].PixelSpacing[1]) / 1000
    for f in features:
        by_id = {v.id: v.value for v in f.features}
        counted = float((labels == f.segment_label).sum() * voxel_ml)
        assert by_id["morph.approx.vol"] / 1000 == pytest.approx(counted, rel=1e-9)
        assert by_id["morph.vol"] / 1000 == pytest.approx(counted, rel=0.01)


def test_sr_carries_every_finite_feature_coded(
    ct: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    labels: Array,
    features: list[SegmentFeatures],
    tmp_path: Path,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = build_sr(
            ct, seg, SEGMENTS, VOLUMES, ALGORITHM, series_instance_uid="2.25.2000", sop_instance_uid="2.25.2001",
            series_number=902, series_description="AI lung report", labels=labels, content_creation=CREATED,
            features=features,
        )  # fmt: skip
    run_dciodvfy(sr, tmp_path)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == IBSI_SCHEME
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    report = hd.sr.srread(buffer)
    groups = report.content.get_volumetric_roi_measurement_groups()
    for group, f in zip(groups, features, strict=True):
        found = {
            m.name.value: m.value for m in group.get_measurements() if m.name.scheme_designator == IBSI_SCHEME
        }
        expected = {v.id: v.value for v in f.finite()}
        assert found.keys() == expected.keys() and len(found) >= 60
        for k, v in expected.items():
            assert found[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k


def test_fhir_report_has_one_observation_of_features_per_segment(
    ct: list[pydicom.Dataset], features: list[SegmentFeatures]
) -> None:
    bundle = build_diagnostic_report(
        StudyRef.from_dataset(ct[0]), SEGMENTS, VOLUMES, ALGORITHM, ids=output_uids("1.2.3|ct-lung|1|abc"),
        issued=dt.datetime(2024, 5, 6, tzinfo=dt.UTC), features=features,
    )  # fmt: skip
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    panels = [o for o in observations if "component" in o]
    assert len(panels) == len(features)
    for panel, f in zip(panels, features, strict=True):
        codes = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in panel["component"]}
        assert all(c["code"]["coding"][0]["system"] == IBSI_SYSTEM for c in panel["component"])
        assert codes["morph.vol"] == pytest.approx(
            next(v.value for v in f.features if v.id == "morph.vol"), rel=1e-5
        )
        assert len(codes) == len(f.finite())
    report = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert len(report["result"]) == len(VOLUMES) + len(features)


def test_export_json_and_csv(tmp_path: Path, features: list[SegmentFeatures]) -> None:
    pipelines = load_pipelines(ROOT / "config" / "pipelines.yaml")
    ct_lung = next(p for p in pipelines if p.name == "ct-lung")
    assert ct_lung.outputs.radiomics is not None and ct_lung.outputs.rtstruct
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.enqueue("k1", "1.2.3", "orthanc-study", "ct-lung", "1.0.0", "fp", NO_INPUT)
    claimed = store.claim("w1", lease_s=30)
    assert claimed is not None
    done = outputs().model_copy(update={"features": features_output(ct_lung, list(SEGMENTS), features)})
    store.succeed(job.id, "w1", JobOutputs.from_json(done.to_json()), None)
    api = Api(store, make_intake(FakeOrthanc(), store, pipelines), lambda: pipelines, lambda: {})
    status, body = api.handle("GET", f"/jobs/{job.id}/features", {}, b"")
    assert status == 200 and body["version"] == 1 and body["standard"] == "IBSI-1"
    assert [s["segment"] for s in body["segments"]] == [s.name for s in SEGMENTS]
    assert body["segments"][0]["values"]["morph.vol"] == pytest.approx(
        features[0].features[0].value, rel=1e-5
    )
    status, answer = api.handle("GET", f"/jobs/{job.id}/features", {"format": "csv"}, b"")
    assert status == 200 and isinstance(answer, TextAnswer) and answer.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(answer.body)))
    assert len(rows) == len(SEGMENTS) * len(FEATURES_BY_ID)
    vol = next(r for r in rows if r["segment"] == SEGMENTS[0].name and r["feature"] == "morph.vol")
    assert (
        float(vol["value"]) == pytest.approx(features[0].features[0].value, rel=1e-5) and vol["unit"] == "mm3"
    )
    assert api.handle("GET", f"/jobs/{job.id}/features", {"format": "xml"}, b"")[0] == 400


def test_export_of_a_job_without_features_is_404(tmp_path: Path) -> None:
    pipelines = load_pipelines(ROOT / "config" / "pipelines.yaml")
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.enqueue("k1", "1.2.3", "orthanc-study", "ct-lung", "1.0.0", "fp", NO_INPUT)
    api = Api(store, make_intake(FakeOrthanc(), store, pipelines), lambda: pipelines, lambda: {})
    status, body = api.handle("GET", f"/jobs/{job.id}/features", {}, b"")
    assert status == 404 and "no radiomics features" in body["error"]
