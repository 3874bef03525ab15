"""Process-level settings that make training steps faster on the host."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=None)
def tune_host_allocator() -> bool:
    """Keep glibc from returning every freed multi-MB block to the OS.

    A CPU training step allocates and frees tens of MB of temporaries; by default glibc serves
    blocks over 128 KiB with mmap and unmaps them on free, so every step pays page faults and
    zeroing again (10-30% of a MISA step on a 2-core machine). Raising the mmap and trim thresholds
    keeps them in the heap for reuse. Does nothing (returns False) off glibc. Idempotent."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return bool(ok)
