"""Process-level settings that make training steps faster on the host: the allocator and the
intra-op thread count, and the precision of fp32 matrix products."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import os
import sys
from typing import Iterator, Optional

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


# The rule below comes from ``python -m bench.threads`` on the 2-core development machine
# (bench/results/threads-cpu-2core-2026-12-02.json; the docs, "Threads"), median ms per step:
#   64-wide MISA (pendulum, K=10): 1 thread 26.5 idle / 25.4 busy; 2 threads 28.4 / 64.3 (spinning),
#     41.3 / 30.5 (passive): a second thread never helps.
#   256-wide MISA (K=50: locomotion, antmaze, adroit, kitchen): 2 threads are 1.5-2.3x faster than 1
#     when idle, and 2.0-2.3x slower when another process holds a core, because OpenMP threads spin at
#     every barrier for the one that lost its core. With passive waiting (threads sleep at barriers)
#     they are still 1.15-1.7x faster idle and at most 1.26x slower busy.
#   256-wide TD3+BC: 2 threads 1.33x faster idle, 1.5x slower busy; passive 1.15x faster idle and
#     no slower busy.
MIN_WIDTH_FOR_THREADS = 256
MAX_DEFAULT_THREADS = 2  # the most measured; `--threads N` (and bench.threads) for bigger machines


def passive_waiting() -> bool:
    """OpenMP threads sleep at barriers instead of spinning (``OMP_WAIT_POLICY=PASSIVE``)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def prefer_passive_waiting() -> None:
    """Ask OpenMP for passive waiting unless the user chose a policy. OpenMP reads the variable
    once, when torch loads it, so this is done before ``import torch`` or not at all (the CLI calls
    it first thing; a library user sets ``OMP_WAIT_POLICY`` before importing torch)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads(cfg, device) -> ThreadChoice:
    """One thread, except for networks of 256 units or more on CPU with passive waiting in effect:
    there every core this process may use, up to ``MAX_DEFAULT_THREADS``. The figures behind it are
    in the comment above."""
    torch_device = getattr(device, "type", str(device))
    if torch_device == "cuda":
        return ThreadChoice(1, "default", "the step runs on the GPU")
    from misa_fast.agents.config_base import hidden_sizes

    widths = [w for network in ("critic", "actor") for w in hidden_sizes(cfg, network)]
    width = max(widths) if widths else 0
    k = getattr(cfg, "num_samples", None) if hasattr(cfg, "hmc_mode") else None
    shape = f"{width}-wide networks" + (f", K={k}" if k else "")
    if width < MIN_WIDTH_FOR_THREADS:
        return ThreadChoice(1, "default", f"{shape}: a second thread measured no faster")
    if not passive_waiting():
        return ThreadChoice(1, "default", f"{shape}, but OMP_WAIT_POLICY is not PASSIVE: spinning threads "
                                          "measured 2x slower whenever another process takes a core")
    threads = max(1, min(available_cpus(), MAX_DEFAULT_THREADS))
    return ThreadChoice(threads, "default", f"{shape} on {available_cpus()} usable core(s), passive "
                                            "waiting: measured 1.15-1.7x faster idle, at most 1.26x "
                                            "slower with a core taken")


def choose_threads(requested: Optional[int], cfg, device) -> ThreadChoice:
    """``--threads N`` first; then ``OMP_NUM_THREADS`` from the environment (how a scheduler such as
    Ray gives a process its CPU share); then :func:`default_threads`."""
    if requested is not None:
        from misa_fast.training.checks import check_positive

        check_positive(requested, "--threads")
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


def resolve_device(name: str):
    """``--device``: "auto" (CUDA when available), "cpu" or "cuda" as a torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return device


MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 products natively on this CPU (AVX-512 BF16 or AMX): only
    there does "medium" make fp32 products faster."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_matmul_precision(name: str, device) -> str:
    """``--matmul-precision`` as torch names it. "auto": "medium" on a CPU with native bfloat16
    products (their learning matches fp32's: docs, "Matrix-product precision on a CPU"), else
    "highest" (CUDA included: no GPU study has been made)."""
    import torch

    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"--matmul-precision: expected one of {MATMUL_PRECISIONS}, got {name!r}")
    if name != "auto":
        return name
    return "medium" if torch.device(device).type == "cpu" and cpu_has_bfloat16() else "highest"


@contextlib.contextmanager
def matmul_precision(name: str, device="cpu") -> Iterator[str]:
    """``torch.set_float32_matmul_precision(name)`` for the block ("auto" resolved for ``device`` by
    :func:`resolve_matmul_precision`), the previous setting restored after it (a Python caller's
    process keeps its own). On a CPU, "medium" lets oneDNN compute fp32 matrix products in bfloat16
    with fp32 accumulation (fast on CPUs with AVX-512 BF16 or AMX); "high" and "highest" keep them
    in fp32 there. The fused ops' torch paths follow the setting; their Triton kernels take the
    precisions of the learner's config. Yields the resolved name."""
    import torch

    name = resolve_matmul_precision(name, device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(name)
    try:
        yield name
    finally:
        torch.set_float32_matmul_precision(previous)
