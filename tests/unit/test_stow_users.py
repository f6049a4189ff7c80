"""Crediting a STOW-RS to the HTTP user: noted per HTTP thread, recorded per stored instance."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from orthanc_plugin.intake.revisions import stored_by_key
from orthanc_plugin.server.stow_users import StowUsers, method_name

USERS = {"Basic cmFkOnNlY3JldA==": "rad", "Basic Y2xlcms6c2VjcmV0": "clerk"}


def _authenticate(headers: Mapping[str, Any]) -> str | None:
    return USERS.get(str(headers.get("authorization", "")))


def _tracker() -> tuple[StowUsers, dict[str, str]]:
    recorded: dict[str, str] = {}
    return StowUsers(_authenticate, recorded.__setitem__), recorded


RAD = {"authorization": "Basic cmFkOnNlY3JldA=="}


def test_the_instances_of_a_stow_request_are_recorded_for_its_user() -> None:
    users, recorded = _tracker()
    users.on_request("/dicom-web/studies", "POST", RAD)
    assert users.on_stored("seg-1") == "rad"
    users.on_request("/dicom-web/studies/1.2.840.1", "POST", RAD)
    assert users.on_stored("seg-2") == "rad"
    assert recorded == {stored_by_key("seg-1"): "rad", stored_by_key("seg-2"): "rad"}


def test_other_requests_clear_the_thread_so_a_reused_thread_credits_nobody() -> None:
    users, recorded = _tracker()
    users.on_request("/dicom-web/studies", "POST", RAD)
    for uri, method in [
        ("/instances", "POST"),  # a REST upload: Orthanc records HttpUsername itself
        ("/dicom-web/studies", "GET"),
        ("/dicom-web/studies/1.2/series", "POST"),
        ("/dicom-web/studies/../instances", "POST"),
        ("/other-web/studies", "POST"),
    ]:
        users.on_request("/dicom-web/studies", "POST", RAD)
        users.on_request(uri, method, RAD)
        assert users.on_stored("x") is None, (uri, method)
    assert recorded == {}


def test_unverified_credentials_credit_nobody() -> None:
    users, recorded = _tracker()
    users.on_request("/dicom-web/studies", "POST", {"authorization": "Basic cmFkOndyb25n"})
    users.on_request("/dicom-web/studies", "POST", {})
    assert users.on_stored("x") is None and recorded == {}


def test_a_store_in_another_thread_is_not_credited_to_the_http_user() -> None:
    """A C-STORE or a job stores in its own thread, while a STOW-RS may be under way elsewhere."""
    users, recorded = _tracker()
    users.on_request("/dicom-web/studies", "POST", RAD)
    seen: list[str | None] = []
    other = threading.Thread(target=lambda: seen.append(users.on_stored("from-dicom")))
    other.start()
    other.join()
    assert seen == [None] and recorded == {}
    assert users.on_stored("from-stow") == "rad"


def test_concurrent_stow_requests_are_kept_apart() -> None:
    users, recorded = _tracker()
    barrier = threading.Barrier(2)

    def store(user_header: str, instance: str) -> None:
        users.on_request("/dicom-web/studies", "POST", {"authorization": user_header})
        barrier.wait()  # both requests noted before either stores
        users.on_stored(instance)

    threads = [
        threading.Thread(target=store, args=("Basic cmFkOnNlY3JldA==", "a")),
        threading.Thread(target=store, args=("Basic Y2xlcms6c2VjcmV0", "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorded == {stored_by_key("a"): "rad", stored_by_key("b"): "clerk"}


def test_a_configured_dicomweb_root_and_the_plugins_method_numbers() -> None:
    recorded: dict[str, str] = {}
    users = StowUsers(_authenticate, recorded.__setitem__, "/web/")
    users.on_request("/web/studies", method_name(2), RAD)
    assert users.on_stored("y") == "rad"
    users.on_request("/dicom-web/studies", method_name(2), RAD)
    assert users.on_stored("z") is None
    assert [method_name(m) for m in (1, 2, 3, 4, "POST")] == ["GET", "POST", "PUT", "DELETE", "POST"]
