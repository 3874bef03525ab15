"""Fused HMC chain for the MISA target: the whole chain (all transitions, all leapfrog steps) in ONE
kernel launch.

Target per chain (``misa_fast.ops.hmc_reference.tilted_log_density``), in one of two spaces (constexpr SPLIT):

- post-tanh (SPLIT = 0, the official sampler): ``log pi(a|s) + min_e Q_e(s, a)`` in action space
  (tanh Jacobian included), ``-inf`` outside the open box (-1, 1)^A, unit-mass leapfrog;
- pre-tanh (SPLIT = 1): whitened positions z = (atanh(a) - mean) / std, target
  N(z; 0, I) exp(min_e Q_e(s, tanh(mean + std z))); the Gaussian part is integrated exactly (a
  rotation of (z, p) by the step size), only dQ/dz = dQ/da (1 - a^2) std kicks the momentum, and
  the recorded states are the pre-tanh actions u = mean + std z.

The gradient in the action is computed analytically in-kernel: the tanh-Gaussian part elementwise
from the per-state policy mean/std, the critic part by a forward and an explicit backward pass
through the MLP ``L0 (H0, S+A) -> act -> [M1 -> act -> [M2 -> act]] -> [Lc (HC, HI) -> act] -> Ll (1, .)``
(1 to 4 hidden layers, NMID = 0..2 middle layers; act: constexpr ACT, any of ACTIVATIONS), starting
from the critics' precomputed layer-1 state halves ``W0[:, :S] s + b0`` (E, B, H0); the argmin critic's
gradient is taken. Transitions follow ``misa_fast.ops.hmc_reference.run_chains`` step for step (L leapfrog steps,
the gradient at the current state cached across transitions, any post-tanh leapfrog position outside
the box rejects, NaN ratios give acceptance probability 0, step-size adaptation
``step *= exp(rate * (prob - target))`` clamped to [1e-4, max_step] during the first ADAPT_STEPS
transitions: 10 post-tanh, a quarter rotation per transition pre-tanh).

Grid (cdiv(C, BLOCK_C),): each program owns BLOCK_C chains and runs all T transitions of them
without leaving the kernel (T * L + 1 gradient evaluations). What lives where:

- chain state, in registers for the whole chain, held transposed as (dims, chains) tiles: position,
  cached log-density and gradient, step size, policy mean / 1/std / log-normaliser (loaded once);
- activations, transposed (features, chains), so that both big dots are a wgmma on sm_90 (mma.sync
  on sm_80) with the weight tile (M = 256 rows) from shared memory, the chains as N (BLOCK_C);
- the hidden weight Wc (HC x H0, 256 KiB fp32 per critic: too large for an SM) and a transposed
  copy Wc^T (a tf32 wgmma needs K-major tiles and cannot transpose in shared memory) stream from
  L2 by TMA in (256 x BLOCK_K) tiles, pipelined (num_stages), once per evaluation per program;
- per critic and evaluation, three loops over BLOCK_K-deep chunks keep every contraction short:
    F  z1 = sum_k Wc[:, k] act(z0_k), with z0_k = W0a_k x + sh_k recomputed per chunk (W0a the
       (H0, A) action half of layer 1, sh the precomputed state half: small loads, L1/L2 hits);
    B  dh0 = sum_n Wc^T[:, n] dz1_n, dz1 = wl * act'(z1 + bc), Q = wl . act(z1 + bc) + bl;
    G  dQ/dx = sum_k W0a_k^T (dh0_k * act'(z0_k));
  the (HC, BLOCK_C) accumulator z1 and (H0, BLOCK_C) dh0 live in registers; dz1, dh0 and Q make one
  round trip through a per-program scratch slice (64 KiB at BLOCK_C = 32, L1/L2-resident) so that
  the next loop can read them back in chunks (Triton cannot slice a register tensor) and so that Q
  reaches the chain state in a plain layout instead of the wgmma accumulator's (which replicated
  the (A, C) chain tiles across warps and spilled). CTA barriers order the scratch traffic.
- middle layers (3 or 4 hidden layers): F runs first into M1 (its pre-activation to scratch), M2
  and Lc read their inputs back from scratch in BLOCK_K chunks through TMA tiles of M_m; after B,
  ``dh = M_m^T (dh * act'(z_m))`` per middle layer (dz through scratch, TMA tiles of a host-made
  M_m^T), so that G sees d/dh0 as before.

Randomness: either supplied (momentum (T, C, A) standard normal, uniform (T, C), exactly what the
torch reference consumes: same decisions, same samples to float rounding), or in-kernel Philox
(``tl.randn`` / ``tl.rand``) keyed by one int64 seed read from device memory (drawn by the caller
from its torch.Generator: no host sync, CUDA-graph capturable) with 64-bit counters: the momentum
of (transition t, chain c, dim a) at counter ``(t*C + c)*A + a``, the uniform of (t, c) at
``2**48 + t*C + c``. The stream does not depend on the launch configuration (BLOCK_C, warps).

Precision (constexpr PREC, the two big hidden-layer dots per critic): 0 = fp32 ("ieee", FMA units),
1 = tf32 (hmc_sample's default), 3 = "tf32x3" (three tf32 MMAs per tile: ~fp32; the MISA agent's
default, config hmc_precision), 2 = bf16 operands (bf16 copies of Wc / Wc^T: half the L2 traffic).
The small action-side dots (layer-1 action half, dQ/da) use PREC0 (fp32, FMA units). Accumulation,
the chain state, momentum, log-densities and the Metropolis ratio are always fp32.

Only triton and torch are imported here; dispatch and the torch reference live in misa_fast.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["PRECISIONS", "ACTIVATIONS", "MAX_DEPTH", "MAX_ACTION_DIM", "MAX_HIDDEN", "MAX_HEAD", "MIN_STEP_SIZE",
           "MAX_STEP_SIZE", "unsupported_reason", "launch_config", "hmc_chains", "HMCKernelOutput"]

PRECISIONS = {"ieee": 0, "fp32": 0, "tf32": 1, "bf16": 2, "tf32x3": 3}
# the critics' hidden activation, constexpr ACT (with ALPHA: ELU's alpha / the leaky slope)
ACTIVATIONS = {"elu": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "tanh": 4, "gelu": 5, "gelu_tanh": 6}
MAX_ACTION_DIM = 32   # one (BLOCK_A, BLOCK_C) position tile
MAX_HIDDEN = 256      # the (H0, BLOCK_C) layer-1 activation and its gradient live on chip
MAX_HEAD = 256        # the (HC, BLOCK_C) last-hidden-layer pre-activation lives on chip
MAX_DEPTH = 4         # hidden layers: the first, up to two middle ones (through scratch), the last
# = misa_fast.ops.hmc_reference's (not imported: kernels never import misa_fast)
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 10.0


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    if PREC == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PREC == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32", out_dtype=tl.float32)
    elif PREC == 3:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3", out_dtype=tl.float32)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    return out


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): +-1, not NaN, where exp overflows or underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """The critics' hidden activation (constexpr ACT, see ACTIVATIONS; ALPHA: ELU's alpha / the leaky
    slope). Same formulas as kernels/sampled_q_kernels.py."""
    if ACT == 0:
        out = tl.where(z > 0, z, ALPHA * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    elif ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0, z, ALPHA * z)
    elif ACT == 3:
        out = z * tl.sigmoid(z)
    elif ACT == 4:
        out = _tanh(z)
    elif ACT == 5:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:  # 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
    return out


@triton.jit
def _dact(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """d act / dz at the pre-activation z (0 at z = 0 for the ReLU family, as torch's backward)."""
    if ACT == 0:
        out = tl.where(z > 0, 1.0, ALPHA * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 1:
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0, 1.0, ALPHA)
    elif ACT == 3:
        sg = tl.sigmoid(z)
        out = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 4:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACT == 5:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:  # s = sigmoid(2u): d (z s) / dz = s (1 + z (1 - s) 2u'), 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2)
        sg = tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
        out = sg * (1.0 + z * (1.0 - sg) * (1.5957691216057308 * (1.0 + 0.134145 * z * z)))
    return out


@triton.jit
def _layer1_chunk(x, st, c_ok, offs_k, k_ok, w0a_ptr, sh_e_ptr, s_w0o, s_w0i, s_shb, s_shh, A,
                  BLOCK_A: tl.constexpr, PREC0: tl.constexpr):
    """Rows offs_k of layer 1 for positions x (BLOCK_A, BLOCK_C): (W0a x + sh)[offs_k] (BK, BLOCK_C),
    and the (BK, BLOCK_A) action-half tile."""
    offs_a = tl.arange(0, BLOCK_A)
    w0a = tl.load(w0a_ptr + offs_k[:, None] * s_w0o + offs_a[None, :] * s_w0i,
                  mask=k_ok[:, None] & (offs_a < A)[None, :], other=0.0).to(tl.float32)
    sh = tl.load(sh_e_ptr + st[None, :] * s_shb + offs_k[:, None] * s_shh,
                 mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    return _mm(w0a, x, PREC0) + sh, w0a


@triton.jit
def _log_density(
    x, mean, inv_std, log_norm, st, c_ok, scratch,
    sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
    E, E0, S, A, H0, HC, H1, H2, HI,
    s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
    BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, PREC0: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
):
    """log p and d log p / dx at positions x (BLOCK_A, BLOCK_C) (dims, chains); -inf and a zero
    gradient for chains outside the open box. Padded dims / hidden units contribute exactly 0.

    Per critic, three loops over BLOCK_K-row chunks, so that every big dot has a short contraction
    (K = BLOCK_K) and its weight tile streams through shared memory:
      F: z1 = sum_k Wc[:, k] act(z0_k), z0_k = W0a_k x + sh_k recomputed per chunk (A FMAs/elem);
      B: dh0 = sum_n Wc^T[:, n] dz1_n, dz1 = wl * act'(z1 + bc) read back in chunks from the
         program's scratch (Wc^T is a host-made transposed copy: a tf32 wgmma wants K-major tiles);
      G: dQ/dx = sum_k W0a_k^T (dh0_k * act'(z0_k)), dh0 read back in chunks from scratch.
    """
    inside = tl.max(tl.abs(x), axis=0) < 1.0  # (BLOCK_C,)
    xa = tl.where(inside[None, :], x, 0.0)  # keep the arithmetic finite outside
    one_m = 1.0 - xa
    one_p = 1.0 + xa
    den = one_m * one_p  # 1 - a^2 = tanh'(u), precise near |a| = 1
    u = 0.5 * tl.log(one_p / one_m)  # atanh
    z = (u - mean) * inv_std
    log_pi = log_norm - tl.sum(0.5 * z * z + tl.log(den), axis=0)
    grad_pi = (2.0 * xa - z * inv_std) / den
    q_min, g_min = _critic_min(
        xa, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr,
        bm2_ptr, bc_ptr, wl_ptr, bl_ptr, E, E0, S, A, H0, HC, H1, H2, HI,
        s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
        BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA)
    log_p = tl.where(inside, log_pi + q_min, float("-inf"))
    grad = tl.where(inside[None, :], grad_pi + g_min, 0.0)
    return log_p, grad


@triton.jit
def _tilt_density(
    z, mean, std, st, c_ok, scratch,
    sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
    E, E0, S, A, H0, HC, H1, H2, HI,
    s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
    BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, PREC0: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
):
    """The pre-tanh chains' tilt (``misa_fast.ops.hmc_reference.tilted_log_density``, space "pre_tanh"): at whitened
    positions z (BLOCK_A, BLOCK_C), Q(tanh(mean + std z)) and its gradient dQ/da (1 - a^2) std in z.
    The N(z; 0, I) part is the integrator's (an exact rotation)."""
    e2u = tl.exp(2.0 * (mean + std * z))
    a = 1.0 - 2.0 / (e2u + 1.0)  # tanh; +-1 (not NaN) where exp overflows or underflows
    q_min, g_min = _critic_min(
        a, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr,
        bm2_ptr, bc_ptr, wl_ptr, bl_ptr, E, E0, S, A, H0, HC, H1, H2, HI,
        s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
        BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA)
    return q_min, g_min * ((1.0 - a) * (1.0 + a) * std)


@triton.jit
def _critic_min(
    xa, st, c_ok, scratch,
    sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
    E, E0, S, A, H0, HC, H1, H2, HI,
    s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
    BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, PREC0: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
):
    """min_e Q_e(s, a) at actions xa (BLOCK_A, BLOCK_C) and the argmin critic's dQ/da."""
    offs_c = tl.arange(0, BLOCK_C)
    q_min = tl.full([BLOCK_C], float("inf"), tl.float32)
    g_min = tl.zeros([BLOCK_A, BLOCK_C], tl.float32)
    for e in range(E):
        w0a_ptr = w0_ptr + e * s_w0e + S * s_w0i
        sh_e_ptr = sh_ptr + e * s_she
        ga = tl.zeros([BLOCK_A, BLOCK_C], tl.float32)
        if HAS_CHUNK:
            offs_n = tl.arange(0, BLOCK_HC)
            n_ok = offs_n < HC
            offs_h = tl.arange(0, BLOCK_H)
            mid_scratch = scratch + (BLOCK_HC + BLOCK_H + 1) * BLOCK_C  # z of middle layer m at (m - 1) tiles
            dz_scratch = mid_scratch + NMID * BLOCK_H * BLOCK_C
            if NMID >= 1:
                # F0: the first middle layer from layer-1 chunks; its pre-activation goes to scratch
                zm = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
                for k0 in range(0, H0, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < H0
                    z0, w0a = _layer1_chunk(xa, st, c_ok, offs_k, k_ok, w0a_ptr, sh_e_ptr, s_w0o, s_w0i, s_shb,
                                            s_shh, A, BLOCK_A, PREC0)
                    wm = tl.reshape(m1_desc.load([E0 + e, 0, k0]), [BLOCK_H, BLOCK_K])
                    zm += _mm(wm, _act(z0, ACT, ALPHA), PREC)
                zm += tl.load(bm1_ptr + e * s_bm1e + offs_h, mask=offs_h < H1, other=0.0).to(tl.float32)[:, None]
                tl.debug_barrier()  # earlier readers of this scratch are done
                tl.store(mid_scratch + offs_h[:, None] * BLOCK_C + offs_c[None, :], zm)
                tl.debug_barrier()
            if NMID >= 2:
                # F1: the second middle layer, its input read back in chunks
                zm = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
                for k0 in range(0, H1, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    hk = _act(tl.load(mid_scratch + offs_k[:, None] * BLOCK_C + offs_c[None, :]), ACT, ALPHA)
                    wm = tl.reshape(m2_desc.load([E0 + e, 0, k0]), [BLOCK_H, BLOCK_K])
                    zm += _mm(wm, hk, PREC)
                zm += tl.load(bm2_ptr + e * s_bm2e + offs_h, mask=offs_h < H2, other=0.0).to(tl.float32)[:, None]
                tl.store(mid_scratch + BLOCK_H * BLOCK_C + offs_h[:, None] * BLOCK_C + offs_c[None, :], zm)
                tl.debug_barrier()
            z1 = tl.zeros([BLOCK_HC, BLOCK_C], tl.float32)
            if NMID == 0:
                for k0 in range(0, H0, BLOCK_K):  # F
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < H0
                    z0, w0a = _layer1_chunk(xa, st, c_ok, offs_k, k_ok, w0a_ptr, sh_e_ptr, s_w0o, s_w0i, s_shb,
                                            s_shh, A, BLOCK_A, PREC0)
                    h0 = _act(z0, ACT, ALPHA)
                    wc = tl.reshape(wc_desc.load([E0 + e, 0, k0]), [BLOCK_HC, BLOCK_K])  # TMA, zero-filled outside
                    z1 += _mm(wc, h0, PREC)
            else:
                top = mid_scratch + (NMID - 1) * BLOCK_H * BLOCK_C  # the last middle layer's z
                for k0 in range(0, HI, BLOCK_K):  # F, the input read back in chunks
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    hk = _act(tl.load(top + offs_k[:, None] * BLOCK_C + offs_c[None, :]), ACT, ALPHA)
                    wc = tl.reshape(wc_desc.load([E0 + e, 0, k0]), [BLOCK_HC, BLOCK_K])
                    z1 += _mm(wc, hk, PREC)
            bc = tl.load(bc_ptr + e * s_bce + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            wl = tl.load(wl_ptr + e * s_wle + offs_n * s_wli, mask=n_ok, other=0.0).to(tl.float32)
            z1 += bc[:, None]
            slope1 = _dact(z1, ACT, ALPHA)
            q = tl.sum(_act(z1, ACT, ALPHA) * wl[:, None], axis=0)
            tl.store(scratch + offs_n[:, None] * BLOCK_C + offs_c[None, :], slope1 * wl[:, None])
            tl.debug_barrier()
            dh0 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
            for n0 in range(0, HC, BLOCK_K):  # B
                offs_j = n0 + tl.arange(0, BLOCK_K)  # < BLOCK_HC: every scratch row was written
                dz1 = tl.load(scratch + offs_j[:, None] * BLOCK_C + offs_c[None, :])
                wct = tl.reshape(wct_desc.load([E0 + e, 0, n0]), [BLOCK_H, BLOCK_K])
                dh0 += _mm(wct, dz1, PREC)
            if NMID >= 2:  # back through the second middle layer
                zm = tl.load(mid_scratch + BLOCK_H * BLOCK_C + offs_h[:, None] * BLOCK_C + offs_c[None, :])
                tl.store(dz_scratch + offs_h[:, None] * BLOCK_C + offs_c[None, :], dh0 * _dact(zm, ACT, ALPHA))
                tl.debug_barrier()
                dh0 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
                for n0 in range(0, H2, BLOCK_K):
                    offs_j = n0 + tl.arange(0, BLOCK_K)
                    dzm = tl.load(dz_scratch + offs_j[:, None] * BLOCK_C + offs_c[None, :])
                    wmt = tl.reshape(m2t_desc.load([E0 + e, 0, n0]), [BLOCK_H, BLOCK_K])
                    dh0 += _mm(wmt, dzm, PREC)
                tl.debug_barrier()
            if NMID >= 1:  # back through the first middle layer
                zm = tl.load(mid_scratch + offs_h[:, None] * BLOCK_C + offs_c[None, :])
                tl.store(dz_scratch + offs_h[:, None] * BLOCK_C + offs_c[None, :], dh0 * _dact(zm, ACT, ALPHA))
                tl.debug_barrier()
                dh0 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
                for n0 in range(0, H1, BLOCK_K):
                    offs_j = n0 + tl.arange(0, BLOCK_K)
                    dzm = tl.load(dz_scratch + offs_j[:, None] * BLOCK_C + offs_c[None, :])
                    wmt = tl.reshape(m1t_desc.load([E0 + e, 0, n0]), [BLOCK_H, BLOCK_K])
                    dh0 += _mm(wmt, dzm, PREC)
            dh0_scratch = scratch + BLOCK_HC * BLOCK_C
            q_scratch = dh0_scratch + BLOCK_H * BLOCK_C
            tl.store(dh0_scratch + offs_h[:, None] * BLOCK_C + offs_c[None, :], dh0)
            # Q also takes the round trip: read back, it carries a plain blocked layout into the chain
            # state instead of the wgmma accumulator's (which would replicate every (A, C) tile of
            # the chain across the 8 warps: ~8x the registers)
            tl.store(q_scratch + offs_c, q)
            tl.debug_barrier()
            q = tl.load(q_scratch + offs_c)
            for k0 in range(0, H0, BLOCK_K):  # G
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H0
                z0, w0a = _layer1_chunk(xa, st, c_ok, offs_k, k_ok, w0a_ptr, sh_e_ptr, s_w0o, s_w0i, s_shb, s_shh,
                                        A, BLOCK_A, PREC0)
                dh0k = tl.load(dh0_scratch + offs_k[:, None] * BLOCK_C + offs_c[None, :])
                ga += _mm(tl.trans(w0a), dh0k * _dact(z0, ACT, ALPHA), PREC0)
        else:
            q = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, H0, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H0
                z0, w0a = _layer1_chunk(xa, st, c_ok, offs_k, k_ok, w0a_ptr, sh_e_ptr, s_w0o, s_w0i, s_shb, s_shh,
                                        A, BLOCK_A, PREC0)
                slope0 = _dact(z0, ACT, ALPHA)
                wl = tl.load(wl_ptr + e * s_wle + offs_k * s_wli, mask=k_ok, other=0.0).to(tl.float32)
                q += tl.sum(_act(z0, ACT, ALPHA) * wl[:, None], axis=0)
                ga += _mm(tl.trans(w0a), slope0 * wl[:, None], PREC0)
        q += tl.load(bl_ptr + e * s_ble).to(tl.float32)
        better = q < q_min  # strict: the first critic wins ties, like torch.min
        q_min = tl.where(better, q, q_min)
        g_min = tl.where(better[None, :], ga, g_min)
    return q_min, g_min


# ----------------------------------------------------------------------------------------------
# the chain
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chain_density(
    x, mean, std, inv_std, log_norm, st, c_ok, scratch,
    sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
    E, E0, S, A, H0, HC, H1, H2, HI,
    s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
    BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, PREC0: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """The chain's (log density, gradient): post-tanh log pi + Q, or the pre-tanh tilt (SPLIT)."""
    if SPLIT:
        log_p, grad = _tilt_density(
            x, mean, std, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc,
            m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
            E, E0, S, A, H0, HC, H1, H2, HI, s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle,
            s_wli, s_ble,
            BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA)
    else:
        log_p, grad = _log_density(
            x, mean, inv_std, log_norm, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc,
            m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr,
            bl_ptr, E, E0, S, A, H0, HC, H1, H2, HI, s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e,
            s_wle, s_wli, s_ble,
            BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA)
    return log_p, grad


@triton.jit
def _hmc_kernel(
    mean_ptr, std_ptr, init_ptr, step_ptr, mom_ptr, unif_ptr, seed_ptr,
    sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr, bl_ptr,
    out_ptr, acc_ptr, prob_ptr, step_out_ptr, scratch_ptr,
    C, T, A, S, E, H0, HC, H1, H2, HI, REPEATS, LEAPFROG, RECORD_FROM, ADAPT_STEPS,
    target_accept, adapt_rate, init_clip, max_step,
    s_mb, s_ma, s_sb, s_sa, s_ib, s_ia,
    s_mt, s_mc, s_mk, s_ut, s_uc,
    s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e, s_wle, s_wli, s_ble,
    s_oc, s_or, s_oa,
    s_m_mean, s_m_std, s_m_init, s_m_mom, s_m_unif, s_m_sh, s_m_w0, s_m_bc, s_m_bm1, s_m_bm2, s_m_wl, s_m_bl, s_m_out,
    BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, PREC0: tl.constexpr,
    ACT: tl.constexpr, ALPHA: tl.constexpr, RNG: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    # Member stacking (several seeds in one launch): grid axis 1 is the member; every member-stacked
    # tensor moves to its member's block (s_m_*: member strides, 0 for one member), and the TMA
    # descriptors of the (M * E, ...) weights read rows E0 + e.
    member = tl.program_id(1).to(tl.int64)
    E0 = tl.program_id(1) * E
    mean_ptr += member * s_m_mean
    std_ptr += member * s_m_std
    init_ptr += member * s_m_init
    mom_ptr += member * s_m_mom
    unif_ptr += member * s_m_unif
    sh_ptr += member * s_m_sh
    w0_ptr += member * s_m_w0
    bc_ptr += member * s_m_bc
    bm1_ptr += member * s_m_bm1
    bm2_ptr += member * s_m_bm2
    wl_ptr += member * s_m_wl
    bl_ptr += member * s_m_bl
    out_ptr += member * s_m_out
    step_ptr += member * C
    step_out_ptr += member * C
    acc_ptr += member * T * C
    prob_ptr += member * T * C
    # this program's scratch: dz1 (BLOCK_HC, BLOCK_C), dh0 (BLOCK_H, BLOCK_C), q (BLOCK_C,), then with
    # middle layers their pre-activations and one dz tile (each (BLOCK_H, BLOCK_C)), fp32
    program = member * tl.num_programs(0) + pid
    scratch = scratch_ptr + program * ((BLOCK_HC + BLOCK_H + 1 + (NMID + 1) * BLOCK_H) * BLOCK_C)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    a_ok = offs_a < A
    m2 = a_ok[:, None] & c_ok[None, :]
    st = (offs_c // REPEATS).to(tl.int64)  # chain b*REPEATS + k belongs to state b

    # per-chain constants of the tanh-Gaussian policy (padding: mean 0, std 1 -> contributes 0)
    mean = tl.load(mean_ptr + st[None, :] * s_mb + offs_a[:, None] * s_ma, mask=m2, other=0.0).to(tl.float32)
    std = tl.load(std_ptr + st[None, :] * s_sb + offs_a[:, None] * s_sa, mask=m2, other=1.0).to(tl.float32)
    inv_std = 1.0 / std
    log_norm = -tl.sum(tl.where(a_ok[:, None], tl.log(std) + 0.9189385332046727, 0.0), axis=0)

    x = tl.load(init_ptr + st[None, :] * s_ib + offs_a[:, None] * s_ia, mask=m2, other=0.0).to(tl.float32)
    x = tl.minimum(tl.maximum(x, -init_clip), init_clip)
    if SPLIT:  # whitened pre-tanh position z = (atanh(a) - mean) / std
        x = (0.5 * tl.log((1.0 + x) / (1.0 - x)) - mean) * inv_std
    step = tl.load(step_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)

    log_p, grad = _chain_density(
        x, mean, std, inv_std, log_norm, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc, m1t_desc,
        m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr, wl_ptr,
        bl_ptr, E, E0, S, A, H0, HC, H1, H2, HI, s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce, s_bm1e, s_bm2e,
        s_wle, s_wli, s_ble,
        BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA, SPLIT)
    if RNG:
        seed = tl.load(seed_ptr)

    for t in range(T):
        tc = offs_c64 + (t * C).to(tl.int64) + member * T * C  # (BLOCK_C,) counter of (member, t, c)
        if RNG:
            p0 = tl.where(m2, tl.randn(seed, tc[None, :] * A + offs_a[:, None]), 0.0)
            unif = tl.rand(seed, tc + 281474976710656)  # 2**48: the uniform stream
        else:
            p0 = tl.load(mom_ptr + t * s_mt + offs_c64[None, :] * s_mc + offs_a[:, None] * s_mk,
                         mask=m2, other=0.0).to(tl.float32)
            unif = tl.load(unif_ptr + t * s_ut + offs_c64 * s_uc, mask=c_ok, other=1.0).to(tl.float32)
        half = 0.5 * step
        if SPLIT:  # the exact Gaussian flow: a rotation of (z, p) by the step size
            cos = tl.cos(step)[None, :]
            sin = tl.sin(step)[None, :]
        # leapfrog: half momentum step, L x (full position step, momentum step), the last one halved
        p = p0 + half[None, :] * grad
        x_new = x
        lp_new = log_p
        g_new = grad
        ok = c_ok
        for leap in range(LEAPFROG):
            if SPLIT:
                x_rot = x_new * cos + p * sin
                p = p * cos - x_new * sin
                x_new = x_rot
            else:
                x_new = x_new + step[None, :] * p
            lp_new, g_new = _chain_density(
                x_new, mean, std, inv_std, log_norm, st, c_ok, scratch, sh_ptr, w0_ptr, wc_desc, wct_desc, m1_desc,
                m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc_ptr,
                wl_ptr, bl_ptr, E, E0, S, A, H0, HC, H1, H2, HI, s_she, s_shb, s_shh, s_w0e, s_w0o, s_w0i, s_bce,
                s_bm1e, s_bm2e, s_wle, s_wli,
                s_ble, BLOCK_C, BLOCK_A, BLOCK_H, BLOCK_HC, BLOCK_K, HAS_CHUNK, NMID, PREC, PREC0, ACT, ALPHA, SPLIT)
            ok = ok & (tl.abs(lp_new) < float("inf"))  # finite (NaN compares false too)
            coef = tl.where(leap == LEAPFROG - 1, half, step)
            p = p + coef[None, :] * g_new
        # log Metropolis ratio: -H(x', p') + H(x, p0), H = -log p + |p|^2 / 2 (+ |z|^2 / 2 if SPLIT)
        kinetic_new = 0.5 * tl.sum(p * p, axis=0)
        kinetic = 0.5 * tl.sum(p0 * p0, axis=0)
        if SPLIT:
            kinetic_new += 0.5 * tl.sum(x_new * x_new, axis=0)
            kinetic += 0.5 * tl.sum(x * x, axis=0)
        log_ratio = (lp_new - kinetic_new) - (log_p - kinetic)
        prob = tl.exp(tl.minimum(log_ratio, 0.0))
        prob = tl.where(ok & (log_ratio == log_ratio), prob, 0.0)  # NaN ratio or off support -> 0
        accept = unif < prob
        x = tl.where(accept[None, :], x_new, x)
        log_p = tl.where(accept, lp_new, log_p)
        grad = tl.where(accept[None, :], g_new, grad)
        adapted = step * tl.exp(adapt_rate * (prob - target_accept))
        adapted = tl.minimum(tl.maximum(adapted, 1e-4), max_step)
        step = tl.where(t < ADAPT_STEPS, adapted, step)
        tl.store(acc_ptr + t * C + offs_c64, accept.to(tl.uint8), mask=c_ok)
        tl.store(prob_ptr + t * C + offs_c64, prob, mask=c_ok)
        r = t - RECORD_FROM
        if SPLIT:  # record the pre-tanh action u = mean + std z
            rec = mean + std * x
        else:
            rec = x
        tl.store(out_ptr + offs_c64[None, :] * s_oc + r * s_or + offs_a[:, None] * s_oa, rec,
                 mask=m2 & (r >= 0))
    tl.store(step_out_ptr + offs_c, step, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unsupported_reason(S: int, A: int, shapes: Sequence[Tuple[int, ...]]) -> Optional[str]:
    """Why the kernel cannot run critics with these stacked weight shapes ((E, out, in) per layer;
    None when it can)."""
    if not 2 <= len(shapes) <= MAX_DEPTH + 1:
        return f"the fused HMC kernel takes critics with 1 to {MAX_DEPTH} hidden layers, got {len(shapes) - 1}"
    if any(len(s) != 3 for s in shapes):
        return "critic weights must be stacked (E, out, in)"
    E, H0, SA = shapes[0]
    if SA != S + A or S < 0:
        return f"first layer takes {SA} inputs, state half + action dims do not match"
    for i in range(1, len(shapes)):
        if shapes[i][2] != shapes[i - 1][1]:
            return f"layer {i} takes {shapes[i][2]} inputs, layer {i - 1} gives {shapes[i - 1][1]}"
    for i, s in enumerate(shapes[:-1]):
        if s[1] > (MAX_HEAD if i == len(shapes) - 2 and i > 0 else MAX_HIDDEN):
            return f"hidden width {s[1]} (layer {i}) > {MAX_HIDDEN}"
    if shapes[-1][1] != 1:
        return f"the last layer must map {shapes[-2][1]} features to 1 output, got {shapes[-1][1:]}"
    if A < 1 or A > MAX_ACTION_DIM:
        return f"action dim {A} not in [1, {MAX_ACTION_DIM}]"
    if E < 1:
        return "no critics"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def launch_config(C: int, A: int, H0: int, HC: int, has_chunk: bool = True, precision: int = 1,
                  device: Optional[torch.device] = None, block_c: Optional[int] = None):
    """(constexpr block sizes, num_warps, num_stages) for C chains.

    Chosen from sm_90 compiles (``python devtools/kernel_resources.py``: registers, spills, shared
    memory) as of 2026-12-03, not from GPU timings. Each gradient evaluation streams Wc and Wc^T
    (2 x 256 KiB fp32 per 256x256 critic) from L2 through shared memory once per program, whatever
    BLOCK_C, so fewer chains per program buy SM parallelism but no shorter evaluation:
    BLOCK_C = 16 where chains are few (paper-faithful, B = 256 chains: 16 programs, 3 TMA stages),
    BLOCK_C = 32 once there are enough chains to fill every SM anyway (parallel mode, B*K = 12,800
    chains: 400 programs, 2 stages). On sm_90, 2x256 critics, A <= 16, supplied noise
    (bench/results/kernels-aot-2026-12-02.md): faithful tf32 219 registers, no spill, 103 KiB
    shared; faithful tf32x3 (the agent's default) 240 registers, no spill, 73 KiB; parallel tf32
    250 registers, no spill, 74 KiB. In-kernel RNG adds ~32 spill bytes, A > 16 up to 80. On sm_80
    these tiles spill 0.5-2 KiB per thread in every variant (no wgmma: the operands go through
    registers): an A100 needs its own configuration. BLOCK_K = 32: the contraction depth of every
    big dot, a 32 KiB fp32 weight tile per TMA copy. 8 warps: two warpgroups split the 256 rows of
    each wgmma. Critics with middle layers (3 or 4 hidden layers) take the same tiles, H0 standing
    for the widest of the first and middle widths; every hidden-to-hidden dot stays a wgmma on sm_90,
    with at most 32 B of spills in the configurations compiled on 2026-12-03 (antmaze's 3x256 in
    every mode / precision / noise source pairwise, 4x256 faithful tf32x3); sm_80 spills 1.2-1.8 KiB
    there. Re-tune with timings on the GPU (``block_c`` overrides the chains per program).
    """
    BLOCK_A = max(16, triton.next_power_of_2(A))
    BLOCK_H = max(16, triton.next_power_of_2(H0))
    BLOCK_HC = max(16, triton.next_power_of_2(HC)) if has_chunk else 16
    if block_c is None:
        if _interpreting():
            block_c = 16
        else:
            sms = _num_sms(device) if device is not None else 132
            # fp32 ("ieee") dots run on FMA units and spill at 32 chains: 16 there
            block_c = 32 if precision != 0 and triton.cdiv(C, 32) >= sms else 16
    BLOCK_K = 32 if min(BLOCK_H, BLOCK_HC) >= 32 else 16
    num_warps = 8 if max(BLOCK_H, BLOCK_HC) >= 128 else 4
    num_stages = 3 if block_c <= 16 else 2
    blocks = dict(BLOCK_C=block_c, BLOCK_A=BLOCK_A, BLOCK_H=BLOCK_H, BLOCK_HC=BLOCK_HC, BLOCK_K=BLOCK_K)
    return blocks, num_warps, num_stages


def _weight_descriptors(wc: Optional[torch.Tensor], E: int, blocks, precision: int, dev, rows: Optional[int] = None):
    """TMA descriptors of the hidden weight Wc (E, HC, H0) and of its transpose (E, H0, HC), in the
    dot's operand dtype (fp32, or bf16 for precision 2). Tiles of (1, BLOCK_HC | BLOCK_H, BLOCK_K);
    rows and columns outside the tensor read as zero. TMA wants 16-byte row strides, so an odd
    width is zero-padded (a copy; the transposed copy is made anyway: a tf32 wgmma needs K-major
    tiles and cannot transpose one in shared memory). A middle layer W (E, H_m, H_m-1) of a 3- or
    4-hidden-layer critic takes ``rows`` = BLOCK_H: tiles of (1, BLOCK_H, BLOCK_K) both ways."""
    bk = blocks["BLOCK_K"]
    if wc is None:  # one hidden layer: unused, any valid descriptor
        dummy = torch.zeros((1, 16, bk), device=dev, dtype=torch.float32)
        return (TensorDescriptor.from_tensor(dummy, [1, 16, bk]), TensorDescriptor.from_tensor(dummy, [1, 16, bk]))
    dtype = torch.bfloat16 if precision == 2 else torch.float32
    align = 16 // torch.empty((), dtype=dtype).element_size()

    def padded(t):  # (E, R, K) contiguous, K a multiple of `align`
        r, k = t.shape[1], t.shape[2]
        kp = -(-k // align) * align
        if kp == k:
            t = t.to(dtype).contiguous()
            return t if t.data_ptr() % 16 == 0 else t.clone()  # TMA also wants a 16-byte aligned base
        out = torch.zeros((E, r, kp), device=dev, dtype=dtype)
        out[:, :, :k] = t
        return out

    w = padded(wc)
    wt = padded(wc.transpose(1, 2))
    return (TensorDescriptor.from_tensor(w, [1, blocks["BLOCK_HC"] if rows is None else rows, bk]),
            TensorDescriptor.from_tensor(wt, [1, blocks["BLOCK_H"], bk]))


class HMCKernelOutput(NamedTuple):
    states: torch.Tensor  # (C, R, A) the states after transitions RECORD_FROM .. T-1, fp32 (pre-tanh u if split)
    accepted: torch.Tensor  # (T, C) bool
    accept_prob: torch.Tensor  # (T, C) fp32
    step_size: torch.Tensor  # (C,) fp32


def hmc_chains(
    mean: torch.Tensor, std: torch.Tensor, init: torch.Tensor,
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], state_half: torch.Tensor,
    step_size: torch.Tensor, *, transitions: int, leapfrog_steps: int, repeats: int = 1,
    record_from: int = 0, adapt_steps: int = 0, target_accept: float = 0.65, adapt_rate: float = 0.5,
    init_clip: float = 0.999, momentum: Optional[torch.Tensor] = None, uniform: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None, precision: int = 1, action_precision: int = 0,
    split: bool = False, max_step: float = MAX_STEP_SIZE,
    block_c: Optional[int] = None, num_warps: Optional[int] = None,
    activation: Tuple[int, float] = (0, 1.0),
) -> HMCKernelOutput:
    """Run C = B * repeats chains (chain b*repeats + k starts at init[b] and uses state b's policy and
    state half) for ``transitions`` transitions in one launch.

    mean, std, init: (B, A) (any strides); layers: stacked critic layers [(W (E, out, in), b (E, out))]
    (layer-1 bias unused: it is inside state_half (E, B, H0)); step_size (C,) fp32. Noise: either
    momentum (T, C, A) and uniform (T, C), or seed (a 1-element int64 tensor on the device) for the
    in-kernel Philox stream. ``split``: pre-tanh chains (whitened positions, exact Gaussian rotation,
    the recorded states are the pre-tanh actions u); adapted step sizes stay in [1e-4, max_step].
    ``activation``: (ACTIVATIONS code, ELU alpha / leaky slope) of the critics' hidden layers.

    With a leading member dimension M on every argument (``mean`` (M, B, A), ...) it runs the M x C
    chains of M independent members (seeds) in one launch, each reading its own member's critics
    and policy statistics; the outputs then have that dimension too."""
    # Several members (seeds) in one launch: every argument then has a leading member dimension M
    # (layers (M, E, out, in), state_half (M, E, B, H0), step_size (M, C), noise (M, T, C, ...)),
    # and so has every output. Member 0's views give the shapes and the per-member strides; the
    # pointers are those of member 0, which the kernel moves by the member strides.
    members = mean.dim() == 3
    M = mean.shape[0] if members else 1

    def first(t):
        return t[0] if members else t

    def mstride(t):
        return t.stride(0) if members else 0

    B, A = first(init).shape
    C = B * repeats
    T = transitions
    dev = init.device
    E, H0, SA = first(layers[0][0]).shape
    S = SA - A
    has_chunk = len(layers) >= 3
    w0 = layers[0][0]
    lead = (M,) if members else ()

    def bias(b, n):
        if b is None:
            return torch.zeros(lead + (E, n), device=dev, dtype=torch.float32)
        return b if b.stride(-1) == 1 else b.contiguous()

    def flat(w):  # (M, E, R, K) -> (M * E, R, K) for the TMA descriptors
        return w.reshape(M * E, *w.shape[-2:]) if members else w

    if has_chunk:
        wc, bc = layers[-2]
        HC, HI = wc.shape[-2], wc.shape[-1]
        bc = bias(bc, HC)
    else:
        wc, bc, HC, HI = None, w0.new_zeros(lead + (E, 1)), H0, H0
    mids = [(w, bias(b, w.shape[-2])) for w, b in layers[1:-2]]  # middle hidden layers (3 or 4 hidden)
    n_mid = len(mids)
    H1 = mids[0][0].shape[-2] if n_mid >= 1 else H0
    H2 = mids[1][0].shape[-2] if n_mid >= 2 else H0
    bm1_ptr = mids[0][1] if n_mid >= 1 else bc
    bm2_ptr = mids[1][1] if n_mid >= 2 else bc
    wl, bl = layers[-1]
    if bl is None:
        bl = torch.zeros(lead + (E, 1), device=dev, dtype=torch.float32)
    R = max(0, T - record_from)
    states = torch.empty(lead + (C, R, A), device=dev, dtype=torch.float32)
    accepted = torch.empty(lead + (T, C), device=dev, dtype=torch.uint8)
    prob = torch.empty(lead + (T, C), device=dev, dtype=torch.float32)
    step_out = torch.empty(lead + (C,), device=dev, dtype=torch.float32)
    step_size = step_size.contiguous()
    rng = momentum is None
    if rng:
        if seed is None:
            raise ValueError("hmc_chains needs either momentum/uniform noise or a seed tensor")
        mom, unif = prob, prob  # unused pointers
        s_mom, s_unif = (0, 0, 0), (0, 0)
    else:
        mom, unif = momentum, uniform
        s_mom, s_unif = tuple(first(momentum).stride()), tuple(first(uniform).stride())
        seed = accepted  # unused pointer
    if C == 0 or T == 0:
        step_out.copy_(step_size)
        return HMCKernelOutput(states, accepted.view(torch.bool), prob, step_out)
    blocks, nw, ns = launch_config(C, A, max(H0, H1, H2), HC, has_chunk, precision, dev, block_c)
    if num_warps is not None:
        nw = num_warps
    wc_desc, wct_desc = _weight_descriptors(None if wc is None else flat(wc), M * E, blocks, precision, dev)
    m1_desc, m1t_desc = _weight_descriptors(flat(mids[0][0]) if n_mid >= 1 else None, M * E, blocks, precision, dev,
                                            blocks["BLOCK_H"])
    m2_desc, m2t_desc = _weight_descriptors(flat(mids[1][0]) if n_mid >= 2 else None, M * E, blocks, precision, dev,
                                            blocks["BLOCK_H"])
    grid = (triton.cdiv(C, blocks["BLOCK_C"]), M)
    per_program = ((blocks["BLOCK_HC"] + blocks["BLOCK_H"] + 1 + (n_mid + 1) * blocks["BLOCK_H"]) * blocks["BLOCK_C"]
                   if has_chunk else 1)
    scratch = torch.empty((grid[0] * M * per_program,), device=dev, dtype=torch.float32)
    mean1, std1, init1, sh1, w01 = first(mean), first(std), first(init), first(state_half), first(w0)
    bc1, bm11, bm21, wl1, bl1 = first(bc), first(bm1_ptr), first(bm2_ptr), first(wl), first(bl)
    states1 = first(states)
    mom_m = 0 if rng else mstride(momentum)
    unif_m = 0 if rng else mstride(uniform)
    _hmc_kernel[grid](
        mean, std, init, step_size, mom, unif, seed,
        state_half, w0, wc_desc, wct_desc, m1_desc, m1t_desc, m2_desc, m2t_desc, bm1_ptr, bm2_ptr, bc, wl, bl,
        states, accepted, prob, step_out, scratch,
        C, T, A, S, E, H0, HC, H1, H2, HI, repeats, leapfrog_steps, record_from, adapt_steps,
        float(target_accept), float(adapt_rate), float(init_clip), float(max_step),
        mean1.stride(0), mean1.stride(1), std1.stride(0), std1.stride(1), init1.stride(0), init1.stride(1),
        *s_mom, *s_unif,
        sh1.stride(0), sh1.stride(1), sh1.stride(2),
        w01.stride(0), w01.stride(1), w01.stride(2), bc1.stride(0), bm11.stride(0), bm21.stride(0),
        wl1.stride(0), wl1.stride(2), bl1.stride(0),
        states1.stride(0), states1.stride(1), states1.stride(2),
        mstride(mean), mstride(std), mstride(init), mom_m, unif_m, mstride(state_half), mstride(w0), mstride(bc),
        mstride(bm1_ptr), mstride(bm2_ptr), mstride(wl), mstride(bl), mstride(states),
        **blocks, HAS_CHUNK=has_chunk, NMID=n_mid, PREC=precision, PREC0=action_precision, RNG=rng, SPLIT=bool(split),
        ACT=int(activation[0]), ALPHA=float(activation[1]),
        num_warps=nw, num_stages=ns,
    )
    return HMCKernelOutput(states, accepted.view(torch.bool), prob, step_out)
