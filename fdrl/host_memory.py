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
from typing import NamedTuple


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


class KernelUsage(NamedTuple):
    """Counters of this process's use of the kernel so far (subtract two for an interval)."""
    system_seconds: float  # CPU time spent in the kernel on the process's behalf
    minor_faults: int  # pages first touched (each 4 KiB on x86-64 without huge pages)

    def __sub__(self, other: "KernelUsage") -> "KernelUsage":
        return KernelUsage(self.system_seconds - other.system_seconds, self.minor_faults - other.minor_faults)


def kernel_usage() -> KernelUsage:
    """XLA on CPU takes its large buffers (temporaries, outputs) from the C heap, which maps
    fresh pages for each and unmaps them when freed: every execution then faults its
    buffers in again. On a virtual machine whose host reclaims freed guest memory, such a
    fault costs far more than on bare metal, so a benchmark reports these counters beside
    its times."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return KernelUsage(usage.ru_stime, usage.ru_minflt)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (1e9 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
