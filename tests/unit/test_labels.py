"""Study labels from job states (orthanc_plugin.orthanc_rest.labels) and the plugin's
SendHttpStatus for both Python plugin versions."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from orthanc_plugin.jobs.store import JobStore
from orthanc_plugin.orthanc_rest.labels import DONE, FAILED, QUEUED, StudyLabels, label_for

from .jobs_helpers import NO_INPUT, outputs


def test_label_for_states() -> None:
    assert label_for([]) is None
    assert label_for(["cancelled"]) is None
    assert label_for(["queued"]) == QUEUED
    assert label_for(["running", "succeeded"]) == QUEUED
    assert label_for(["succeeded", "succeeded"]) == DONE
    assert label_for(["succeeded", "failed", "running"]) == FAILED


class FakeOrthanc:
    def __init__(self, has_labels: bool | None) -> None:
        self.system: dict[str, Any] = {"Version": "1.12.7" if has_labels else "1.10.1"}
        if has_labels is not None:
            self.system["HasLabels"] = has_labels
        self.labels: dict[str, set[str]] = {"s1": {"keep-me"}}
        self.calls: list[str] = []

    def get_json(self, path: str) -> Any:
        if path == "/system":
            return self.system
        return sorted(self.labels[path.split("/")[2]])

    def put(self, path: str) -> None:
        self.calls.append("PUT " + path)
        self.labels[path.split("/")[2]].add(path.rsplit("/", 1)[1])

    def delete(self, path: str) -> None:
        self.calls.append("DELETE " + path)
        self.labels[path.split("/")[2]].discard(path.rsplit("/", 1)[1])


def _store(tmp_path: Path) -> JobStore:
    store = JobStore(tmp_path / "jobs.sqlite")
    for key, pipeline in (("k1", "p1"), ("k2", "p2")):
        store.enqueue(key, "1.2.3", "s1", pipeline, "1", "fp", NO_INPUT)
    return store


def test_sync_follows_the_jobs_and_keeps_other_labels(tmp_path: Path) -> None:
    orthanc, store = FakeOrthanc(True), _store(tmp_path)
    labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
    assert labels.detect() and labels.status()["enabled"] is True
    assert labels.sync(store, "1.2.3", "s1") == QUEUED
    assert orthanc.labels["s1"] == {"keep-me", QUEUED}
    for _ in range(2):
        job = store.claim("w", 30)
        assert job is not None
        store.succeed(job.id, "w", outputs(), None)
    assert labels.sync(store, "1.2.3", "s1") == DONE
    assert orthanc.labels["s1"] == {"keep-me", DONE}
    sent = len(orthanc.calls)
    assert labels.sync(store, "1.2.3", "s1") == DONE
    assert len(orthanc.calls) == sent  # nothing sent when the label is already right


def test_failed_job_labels_the_study_failed(tmp_path: Path) -> None:
    orthanc, store = FakeOrthanc(True), _store(tmp_path)
    labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
    job = store.claim("w", 30)
    assert job is not None
    store.fail(job.id, "w", "bad input", retryable=False, backoff_s=0)
    assert labels.sync(store, "1.2.3", "s1") == FAILED
    assert orthanc.labels["s1"] == {"keep-me", FAILED}


@pytest.mark.parametrize("has_labels", [None, False])
def test_without_labels_nothing_is_sent_and_the_reason_is_stated(
    tmp_path: Path, has_labels: bool | None
) -> None:
    orthanc, store = FakeOrthanc(has_labels), _store(tmp_path)
    labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
    assert labels.sync(store, "1.2.3", "s1") is None
    assert orthanc.calls == []
    status = labels.status()
    assert status["enabled"] is False and "Orthanc 1.10.1 has no study labels" in status["reason"]


def test_label_errors_never_escape(tmp_path: Path) -> None:
    orthanc, store = FakeOrthanc(True), _store(tmp_path)

    def broken(path: str) -> None:
        raise RuntimeError("Orthanc said 404")

    labels = StudyLabels(orthanc.get_json, broken, broken)
    assert labels.sync(store, "1.2.3", "s1") is None


# -- SendHttpStatus: plugin 4.x (status, body, length), plugin 5.0 (status, body) -------------------


@pytest.fixture()
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "orthanc", types.ModuleType("orthanc"))
    monkeypatch.delitem(sys.modules, "orthanc_plugin.server.plugin", raising=False)
    return importlib.import_module("orthanc_plugin.server.plugin")


class Output4:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def SendHttpStatus(self, status: int, body: str, length: int) -> None:  # noqa: N802
        self.sent.append((status, body, length))


class Output5:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def SendHttpStatus(self, status: int, body: str) -> None:  # noqa: N802
        self.sent.append((status, body))


@pytest.mark.parametrize("output_class", [Output4, Output5])
def test_send_http_status_on_both_plugin_versions(plugin_module: Any, output_class: type) -> None:
    for _ in range(2):  # the second answer uses the form found by the first
        out = output_class()
        plugin_module.send_http_status(out, 404, '{"error": "é"}')
        assert out.sent and out.sent[0][:2] == (404, '{"error": "é"}')
        if output_class is Output4:
            assert out.sent[0][2] == len('{"error": "é"}'.encode())


def test_a_state_change_during_the_sync_is_caught_up(tmp_path: Path) -> None:
    """The plugin syncs (job queued) while a worker finishes the job: the later states win."""
    orthanc, store = FakeOrthanc(True), _store(tmp_path)
    put = orthanc.put

    def put_then_finish(path: str) -> None:  # both jobs end between the state read and the PUT
        put(path)
        for _ in range(2):
            job = store.claim("w", 30)
            if job is not None:
                store.succeed(job.id, "w", outputs(), None)

    orthanc.put = put_then_finish  # type: ignore[method-assign]
    labels = StudyLabels(orthanc.get_json, orthanc.put, orthanc.delete)
    assert labels.sync(store, "1.2.3", "s1") == DONE
    assert orthanc.labels["s1"] == {"keep-me", DONE}
