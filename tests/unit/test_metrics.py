# SPDX-License-Identifier: AGPL-3.0-or-later
"""/ai/metrics text: Prometheus exposition format 0.0.4, from a real (temporary) job store."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from orthanc_plugin.jobs.outbox import Outbox
from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.server.metrics import CONTENT_TYPE, REASONS, escape_label, failure_reason, render_metrics

from .jobs_helpers import NO_INPUT, outputs

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
WEIRD = 'od"d\\pipe\nline'  # a pipeline name that needs every escape
SECRET_TEXT = ["1.2.840.99999", "DOE^JOHN", "unreachable at", "HTTP 403", "KeyError", "gremlins"]


def parse(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """({family: (type, help)}, [(sample name, labels, value)]), failing on any malformed line."""
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert NAME.fullmatch(name) and help_text and name not in helps, line
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("gauge", "counter", "summary", "histogram", "untyped"), line
            assert name in helps and name not in families, f"TYPE without HELP or twice: {line}"
            families[name] = (kind, helps[name])
        else:
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert m, f"not a sample line: {line!r}"
            labels: dict[str, str] = {}
            body = m[2] or ""
            pos = 0
            while pos < len(body):
                lm = LABEL.match(body, pos)
                assert lm, f"bad labels in {line!r} at {body[pos:]!r}"
                labels[lm[1]] = lm[2].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                pos = lm.end()
                if pos < len(body):
                    assert body[pos] == ",", line
                    pos += 1
            value = float(m[3].replace("+Inf", "inf"))
            name = m[1]
            base = re.sub(r"_(sum|count|bucket)$", "", name)
            family = name if name in families else base
            assert family in families, f"sample {name} before its # TYPE"
            samples.append((name, labels, value))
    return families, samples


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, lb, v in samples if n == name and lb == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def run_job(store: JobStore, key: str, pipeline: str = "ct-lung", timings: dict[str, float] | None = None,
            error: str | None = None) -> str:  # fmt: skip
    job, _ = store.enqueue(key, "1.2.840.99999." + key, "oid-" + key, pipeline, "1.0.0", "fp",
                           NO_INPUT, max_attempts=1)  # fmt: skip
    claimed = store.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == job.id
    for stage, seconds in (timings or {}).items():
        store.record_stage(job.id, "w1", stage, seconds)
    if error is None:
        assert store.succeed(job.id, "w1", outputs("ct_lung", "1"), None)
    else:
        assert store.fail(job.id, "w1", error, retryable=False, backoff_s=0) == "failed"
    return job.id


def test_failure_reasons_are_fixed_classes() -> None:
    assert failure_reason("input not usable: the series of DOE^JOHN is too thin") == "input_not_usable"
    assert failure_reason("inference failed: Triton unreachable at localhost:8001") == "inference_failed"
    assert failure_reason("Orthanc refused store 1.2.3: HTTP 403 Forbidden") == "orthanc_refused"
    assert failure_reason("Orthanc unreachable at http://x while trying to read") == "orthanc_unreachable"
    assert failure_reason("worker lost during attempt 3 of 3 (lease of w expired)") == "worker_lost"
    assert failure_reason("lease of host:12 expired") == "worker_lost"
    assert failure_reason("worker 0 (pid 12) exited with -9") == "worker_lost"
    assert failure_reason("internal error: KeyError: 'x'") == "internal"
    assert failure_reason("gremlins in 1.2.840.99999") == "other"
    assert failure_reason(None) == "other"
    assert set(REASONS) >= {
        "input_not_usable",
        "inference_failed",
        "orthanc_refused",
        "worker_lost",
        "internal",
    }


def test_escape_label() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_render_metrics_exposition(store: JobStore, tmp_path: Path) -> None:
    run_job(store, "a", timings={"fetch": 0.5, "inference": 2.0, "total": 3.0})
    run_job(store, "b", timings={"fetch": 1.5, "inference": 4.0, "total": 6.0})
    run_job(store, "c", pipeline=WEIRD, timings={"inference": 1.0})
    run_job(store, "d", error="input not usable: series 1.2.840.99999.7 of DOE^JOHN has 2 slices")
    run_job(
        store, "e", error="inference failed: Triton unreachable at localhost:8001", timings={"fetch": 0.25}
    )
    run_job(store, "f", error="Orthanc refused store: HTTP 403 Forbidden")
    run_job(store, "g", error="internal error: KeyError: 'x'")
    run_job(store, "h", pipeline=WEIRD, error="gremlins in 1.2.840.99999.8")
    lost, _ = store.enqueue(
        "i", "1.2.840.99999.i", "oid-i", "ct-lung", "1.0.0", "fp", NO_INPUT, max_attempts=1
    )
    assert store.claim("dead", lease_s=0.01) is not None
    time.sleep(0.05)
    store.enqueue("j", "1.2.840.99999.j", "oid-j", "ct-lung", "1.0.0", "fp", NO_INPUT)
    assert store.claim("w2", lease_s=30) is not None  # expires the dead lease, then runs j
    assert store.get(lost.id).state == "failed"
    store.enqueue("k", "1.2.840.99999.k", "oid-k", "ct-lung", "1.0.0", "fp", NO_INPUT)

    health = {"workers": {"alive": 1, "expected": 2}, "triton": {"ready": True}, "fhir_backlog": 4}
    outbox = Outbox(tmp_path / "jobs.sqlite")
    text = render_metrics(store, outbox, health)
    families, samples = parse(text)

    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    assert families["orthanc_ai_jobs"][0] == "gauge"
    assert families["orthanc_ai_job_stage_seconds"][0] == "summary"
    assert families["orthanc_ai_inference_seconds"][0] == "summary"
    assert families["orthanc_ai_job_failures_total"][0] == "counter"
    for gauge in ("orthanc_ai_fhir_backlog", "orthanc_ai_workers_alive", "orthanc_ai_triton_ready"):
        assert families[gauge][0] == "gauge"
    assert "last 1000 finished jobs" in families["orthanc_ai_job_stage_seconds"][1]

    counts = {lb["state"]: v for n, lb, v in samples if n == "orthanc_ai_jobs"}
    assert counts == {"queued": 1, "running": 1, "succeeded": 3, "failed": 6, "cancelled": 0}

    stage = "orthanc_ai_job_stage_seconds"
    assert value(samples, f"{stage}_count", pipeline="ct-lung", stage="fetch") == 3  # a, b and failed e
    assert value(samples, f"{stage}_sum", pipeline="ct-lung", stage="fetch") == 2.25
    assert value(samples, stage, pipeline="ct-lung", stage="total", quantile="0.5") == 3.0
    assert value(samples, stage, pipeline="ct-lung", stage="total", quantile="0.99") == 6.0
    assert value(samples, "orthanc_ai_inference_seconds_count", pipeline="ct-lung") == 2
    assert value(samples, "orthanc_ai_inference_seconds_sum", pipeline="ct-lung") == 6.0
    assert value(samples, "orthanc_ai_inference_seconds", pipeline=WEIRD, quantile="0.9") == 1.0

    failures = {
        (lb["pipeline"], lb["reason"]): v for n, lb, v in samples if n == "orthanc_ai_job_failures_total"
    }
    assert failures == {
        ("ct-lung", "input_not_usable"): 1,
        ("ct-lung", "inference_failed"): 1,
        ("ct-lung", "orthanc_refused"): 1,
        ("ct-lung", "internal"): 1,
        ("ct-lung", "worker_lost"): 1,
        (WEIRD, "other"): 1,
    }
    assert value(samples, "orthanc_ai_fhir_backlog") == 0  # the outbox wins over health's copy
    assert value(samples, "orthanc_ai_workers_alive") == 1
    assert value(samples, "orthanc_ai_workers_expected") == 2
    assert value(samples, "orthanc_ai_triton_ready") == 1
    assert 'pipeline="od\\"d\\\\pipe\\nline"' in text  # escaped on the wire

    # Nothing from error texts or the studies reaches the exposition, labels or not.
    for secret in SECRET_TEXT:
        assert secret not in text, secret
    for _, labels, _ in samples:
        assert set(labels) <= {"state", "pipeline", "stage", "reason", "quantile", "kind", "model", "version",
                               "review", "attribute", "measurement", "check"}  # fmt: skip
    outbox.close()


def test_render_metrics_empty_store_without_health(store: JobStore) -> None:
    families, samples = parse(render_metrics(store, None, None))
    assert {n for n, _, _ in samples} == {"orthanc_ai_jobs", "orthanc_ai_jobs_waiting"}
    assert [value(samples, "orthanc_ai_jobs_waiting", kind=k) for k in ("urgent", "routine", "deferred")] == [
        0,
        0,
        0,
    ]
    assert "orthanc_ai_triton_ready" not in families and "orthanc_ai_fhir_backlog" not in families
    health = {"workers": {"alive": 0, "expected": 1}, "triton": {"ready": False}, "fhir_backlog": 3}
    _, samples = parse(render_metrics(store, None, health))
    assert value(samples, "orthanc_ai_triton_ready") == 0
    assert value(samples, "orthanc_ai_fhir_backlog") == 3


def test_window_limits_the_timings(store: JobStore) -> None:
    for i in range(5):
        run_job(store, f"w{i}", timings={"inference": float(i + 1)})
        time.sleep(0.002)
    _, samples = parse(render_metrics(store, None, None, window=2))
    assert value(samples, "orthanc_ai_inference_seconds_count", pipeline="ct-lung") == 2
    assert value(samples, "orthanc_ai_inference_seconds_sum", pipeline="ct-lung") == 9.0  # the 2 newest
