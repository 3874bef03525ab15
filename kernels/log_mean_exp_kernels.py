"""Row-wise log-mean-exp: ``logsumexp(x, -1) - log K`` over the last dim of a (M, K) matrix.

Forward: one pass with an online max / rescaled sum per row, looping over K in BLOCK_K chunks, so
any K works (a single chunk for K <= BLOCK_K). Accumulation is fp32 whatever the input dtype. It
writes the output in the caller's dtype and the fp32 log-sum-exp per row (saved for the backward).
Backward: ``dx = softmax(x) * g = exp(x - lse) * g``, one more pass over x.

Non-finite rows: an all ``-inf`` row gives ``-inf`` and a zero gradient (never NaN); a ``+inf``
entry gives ``+inf``; NaN propagates.

Only triton and torch are imported here; the autograd wrapper and dispatch live in misa_fast.ops.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["log_mean_exp_fwd", "log_mean_exp_bwd", "launch_config"]


@triton.jit
def _lme_fwd_kernel(
    x_ptr, out_ptr, lse_ptr,
    M, K, stride_xm, log_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    row_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(row_base + k[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # Shift by 0 instead of an infinite max: keeps exp(-inf - -inf) = NaN out of all-(-inf) rows.
        m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    lse = m_safe + tl.log(s)  # s == 0 (all -inf) -> -inf
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(out_ptr + rows, (lse - log_k).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _lme_bwd_kernel(
    x_ptr, lse_ptr, g_ptr, dx_ptr,
    M, K, stride_xm, stride_dxm, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # All -inf row: lse = -inf; use +inf so that exp(-inf - inf) = 0 (zero gradient, no NaN).
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    g = tl.load(g_ptr + rows.to(tl.int64) * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=mask, other=float("-inf"))
        p = tl.exp(x.to(tl.float32) - lse[:, None])
        dx = p * g[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dxm + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def launch_config(M: int, K: int):
    """(BLOCK_M, BLOCK_K, num_warps) for an (M, K) problem.

    GPU: a tile of ~2K elements (BLOCK_K up to 2048, looped beyond), BLOCK_M shrunk for small M so
    that there are enough programs to spread over the SMs. Interpreter: few, large programs.
    """
    BLOCK_K = min(triton.next_power_of_2(max(K, 1)), 2048)
    if _interpreting():
        BLOCK_M = min(max(1, 8192 // BLOCK_K), triton.next_power_of_2(max(M, 1)))
        return BLOCK_M, BLOCK_K, 4
    BLOCK_M = max(1, 2048 // BLOCK_K)
    # Aim for >= ~256 programs when M allows it (an H100 has 132 SMs).
    BLOCK_M = max(1, min(BLOCK_M, triton.next_power_of_2(max(1, M // 256))))
    tile = BLOCK_M * BLOCK_K
    num_warps = max(1, min(8, tile // 256))  # ~8 elements per thread and pass
    return BLOCK_M, BLOCK_K, num_warps


def log_mean_exp_fwd(x2d: torch.Tensor, block_k: Optional[int] = None):
    """x2d: (M, K) with unit stride along K. Returns (out (M,) in x's dtype, lse (M,) fp32).
    ``block_k`` (a power of two) overrides the K tile, e.g. to exercise the K loop in tests."""
    assert x2d.dim() == 2 and x2d.stride(1) == 1
    M, K = x2d.shape
    out = torch.empty(M, device=x2d.device, dtype=x2d.dtype)
    lse = torch.empty(M, device=x2d.device, dtype=torch.float32)
    if M == 0:
        return out, lse
    BLOCK_M, BLOCK_K, num_warps = launch_config(M, K)
    if block_k is not None:
        BLOCK_K = block_k
    grid = (triton.cdiv(M, BLOCK_M),)
    _lme_fwd_kernel[grid](
        x2d, out, lse, M, K, x2d.stride(0), math.log(K),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    return out, lse


def log_mean_exp_bwd(x2d: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     block_k: Optional[int] = None) -> torch.Tensor:
    """Gradient of the row-wise log-mean-exp: softmax(x2d) * g[:, None], in x2d's dtype."""
    assert x2d.dim() == 2 and x2d.stride(1) == 1 and g.dim() == 1
    M, K = x2d.shape
    dx = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
    if M == 0:
        return dx
    BLOCK_M, BLOCK_K, num_warps = launch_config(M, K)
    if block_k is not None:
        BLOCK_K = block_k
    grid = (triton.cdiv(M, BLOCK_M),)
    _lme_bwd_kernel[grid](
        x2d, lse, g, dx, M, K, x2d.stride(0), dx.stride(0), g.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    return dx
