"""Fused sampled-Q log-sum-exp for one critic: ``lse_b = log sum_k exp(Q(s_b, a_bk) / T + logw_bk)``,
``out_b = T * lse_b - norm`` (T: CQL's temperature, 1 for MISA).

The critic is an MLP on ``concat(s, a)`` with 1 to 4 hidden layers and one activation ``act``
after each (constexpr ACT: ReLU, ELU(alpha), LeakyReLU(slope), SiLU, Tanh, GELU exact or tanh; the
runtime ALPHA carries ELU's alpha / the leaky slope):
``L0 (H0, S+A) -> act -> [M1 (H1, H0) -> act -> [M2 (H2, H1) -> act]] -> [Lc (HC, HI) -> act] -> Ll (1, .)``
(MISA/CQL: H0 = HC = 256; CORL's CQL and the antmaze preset: three hidden layers of 256, one middle
layer M1). Widths: H0, H1, H2 <= 256 (on-chip tiles), HC <= 256 with middle layers, <= 4096 without
(streamed).

Orientation: activations are held transposed, (features, samples) = (BLOCK_H, BLOCK_K), so each
layer is ``W @ h^T`` with the weight tile on the left and the computed activation on the right.
On sm_90 most dots are wgmma, but ``Wc @ h^T`` in the forward and the trunk compiles to mma.sync
(register operands); sm_80 has mma.sync only (bench/results/kernels-aot-*.md, per dot).

Forward (``_sq_fwd_kernel``, grid (B,), one program per state, looping over K in BLOCK_K blocks):
the state half of L0, ``W0[:, :S] s + b0``, is computed once per state (an (H0, S) multiply-reduce)
and broadcast over the samples; the action half is an (H0, A) x (A, BLOCK_K) dot. A middle layer
(NMID = 1 or 2 of them) is computed in BLOCK_R-row chunks into a per-program scratch tile (L1/L2
resident) and read back whole, since a register tile cannot be assembled from row chunks. Lc is
streamed in BLOCK_C-row chunks whose activation is contracted at once with the matching slice of Ll,
so the (K, HC) activations never exist anywhere and the (K, H) ones of the other layers never leave
the program's own tiles. An online max / rescaled sum over the K blocks gives the log-sum-exp. Writes
the per-sample Q (B, K) (the backward reads it), lse (B,) and out.

Backward: ``dL/dq_bk = g_b * softmax_k(q_b / T + logw_b)`` (from the saved Q and lse), pushed through
the MLP by recomputation, in 2 + NMID kernels:

- ``_sq_bwd_head_kernel``, grid (cdiv(HC, BLOCK_C), G): program (j, g) recomputes the layers below
  Lc for the states of group g, then row chunk j of Lc, and accumulates dWc[j] (BLOCK_C, HI),
  dbc[j], dWl[j] and dbl in registers over those states.
- ``_sq_bwd_mid_kernel`` (one launch per middle layer m), grid (cdiv(H_m, BLOCK_R), G): recomputes
  the forward (middle pre-activations in scratch) and the backward from the top down to layer m,
  and accumulates rows of dW_m, db_m in registers.
- ``_sq_bwd_trunk_kernel``, grid (G,): recomputes everything to get ``dh = sum_j Wc_j^T dzc_j``,
  back through the middle layers (``W_m^T dz_m`` in row chunks through scratch), then L0:
  ``dW0[:, S:] += dz0 a`` in registers; the state half again uses the sharing across the samples:
  per state ``dW0[:, :S] += (sum_k dz0_k) s^T`` and ``d_obs = W0[:, :S]^T sum_k dz0_k``.

Each program writes its own slice of a partial-gradient buffer (no atomics) and the host reduces
the slices with one ``sum`` per kernel, in a fixed order: gradients are bitwise reproducible run
to run. The only global read-modify-write is of the program's own dW0[:, :S] slice (one state at a
time, separated by a CTA barrier) and of its own scratch tiles.

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

__all__ = ["PRECISIONS", "ACTIVATIONS", "CriticSpec", "critic_spec", "unsupported_reason", "launch_config",
           "sampled_q_fwd", "sampled_q_bwd", "MAX_ACTION_DIM", "MAX_HIDDEN", "MAX_HEAD", "MAX_DEPTH"]

PRECISIONS = {"ieee": 0, "fp32": 0, "tf32": 1, "bf16": 2}
# the hidden activation, constexpr ACT (ELU's alpha / the leaky slope is the runtime ALPHA)
ACTIVATIONS = {"elu": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "tanh": 4, "gelu": 5, "gelu_tanh": 6}
MAX_ACTION_DIM = 32  # one (BLOCK_A, BLOCK_K) action tile per K block
MAX_HIDDEN = 256     # the (H0, BLOCK_K) first-layer activation tile lives on chip
MAX_HEAD = 4096      # the last hidden layer of a 2-hidden-layer critic is streamed in row chunks
MAX_DEPTH = 4        # hidden layers: the first, up to two middle ones, the last


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
    else:  # 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
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
    else:  # s = sigmoid(2u): d (z s) / dz = s (1 + z (1 - s) 2u'), 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2)
        sg = tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
        out = sg * (1.0 + z * (1.0 - sg) * (1.5957691216057308 * (1.0 + 0.134145 * z * z)))
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
# middle layers (critics of 3 or 4 hidden layers): full (BLOCK_H, BLOCK_K) tiles through the
# program's scratch, because a register tile cannot be sliced into row chunks
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mid_forward(h_t, w_ptr, b_ptr, s_wo, s_wi, n_out, n_in, zs_ptr,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """Pre-activation z = W h + b (BLOCK_H, BLOCK_K) of a middle layer (W (n_out, n_in)), computed in
    BLOCK_R-row chunks into the scratch tile zs and read back whole. Padded rows are 0."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_kk = tl.arange(0, BLOCK_K)
    tl.debug_barrier()  # earlier readers of zs are done
    for r0 in range(0, BLOCK_H, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        w = _load_w(w_ptr, s_wo, s_wi, n_out, n_in, offs_r, offs_h)  # (BLOCK_R, BLOCK_H)
        bb = tl.load(b_ptr + offs_r, mask=offs_r < n_out, other=0.0).to(tl.float32)
        tl.store(zs_ptr + offs_r[:, None] * BLOCK_K + offs_kk[None, :], _mm(w, h_t, PREC) + bb[:, None])
    tl.debug_barrier()
    return tl.load(zs_ptr + offs_h[:, None] * BLOCK_K + offs_kk[None, :])


@triton.jit
def _load_tile(zs_ptr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_kk = tl.arange(0, BLOCK_K)
    return tl.load(zs_ptr + offs_h[:, None] * BLOCK_K + offs_kk[None, :])


@triton.jit
def _rows_of(x, ds_ptr, offs_r, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows offs_r of the register tile x (BLOCK_H, BLOCK_K), through the scratch tile ds."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_kk = tl.arange(0, BLOCK_K)
    tl.debug_barrier()
    tl.store(ds_ptr + offs_h[:, None] * BLOCK_K + offs_kk[None, :], x)
    tl.debug_barrier()
    return tl.load(ds_ptr + offs_r[:, None] * BLOCK_K + offs_kk[None, :])


@triton.jit
def _mid_backward(dz, w_ptr, s_wo, s_wi, n_out, n_in, ds_ptr,
                  BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """W^T dz (BLOCK_H, BLOCK_K) for a middle layer W (n_out, n_in): dz goes through the scratch tile
    ds and is contracted in BLOCK_R-row chunks."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_kk = tl.arange(0, BLOCK_K)
    tl.debug_barrier()
    tl.store(ds_ptr + offs_h[:, None] * BLOCK_K + offs_kk[None, :], dz)
    tl.debug_barrier()
    acc = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
    for r0 in range(0, BLOCK_H, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        w = _load_w(w_ptr, s_wo, s_wi, n_out, n_in, offs_r, offs_h)  # (BLOCK_R, BLOCK_H)
        d = tl.load(ds_ptr + offs_r[:, None] * BLOCK_K + offs_kk[None, :])  # (BLOCK_R, BLOCK_K)
        acc += _mm(tl.trans(w), d, PREC)
    return acc


@triton.jit
def _trunk_forward(h_t, scr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, H0, H1, H2, s_w1o, s_w1i, s_w2o, s_w2i,
                   ACT: tl.constexpr, ALPHA, NMID: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """The input of the last hidden layer from h0: through NMID (0..2) middle layers, whose
    pre-activations stay in scratch tiles 0 and 1 for a backward pass."""
    if NMID >= 1:
        z1 = _mid_forward(h_t, w1_ptr, b1_ptr, s_w1o, s_w1i, H1, H0, scr, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
        h_t = _act(z1, ACT, ALPHA)
    if NMID >= 2:
        z2 = _mid_forward(h_t, w2_ptr, b2_ptr, s_w2o, s_w2i, H2, H1, scr + BLOCK_H * BLOCK_K,
                          BLOCK_H, BLOCK_R, BLOCK_K, PREC)
        h_t = _act(z2, ACT, ALPHA)
    return h_t


@triton.jit
def _last_hidden_dh(h_t, dq, wc_ptr, bc_ptr, wl_ptr, HC, HI, s_wco, s_wci, s_wl, ACT: tl.constexpr, ALPHA,
                    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """d sum_k dq_k Q_k / d h (BLOCK_H, BLOCK_K) at the input h of the last hidden layer, its rows
    streamed in BLOCK_C chunks."""
    offs_h = tl.arange(0, BLOCK_H)
    dh_t = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
    for c0 in range(0, HC, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < HC
        wc = _load_w(wc_ptr, s_wco, s_wci, HC, HI, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
        bc = tl.load(bc_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        wl = tl.load(wl_ptr + offs_c * s_wl, mask=c_ok, other=0.0).to(tl.float32)
        zc_t = _mm(wc, h_t, PREC) + bc[:, None]
        dzc_t = (wl[:, None] * dq[None, :]) * _dact(zc_t, ACT, ALPHA)
        dh_t += _mm(tl.trans(wc), dzc_t, PREC)  # (BLOCK_H, BLOCK_C) @ (BLOCK_C, BLOCK_K)
    return dh_t


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sq_fwd_kernel(
    obs_ptr, act_ptr, logw_ptr,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wl_ptr, bl_ptr,
    q_ptr, lse_ptr, out_ptr, scr_ptr,
    K, S, A, H0, H1, H2, HI, HC, norm, temp, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk,
    s_w0o, s_w0i, s_w1o, s_w1i, s_w2o, s_w2i, s_wco, s_wci, s_wl, s_qb,
    s_m_obs, s_m_act, s_m_lw, s_m_w0, s_m_b0, s_m_w1, s_m_b1, s_m_w2, s_m_b2, s_m_wc, s_m_bc, s_m_wl, s_m_bl,
    s_m_q, s_m_lse, s_m_out,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LOGW: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr,
    MEMBERS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if MEMBERS:  # one run compiles without the member offsets: the binary it had before members
        member = tl.program_id(1).to(tl.int64)
        # the member's tensors: member 0's pointers moved by the member strides
        obs_ptr += member * s_m_obs
        act_ptr += member * s_m_act
        logw_ptr += member * s_m_lw
        w0_ptr += member * s_m_w0
        b0_ptr += member * s_m_b0
        w1_ptr += member * s_m_w1
        b1_ptr += member * s_m_b1
        w2_ptr += member * s_m_w2
        b2_ptr += member * s_m_b2
        wc_ptr += member * s_m_wc
        bc_ptr += member * s_m_bc
        wl_ptr += member * s_m_wl
        bl_ptr += member * s_m_bl
        q_ptr += member * s_m_q
        lse_ptr += member * s_m_lse
        out_ptr += member * s_m_out
        scr = scr_ptr + (member * tl.num_programs(0) + b) * (NMID * BLOCK_H * BLOCK_K)
    else:
        scr = scr_ptr + b * (NMID * BLOCK_H * BLOCK_K)
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
        h_t = _trunk_forward(h_t, scr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, H0, H1, H2, s_w1o, s_w1i, s_w2o, s_w2i,
                             ACT, ALPHA, NMID, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
        if HAS_CHUNK:
            q = tl.zeros([BLOCK_K], tl.float32)
            for c0 in range(0, HC, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < HC
                wc = _load_w(wc_ptr, s_wco, s_wci, HC, HI, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
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
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wl_ptr,
    part_ptr, scr_ptr,
    B, K, S, A, H0, H1, H2, HI, HC, SPP, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk, s_g,
    s_w0o, s_w0i, s_w1o, s_w1i, s_w2o, s_w2i, s_wco, s_wci, s_wl, s_qb,
    s_part, off_wc, off_bc, off_wl, off_bl,
    s_m_obs, s_m_act, s_m_lw, s_m_q, s_m_lse, s_m_g, s_m_w0, s_m_b0, s_m_w1, s_m_b1, s_m_w2, s_m_b2, s_m_wc,
    s_m_bc, s_m_wl, s_m_part,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LOGW: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr, MEMBERS: tl.constexpr,
):
    """The last hidden layer's dWc rows, dbc, dWl and dbl for row chunk pid_c and state group pid_g
    of member program_id(2)."""
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    if MEMBERS:  # one run compiles without the member offsets: the binary it had before members
        member = tl.program_id(2).to(tl.int64)
        # the member's tensors: member 0's pointers moved by the member strides
        obs_ptr += member * s_m_obs
        act_ptr += member * s_m_act
        logw_ptr += member * s_m_lw
        q_ptr += member * s_m_q
        lse_ptr += member * s_m_lse
        g_ptr += member * s_m_g
        w0_ptr += member * s_m_w0
        b0_ptr += member * s_m_b0
        w1_ptr += member * s_m_w1
        b1_ptr += member * s_m_b1
        w2_ptr += member * s_m_w2
        b2_ptr += member * s_m_b2
        wc_ptr += member * s_m_wc
        bc_ptr += member * s_m_bc
        wl_ptr += member * s_m_wl
        part_ptr += member * s_m_part
        program = (member * tl.num_programs(1) + pid_g) * tl.num_programs(0) + pid_c
        scr = scr_ptr + program * (NMID * BLOCK_H * BLOCK_K)
    else:
        scr = scr_ptr + (pid_g * tl.num_programs(0) + pid_c).to(tl.int64) * (NMID * BLOCK_H * BLOCK_K)
    b_start = pid_g * SPP
    b_end = tl.minimum(b_start + SPP, B)
    offs_h = tl.arange(0, BLOCK_H)
    i_ok = offs_h < HI
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
            h_t = _trunk_forward(h_t, scr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, H0, H1, H2, s_w1o, s_w1i, s_w2o, s_w2i,
                                 ACT, ALPHA, NMID, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
            dq = _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp,
                               HAS_LOGW)
            wc = _load_w(wc_ptr, s_wco, s_wci, HC, HI, offs_c, offs_h)  # (BLOCK_C, BLOCK_H)
            zc_t = _mm(wc, h_t, PREC) + bc[:, None]  # (BLOCK_C, BLOCK_K)
            acc_wl += tl.sum(_act(zc_t, ACT, ALPHA) * dq[None, :], axis=1)
            dzc_t = (wl[:, None] * dq[None, :]) * _dact(zc_t, ACT, ALPHA)
            acc_b += tl.sum(dzc_t, axis=1)
            acc_w += _mm(dzc_t, tl.trans(h_t), PREC)  # (BLOCK_C, BLOCK_K) @ (BLOCK_K, BLOCK_H)
            acc_bl += dq
    base = part_ptr + pid_g.to(tl.int64) * s_part
    tl.store(base + off_wc + offs_c[:, None] * HI + offs_h[None, :], acc_w, mask=c_ok[:, None] & i_ok[None, :])
    tl.store(base + off_bc + offs_c, acc_b, mask=c_ok)
    tl.store(base + off_wl + offs_c, acc_wl, mask=c_ok)
    tl.store(base + off_bl, tl.sum(acc_bl, axis=0), mask=pid_c == 0)


@triton.jit
def _sq_bwd_mid_kernel(
    obs_ptr, act_ptr, logw_ptr, q_ptr, lse_ptr, g_ptr,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wl_ptr,
    part_ptr, scr_ptr,
    B, K, S, A, H0, H1, H2, HI, HC, SPP, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk, s_g,
    s_w0o, s_w0i, s_w1o, s_w1i, s_w2o, s_w2i, s_wco, s_wci, s_wl, s_qb,
    s_part, off_w, off_b,
    s_m_obs, s_m_act, s_m_lw, s_m_q, s_m_lse, s_m_g, s_m_w0, s_m_b0, s_m_w1, s_m_b1, s_m_w2, s_m_b2, s_m_wc,
    s_m_bc, s_m_wl, s_m_part,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LOGW: tl.constexpr, NMID: tl.constexpr, LAYER: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr,
    MEMBERS: tl.constexpr,
):
    """Middle layer LAYER (1 or 2): rows pid_r * BLOCK_R.. of its dW and db over state group pid_g.
    Recomputes the forward (pre-activations in scratch tiles 0, 1) and the backward from the top
    down to the layer; the layer's dz goes through scratch tile NMID to be read by rows. Member
    program_id(2)."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    if MEMBERS:  # one run compiles without the member offsets: the binary it had before members
        member = tl.program_id(2).to(tl.int64)
        # the member's tensors: member 0's pointers moved by the member strides
        obs_ptr += member * s_m_obs
        act_ptr += member * s_m_act
        logw_ptr += member * s_m_lw
        q_ptr += member * s_m_q
        lse_ptr += member * s_m_lse
        g_ptr += member * s_m_g
        w0_ptr += member * s_m_w0
        b0_ptr += member * s_m_b0
        w1_ptr += member * s_m_w1
        b1_ptr += member * s_m_b1
        w2_ptr += member * s_m_w2
        b2_ptr += member * s_m_b2
        wc_ptr += member * s_m_wc
        bc_ptr += member * s_m_bc
        wl_ptr += member * s_m_wl
        part_ptr += member * s_m_part
        program = (member * tl.num_programs(1) + pid_g) * tl.num_programs(0) + pid_r
        scr = scr_ptr + program * ((NMID + 1) * BLOCK_H * BLOCK_K)
    else:
        scr = scr_ptr + (pid_g * tl.num_programs(0) + pid_r).to(tl.int64) * ((NMID + 1) * BLOCK_H * BLOCK_K)
    ds = scr + NMID * BLOCK_H * BLOCK_K
    b_start = pid_g * SPP
    b_end = tl.minimum(b_start + SPP, B)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, BLOCK_A)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if LAYER == 1:
        n_out = H1
        n_in = H0
    else:
        n_out = H2
        n_in = H1
    r_ok = offs_r < n_out
    acc_w = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
    acc_b = tl.zeros([BLOCK_R], tl.float32)
    for b in range(b_start, b_end):
        sh = _state_half(obs_ptr, b, S, H0, s_ob, s_os, w0_ptr, b0_ptr, s_w0o, s_w0i, BLOCK_S, BLOCK_H)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a_t = _load_actions_t(act_ptr, b, offs_k, k_ok, A, s_ab, s_ak, s_aa, BLOCK_A)
            w0a = _load_w(w0_ptr + S * s_w0i, s_w0o, s_w0i, H0, A, offs_h, offs_a)  # (BLOCK_H, BLOCK_A)
            h0 = _act(_mm(w0a, a_t, PREC) + sh[:, None], ACT, ALPHA)
            h_t = _trunk_forward(h0, scr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, H0, H1, H2, s_w1o, s_w1i, s_w2o, s_w2i,
                                 ACT, ALPHA, NMID, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
            dq = _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp,
                               HAS_LOGW)
            dh_t = _last_hidden_dh(h_t, dq, wc_ptr, bc_ptr, wl_ptr, HC, HI, s_wco, s_wci, s_wl, ACT, ALPHA,
                                   BLOCK_H, BLOCK_C, BLOCK_K, PREC)
            if LAYER == 2:
                dz = dh_t * _dact(_load_tile(scr + BLOCK_H * BLOCK_K, BLOCK_H, BLOCK_K), ACT, ALPHA)
                h_in = _act(_load_tile(scr, BLOCK_H, BLOCK_K), ACT, ALPHA)
            else:
                if NMID >= 2:
                    dz2 = dh_t * _dact(_load_tile(scr + BLOCK_H * BLOCK_K, BLOCK_H, BLOCK_K), ACT, ALPHA)
                    dh_t = _mid_backward(dz2, w2_ptr, s_w2o, s_w2i, H2, H1, ds, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
                dz = dh_t * _dact(_load_tile(scr, BLOCK_H, BLOCK_K), ACT, ALPHA)
                h_in = h0
            dz_r = _rows_of(dz, ds, offs_r, BLOCK_H, BLOCK_K)  # (BLOCK_R, BLOCK_K)
            acc_w += _mm(dz_r, tl.trans(h_in), PREC)  # (BLOCK_R, BLOCK_K) @ (BLOCK_K, BLOCK_H)
            acc_b += tl.sum(dz_r, axis=1)
    base = part_ptr + pid_g.to(tl.int64) * s_part
    tl.store(base + off_w + offs_r[:, None] * n_in + offs_h[None, :], acc_w,
             mask=r_ok[:, None] & (offs_h < n_in)[None, :])
    tl.store(base + off_b + offs_r, acc_b, mask=r_ok)


@triton.jit
def _sq_bwd_trunk_kernel(
    obs_ptr, act_ptr, logw_ptr, q_ptr, lse_ptr, g_ptr,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wl_ptr,
    part_ptr, dobs_ptr, dact_ptr, scr_ptr,
    B, K, S, A, H0, H1, H2, HI, HC, SPP, inv_temp, ALPHA,
    s_ob, s_os, s_ab, s_ak, s_aa, s_lb, s_lk, s_g,
    s_w0o, s_w0i, s_w1o, s_w1i, s_w2o, s_w2i, s_wco, s_wci, s_wl, s_qb,
    s_dob, s_dos, s_dab, s_dak, s_daa,
    s_part, off_w0, off_b0, off_wl, off_bl,
    s_m_obs, s_m_act, s_m_lw, s_m_q, s_m_lse, s_m_g, s_m_w0, s_m_b0, s_m_w1, s_m_b1, s_m_w2, s_m_b2, s_m_wc,
    s_m_bc, s_m_wl, s_m_part,
    s_m_dobs, s_m_dact,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LOGW: tl.constexpr, HAS_CHUNK: tl.constexpr, NMID: tl.constexpr, PREC: tl.constexpr,
    NEED_DOBS: tl.constexpr, NEED_DACT: tl.constexpr, ACCUM_DIN: tl.constexpr, ACT: tl.constexpr,
    MEMBERS: tl.constexpr,
):
    pid_g = tl.program_id(0)
    if MEMBERS:  # one run compiles without the member offsets: the binary it had before members
        member = tl.program_id(1).to(tl.int64)
        # the member's tensors: member 0's pointers moved by the member strides
        obs_ptr += member * s_m_obs
        act_ptr += member * s_m_act
        logw_ptr += member * s_m_lw
        q_ptr += member * s_m_q
        lse_ptr += member * s_m_lse
        g_ptr += member * s_m_g
        w0_ptr += member * s_m_w0
        b0_ptr += member * s_m_b0
        w1_ptr += member * s_m_w1
        b1_ptr += member * s_m_b1
        w2_ptr += member * s_m_w2
        b2_ptr += member * s_m_b2
        wc_ptr += member * s_m_wc
        bc_ptr += member * s_m_bc
        wl_ptr += member * s_m_wl
        part_ptr += member * s_m_part
        dobs_ptr += member * s_m_dobs
        dact_ptr += member * s_m_dact
        scr = scr_ptr + (member * tl.num_programs(0) + pid_g) * ((NMID + 1) * BLOCK_H * BLOCK_K)
    else:
        scr = scr_ptr + pid_g.to(tl.int64) * ((NMID + 1) * BLOCK_H * BLOCK_K)
    ds = scr + NMID * BLOCK_H * BLOCK_K
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
            dq = _softmax_grad(q_ptr, logw_ptr, lse_ptr, g_ptr, b, offs_k, k_ok, s_qb, s_lb, s_lk, s_g, inv_temp,
                               HAS_LOGW)
            if HAS_CHUNK:
                h_t = _trunk_forward(h_t, scr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, H0, H1, H2, s_w1o, s_w1i, s_w2o,
                                     s_w2i, ACT, ALPHA, NMID, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
                dh_t = _last_hidden_dh(h_t, dq, wc_ptr, bc_ptr, wl_ptr, HC, HI, s_wco, s_wci, s_wl, ACT, ALPHA,
                                       BLOCK_H, BLOCK_C, BLOCK_K, PREC)
                if NMID >= 2:
                    dz2 = dh_t * _dact(_load_tile(scr + BLOCK_H * BLOCK_K, BLOCK_H, BLOCK_K), ACT, ALPHA)
                    dh_t = _mid_backward(dz2, w2_ptr, s_w2o, s_w2i, H2, H1, ds, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
                if NMID >= 1:
                    dz1 = dh_t * _dact(_load_tile(scr, BLOCK_H, BLOCK_K), ACT, ALPHA)
                    dh_t = _mid_backward(dz1, w1_ptr, s_w1o, s_w1i, H1, H0, ds, BLOCK_H, BLOCK_R, BLOCK_K, PREC)
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
    """One critic's layers the way the kernels see them (views of the caller's tensors). For several
    members (seeds) every tensor may carry a leading member dimension M (a missing bias, filled with
    zeros, does not: it is the same for every member)."""

    w0: torch.Tensor  # (H0, S + A)
    b0: torch.Tensor  # (H0,)
    mids: List[Tuple[torch.Tensor, torch.Tensor]]  # 0..2 middle hidden layers (H_m, H_{m-1}), (H_m,)
    wc: Optional[torch.Tensor]  # (HC, HI) the last hidden layer, None for a one-hidden-layer critic
    bc: Optional[torch.Tensor]  # (HC,)
    wl: torch.Tensor  # (1, HC) or (1, H0)
    bl: torch.Tensor  # (1,)
    H0: int
    HC: int
    HI: int = 0  # input width of the last hidden layer (H0, or the last middle layer's width)

    @property
    def widths(self) -> Tuple[int, int]:
        """(H1, H2): the middle widths (H0 where absent)."""
        hs = [w.shape[-2] for w, _ in self.mids] + [self.H0, self.H0]
        return hs[0], hs[1]


def _bias(b: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    if b is None:
        return torch.zeros(n, device=like.device, dtype=like.dtype)
    return b if b.stride(-1) == 1 else b.contiguous()


def unsupported_reason(S: int, A: int, shapes: Sequence[Tuple[int, ...]]) -> Optional[str]:
    """Why the kernels cannot run a critic with these weight shapes (None when it can)."""
    hidden = len(shapes) - 1
    if not 1 <= hidden <= MAX_DEPTH:
        return f"the fused kernel takes critics with 1 to {MAX_DEPTH} hidden layers, got {hidden}"
    if shapes[0][1] != S + A:
        return f"first layer expects {shapes[0][1]} inputs, obs + action dims are {S + A}"
    for i in range(1, len(shapes)):
        if shapes[i][1] != shapes[i - 1][0]:
            return f"layer {i} takes {shapes[i][1]} inputs, layer {i - 1} gives {shapes[i - 1][0]}"
    # every hidden width but the last one's output is an on-chip (width, BLOCK_K) tile
    for i in range(hidden - 1 if hidden > 1 else 1):
        if shapes[i][0] > MAX_HIDDEN:
            return f"hidden width {shapes[i][0]} (layer {i}) > {MAX_HIDDEN}"
    if hidden > 1 and shapes[-2][0] > (MAX_HEAD if hidden == 2 else MAX_HIDDEN):
        return f"last hidden width {shapes[-2][0]} > {MAX_HEAD if hidden == 2 else MAX_HIDDEN}"
    if shapes[-1][0] != 1:
        return f"the last layer must map {shapes[-2][0]} features to 1 output, got {shapes[-1]}"
    if A > MAX_ACTION_DIM:
        return f"action dim {A} > {MAX_ACTION_DIM}"
    return None


def critic_spec(layers: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> CriticSpec:
    """One critic's ``(weight (out, in), bias (out,) or None)`` layers, or those of M members
    (weights (M, out, in), biases (M, out) or None)."""
    layers = list(layers)
    if not 2 <= len(layers) <= MAX_DEPTH + 1:
        raise ValueError(f"the fused kernel takes critics with 1 to {MAX_DEPTH} hidden layers")
    w0, b0 = layers[0]
    H0 = w0.shape[-2]
    wl, bl = layers[-1]
    mids = [(w, _bias(b, w.shape[-2], w)) for w, b in layers[1:-2]]
    if len(layers) >= 3:
        wc, bc = layers[-2]
        HC, HI = wc.shape[-2], wc.shape[-1]
        bc = _bias(bc, HC, wc)
    else:
        wc = bc = None
        HC = HI = H0
    return CriticSpec(w0=w0, b0=_bias(b0, H0, w0), mids=mids, wc=wc, bc=bc, wl=wl, bl=_bias(bl, 1, wl), H0=H0,
                      HC=HC, HI=HI)


def launch_config(kind: str, K: int, S: int, A: int, H0: int, HC: int, n_mid: int = 0, H_max: Optional[int] = None):
    """Block sizes, warps and stages for ``kind`` in {"fwd", "trunk", "head", "mid"}.

    Chosen from sm_90 compiles (registers, spills, shared memory reported by Triton's bundled
    ptxas/cuobjdump: ``python devtools/kernel_resources.py``), not from GPU timings (2026-12-03).
    At the MISA sizes (H0 = HC = 256, K = 50, A <= 16, tf32) on sm_90 that gives
    (bench/results/kernels-aot-2026-12-02.md): forward BLOCK_K 64, BLOCK_C 32, 8 warps: 136
    registers, no spill, 112 KiB shared; trunk BLOCK_K 32, BLOCK_C 32, 8 warps: 232 registers, no
    spill, 114 KiB; head BLOCK_K 32, BLOCK_C 64 (its (BLOCK_C, H0) weight-gradient accumulator stays
    in registers), 8 warps: 255 registers, no spill, 144 KiB (A in 17..32: 160 KiB). Software
    pipelining (num_stages 2) only added shared memory and spills here. Not tuned for sm_80, where
    the head spills 312 bytes (1.6 KiB for A > 16), nor for "ieee": fp32 dots on the FMA units
    spill kilobytes at H0 = 256 on both architectures. Critics with middle layers (3 or 4 hidden
    layers, ``n_mid`` > 0) hold one more (BLOCK_H, BLOCK_K) tile and pass their middle activations
    through a per-program scratch tile: forward BLOCK_K 32, backward BLOCK_K 16 (at 32 the backward
    kernels spilled 160-200 B on sm_90), middle-layer rows in BLOCK_R = 32 chunks. At 3x256 and 4x256
    (tf32, bench/results/kernels-aot-2026-12-03.md) no sampled-Q kernel spills more than 40 B on
    sm_90; on sm_80 the 4x256 trunk spills 488 B and the middle-layer kernel 352 B. Re-tune with
    timings on the GPU.
    """
    H_max = H0 if H_max is None else H_max
    BLOCK_H = max(16, triton.next_power_of_2(H_max))
    BLOCK_S = 16
    BLOCK_A = max(16, triton.next_power_of_2(A))
    kmax = 64 if kind == "fwd" and n_mid == 0 else (32 if kind == "fwd" or n_mid == 0 else 16)
    BLOCK_K = max(16, min(kmax, triton.next_power_of_2(K)))
    BLOCK_C = max(16, min(64 if kind == "head" and n_mid == 0 else 32, triton.next_power_of_2(HC)))
    BLOCK_R = min(32, BLOCK_H)
    num_warps = 8 if BLOCK_H >= (256 if kind == "fwd" else 128) else 4
    blocks = dict(BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_A=BLOCK_A, BLOCK_H=BLOCK_H, BLOCK_C=BLOCK_C,
                  BLOCK_R=BLOCK_R)
    return blocks, num_warps, 1


def _member_stride(t: Optional[torch.Tensor], dims: int) -> int:
    """The stride between members of ``t`` (``dims`` dimensions per member): 0 without a member
    dimension or with one member (whose launch compiles without member offsets: ``MEMBERS`` off),
    so that one run's launch is the same binary whatever its layout."""
    return t.stride(0) if t is not None and t.dim() > dims and t.shape[0] > 1 else 0


def _members(t: torch.Tensor, dims: int) -> int:
    return t.shape[0] if t.dim() > dims else 1


def _layer_args(spec: CriticSpec):
    """Pointers, widths, strides and member strides (w0, b0, w1, b1, w2, b2, wc, bc, wl, bl) of the
    layers (unused ones point at layer 0)."""
    mids = list(spec.mids) + [(spec.w0, spec.b0)] * (2 - len(spec.mids))
    (w1, b1), (w2, b2) = mids
    wc = spec.wc if spec.wc is not None else spec.w0
    bc = spec.bc if spec.bc is not None else spec.b0
    H1, H2 = spec.widths
    ptrs = (spec.w0, spec.b0, w1, b1, w2, b2, wc, bc, spec.wl)
    dims = (spec.H0, H1, H2, spec.HI, spec.HC)
    strides = (spec.w0.stride(-2), spec.w0.stride(-1), w1.stride(-2), w1.stride(-1), w2.stride(-2), w2.stride(-1),
               wc.stride(-2), wc.stride(-1), spec.wl.stride(-1))
    member_strides = tuple(_member_stride(t, n) for t, n in ((spec.w0, 2), (spec.b0, 1), (w1, 2), (b1, 1), (w2, 2),
                                                              (b2, 1), (wc, 2), (bc, 1), (spec.wl, 2), (spec.bl, 1)))
    return ptrs, dims, strides, member_strides


def _h_max(spec: CriticSpec) -> int:
    return max([spec.H0] + [w.shape[-2] for w, _ in spec.mids])


def sampled_q_fwd(obs: torch.Tensor, actions: torch.Tensor, logw: Optional[torch.Tensor], spec: CriticSpec,
                  norm: float, precision: int, q: torch.Tensor, lse: torch.Tensor, out: torch.Tensor,
                  activation: Tuple[int, float] = (0, 1.0), temperature: float = 1.0) -> None:
    """One critic. obs (B, S), actions (B, K, A), logw None or (B, K) (any strides, 0 allowed);
    ``activation`` = (ACTIVATIONS code, alpha / slope). Writes q (B, K) (unit stride along K), lse (B,)
    of q / T + logw, out (B,) = T * lse - norm (fp32).

    Several members (seeds) in one launch (grid axis 1): obs (M, B, S), actions (M, B, K, A), logw
    (M, B, K), the critic's layers of :func:`critic_spec` with a member dimension, q (M, B, K), lse
    and out (M, B); each member reads its own tensors through the member strides."""
    M = _members(obs, 2)
    B, K, A = actions.shape[-3:]
    S = obs.shape[-1]
    n_mid = len(spec.mids)
    blocks, num_warps, num_stages = launch_config("fwd", K, S, A, spec.H0, spec.HC, n_mid, _h_max(spec))
    ptrs, dims, strides, member_strides = _layer_args(spec)
    lw = logw if logw is not None else q
    s_lb, s_lk = (logw.stride(-2), logw.stride(-1)) if logw is not None else (0, 0)
    scr = (torch.empty((M * B * n_mid * blocks["BLOCK_H"] * blocks["BLOCK_K"],), device=q.device,
                       dtype=torch.float32) if n_mid else q)
    _sq_fwd_kernel[(B, M)](
        obs, actions, lw,
        *ptrs, spec.bl,
        q, lse, out, scr,
        K, S, A, *dims, float(norm), float(temperature), 1.0 / float(temperature), float(activation[1]),
        obs.stride(-2), obs.stride(-1), actions.stride(-3), actions.stride(-2), actions.stride(-1), s_lb, s_lk,
        *strides, q.stride(-2),
        _member_stride(obs, 2), _member_stride(actions, 3), _member_stride(logw, 2), *member_strides,
        _member_stride(q, 2), _member_stride(lse, 1), _member_stride(out, 1),
        **blocks, HAS_LOGW=logw is not None, HAS_CHUNK=spec.wc is not None, NMID=n_mid, PREC=precision,
        ACT=activation[0], MEMBERS=M > 1, num_warps=num_warps, num_stages=num_stages,
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
    """Gradients of ``sum_{c,b} g[c, b] * T * lse[c, b]`` (lse of q / T + logw) w.r.t. the parameters
    of E same-shaped critics.

    q (E, B, K), lse (E, B), g (E, B) (any strides). Returns the gradients stacked over critics, in
    layer order ``[dW0 (E, H0, S+A), db0 (E, H0), (dW_m (E, H_m, H_m-1), db_m (E, H_m) per middle
    layer, dWc (E, HC, HI), dbc (E, HC),) dWl (E, 1, HC), dbl (E, 1)]``: fp32, contiguous, views of
    the reduced partial buffers (index ``[c]`` for one critic's). Critics with ``active[c]`` False
    are skipped (their slices are left undefined). ``dobs`` (B, S) / ``dact`` (B, K, A), fp32, if
    given, receive the input gradients summed over the active critics. ``groups`` overrides the
    number of state groups (programs along B).

    Several members (seeds) in the same launches (a grid axis for the member): obs (M, B, S),
    actions (M, B, K, A), logw (M, B, K), specs of member-stacked layers (:func:`critic_spec`), q
    (M, E, B, K), lse and g (M, E, B), dobs (M, B, S), dact (M, B, K, A); the gradients are then
    (M, E, ...), each member's computed exactly as its own launch would.
    """
    E = len(specs)
    members = obs.dim() == 3
    M = _members(obs, 2)
    B, K, A = actions.shape[-3:]
    S = obs.shape[-1]
    spec0 = specs[0]
    H0, HC, HI, chunk, n_mid = spec0.H0, spec0.HC, spec0.HI, spec0.wc is not None, len(spec0.mids)
    H1, H2 = spec0.widths
    for sp in specs:
        assert (sp.H0, sp.HC, sp.HI, sp.widths, len(sp.mids), sp.wc is not None) == \
            (H0, HC, HI, (H1, H2), n_mid, chunk), "critics must have the same shapes"
    H_max = _h_max(spec0)
    active = [True] * E if active is None else list(active)
    act, alpha = int(activation[0]), float(activation[1])
    inv_t = 1.0 / float(temperature)
    dev = q.device
    lw_strides = (logw.stride(-2), logw.stride(-1)) if logw is not None else (0, 0)
    need_dobs, need_dact = dobs is not None, dact is not None
    do = dobs if need_dobs else q
    da = dact if need_dact else q
    s_do = (dobs.stride(-2), dobs.stride(-1)) if need_dobs else (0, 0)
    s_da = (dact.stride(-3), dact.stride(-2), dact.stride(-1)) if need_dact else (0, 0, 0)
    m_din = (_member_stride(dobs, 2) if need_dobs else 0, _member_stride(dact, 3) if need_dact else 0)

    def critic(t, c):  # critic c's slice of q / lse / g, with its member dimension
        return t[:, c] if members else t[c]

    # parameter-major layouts: [dW0 of critic 0..E-1 | db0 0..E-1 | ...] so that every gradient is
    # one contiguous (E, ...) block of the reduced buffer (of each member's: (M, groups, size))
    n_w0, n_wc = H0 * (S + A), HC * HI
    if chunk:
        trunk_sizes = [n_w0, H0]
        head_sizes = [n_wc, HC, HC, 1]
    else:
        trunk_sizes = [n_w0, H0, H0, 1]
        head_sizes = []
    mid_shapes = [(H1, H0), (H2, H1)][:n_mid]
    trunk_offs = [E * sum(trunk_sizes[:i]) for i in range(len(trunk_sizes) + 1)]
    head_offs = [E * sum(head_sizes[:i]) for i in range(len(head_sizes) + 1)]

    def scratch(programs: int, blocks) -> torch.Tensor:
        n = M * programs * (n_mid + 1) * blocks["BLOCK_H"] * blocks["BLOCK_K"] if n_mid else 1
        return torch.empty((n,), device=dev, dtype=torch.float32)

    def partials(G: int, size: int) -> torch.Tensor:
        return torch.empty((M, G, size), device=dev, dtype=torch.float32)

    blocks2, nw2, ns2 = launch_config("trunk", K, S, A, H0, HC, n_mid, H_max)
    G2, spp2 = _groups(B, 1, groups, 128)
    part2 = partials(G2, trunk_offs[-1])
    scr2 = scratch(G2, blocks2)
    if chunk:
        blocks1, nw1, ns1 = launch_config("head", K, S, A, H0, HC, n_mid, H_max)
        n_chunks = triton.cdiv(HC, blocks1["BLOCK_C"])
        G1, spp1 = _groups(B, n_chunks, groups, 128)
        part1 = partials(G1, head_offs[-1])
        scr1 = scratch(G1 * n_chunks, blocks1)
    mids = []
    for m, (n_out, n_in) in enumerate(mid_shapes):
        blocks3, nw3, ns3 = launch_config("mid", K, S, A, H0, HC, n_mid, H_max)
        n_rows = triton.cdiv(n_out, blocks3["BLOCK_R"])
        G3, spp3 = _groups(B, n_rows, groups, 128)
        sizes = [n_out * n_in, n_out]
        mids.append(dict(blocks=blocks3, nw=nw3, ns=ns3, n_rows=n_rows, G=G3, spp=spp3, sizes=sizes,
                         part=partials(G3, E * sum(sizes)), scr=scratch(G3 * n_rows, blocks3)))

    wrote_inputs = False
    for c, spec in enumerate(specs):
        if not active[c]:
            continue
        ptrs, dims, strides, layer_members = _layer_args(spec)
        qc, lsec, gc = critic(q, c), critic(lse, c), critic(g, c)
        lw = logw if logw is not None else qc
        common = (obs.stride(-2), obs.stride(-1), actions.stride(-3), actions.stride(-2), actions.stride(-1),
                  *lw_strides, gc.stride(-1), *strides, qc.stride(-2))
        inputs_members = (_member_stride(obs, 2), _member_stride(actions, 3), _member_stride(logw, 2),
                          _member_stride(qc, 2), _member_stride(lsec, 1), _member_stride(gc, 1), *layer_members[:9])

        def members_of(part):  # the member strides of the inputs, the layers but bl, and ``part``
            return (*inputs_members, _member_stride(part, 2))

        to = [trunk_offs[i] + c * trunk_sizes[i] for i in range(len(trunk_sizes))]
        off_wl, off_bl = (to[2], to[3]) if not chunk else (0, 0)
        _sq_bwd_trunk_kernel[(G2, M)](
            obs, actions, lw, qc, lsec, gc,
            *ptrs,
            part2, do, da, scr2,
            B, K, S, A, *dims, spp2, inv_t, alpha,
            *common, *s_do, *s_da,
            part2.stride(1), to[0], to[1], off_wl, off_bl,
            *members_of(part2), *m_din,
            **blocks2, HAS_LOGW=logw is not None, HAS_CHUNK=chunk, NMID=n_mid, PREC=precision,
            NEED_DOBS=need_dobs, NEED_DACT=need_dact, ACCUM_DIN=wrote_inputs, ACT=act, MEMBERS=M > 1,
            num_warps=nw2, num_stages=ns2,
        )
        wrote_inputs = True
        for m, md in enumerate(mids):
            _sq_bwd_mid_kernel[(md["n_rows"], md["G"], M)](
                obs, actions, lw, qc, lsec, gc,
                *ptrs,
                md["part"], md["scr"],
                B, K, S, A, *dims, md["spp"], inv_t, alpha,
                *common,
                md["part"].stride(1), c * md["sizes"][0], E * md["sizes"][0] + c * md["sizes"][1],
                *members_of(md["part"]),
                **md["blocks"], HAS_LOGW=logw is not None, NMID=n_mid, LAYER=m + 1, PREC=precision, ACT=act,
                MEMBERS=M > 1, num_warps=md["nw"], num_stages=md["ns"],
            )
        if chunk:
            ho = [head_offs[i] + c * head_sizes[i] for i in range(len(head_sizes))]
            _sq_bwd_head_kernel[(n_chunks, G1, M)](
                obs, actions, lw, qc, lsec, gc,
                *ptrs,
                part1, scr1,
                B, K, S, A, *dims, spp1, inv_t, alpha,
                *common,
                part1.stride(1), *ho,
                *members_of(part1),
                **blocks1, HAS_LOGW=logw is not None, NMID=n_mid, PREC=precision, ACT=act, MEMBERS=M > 1,
                num_warps=nw1, num_stages=ns1,
            )

    lead = (M,) if members else ()

    def reduced(part, G):  # (M, size) summed over the state groups; (size,) for one run
        t = part.sum(1) if G > 1 else part[:, 0]
        return t if members else t[0]

    def block(t, lo, hi, *shape):
        return t[..., lo:hi].view(*lead, E, *shape)

    t2 = reduced(part2, G2)
    grads = [block(t2, trunk_offs[0], trunk_offs[1], H0, S + A), block(t2, trunk_offs[1], trunk_offs[2], H0)]
    if not chunk:
        return grads + [block(t2, trunk_offs[2], trunk_offs[3], 1, H0), block(t2, trunk_offs[3], trunk_offs[4], 1)]
    for md, (n_out, n_in) in zip(mids, mid_shapes):
        t = reduced(md["part"], md["G"])
        nw = E * md["sizes"][0]
        grads += [block(t, 0, nw, n_out, n_in), block(t, nw, E * sum(md["sizes"]), n_out)]
    t1 = reduced(part1, G1)
    return grads + [block(t1, head_offs[0], head_offs[1], HC, HI), block(t1, head_offs[1], head_offs[2], HC),
                    block(t1, head_offs[2], head_offs[3], 1, HC), block(t1, head_offs[3], head_offs[4], 1)]
