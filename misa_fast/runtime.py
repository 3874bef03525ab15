"""Process-level settings that make training steps faster on the host: the allocator and the
intra-op thread count."""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
from typing import Optional

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


# ------------------------------------------------------------------------------------ intra-op threads
@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count a run uses and where it came from (printed once at start)."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "default"
    reason: str

    def describe(self) -> str:
        plural = "" if self.threads == 1 else "s"
        return f"{self.threads} intra-op thread{plural} ({self.source}: {self.reason})"


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which taskset, cgroups' cpusets and
    schedulers narrow), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(cfg, device) -> ThreadChoice:
    """The measured rule (``python -m bench.threads``; README, "Threads"): one thread.

    On the 2-core development machine a second intra-op thread made no preset's step faster when
    the machine was idle, and when one other single-threaded process was running it made every
    preset's step slower, often several times (OpenMP's threads spin at each barrier waiting for
    the one that lost its core). A CUDA run's host side (launches, environment steps) has no use
    for the pool either."""
    torch_device = getattr(device, "type", str(device))
    if torch_device == "cuda":
        return ThreadChoice(1, "default", "the step runs on the GPU")
    widths = [w for name in ("critic_hidden", "policy_hidden", "actor_hidden") for w in getattr(cfg, name, ())]
    k = getattr(cfg, "num_samples", None)
    shape = f"{max(widths) if widths else '?'}-wide networks" + (f", K={k}" if k else "")
    return ThreadChoice(1, "default", f"{shape} on CPU; more threads measured no faster idle and "
                                      "several times slower with a core taken")


def choose_threads(requested: Optional[int], cfg, device) -> ThreadChoice:
    """``--threads N`` first; then ``OMP_NUM_THREADS`` from the environment (how a scheduler such as
    Ray gives a process its CPU share); then :func:`default_threads`."""
    if requested is not None:
        if int(requested) != requested or requested < 1:
            raise ValueError(f"--threads: expected a positive integer, got {requested!r}")
        return ThreadChoice(int(requested), "--threads", "as asked")
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env:
        if not from_env.isdigit() or int(from_env) < 1:
            raise ValueError(f"OMP_NUM_THREADS: expected a positive integer, got {from_env!r}")
        return ThreadChoice(int(from_env), "OMP_NUM_THREADS", "set in the environment")
    return default_threads(cfg, device)


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    import torch

    torch.set_num_threads(choice.threads)
    return choice
