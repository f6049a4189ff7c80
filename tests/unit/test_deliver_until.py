"""The delivery loop every channel runs (jobs.outbox.deliver_until): idle polls, wake-ups, errors."""

from __future__ import annotations

import logging
import threading

from orthanc_plugin.jobs.outbox import deliver_until

LOG = logging.getLogger("test")


def _loop(run_once, wake):  # type: ignore[no-untyped-def]
    stop = threading.Event()
    t = threading.Thread(target=deliver_until, args=(stop, run_once, 60.0, LOG, "test", wake), daemon=True)
    t.start()
    return stop, t


def test_a_wake_makes_an_idle_loop_look_again_at_once() -> None:
    """Idle, the loop would wait its 60 s poll; a job that just succeeded wakes it instead."""
    calls: list[int] = []
    called = threading.Condition()

    def run_once() -> bool:
        with called:
            calls.append(1)
            called.notify_all()
        return False  # nothing to send

    wake = threading.Event()
    stop, t = _loop(run_once, wake)
    with called:
        assert called.wait_for(lambda: len(calls) == 1, timeout=5)
        wake.set()
        assert called.wait_for(lambda: len(calls) == 2, timeout=5), "the wake did not end the idle wait"
    stop.set()
    wake.set()
    t.join(5)
    assert not t.is_alive()


def test_busy_passes_do_not_wait_and_a_failed_one_is_not_fatal() -> None:
    """A pass that sent something runs again without waiting; an exception is logged and the loop
    goes on (after an idle wait, here ended by a wake)."""
    calls: list[int] = []
    failed, again = threading.Event(), threading.Event()
    wake = threading.Event()

    def run_once() -> bool:
        calls.append(1)
        if len(calls) == 3:
            failed.set()
            raise RuntimeError("database locked")
        if len(calls) == 4:
            again.set()
        return len(calls) < 3  # two busy passes, then idle

    stop, t = _loop(run_once, wake)
    assert failed.wait(5), "busy passes waited for the poll"
    wake.set()
    assert again.wait(5), "the loop ended with the error"
    stop.set()
    wake.set()
    t.join(5)
    assert not t.is_alive()
