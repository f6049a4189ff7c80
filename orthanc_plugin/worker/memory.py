"""Handing the heap that a job freed back to the operating system.

Python frees the pixel data of a few hundred instances and a job's temporaries to the C
allocator, which (glibc) keeps much of it in the process for later allocations: measured at
stage boundaries on a 320-slice CT, about 80 MB after the volume is built and more across jobs.
``malloc_trim`` returns those pages. Where the C library has no such call, nothing happens.

glibc gives each thread that allocates its own heap ("arena"), and ``malloc_trim`` did not hand
back what was freed in those: the instances are parsed in the fetch threads, so their pixel data
(168 MB on a 320-slice CT) stayed in the worker after the volume was built, about 100 MB of it
measured with ``/proc/self/status`` at the stage boundaries. :func:`one_heap` makes every thread
allocate from the main heap, which ``malloc_trim`` does shrink; the worker calls it first thing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

#: glibc's ``mallopt`` parameter for the largest number of heaps (``malloc.h``: ``M_ARENA_MAX``)
M_ARENA_MAX = -8


def _libc_call(name: str) -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None
    return fn


_TRIM = _libc_call("malloc_trim")
_MALLOPT = _libc_call("mallopt")


def release_free_heap() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim(0)``)."""
    if _TRIM is not None:
        _TRIM(0)


def one_heap() -> bool:
    """Let every thread allocate from the main heap (glibc's ``mallopt(M_ARENA_MAX, 1)``), so
    that :func:`release_free_heap` reaches what any thread freed. Effective for the heaps that
    threads create after the call: call it before starting threads. False where the C library
    has no ``mallopt`` or refuses."""
    return _MALLOPT is not None and _MALLOPT(M_ARENA_MAX, 1) == 1
