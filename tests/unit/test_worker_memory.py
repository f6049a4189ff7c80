"""Handing freed heap back to the operating system."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from orthanc_plugin.worker import memory, pipeline


def test_free_heap_is_released_where_the_c_library_can() -> None:
    if platform.libc_ver()[0] == "glibc":
        assert memory._TRIM is not None
    memory.release_free_heap()  # never raises, with or without malloc_trim
    saved, memory._TRIM = memory._TRIM, None
    try:
        memory.release_free_heap()
    finally:
        memory._TRIM = saved


_FREED_IN_THREADS = """
import sys, threading
from orthanc_plugin.worker import memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

if sys.argv[1] == "one":
    assert memory.one_heap()
big = b"x" * (30 << 20)  # freed: glibc then serves pieces under 30 MB from its heaps, not mmap
del big
before = rss_mb()
kept = []

def fetch():  # as the fetch threads do: instances' pixel data, 0.5 MB each
    kept.extend(b"p" * (512 << 10) + bytes([i % 256]) for i in range(80))

threads = [threading.Thread(target=fetch) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
held = rss_mb()
kept.clear()  # dropped by the main thread once the volume holds the pixels
memory.release_free_heap()
print(before, held, rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heaps and malloc_trim")
def test_what_threads_freed_goes_back_to_the_system() -> None:
    """160 MB allocated in four threads and freed by the main thread: all but a few MB leave
    the process at the trim once every thread allocates from the main heap."""
    out = subprocess.run(
        [sys.executable, "-c", _FREED_IN_THREADS, "one"], capture_output=True, text=True, check=True
    ).stdout
    before, held, after = (int(x) for x in out.split())
    assert held - before > 140, out
    assert after - before < 20, out


def test_each_stage_hands_back_what_it_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's stages trim the heap one by one: the next stage starts from what is live."""
    events: list[str] = []

    class Store:
        def record_stage(self, job_id: str, owner: str, name: str, seconds: float) -> None:
            events.append(f"recorded {name}")

    monkeypatch.setattr(pipeline, "release_free_heap", lambda: events.append("trimmed"))
    run = pipeline.Run(
        job=SimpleNamespace(id="j"),  # type: ignore[arg-type]
        pipeline=None,  # type: ignore[arg-type]
        settings=None,  # type: ignore[arg-type]
        owner="w",
        store=Store(),  # type: ignore[arg-type]
        orthanc=None,  # type: ignore[arg-type]
        triton=None,  # type: ignore[arg-type]
        lost=threading.Event(),
    )
    assert run.stage("measure", lambda: events.append("ran") or 7) == 7
    assert events == ["ran", "recorded measure", "trimmed"]
