"""fdrl.host_memory: the process's heap and kernel counters."""

import mmap
import sys

import pytest

from fdrl import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage's fault count is Linux's")
def test_kernel_usage_counts_pages_touched_afresh():
    size = 16 << 20
    before = host_memory.kernel_usage()
    buf = mmap.mmap(-1, size)  # anonymous: its pages exist once written
    for offset in range(0, size, mmap.PAGESIZE):
        buf[offset] = 1
    used = host_memory.kernel_usage() - before
    buf.close()
    # 4096 faults of 4 KiB pages, or 8 of 2 MiB where the kernel backs it with huge pages.
    assert used.minor_faults >= size // (2 << 20)
    assert used.system_seconds >= 0.0
    assert isinstance(used, host_memory.KernelUsage)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_covers_memory_touched_since():
    rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    held = b"\x01" * (256 << 20)  # written, so resident
    assert host_memory.peak_rss_gb() >= (rss_kib * 1024 + len(held)) / 1e9 * 0.99
    del held
    assert host_memory.release_free_heap()
