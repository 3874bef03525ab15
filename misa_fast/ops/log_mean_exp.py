"""``log_mean_exp(x, dim)``: ``logsumexp(x, dim) - log K`` (K = x.shape[dim]).

- :func:`log_mean_exp_reference`: plain torch, differentiable by autograd (the spec).
- :class:`LogMeanExpFunction`: autograd.Function over the Triton kernels (``kernels/log_mean_exp_kernels.py``).
- :func:`log_mean_exp`: dispatcher (Triton for CUDA tensors, the reference elsewhere; see
  :mod:`misa_fast.ops.dispatch`).
- :class:`LogMeanExp`: ``nn.Module`` wrapper.

dtypes: fp32, fp16 and bf16 inputs are reduced in fp32; the result (and the gradient) come back in
the input dtype. fp64 inputs always use the reference. A row of only ``-inf`` gives ``-inf`` and a
zero gradient in both backends (``torch.logsumexp`` alone would give a NaN gradient there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from misa_fast.ops.dispatch import resolve_backend

__all__ = ["log_mean_exp", "log_mean_exp_reference", "logsumexp_safe", "LogMeanExpFunction", "LogMeanExp"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from misa_fast.kernels import log_mean_exp_kernels as k

    return k


def log_mean_exp_reference(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Plain-torch log-mean-exp, fp32 accumulation for low-precision inputs.

    Written out (max shift, guarded log) rather than ``torch.logsumexp`` so that all ``-inf`` rows
    have a zero gradient instead of NaN; equal to ``torch.logsumexp(x, dim) - log K`` otherwise.
    """
    K = x.shape[dim]
    if K == 0:
        raise ValueError("log_mean_exp over an empty dimension")
    return (logsumexp_safe(x, dim, keepdim) - math.log(K)).to(x.dtype)


def logsumexp_safe(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``torch.logsumexp`` in fp32 (fp64 kept) whose gradient on an all ``-inf`` row is 0, not NaN."""
    xf = x if x.dtype == torch.float64 else x.float()
    m = xf.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s = torch.exp(xf - m).sum(dim=dim, keepdim=True)
    empty = s == 0  # all -inf (NaN rows stay NaN)
    lse = torch.where(empty, torch.full_like(s, -math.inf), torch.log(torch.where(empty, torch.ones_like(s), s)) + m)
    return lse if keepdim else lse.squeeze(dim)


class LogMeanExpFunction(torch.autograd.Function):
    """Triton forward (online max/sum) and backward (softmax * grad)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int = -1, keepdim: bool = False):
        k = _kernels()
        dim = dim % x.dim()
        K = x.shape[dim]
        if K == 0:
            raise ValueError("log_mean_exp over an empty dimension")
        xm = x.movedim(dim, -1)
        lead = xm.shape[:-1]
        x2d = xm.reshape(-1, K)
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        out, lse = k.log_mean_exp_fwd(x2d)
        ctx.save_for_backward(x2d, lse)
        ctx.dim, ctx.x_shape, ctx.lead = dim, x.shape, lead
        out = out.reshape(lead)
        if keepdim:
            out = out.unsqueeze(dim)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        k = _kernels()
        x2d, lse = ctx.saved_tensors
        g = grad_out.reshape(-1)  # keepdim's unit dim or not, the row order is the same
        dx2d = k.log_mean_exp_bwd(x2d, lse, g)
        dx = dx2d.reshape(*ctx.lead, x2d.shape[1]).movedim(-1, ctx.dim)
        return dx, None, None


def log_mean_exp(
    x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, backend: Optional[str] = None
) -> torch.Tensor:
    """``logsumexp(x, dim, keepdim) - log(x.shape[dim])``, fp32 accumulation, result in x's dtype.

    Differentiable (the gradient is ``softmax(x, dim) * grad``). ``backend``: ``"triton"``,
    ``"torch"`` or ``"auto"`` (default: the context / ``MISA_FAST_OPS`` / auto by device).
    """
    if x.dim() == 0:
        raise ValueError("log_mean_exp needs at least one dimension")
    if resolve_backend(backend, x) == "triton" and x.dtype in _KERNEL_DTYPES:
        return LogMeanExpFunction.apply(x, dim, keepdim)
    return log_mean_exp_reference(x, dim, keepdim)


class LogMeanExp(nn.Module):
    """``nn.Module`` form of :func:`log_mean_exp` over a fixed ``dim``."""

    def __init__(self, dim: int = -1, keepdim: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.dim, self.keepdim, self.backend = dim, keepdim, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_exp(x, self.dim, self.keepdim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"
