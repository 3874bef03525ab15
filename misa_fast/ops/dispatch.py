"""Backend selection for the fused ops: Triton kernels or the plain-torch references.

Precedence, first match wins:

1. the ``backend=`` argument of an op call (``"triton"``, ``"torch"`` or ``"auto"``);
2. the innermost active :func:`use_backend` context (thread-local);
3. the environment variable ``MISA_FAST_OPS`` (read at every call, default ``"auto"``).

``"auto"`` picks Triton when every tensor argument lives on a CUDA device and Triton (plus the
kernel package) imports, the torch reference otherwise. The Triton path calls the registered
operators (``torch.ops.misa_fast.log_mean_exp``, ``.sampled_q_log_mean_exp``, ``.hmc_chains``):
what a compiled or exported graph holds, and inside ``torch.func.vmap`` (the stacked seeds of
``misa-fast train --seeds``, :func:`member_batched`) their vmap rules launch each kernel once for
every member, at the precision one run uses. ``"triton"`` forces the kernels: on CPU
tensors that only works under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels
are imported), which is how the tests exercise them without a GPU. ``"torch"`` forces the reference.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

ENV_VAR = "MISA_FAST_OPS"
BACKENDS = ("auto", "triton", "torch")

_local = threading.local()


def _check(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the ops called inside the block (thread-local, nestable)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(_check(name))
    try:
        yield
    finally:
        stack.pop()


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by the argument, the context or the environment (may be "auto")."""
    if backend is not None:
        return _check(backend)
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get(ENV_VAR, "auto") or "auto")


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_triton_imports: Optional[bool] = None  # a plain global, not an lru_cache: dynamo reads it as a constant


def triton_available() -> bool:
    """Triton and the kernel package import (found once per process)."""
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401

            import misa_fast.kernels  # noqa: F401
        except Exception:
            _triton_imports = False
        else:
            _triton_imports = True
    return _triton_imports


_member_maps = 0  # depth of misa_fast.agents.members' vmapped calls (a plain global: dynamo traces it)


@contextlib.contextmanager
def member_map() -> Iterator[None]:
    """Marks the ops called inside as running under the member vmap of a stacked agent."""
    global _member_maps
    _member_maps += 1
    try:
        yield
    finally:
        _member_maps -= 1


def member_batched(*tensors: Optional[torch.Tensor]) -> bool:
    """True inside a stacked agent's member vmap (:func:`member_map`) or when a tensor is one
    member's view inside any ``torch.func.vmap``: a raw kernel launch cannot read such a tensor (it
    holds every member's data behind one logical tensor)."""
    if _member_maps:
        return True
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def resolve_backend(backend: Optional[str], *tensors: Optional[torch.Tensor], members: bool = False) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``tensors`` (``None`` entries ignored).
    ``members``: the op launches its kernel for every member at once under vmap (a vmap rule of its
    operator); an op without one takes the torch reference there."""
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    ts = [t for t in tensors if t is not None]
    if not members and member_batched(*ts):
        return "torch"
    on_cuda = bool(ts) and all(t.is_cuda for t in ts)
    if name == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    # forced triton
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}/backend='triton' but triton (or misa_fast.kernels) does not import")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before misa_fast.kernels is imported"
        )
    return "triton"


def kernel_runs_on(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a Triton kernel can run on ``tensors`` (``None`` entries ignored): Triton imports and
    they all live on a CUDA device, or the interpreter runs kernels on the CPU. The registered
    operators (``torch.ops.misa_fast``) launch their kernels where this holds and compute the
    torch reference elsewhere, so that an exported or compiled graph runs on any device."""
    ts = [t for t in tensors if t is not None]
    if not triton_available():
        return False
    return (bool(ts) and all(t.is_cuda for t in ts)) or interpreter_enabled()


# torch.get_float32_matmul_precision() -> the Triton dot precision that keeps a drop-in's numerics
_TORCH_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


@torch.compiler.assume_constant_result
def _matmul_precision() -> str:
    # dynamo cannot put the string this returns into a graph: it is read when the graph is traced,
    # and a compiled graph keeps the precision it was traced with
    return torch.get_float32_matmul_precision()


def resolve_precision(precision: Optional[str], allowed=("tf32", "bf16", "ieee", "fp32")) -> str:
    """The dot precision of a fused op: ``precision`` if given, else the one PyTorch's own setting
    asks for (``torch.get_float32_matmul_precision()``: "highest" -> "ieee", "high" -> "tf32",
    "medium" -> "bf16"), so that a call without ``precision=`` computes what the caller's fp32
    matmuls compute."""
    if precision is None:
        return _TORCH_PRECISION.get(_matmul_precision(), "ieee")
    if precision not in allowed:
        raise ValueError(f"precision must be one of {allowed} or None (PyTorch's own setting), got {precision!r}")
    return precision
