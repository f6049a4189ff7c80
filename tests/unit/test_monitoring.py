# SPDX-License-Identifier: AGPL-3.0-or-later
"""Model monitoring: the drift statistics on known distributions, the alert state, and the report
and metrics built from a real (temporary) job store with reviews."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from scipy import stats

from orthanc_plugin.core.handoff import AcquisitionInfo, JobOutputs
from orthanc_plugin.imaging.acquisition import acquisition_of, age_band
from orthanc_plugin.jobs.reviews import Reviews
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.monitoring.drift import (
    MIN_SAMPLES,
    categorical_drift,
    kolmogorov_q,
    ks_2samp,
    numeric_drift,
    psi,
    worst,
)
from orthanc_plugin.monitoring.report import input_categories, load_records, model_report, windows
from orthanc_plugin.server.api import Api
from orthanc_plugin.server.metrics import render_metrics

from ..monitoring_jobs import GE, SIEMENS, Spec, write_jobs
from .jobs_helpers import outputs
from .test_metrics import parse, value

# --------------------------------------------------------------------------- statistics


def test_psi_of_identical_distributions_is_zero_and_grows_with_the_shift() -> None:
    same = psi({"a": 50, "b": 30, "c": 20}, {"a": 100, "b": 60, "c": 40})
    assert same == pytest.approx(0.0, abs=1e-3)
    small = psi({"a": 50, "b": 50}, {"a": 55, "b": 45})
    large = psi({"a": 50, "b": 50}, {"a": 90, "b": 10})
    assert 0 < small < 0.1 < 0.25 < large


def test_psi_matches_the_formula_by_hand() -> None:
    # (r - e) * ln(r / e) summed, with half a job added to each category of each window
    e = [(60 + 0.5) / 101, (40 + 0.5) / 101]
    r = [(20 + 0.5) / 101, (80 + 0.5) / 101]
    expected = sum((ri - ei) * math.log(ri / ei) for ri, ei in zip(r, e, strict=True))
    assert psi({"x": 60, "y": 40}, {"x": 20, "y": 80}) == pytest.approx(expected, rel=1e-12)
    # a category that only the recent window has counts (finite, large)
    assert 0.25 < psi({"x": 100}, {"x": 50, "new": 50}) < 10


def test_ks_matches_scipy_on_known_distributions() -> None:
    rng = random.Random(7)
    a = [rng.gauss(0, 1) for _ in range(200)]
    b = [rng.gauss(0, 1) for _ in range(150)]
    c = [rng.gauss(0.8, 1) for _ in range(150)]
    for x, y in ((a, b), (a, c)):
        d, p = ks_2samp(x, y)
        ref = stats.ks_2samp(x, y, method="asymp")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, abs=0.01)
    assert ks_2samp(a, b)[1] > 0.05 and ks_2samp(a, c)[1] < 0.001
    # ties, equal samples, disjoint samples
    assert ks_2samp([1, 1, 2, 2], [1, 1, 2, 2]) == (0.0, 1.0)
    assert ks_2samp(list(range(20)), list(range(100, 120)))[0] == 1.0
    assert kolmogorov_q(0.0) == 1.0 and kolmogorov_q(3.0) < 1e-6


def test_the_alert_flips_on_a_shifted_distribution_and_not_on_an_unshifted_one() -> None:
    rng = random.Random(11)
    reference = [rng.lognormvariate(5, 0.3) for _ in range(100)]
    same = [rng.lognormvariate(5, 0.3) for _ in range(50)]
    shifted = [v * 1.5 for v in (rng.lognormvariate(5, 0.3) for _ in range(50))]
    assert numeric_drift(reference, same).state == "ok"
    assert numeric_drift(reference, shifted).state == "alert"
    scanners = ["SIEMENS"] * 70 + ["GE"] * 30
    assert categorical_drift(scanners, ["SIEMENS"] * 35 + ["GE"] * 15)[0].state == "ok"
    assert categorical_drift(scanners, ["SIEMENS"] * 10 + ["GE"] * 40)[0].state == "alert"
    # too few jobs: no alert whatever the shift
    few = numeric_drift(reference, shifted[: MIN_SAMPLES - 1])
    assert few.state == "insufficient" and not few.alert
    assert worst(["ok", "insufficient", "alert", "warn"]) == "alert" and worst([]) == "insufficient"


# --------------------------------------------------------------------------- acquisition


def test_acquisition_of_a_dataset_keeps_an_age_band_only() -> None:
    ds = Dataset()
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "SOMATOM Force"
    ds.ConvolutionKernel = ["Br40d", "3"]
    ds.SliceThickness, ds.PixelSpacing = "1.0", ["0.7031", "0.7031"]
    ds.PatientAge = "067Y"
    a = acquisition_of(ds)
    assert (a.manufacturer, a.model, a.kernel) == ("SIEMENS", "SOMATOM Force", "Br40d\\3")
    assert (a.slice_thickness_mm, a.pixel_spacing_mm, a.age_band) == (1.0, 0.7031, "60-79")
    assert "67" not in a.model_dump_json()
    ds2 = Dataset()
    ds2.PatientBirthDate, ds2.StudyDate = "19800615", "20240101"
    assert acquisition_of(ds2).age_band == "40-59" and acquisition_of(ds2).manufacturer is None
    assert age_band(5) == "0-17" and age_band(85) == "80+" and age_band(None) is None
    cats = input_categories(a)
    assert cats["pixel_spacing"] == "0.7-0.8 mm" and cats["slice_thickness"] == "1 mm"
    assert set(input_categories(None).values()) == {"unknown"}


# --------------------------------------------------------------------------- report from a job store


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[JobStore, Reviews]]:
    store, reviews = JobStore(tmp_path / "jobs.sqlite"), Reviews(tmp_path / "jobs.sqlite")
    yield store, reviews
    reviews.close()
    store.close()


def stable_specs(n: int, seed: int, acquisition: AcquisitionInfo = SIEMENS, scale: float = 1.0) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec(acquisition, {"nodule": scale * rng.lognormvariate(2.3, 0.25)}) for _ in range(n)]


def test_windows_split_the_jobs_without_overlap() -> None:
    recs = list(range(30))
    ref, rec = windows(recs, 200, 50)  # type: ignore[arg-type]
    assert (ref, rec) == (list(range(15)), list(range(15, 30)))
    ref, rec = windows(list(range(300)), 200, 50)  # type: ignore[arg-type]
    assert ref == list(range(200)) and rec == list(range(250, 300))


def test_report_counts_reviews_times_and_edits(db: tuple[JobStore, Reviews]) -> None:
    store, reviews = db
    specs = stable_specs(8, 1)
    specs[0].decision, specs[0].review_after_s = "accept", 600
    specs[1].decision, specs[1].review_after_s = "reject", 7200
    specs[2].decision, specs[2].agreement = "edit", {"nodule": (0.8, -12.5)}
    specs[3].decision, specs[3].agreement = "edit", {"nodule": (0.6, 30.0)}
    specs[4].version = "2"
    write_jobs(store, reviews, specs)
    report = model_report(load_records(store, reviews), "ct_lung")
    v1, v2 = report["versions"]
    assert (v1["version"], v1["jobs"], v2["version"], v2["jobs"]) == ("1", 7, "2", 1)
    assert v1["counts"] == {"accepted": 1, "edited": 2, "rejected": 1, "unreviewed": 3}
    assert v1["review_seconds"]["n"] == 4 and v1["review_seconds"]["min"] == pytest.approx(600)
    assert v1["review_seconds"]["max"] == pytest.approx(7200)
    assert sorted([v1["edit_dice"]["min"], v1["edit_dice"]["max"]]) == [0.6, 0.8]
    assert v1["edit_volume_diff_pct"]["min"] == -12.5 and sum(v1["edit_dice"]["histogram"]["counts"]) == 2
    assert model_report(load_records(store, reviews), "other")["versions"] == []


def test_a_shifted_input_and_output_raise_the_alert(db: tuple[JobStore, Reviews], tmp_path: Path) -> None:
    store, reviews = db
    # 40 jobs from the usual scanner, then 20 from another one whose volumes come out larger
    write_jobs(store, reviews, stable_specs(40, 2) + stable_specs(20, 3, acquisition=GE, scale=1.6))
    report = model_report(load_records(store, reviews), "ct_lung", reference=40, recent=20)
    drift = report["versions"][0]["drift"]
    inputs = {x["attribute"]: x for x in drift["input_drift"]}
    assert inputs["manufacturer"]["state"] == "alert" and inputs["manufacturer"]["statistic"] > 0.25
    assert inputs["manufacturer"]["categories"] == ["GE MEDICAL SYSTEMS", "SIEMENS"]
    assert inputs["manufacturer"]["reference"] == [0, 40] and inputs["manufacturer"]["recent"] == [20, 0]
    (volume,) = drift["output_drift"]
    assert volume["measurement"] == "nodule volume_ml" and volume["state"] == "alert", volume
    assert drift["alert"] and report["alert"] and drift["state"] == "alert"
    # Prometheus: the same alert, per model version and check
    _, samples = parse(render_metrics(store, None, None, reviews=reviews))
    assert value(samples, "orthanc_ai_model_drift_alert", model="ct_lung", version="1", kind="input",
                 check="manufacturer") == 1  # fmt: skip
    assert value(samples, "orthanc_ai_model_jobs", model="ct_lung", version="1", review="unreviewed") == 60
    # ... and the statistics behind it, named by attribute and by measurement
    default = model_report(load_records(store, reviews), "ct_lung")["versions"][0]["drift"]
    psi = value(samples, "orthanc_ai_model_input_psi", model="ct_lung", version="1", attribute="manufacturer")
    ks = value(
        samples, "orthanc_ai_model_output_ks", model="ct_lung", version="1", measurement="nodule volume_ml"
    )
    by_attribute = {x["attribute"]: x["statistic"] for x in default["input_drift"]}
    assert psi > 0.25 and psi == pytest.approx(by_attribute["manufacturer"], abs=1e-4), default
    assert ks > 0.4 and ks == pytest.approx(default["output_drift"][0]["statistic"], abs=1e-4), default


def test_an_unshifted_window_raises_no_alert(db: tuple[JobStore, Reviews]) -> None:
    store, reviews = db
    write_jobs(store, reviews, stable_specs(40, 4) + stable_specs(20, 5))
    drift = model_report(load_records(store, reviews), "ct_lung", reference=40, recent=20)["versions"][0][
        "drift"
    ]
    assert not drift["alert"] and drift["state"] == "ok", drift
    _, samples = parse(render_metrics(store, None, None, reviews=reviews))
    alerts = [v for n, lb, v in samples if n == "orthanc_ai_model_drift_alert"]
    assert len(alerts) == 7 and not any(alerts)  # six input attributes and one measurement


def test_the_api_answers_monitoring_and_refuses_bad_windows(db: tuple[JobStore, Reviews]) -> None:
    store, reviews = db
    write_jobs(store, reviews, stable_specs(12, 6))
    api = Api(store, None, lambda: [], lambda: {"ok": True}, viewer_url="http://ohif.example")  # type: ignore[arg-type]
    status, body = api.handle("GET", "/models/ct_lung/monitoring", {"reference": "6", "recent": "6"}, b"")
    assert status == 200 and body["versions"][0]["drift"]["windows"]["recent"]["jobs"] == 6, body
    assert api.handle("GET", "/models", {}, b"") == (200, [{"model": "ct_lung", "versions": {"1": 12}}])
    status, body = api.handle("GET", "/models/ct_lung/monitoring", {"recent": "x"}, b"")
    assert status == 400 and "recent must be" in body["error"]
    assert api.handle("GET", "/models/nope/monitoring", {}, b"")[0] == 404
    assert api.handle("GET", "/viewer", {}, b"") == (200, {"url": "http://ohif.example"})


def test_outputs_written_before_the_acquisition_existed_still_read() -> None:
    older = outputs().to_json()
    del older["acquisition"]
    assert JobOutputs.from_json(older).acquisition is None
    assert input_categories(JobOutputs.from_json(older).acquisition)["manufacturer"] == "unknown"
