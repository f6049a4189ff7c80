"""Handing freed heap back to the operating system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from orthanc_plugin.worker import memory


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
