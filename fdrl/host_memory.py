"""The host process's memory: give freed heap back to the OS, read the peak.

XLA on CPU allocates and frees its buffers through the C heap. After a sampling
call, glibc keeps about a gigabyte of freed pages (free chunks it does not hand
back by itself because live chunks sit beside them); the update that follows
then allocates its own buffers on top, and the process's peak grows by that
much. `release_free_heap` (glibc's malloc_trim) returns those pages; it takes
milliseconds, and is a no-op where the C library has no such call (macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Hands the heap's free pages back to the OS; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (1e9 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
