"""Handing freed heap back to the operating system."""

from __future__ import annotations

import platform

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
