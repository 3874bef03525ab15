"""Fused sampled-Q log-sum-exp for one critic: ``lse_b = log sum_k exp(Q(s_b, a_bk) + logw_bk)``.

The critic is an MLP on ``concat(s, a)`` with one or two hidden ELU layers:
``L0 (H0, S+A) -> ELU -> [Lc (HC, H0) -> ELU] -> Ll (1, HC or H0)`` (MISA/CQL: H0 = HC = 256).

Orientation: activations are held transposed, (features, samples) = (BLOCK_H, BLOCK_K), so each
layer is ``W @ h^T`` with the weight tile on the left and the computed activation on the right.
On sm_90 most dots are wgmma, but ``Wc @ h^T`` in the forward and the trunk compiles to mma.sync
(register operands); sm_80 has mma.sync only (bench/results/kernels-aot-2026-12-02.md, per dot).

Forward (``_sq_fwd_kernel``, grid (B,), one program per state, looping over K in BLOCK_K blocks):
the state half of L0, ``W0[:, :S] s + b0``, is computed once per state (an (H0, S) multiply-reduce)
and broadcast over the samples; the action half is an (H0, A) x (A, BLOCK_K) dot. Lc is streamed in
BLOCK_C-row chunks whose ELU output is contracted at once with the matching slice of Ll, so neither
(K, H0) nor (K, HC) activations ever leave the SM. An online max / rescaled sum over the K blocks
gives the log-sum-exp. Writes the per-sample Q (B, K) (the backward reads it), lse (B,) and
out = lse - norm.

Backward: ``dL/dq_bk = g_b * softmax_k(q_b + logw_b)`` (from the saved Q and lse), pushed through
the MLP by recomputation, in two kernels:

- ``_sq_bwd_head_kernel``, grid (cdiv(HC, BLOCK_C), G): program (j, g) recomputes L0 for the states
  of group g and row chunk j of Lc, and accumulates dWc[j] (BLOCK_C, H0), dbc[j], dWl[j] and dbl in
  registers over those states.
- ``_sq_bwd_trunk_kernel``, grid (G,): recomputes all chunks to get ``dh = sum_j Wc_j^T dzc_j``,
  then L0: ``dW0[:, S:] += dz0 a`` in registers; the state half again uses the sharing across the
  samples: per state ``dW0[:, :S] += (sum_k dz0_k) s^T`` and ``d_obs = W0[:, :S]^T sum_k dz0_k``.

Each program writes its own slice of a partial-gradient buffer (no atomics) and the host reduces
the slices with one ``sum`` per kernel, in a fixed order: gradients are bitwise reproducible run
to run. The only global read-modify-write is of the program's own dW0[:, :S] slice (one state at a
time, separated by a CTA barrier).

Precision (constexpr PREC): 0 = fp32 dots ("ieee"), 1 = tf32 dots, 2 = bf16 dot operands; always
fp32 accumulation, fp32 elementwise math and fp32 outputs.

Only triton and torch are imported here; the autograd wrapper and dispatch live in misa_fast.ops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["PRECISIONS", "ACTIVATIONS", "CriticSpec", "critic_spec", "unsupported_reason", "launch_config", "sampled_q_fwd",
           "sampled_q_bwd", "MAX_ACTION_DIM", "MAX_HIDDEN", "MAX_HEAD"]

PRECISIONS = {"ieee": 0, "fp32": 0, "tf32": 1, "bf16": 2}
# the hidden activation, constexpr ACT (ELU's alpha / the leaky slope is the runtime ALPHA)
ACTIVATIONS = {"elu": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "tanh": 4, "gelu": 5, "gelu_tanh": 6}
MAX_ACTION_DIM = 32  # one (BLOCK_A, BLOCK_K) action tile per K block
MAX_HIDDEN = 256     # the (H0, BLOCK_K) first-layer activation tile lives on chip
MAX_HEAD = 4096      # the second layer is streamed in column chunks


# ----------------------------------------------------------------------------------------------
# jit helpers. Activations are held transposed, (features, samples) = (BLOCK_H, BLOCK_K): every
# layer is W @ h^T with the weight tile as the left operand and the computed activation as the
# right one. Which MMA each call site becomes on sm_90 (wgmma, or mma.sync where Triton keeps the
# operands in registers) is in bench/results/kernels-aot-*.md ("dots"); fp32 ("ieee") runs on FMAs.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    if PREC == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PREC == 1:
        out = tl.dot(a, b, input_precision="tf32", out_dtype=tl.float32)
    else:
        out = tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)
    return out


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): +-1, not NaN, where exp overflows or underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr, ALPHA):
    """The hidden activation (constexpr ACT, see ACTIVATIONS; ALPHA: ELU's alpha / the leaky slope)."""
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
    else:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    return out


@triton.jit
def _dact(z, ACT: tl.constexpr, ALPHA):
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
    else:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    return out


@triton.jit
def _state_half(obs_ptr, b, S, H0, s_ob, s_os, w0_ptr, b0_ptr, s_w0o, s_w0i,
                BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """W0[:, :S] @ obs[b] + b0 -> (BLOCK_H,), zero beyond H0. Once per state."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H0
    acc = tl.load(b0_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        sv = tl.load(obs_ptr + b * s_ob + offs_s * s_os, mask=s_ok, other=0.0).to(tl.float32)
        w = tl.load(w0_ptr + offs_h[:, None] * s_w0o + offs_s[None, :] * s_w0i,
                    mask=h_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * sv[None, :], axis=1)
    return acc


@triton.jit
def _load_w(w_ptr, s_out, s_in, n_out, n_in, offs_out, offs_in):
    """W[offs_out, offs_in] as a (len(offs_out), len(offs_in)) fp32 tile, zero padded."""
    return tl.load(w_ptr + offs_out[:, None] * s_out + offs_in[None, :] * s_in,
                   mask=(offs_out < n_out)[:, None] & (offs_in < n_in)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_actions_t(act_ptr, b, offs_k, k_ok, A, s_ab, s_ak, s_aa, BLOCK_A: tl.constexpr):
    """actions[b, offs_k, :]^T -> (BLOCK_A, BLOCK_K)."""
    offs_a = tl.arange(0, BLOCK_A)
    return tl.load(act_ptr + b * s_ab + offs_k[None, :] * s_ak + offs_a[:, None] * s_aa,
                   mask=k_ok[None, :] & (offs_a < A)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp,
                  HAS_LOGW: tl.constexpr):
    """g_b * softmax_k(q_b / T + logw_b) for one K block (d (T lse_b) / d q_bk: the T and the 1/T
    cancel), 0 on padding and on all -inf rows."""
    v = tl.load(q_ptr + b * s_qb + offs_k, mask=k_ok, other=float("-inf")) * inv_temp
    if HAS_LOGW:
        v += tl.load(logw_ptr + b * s_lb + offs_k * s_lk, mask=k_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + b)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    g = tl.load(g_ptr + b * s_g).to(tl.float32)
    return tl.where(k_ok, tl.exp(v - lse) * g, 0.0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sq_fwd_kernel(
    obs_ptr, act_ptr, logw_ptr,
    w0_ptr, b0_ptr, wc_ptr, bc_ptr, wl_ptr, bl_ptr,
    q_ptr, lse_ptr, out_ptr,
    K, S, A, H0, HC, norm, temp, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk,
    s_w0o, s_w0i, s_wco, s_wci, s_wl, s_qb,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_LOGW: tl.constexpr, HAS_CHUNK: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, BLOCK_A)
    sh = _state_half(obs_ptr, b, S, H0, s_ob, s_os, w0_ptr, b0_ptr, s_w0o, s_w0i, BLOCK_S, BLOCK_H)
    w0a = _load_w(w0_ptr + S * s_w0i, s_w0o, s_w0i, H0, A, offs_h, offs_a)  # (BLOCK_H, BLOCK_A)
    bl = tl.load(bl_ptr).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    ssum = tl.full([], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a_t = _load_actions_t(act_ptr, b, offs_k, k_ok, A, s_ab, s_ak, s_aa, BLOCK_A)
        h_t = _act(_mm(w0a, a_t, PREC) + sh[:, None], ACT, ALPHA)  # (BLOCK_H, BLOCK_K)
        if HAS_CHUNK:
            q = tl.zeros([BLOCK_K], tl.float32)
            for c0 in range(0, HC, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < HC
                wc = _load_w(wc_ptr, s_wco, s_wci, HC, H0, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
                bc = tl.load(bc_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                wl = tl.load(wl_ptr + offs_c * s_wl, mask=c_ok, other=0.0).to(tl.float32)
                hc_t = _act(_mm(wc, h_t, PREC) + bc[:, None], ACT, ALPHA)  # (BLOCK_C, BLOCK_K)
                q += tl.sum(hc_t * wl[:, None], axis=0)
        else:
            wl = tl.load(wl_ptr + offs_h * s_wl, mask=offs_h < H0, other=0.0).to(tl.float32)
            q = tl.sum(h_t * wl[:, None], axis=0)
        q = q + bl
        tl.store(q_ptr + b * s_qb + offs_k, q, mask=k_ok)
        v = q * inv_temp
        if HAS_LOGW:
            v += tl.load(logw_ptr + b * s_lb + offs_k * s_lk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.where(k_ok, v, float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=0))
        m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(v - m_safe), axis=0)
        m = m_new
    m_safe = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    lse = m_safe + tl.log(ssum)
    tl.store(lse_ptr + b, lse)
    tl.store(out_ptr + b, temp * lse - norm)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sq_bwd_head_kernel(
    obs_ptr, act_ptr, logw_ptr, q_ptr, lse_ptr, g_ptr,
    w0_ptr, b0_ptr, wc_ptr, bc_ptr, wl_ptr,
    part_ptr,
    B, K, S, A, H0, HC, SPP, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk, s_g,
    s_w0o, s_w0i, s_wco, s_wci, s_wl, s_qb,
    s_part, off_wc, off_bc, off_wl, off_bl,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_LOGW: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    b_start = pid_g * SPP
    b_end = tl.minimum(b_start + SPP, B)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H0
    offs_a = tl.arange(0, BLOCK_A)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < HC
    bc = tl.load(bc_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    wl = tl.load(wl_ptr + offs_c * s_wl, mask=c_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C, BLOCK_H], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    acc_wl = tl.zeros([BLOCK_C], tl.float32)
    acc_bl = tl.zeros([BLOCK_K], tl.float32)
    for b in range(b_start, b_end):
        sh = _state_half(obs_ptr, b, S, H0, s_ob, s_os, w0_ptr, b0_ptr, s_w0o, s_w0i, BLOCK_S, BLOCK_H)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a_t = _load_actions_t(act_ptr, b, offs_k, k_ok, A, s_ab, s_ak, s_aa, BLOCK_A)
            # weight tiles are re-read per block (L1/L2 hits) rather than held live in registers
            w0a = _load_w(w0_ptr + S * s_w0i, s_w0o, s_w0i, H0, A, offs_h, offs_a)  # (BLOCK_H, BLOCK_A)
            h_t = _act(_mm(w0a, a_t, PREC) + sh[:, None], ACT, ALPHA)
            dq = _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp, HAS_LOGW)
            wc = _load_w(wc_ptr, s_wco, s_wci, HC, H0, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
            zc_t = _mm(wc, h_t, PREC) + bc[:, None]  # (BLOCK_C, BLOCK_K)
            acc_wl += tl.sum(_act(zc_t, ACT, ALPHA) * dq[None, :], axis=1)
            dzc_t = (wl[:, None] * dq[None, :]) * _dact(zc_t, ACT, ALPHA)
            acc_b += tl.sum(dzc_t, axis=1)
            acc_w += _mm(dzc_t, tl.trans(h_t), PREC)  # (BLOCK_C, BLOCK_K) @ (BLOCK_K, BLOCK_H)
            acc_bl += dq
    base = part_ptr + pid_g.to(tl.int64) * s_part
    tl.store(base + off_wc + offs_c[:, None] * H0 + offs_h[None, :], acc_w, mask=c_ok[:, None] & h_ok[None, :])
    tl.store(base + off_bc + offs_c, acc_b, mask=c_ok)
    tl.store(base + off_wl + offs_c, acc_wl, mask=c_ok)
    tl.store(base + off_bl, tl.sum(acc_bl, axis=0), mask=pid_c == 0)


@triton.jit
def _sq_bwd_trunk_kernel(
    obs_ptr, act_ptr, logw_ptr, q_ptr, lse_ptr, g_ptr,
    w0_ptr, b0_ptr, wc_ptr, bc_ptr, wl_ptr,
    part_ptr, dobs_ptr, dact_ptr,
    B, K, S, A, H0, HC, SPP, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk, s_g,
    s_w0o, s_w0i, s_wco, s_wci, s_wl, s_qb,
    s_dob, s_dos, s_dab, s_dak, s_daa,
    s_part, off_w0, off_b0, off_wl, off_bl,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_LOGW: tl.constexpr, HAS_CHUNK: tl.constexpr, PREC: tl.constexpr,
    NEED_DOBS: tl.constexpr, NEED_DACT: tl.constexpr, ACCUM_DIN: tl.constexpr, ACT: tl.constexpr,
):
    pid_g = tl.program_id(0)
    b_start = pid_g * SPP
    b_end = tl.minimum(b_start + SPP, B)
    base = part_ptr + pid_g.to(tl.int64) * s_part
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H0
    offs_a = tl.arange(0, BLOCK_A)
    a_ok = offs_a < A
    SA = S + A
    w0a = _load_w(w0_ptr + S * s_w0i, s_w0o, s_w0i, H0, A, offs_h, offs_a)  # (BLOCK_H, BLOCK_A)
    acc_w0a = tl.zeros([BLOCK_H, BLOCK_A], tl.float32)
    acc_b0 = tl.zeros([BLOCK_H], tl.float32)
    acc_wl = tl.zeros([BLOCK_H], tl.float32)  # one-hidden-layer critics only
    acc_bl = tl.zeros([BLOCK_K], tl.float32)  # one-hidden-layer critics only
    for b in range(b_start, b_end):
        sh = _state_half(obs_ptr, b, S, H0, s_ob, s_os, w0_ptr, b0_ptr, s_w0o, s_w0i, BLOCK_S, BLOCK_H)
        dz0_sum = tl.zeros([BLOCK_H], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a_t = _load_actions_t(act_ptr, b, offs_k, k_ok, A, s_ab, s_ak, s_aa, BLOCK_A)
            h_t = _act(_mm(w0a, a_t, PREC) + sh[:, None], ACT, ALPHA)
            dq = _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp, HAS_LOGW)
            if HAS_CHUNK:
                dh_t = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
                for c0 in range(0, HC, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    c_ok = offs_c < HC
                    wc = _load_w(wc_ptr, s_wco, s_wci, HC, H0, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
                    bc = tl.load(bc_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                    wl = tl.load(wl_ptr + offs_c * s_wl, mask=c_ok, other=0.0).to(tl.float32)
                    zc_t = _mm(wc, h_t, PREC) + bc[:, None]
                    dzc_t = (wl[:, None] * dq[None, :]) * _dact(zc_t, ACT, ALPHA)
                    dh_t += _mm(tl.trans(wc), dzc_t, PREC)  # (BLOCK_H, BLOCK_C) @ (BLOCK_C, BLOCK_K)
            else:
                wl_h = tl.load(wl_ptr + offs_h * s_wl, mask=h_ok, other=0.0).to(tl.float32)
                acc_wl += tl.sum(h_t * dq[None, :], axis=1)
                acc_bl += dq
                dh_t = wl_h[:, None] * dq[None, :]
            # layer 0 (pre-activation recomputed rather than kept live across the chunk loop)
            dz0_t = dh_t * _dact(_mm(w0a, a_t, PREC) + sh[:, None], ACT, ALPHA)  # (BLOCK_H, BLOCK_K)
            acc_w0a += _mm(dz0_t, tl.trans(a_t), PREC)  # (BLOCK_H, BLOCK_K) @ (BLOCK_K, BLOCK_A)
            dz0_sum += tl.sum(dz0_t, axis=1)
            if NEED_DACT:
                da_t = _mm(tl.trans(w0a), dz0_t, PREC)  # (BLOCK_A, BLOCK_K)
                pda = dact_ptr + b * s_dab + offs_k[None, :] * s_dak + offs_a[:, None] * s_daa
                dmask = k_ok[None, :] & a_ok[:, None]
                if ACCUM_DIN:
                    da_t += tl.load(pda, mask=dmask, other=0.0)
                tl.store(pda, da_t, mask=dmask)
        acc_b0 += dz0_sum
        # state half of L0: dW0[:, :S] += dz0_sum s^T, d_obs = dz0_sum W0[:, :S]
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            sv = tl.load(obs_ptr + b * s_ob + offs_s * s_os, mask=s_ok, other=0.0).to(tl.float32)
            pw = base + off_w0 + offs_h[:, None] * SA + offs_s[None, :]
            pmask = h_ok[:, None] & s_ok[None, :]
            prev = tl.load(pw, mask=pmask & (b != b_start), other=0.0)
            tl.store(pw, prev + dz0_sum[:, None] * sv[None, :], mask=pmask)
            if NEED_DOBS:
                w = tl.load(w0_ptr + offs_h[:, None] * s_w0o + offs_s[None, :] * s_w0i,
                            mask=pmask, other=0.0).to(tl.float32)
                do = tl.sum(w * dz0_sum[:, None], axis=0)
                pdo = dobs_ptr + b * s_dob + offs_s * s_dos
                if ACCUM_DIN:
                    do += tl.load(pdo, mask=s_ok, other=0.0)
                tl.store(pdo, do, mask=s_ok)
        tl.debug_barrier()
    tl.store(base + off_w0 + offs_h[:, None] * SA + S + offs_a[None, :], acc_w0a, mask=h_ok[:, None] & a_ok[None, :])
    tl.store(base + off_b0 + offs_h, acc_b0, mask=h_ok)
    if not HAS_CHUNK:
        tl.store(base + off_wl + offs_h, acc_wl, mask=h_ok)
        tl.store(base + off_bl, tl.sum(acc_bl, axis=0))


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class CriticSpec:
    """One critic's layers the way the kernels see them (views of the caller's tensors)."""

    w0: torch.Tensor  # (H0, S + A)
    b0: torch.Tensor  # (H0,)
    wc: Optional[torch.Tensor]  # (HC, H0), None for a one-hidden-layer critic
    bc: Optional[torch.Tensor]  # (HC,)
    wl: torch.Tensor  # (1, HC) or (1, H0)
    bl: torch.Tensor  # (1,)
    H0: int
    HC: int


def _bias(b: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    if b is None:
        return torch.zeros(n, device=like.device, dtype=like.dtype)
    return b if b.stride(-1) == 1 else b.contiguous()


def unsupported_reason(S: int, A: int, shapes: Sequence[Tuple[int, ...]]) -> Optional[str]:
    """Why the kernels cannot run a critic with these weight shapes (None when they can)."""
    if len(shapes) not in (2, 3):
        return f"the fused kernel takes critics with 1 or 2 hidden layers, got {len(shapes) - 1}"
    if shapes[0][1] != S + A:
        return f"first layer expects {shapes[0][1]} inputs, obs + action dims are {S + A}"
    H0 = shapes[0][0]
    if H0 > MAX_HIDDEN:
        return f"first hidden width {H0} > {MAX_HIDDEN}"
    if len(shapes) == 3 and (shapes[1][1] != H0 or shapes[1][0] > MAX_HEAD):
        return f"second layer {shapes[1]} does not fit (input {H0}, at most {MAX_HEAD} outputs)"
    if shapes[-1][0] != 1 or shapes[-1][1] != shapes[-2][0]:
        return f"the last layer must map {shapes[-2][0]} features to 1 output, got {shapes[-1]}"
    if A > MAX_ACTION_DIM:
        return f"action dim {A} > {MAX_ACTION_DIM}"
    return None


def critic_spec(layers: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> CriticSpec:
    layers = list(layers)
    w0, b0 = layers[0]
    H0 = w0.shape[0]
    wl, bl = layers[-1]
    if len(layers) == 3:
        wc, bc = layers[1]
        HC = wc.shape[0]
        bc = _bias(bc, HC, wc)
    elif len(layers) == 2:
        wc = bc = None
        HC = H0
    else:
        raise ValueError("the fused kernel takes critics with 1 or 2 hidden layers")
    return CriticSpec(w0=w0, b0=_bias(b0, H0, w0), wc=wc, bc=bc, wl=wl, bl=_bias(bl, 1, wl), H0=H0, HC=HC)


def launch_config(kind: str, K: int, S: int, A: int, H0: int, HC: int):
    """Block sizes, warps and stages for ``kind`` in {"fwd", "trunk", "head"}.

    Chosen from sm_90 compiles (registers, spills, shared memory reported by Triton's bundled
    ptxas/cuobjdump: ``python bench/kernel_resources.py``), not from timings: no GPU was available.
    At the MISA sizes (H0 = HC = 256, K = 50, A <= 16, tf32) on sm_90 that gives
    (bench/results/kernels-aot-2026-12-02.md): forward BLOCK_K 64, BLOCK_C 32, 8 warps: 136
    registers, no spill, 112 KiB shared; trunk BLOCK_K 32, BLOCK_C 32, 8 warps: 232 registers, no
    spill, 114 KiB; head BLOCK_K 32, BLOCK_C 64 (its (BLOCK_C, H0) weight-gradient accumulator stays
    in registers), 8 warps: 255 registers, no spill, 144 KiB (A in 17..32: 160 KiB). Software
    pipelining (num_stages 2) only added shared memory and spills here. Not tuned for sm_80, where
    the head spills 312 bytes (1.6 KiB for A > 16), nor for "ieee": fp32 dots on the FMA units
    spill kilobytes at H0 = 256 on both architectures. Re-tune with timings on the GPU.
    """
    BLOCK_H = max(16, triton.next_power_of_2(H0))
    BLOCK_S = 16
    BLOCK_A = max(16, triton.next_power_of_2(A))
    kmax = 64 if kind == "fwd" else 32
    BLOCK_K = max(16, min(kmax, triton.next_power_of_2(K)))
    BLOCK_C = max(16, min(64 if kind == "head" else 32, triton.next_power_of_2(HC)))
    num_warps = 8 if BLOCK_H >= (256 if kind == "fwd" else 128) else 4
    blocks = dict(BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_A=BLOCK_A, BLOCK_H=BLOCK_H, BLOCK_C=BLOCK_C)
    return blocks, num_warps, 1


def _param_strides(spec: CriticSpec):
    wc = spec.wc if spec.wc is not None else spec.w0
    return (spec.w0.stride(0), spec.w0.stride(1), wc.stride(0), wc.stride(1), spec.wl.stride(1))


def sampled_q_fwd(obs: torch.Tensor, actions: torch.Tensor, logw: Optional[torch.Tensor], spec: CriticSpec,
                  norm: float, precision: int, q: torch.Tensor, lse: torch.Tensor, out: torch.Tensor,
                  activation: Tuple[int, float] = (0, 1.0), temperature: float = 1.0) -> None:
    """One critic. obs (B, S), actions (B, K, A), logw None or (B, K) (any strides, 0 allowed);
    ``activation`` = (ACTIVATIONS code, alpha / slope). Writes q (B, K) (unit stride along K), lse (B,)
    of q / T + logw, out (B,) = T * lse - norm (fp32)."""
    B, K, A = actions.shape
    S = obs.shape[1]
    blocks, num_warps, num_stages = launch_config("fwd", K, S, A, spec.H0, spec.HC)
    wc = spec.wc if spec.wc is not None else spec.w0
    bc = spec.bc if spec.bc is not None else spec.b0
    lw = logw if logw is not None else q
    s_lb, s_lk = (logw.stride(0), logw.stride(1)) if logw is not None else (0, 0)
    _sq_fwd_kernel[(B,)](
        obs, actions, lw,
        spec.w0, spec.b0, wc, bc, spec.wl, spec.bl,
        q, lse, out,
        K, S, A, spec.H0, spec.HC, float(norm), float(temperature), 1.0 / float(temperature), float(activation[1]),
        obs.stride(0), obs.stride(1), actions.stride(0), actions.stride(1), actions.stride(2), s_lb, s_lk,
        *_param_strides(spec), q.stride(0),
        **blocks, HAS_LOGW=logw is not None, HAS_CHUNK=spec.wc is not None, PREC=precision, ACT=activation[0],
        num_warps=num_warps, num_stages=num_stages,
    )


def _groups(B: int, n_cols: int, override: Optional[int], target: int) -> Tuple[int, int]:
    """(number of state groups, states per program) for a backward grid with n_cols columns."""
    if override is not None:
        g = max(1, min(B, override))
    elif _interpreting():
        g = min(B, 2)
    else:
        g = min(B, max(1, target // max(1, n_cols)))
    spp = triton.cdiv(B, g)
    return triton.cdiv(B, spp), spp


def sampled_q_bwd(obs, actions, logw, specs: Sequence[CriticSpec], q, lse, g, precision: int,
                  active: Optional[Sequence[bool]] = None, dobs: Optional[torch.Tensor] = None,
                  dact: Optional[torch.Tensor] = None, groups: Optional[int] = None,
                  activation: Tuple[int, float] = (0, 1.0), temperature: float = 1.0) -> List[torch.Tensor]:
    """Gradients of ``sum_{c,b} g[c, b] * T * lse[c, b]`` (lse of q / T + logw) w.r.t. the parameters of E same-shaped critics.

    q (E, B, K), lse (E, B), g (E, B) (any strides). Returns the gradients stacked over critics, in
    layer order ``[dW0 (E, H0, S+A), db0 (E, H0), (dWc (E, HC, H0), dbc (E, HC),) dWl (E, 1, HC),
    dbl (E, 1)]``: fp32, contiguous, views of the reduced partial buffers (index ``[c]`` for one
    critic's). Critics with ``active[c]`` False are skipped (their slices are left undefined).
    ``dobs`` (B, S) / ``dact`` (B, K, A), fp32, if given, receive the input gradients summed over the
    active critics. ``groups`` overrides the number of state groups (programs along B).
    """
    E = len(specs)
    B, K, A = actions.shape
    S = obs.shape[1]
    spec0 = specs[0]
    H0, HC, chunk = spec0.H0, spec0.HC, spec0.wc is not None
    for sp in specs:
        assert (sp.H0, sp.HC, sp.wc is not None) == (H0, HC, chunk), "critics must have the same shapes"
    active = [True] * E if active is None else list(active)
    act, alpha = int(activation[0]), float(activation[1])
    inv_t = 1.0 / float(temperature)
    dev = q.device
    lw_strides = (logw.stride(0), logw.stride(1)) if logw is not None else (0, 0)
    need_dobs, need_dact = dobs is not None, dact is not None
    do = dobs if need_dobs else q
    da = dact if need_dact else q
    s_do = (dobs.stride(0), dobs.stride(1)) if need_dobs else (0, 0)
    s_da = (dact.stride(0), dact.stride(1), dact.stride(2)) if need_dact else (0, 0, 0)

    # parameter-major layouts: [dW0 of critic 0..E-1 | db0 0..E-1 | ...] so that every gradient is
    # one contiguous (E, ...) block of the reduced buffer
    n_w0, n_wc = H0 * (S + A), HC * H0
    if chunk:
        trunk_sizes = [n_w0, H0]
        head_sizes = [n_wc, HC, HC, 1]
    else:
        trunk_sizes = [n_w0, H0, H0, 1]
        head_sizes = []
    trunk_offs = [E * sum(trunk_sizes[:i]) for i in range(len(trunk_sizes) + 1)]
    head_offs = [E * sum(head_sizes[:i]) for i in range(len(head_sizes) + 1)]

    blocks2, nw2, ns2 = launch_config("trunk", K, S, A, H0, HC)
    G2, spp2 = _groups(B, 1, groups, 128)
    part2 = torch.empty((G2, trunk_offs[-1]), device=dev, dtype=torch.float32)
    if chunk:
        blocks1, nw1, ns1 = launch_config("head", K, S, A, H0, HC)
        n_chunks = triton.cdiv(HC, blocks1["BLOCK_C"])
        G1, spp1 = _groups(B, n_chunks, groups, 128)
        part1 = torch.empty((G1, head_offs[-1]), device=dev, dtype=torch.float32)

    wrote_inputs = False
    for c, spec in enumerate(specs):
        if not active[c]:
            continue
        wc = spec.wc if chunk else spec.w0
        bc = spec.bc if chunk else spec.b0
        lw = logw if logw is not None else q[c]
        common = (obs.stride(0), obs.stride(1), actions.stride(0), actions.stride(1), actions.stride(2),
                  *lw_strides, g.stride(1), *_param_strides(spec), q.stride(1))
        to = [trunk_offs[i] + c * trunk_sizes[i] for i in range(len(trunk_sizes))]
        off_wl, off_bl = (to[2], to[3]) if not chunk else (0, 0)
        _sq_bwd_trunk_kernel[(G2,)](
            obs, actions, lw, q[c], lse[c], g[c],
            spec.w0, spec.b0, wc, bc, spec.wl,
            part2, do, da,
            B, K, S, A, H0, HC, spp2, inv_t, alpha,
            *common, *s_do, *s_da,
            part2.stride(0), to[0], to[1], off_wl, off_bl,
            **blocks2, HAS_LOGW=logw is not None, HAS_CHUNK=chunk, PREC=precision,
            NEED_DOBS=need_dobs, NEED_DACT=need_dact, ACCUM_DIN=wrote_inputs, ACT=act,
            num_warps=nw2, num_stages=ns2,
        )
        wrote_inputs = True
        if chunk:
            ho = [head_offs[i] + c * head_sizes[i] for i in range(len(head_sizes))]
            _sq_bwd_head_kernel[(n_chunks, G1)](
                obs, actions, lw, q[c], lse[c], g[c],
                spec.w0, spec.b0, wc, bc, spec.wl,
                part1,
                B, K, S, A, H0, HC, spp1, inv_t, alpha,
                *common,
                part1.stride(0), *ho,
                **blocks1, HAS_LOGW=logw is not None, PREC=precision, ACT=act,
                num_warps=nw1, num_stages=ns1,
            )

    t2 = part2.sum(0) if G2 > 1 else part2[0]
    grads = [t2[trunk_offs[0]:trunk_offs[1]].view(E, H0, S + A), t2[trunk_offs[1]:trunk_offs[2]].view(E, H0)]
    if not chunk:
        return grads + [t2[trunk_offs[2]:trunk_offs[3]].view(E, 1, H0), t2[trunk_offs[3]:trunk_offs[4]].view(E, 1)]
    t1 = part1.sum(0) if G1 > 1 else part1[0]
    return grads + [t1[head_offs[0]:head_offs[1]].view(E, HC, H0), t1[head_offs[1]:head_offs[2]].view(E, HC),
                    t1[head_offs[2]:head_offs[3]].view(E, 1, HC), t1[head_offs[3]:head_offs[4]].view(E, 1)]
