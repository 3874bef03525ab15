"""Checking a fused op against its torch reference in this process: where the Triton kernels run
and how closely they can agree with the fp32 reference at a given dot precision.

- :func:`kernel_device`: ``"cuda"`` on a machine with a CUDA device (compiled kernels), ``"cpu"``
  under the Triton interpreter (``TRITON_INTERPRET=1``, what the test suite sets without a GPU),
  ``None`` when the kernels cannot run at all. Tensors given to a forced-Triton op must live there:
  on a CUDA host the interpreter is off, and CPU tensors make the dispatcher raise.
- :func:`kernels_compiled`: the kernels run as GPU code, so the requested dot precision is the one
  actually used (the interpreter computes every ``tl.dot`` in fp32, whatever it is asked).
- :func:`dot_tolerance`: ``atol``/``rtol`` for ``torch.testing.assert_close`` derived from the
  precision, the reduction length and the number of chained dot layers.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from misa_fast.ops.dispatch import interpreter_enabled

__all__ = ["kernel_device", "kernels_compiled", "dot_tolerance", "DOT_INPUT_ROUNDING"]


def kernel_device() -> Optional[str]:
    """The device whose tensors a forced-Triton op accepts here (see the module docstring)."""
    if torch.cuda.is_available():
        return "cuda"
    if interpreter_enabled():
        return "cpu"
    return None


def kernels_compiled() -> bool:
    """True when Triton kernels run as compiled GPU code rather than in the interpreter."""
    return kernel_device() == "cuda" and not interpreter_enabled()


# Relative error of one product a*b from rounding its two fp32 inputs to the dot's operand format:
# twice the unit roundoff of that format (each operand carries up to one). tf32 keeps 10 mantissa
# bits; fp32 registers fed to a tf32 MMA may be truncated rather than rounded to nearest, so one
# unit is taken as 2^-10, not 2^-11. bf16 keeps 7 bits, rounded to nearest: 2^-8. tf32x3 adds the two cross products of
# the low parts, leaving the low*low term and the rounding of the low parts, ~2^-21 each. "ieee"
# multiplies in fp32: no input rounding.
DOT_INPUT_ROUNDING: Dict[str, float] = {
    "ieee": 0.0,
    "fp32": 0.0,
    "tf32x3": 2 * 2.0 ** -21,
    "tf32": 2 * 2.0 ** -10,
    "bf16": 2 * 2.0 ** -8,
}
_FP32_ROUNDOFF = 2.0 ** -24
# Elementwise checks over up to ~1e5 outputs see the tail of the error distribution: four times
# the typical error (the per-product figures above are already worst-case per operand).
_SAFETY = 4.0


def dot_tolerance(precision: str, *, reduction: int, depth: int, scale: float = 1.0,
                  floor: float = 0.0) -> Dict[str, float]:
    """``dict(atol=..., rtol=...)`` for comparing a fused op's output with the fp32 reference.

    The model: one dot layer of reduction length ``n`` has a relative error of about
    ``input_rounding(precision) + 2^-24 * sqrt(n)``: the operand rounding of each product (errors of
    independent sign: relative to the result they do not grow with n) plus fp32 accumulation in a
    different order than the reference's (a random walk over n partial sums). ``depth`` chained
    layers (Linear + activation, Lipschitz ~1 at these initialisations) add their errors: a forward pass
    through L layers has ``depth=L``; a gradient recomputes the forward and runs the backward,
    ``depth=2L``. A log-sum-exp over the outputs passes an absolute error through unchanged
    (softmax weights sum to 1). ``rtol`` is that error times a safety factor; ``atol`` the same
    relative error of ``scale``, the typical magnitude of the compared values, for outputs that
    cancel to near zero. ``reduction``: the longest reduction on the path (hidden width forward;
    B*K rows for a weight gradient).

    Under the interpreter the dots are fp32 whatever ``precision`` says, so "ieee" is used; the
    result never goes below ``floor``, which is how a test keeps the tolerance it had on the CPU.
    """
    if precision not in DOT_INPUT_ROUNDING:
        raise ValueError(f"unknown dot precision {precision!r}; expected one of {tuple(DOT_INPUT_ROUNDING)}")
    if reduction < 1 or depth < 1:
        raise ValueError(f"reduction and depth must be >= 1, got {reduction} and {depth}")
    effective = precision if kernels_compiled() else "ieee"
    per_layer = DOT_INPUT_ROUNDING[effective] + _FP32_ROUNDOFF * math.sqrt(reduction)
    rtol = max(_SAFETY * depth * per_layer, floor)
    return {"atol": max(rtol * scale, floor), "rtol": rtol}
