"""Give freed heap memory back to the operating system (glibc's ``malloc_trim``).

The analyses allocate many short-lived numpy arrays of a few MB. glibc serves those from its heap
(its mmap threshold grows after large frees) and keeps the freed pages, so the process's resident
memory stays at the analysis' peak while the pruned weights are allocated on top of it. One
``malloc_trim(0)`` after a stage that freed a lot returns those pages (tens to hundreds of MB on
large models). A no-op where the C library has no ``malloc_trim`` (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_free_memory"]

_trim = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _trim = getattr(_libc, "malloc_trim", None)
        if _trim is not None:
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
    except OSError:  # pragma: no cover - no loadable C library
        _trim = None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when the C library could do it."""
    if _trim is None:
        return False
    return bool(_trim(0))
