"""``log_mean_exp(x, dim)``: ``logsumexp(x, dim) - log K`` (K = x.shape[dim]).

- :func:`log_mean_exp_reference`: plain torch, differentiable by autograd (the spec).
- :func:`log_mean_exp_op`: the operator ``torch.ops.misa_fast.log_mean_exp`` over the Triton kernels
  (``kernels/log_mean_exp_kernels.py``), with a fake implementation (compile, export), autograd
  (``torch.ops.misa_fast.log_mean_exp_backward``) and a vmap rule (one launch for a vmapped batch).
- :func:`log_mean_exp`: dispatcher (the operator for CUDA tensors, the reference elsewhere; see
  :mod:`misa_fast.ops.dispatch`).
- :class:`LogMeanExp`: ``nn.Module`` wrapper.

dtypes: fp32, fp16 and bf16 inputs are reduced in fp32; the result (and the gradient) come back in
the input dtype. fp64 inputs always use the reference. A row of only ``-inf`` gives ``-inf`` and a
zero gradient in both backends (``torch.logsumexp`` alone would give a NaN gradient there).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from misa_fast.ops.dispatch import kernel_runs_on, resolve_backend

__all__ = ["log_mean_exp", "log_mean_exp_reference", "logsumexp_safe", "log_mean_exp_op", "LogMeanExp"]

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


# ----------------------------------------------------------------------------------------------
# the registered operator: torch.ops.misa_fast.log_mean_exp
# ----------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with ``dim`` moved last, as (rows, K) with unit stride along K (what the kernels read)."""
    x2d = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    return x2d if x2d.stride(1) == 1 else x2d.contiguous()


def _out_shape(x: torch.Tensor, dim: int, keepdim: bool):
    shape = list(x.shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return shape


@torch.library.custom_op("misa_fast::log_mean_exp", mutates_args=())
def log_mean_exp_op(x: torch.Tensor, dim: int, keepdim: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log_mean_exp(x, dim, keepdim), lse)``: lse (fp32, the shape of the result) is the
    log-sum-exp the backward reads, so a low-precision result is never inverted. The Triton kernel
    where one runs (CUDA, or the interpreter), the torch reference elsewhere."""
    dim = dim % x.dim()
    K = x.shape[dim]
    if K == 0:
        raise ValueError("log_mean_exp over an empty dimension")
    shape = _out_shape(x, dim, keepdim)
    if kernel_runs_on(x) and x.dtype in _KERNEL_DTYPES:
        out, lse = _kernels().log_mean_exp_fwd(_rows(x, dim))
        return out.reshape(shape), lse.reshape(shape)
    lse = logsumexp_safe(x, dim, keepdim)
    return (lse - math.log(K)).to(x.dtype), lse.float()


@log_mean_exp_op.register_fake
def _(x, dim, keepdim):
    shape = _out_shape(x, dim % x.dim(), keepdim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("misa_fast::log_mean_exp_backward", mutates_args=())
def log_mean_exp_backward_op(grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, dim: int) -> torch.Tensor:
    """``softmax(x, dim) * grad`` (grad and lse shaped as the result, with or without keepdim's unit
    dimension: the row order is the same), in x's dtype."""
    dim = dim % x.dim()
    rows = lse.reshape(-1)
    if kernel_runs_on(x) and x.dtype in _KERNEL_DTYPES:
        x2d = _rows(x, dim)
        dx2d = _kernels().log_mean_exp_bwd(x2d, rows.contiguous(), grad.reshape(-1).float().contiguous())
        lead = x.movedim(dim, -1).shape[:-1]
        return dx2d.reshape(*lead, x2d.shape[1]).movedim(-1, dim).contiguous()
    xm = x.movedim(dim, -1)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    safe = torch.where(torch.isinf(rows), torch.full_like(rows, math.inf), rows)  # an all -inf row: zeros
    p = torch.exp(xm.to(work) - safe.reshape(xm.shape[:-1]).unsqueeze(-1).to(work))
    return (p * grad.reshape(xm.shape[:-1]).unsqueeze(-1).to(work)).to(x.dtype).movedim(-1, dim).contiguous()


@log_mean_exp_backward_op.register_fake
def _(grad, x, lse, dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _log_mean_exp_setup(ctx, inputs, output):
    x, dim, _keepdim = inputs
    _out, lse = output
    ctx.save_for_backward(x, lse)
    ctx.dim = dim
    ctx.mark_non_differentiable(lse)


def _log_mean_exp_backward(ctx, grad_out, _grad_lse):
    x, lse = ctx.saved_tensors
    return log_mean_exp_backward_op(grad_out, x, lse, ctx.dim), None, None


log_mean_exp_op.register_autograd(_log_mean_exp_backward, setup_context=_log_mean_exp_setup)


@log_mean_exp_op.register_vmap
def _(info, in_dims, x, dim, keepdim):
    # the member (or any vmapped) dimension is one more leading row dimension: one launch for all
    x_dim = in_dims[0]
    if x_dim is None:
        out = log_mean_exp_op(x, dim, keepdim)
        return out, (None, None)
    xb = x.movedim(x_dim, 0)
    out = log_mean_exp_op(xb, dim % (xb.dim() - 1) + 1, keepdim)
    return out, (0, 0)


def log_mean_exp(
    x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, backend: Optional[str] = None
) -> torch.Tensor:
    """``logsumexp(x, dim, keepdim) - log(x.shape[dim])``, fp32 accumulation, result in x's dtype.

    Differentiable (the gradient is ``softmax(x, dim) * grad``). ``backend``: ``"triton"``,
    ``"torch"`` or ``"auto"`` (default: the context / ``MISA_FAST_OPS`` / auto by device).
    """
    if x.dim() == 0:
        raise ValueError("log_mean_exp needs at least one dimension")
    if resolve_backend(backend, x, members=True) == "triton" and x.dtype in _KERNEL_DTYPES:
        return log_mean_exp_op(x, dim, keepdim)[0]
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
