"""Fused sampled-Q log-mean-exp over K action samples per state, for each critic of an ensemble.

    out[c, b] = log( sum_k exp(Q_c(s_b, a_bk) + logw_bk) ) - normalizer

with ``Q_c`` an MLP on ``concat(s, a)``: Linear layers with ELU between them, the last Linear
mapping to one output (the MISA/CQL critic). With ``normalizer="k"`` and no log-weights this is
``log_mean_exp_k Q_c(s_b, a_bk)``, the MISA critic regulariser; with per-sample log-weights
(``-log proposal density``) and ``normalizer="none"`` it is CQL's importance-sampled log-sum-exp.

- :func:`sampled_q_values_reference` / :func:`sampled_q_log_mean_exp_reference`: plain torch.
- :class:`SampledQLogMeanExpFunction`: autograd.Function over the Triton kernels
  (``kernels/sampled_q.py``); differentiable w.r.t. every weight and bias, obs, actions and the
  log-weights (each computed only when required).
- :func:`sampled_q_log_mean_exp`: dispatcher (Triton for CUDA tensors, the reference elsewhere).
- :class:`SampledQLogMeanExp`: ``nn.Module`` wrapper holding the options.

Critics are given as plain tensors, either

- per critic: a sequence (one entry per critic) of sequences of ``(weight, bias)`` pairs,
  ``nn.Linear`` modules, or an ``nn.Module`` whose ``nn.Linear`` submodules in registration order
  form the MLP (:func:`critic_layers`); or
- stacked: one sequence of ``(weight (E, out, in), bias (E, out))`` pairs for an ensemble of E
  critics stored stacked, or a module with a ``stacked_layers()`` method returning that (e.g.
  ``misa_fast.nets.TwinCritic``). Gradients then come back stacked, without per-critic copies.

The activation between layers is always ELU: the op cannot see a module's forward, so that is the
caller's contract. The Triton kernels take critics with one or two hidden layers (first width up
to 256, action dim up to 32, all critics the same shapes); anything else runs the reference
(``backend="triton"`` raises instead).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from misa_fast.ops.dispatch import requested_backend, resolve_backend
from misa_fast.ops.log_mean_exp import logsumexp_safe

__all__ = [
    "sampled_q_log_mean_exp",
    "sampled_q_log_mean_exp_reference",
    "sampled_q_values_reference",
    "SampledQLogMeanExpFunction",
    "SampledQLogMeanExp",
    "critic_layers",
]

Layer = Tuple[torch.Tensor, Optional[torch.Tensor]]
CriticLike = Union[nn.Module, Sequence[Union[Layer, nn.Linear]]]
Normalizer = Union[str, float, int, None]


def _kernels():
    from misa_fast.kernels import sampled_q as k

    return k


# ----------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------
def critic_layers(critic: CriticLike) -> List[Layer]:
    """The ``(weight, bias)`` pairs of a critic, first layer first."""
    if isinstance(critic, nn.Linear):
        raise TypeError("a critic needs at least two Linear layers, got a single nn.Linear")
    if isinstance(critic, nn.Module):
        layers = [(m.weight, m.bias) for m in critic.modules() if isinstance(m, nn.Linear)]
    else:
        layers = []
        for item in critic:
            if isinstance(item, nn.Linear):
                layers.append((item.weight, item.bias))
            else:
                w, b = item
                layers.append((w, b))
    if len(layers) < 2:
        raise ValueError("a critic needs at least two Linear layers")
    return layers


def _stacked_layers(critics) -> Optional[List[Layer]]:
    """The layers of a stacked ensemble (weights (E, out, in), biases (E, out)), or None."""
    if isinstance(critics, nn.Module) and callable(getattr(critics, "stacked_layers", None)):
        return list(critics.stacked_layers())
    if isinstance(critics, nn.Module):
        return None
    items = list(critics)
    if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2 and torch.is_tensor(items[0][0]) \
            and items[0][0].dim() == 3:
        return [(w, b) for w, b in items]
    return None


def _per_critic(critics) -> Tuple[List[List[Layer]], Optional[List[Layer]]]:
    """(per-critic layer lists, the stacked layers if the critics came stacked)."""
    stacked = _stacked_layers(critics)
    if stacked is not None:
        E = stacked[0][0].shape[0]
        return [[(w[c], None if b is None else b[c]) for w, b in stacked] for c in range(E)], stacked
    if isinstance(critics, nn.Module):
        raise TypeError("pass a sequence of critics (or a stacked ensemble), not a single module")
    return [critic_layers(c) for c in critics], None


def _normalizer_value(normalizer: Normalizer, K: int, B: int) -> float:
    if normalizer is None:
        return 0.0
    if isinstance(normalizer, str):
        key = normalizer.lower()
        if key == "k":
            return math.log(K)
        if key == "none":
            return 0.0
        if key == "batch":  # the official MISA code's log(batch size)
            return math.log(B)
        raise ValueError(f"normalizer must be 'k', 'batch', 'none' or a number, got {normalizer!r}")
    return float(normalizer)


def _log_weights(log_weights: Optional[torch.Tensor], B: int, K: int) -> Optional[torch.Tensor]:
    """(K,), (1, K), (B, K) or (B, 1) -> a broadcast (B, K) view (no copy)."""
    if log_weights is None:
        return None
    lw = log_weights
    if lw.dim() == 1:
        lw = lw.unsqueeze(0)
    if lw.dim() != 2:
        raise ValueError(f"log_weights must be (K,) or (B, K), got {tuple(log_weights.shape)}")
    return lw.expand(B, K)


def _check_shapes(obs: torch.Tensor, actions: torch.Tensor, layers: Sequence[Sequence[Layer]]) -> None:
    if obs.dim() != 2 or actions.dim() != 3 or actions.shape[0] != obs.shape[0]:
        raise ValueError(f"expected obs (B, S) and actions (B, K, A), got {tuple(obs.shape)} and {tuple(actions.shape)}")
    if actions.shape[1] == 0:
        raise ValueError("no action samples (K = 0)")
    SA = obs.shape[1] + actions.shape[2]
    for c in layers:
        if c[0][0].shape[1] != SA:
            raise ValueError(f"first layer expects {c[0][0].shape[1]} inputs, obs + action dims are {SA}")


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def sampled_q_values_reference(obs: torch.Tensor, actions: torch.Tensor, critics: Sequence[CriticLike]) -> torch.Tensor:
    """Q_c(s_b, a_bk) -> (n_critics, B, K), fp32 math, the first layer split into its state half
    (computed once per state) and its action half."""
    layers, _ = _per_critic(critics)
    _check_shapes(obs, actions, layers)
    S = obs.shape[1]
    qs = []
    for c in layers:
        w0, b0 = c[0]
        w0 = w0.float()
        hs = F.linear(obs.float(), w0[:, :S], None if b0 is None else b0.float())  # (B, H)
        h = F.elu(hs.unsqueeze(1) + F.linear(actions.float(), w0[:, S:]))  # (B, K, H)
        for w, b in c[1:-1]:
            h = F.elu(F.linear(h, w.float(), None if b is None else b.float()))
        w, b = c[-1]
        qs.append(F.linear(h, w.float(), None if b is None else b.float()).squeeze(-1))
    return torch.stack(qs)


def sampled_q_log_mean_exp_reference(
    obs: torch.Tensor,
    actions: torch.Tensor,
    critics: Sequence[CriticLike],
    log_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = "k",
    return_q: bool = False,
):
    """Plain-torch version of :func:`sampled_q_log_mean_exp` (same arguments, same results)."""
    B, K = actions.shape[0], actions.shape[1]
    q = sampled_q_values_reference(obs, actions, critics)
    v = q
    lw = _log_weights(log_weights, B, K)
    if lw is not None:
        v = v + lw.float()
    out = logsumexp_safe(v, -1) - _normalizer_value(normalizer, K, B)
    return (out, q.detach()) if return_q else out


# ----------------------------------------------------------------------------------------------
# Triton autograd function
# ----------------------------------------------------------------------------------------------
class SampledQLogMeanExpFunction(torch.autograd.Function):
    """Triton forward (fused MLP + online log-sum-exp per state) and recomputing Triton backward.

    ``forward(obs, actions, log_weights_bk_or_None, norm, precision_code, groups, layout, *flat)``:
    ``layout = (stacked, n_critics, n_layers)``; with ``stacked`` False, ``flat`` holds for each
    critic, for each layer, weight then bias (a bias may be None); with ``stacked`` True, for each
    layer the (E, out, in) weight then the (E, out) bias. Returns ``(out (E, B), q (E, B, K))``; q
    is not differentiable. Gradients come back in the same layout (stacked ones without copies).
    """

    @staticmethod
    def forward(ctx, obs, actions, log_weights, norm, precision, groups, layout, *flat):
        k = _kernels()
        B, K, _ = actions.shape
        _, E, _ = layout
        dev = obs.device
        out = torch.empty((E, B), device=dev, dtype=torch.float32)
        lse = torch.empty((E, B), device=dev, dtype=torch.float32)
        q = torch.empty((E, B, K), device=dev, dtype=torch.float32)
        for c, spec in enumerate(_specs(k, flat, layout)):
            k.sampled_q_fwd(obs, actions, log_weights, spec, norm, precision, q[c], lse[c], out[c])
        ctx.save_for_backward(obs, actions, log_weights, q, lse, *flat)
        ctx.precision, ctx.groups, ctx.layout = precision, groups, layout
        ctx.mark_non_differentiable(q)
        return out, q

    @staticmethod
    def backward(ctx, g_out, _g_q):
        k = _kernels()
        obs, actions, log_weights, q, lse, *flat = ctx.saved_tensors
        n_fixed = 7
        if g_out is None:
            return (None,) * (n_fixed + len(flat))
        stacked, E, L = ctx.layout
        g_out = g_out.float()
        need_obs, need_act, need_lw = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        wants = [p is not None and ctx.needs_input_grad[n_fixed + i] for i, p in enumerate(flat)]
        if stacked:
            active = [any(wants) or need_obs or need_act] * E
        else:
            active = [any(wants[2 * L * c:2 * L * (c + 1)]) or need_obs or need_act for c in range(E)]
        dobs = torch.empty(obs.shape, device=obs.device, dtype=torch.float32) if need_obs else None
        dact = torch.empty(actions.shape, device=actions.device, dtype=torch.float32) if need_act else None
        flat_grads: List[Optional[torch.Tensor]] = [None] * len(flat)
        if any(active):
            grads = k.sampled_q_bwd(obs, actions, log_weights, _specs(k, flat, ctx.layout), q, lse, g_out,
                                    ctx.precision, active=active, dobs=dobs, dact=dact, groups=ctx.groups)
            for i, p in enumerate(flat):
                if wants[i]:
                    gr = grads[i] if stacked else grads[i % (2 * L)][i // (2 * L)]
                    flat_grads[i] = gr.to(p.dtype).view(p.shape)
        dlw = None
        if need_lw:
            lse_safe = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)
            p = torch.exp(q + log_weights.float() - lse_safe.unsqueeze(-1))  # (E, B, K)
            dlw = (p * g_out.unsqueeze(-1)).sum(0).to(log_weights.dtype)
        if dobs is not None:
            dobs = dobs.to(obs.dtype)
        if dact is not None:
            dact = dact.to(actions.dtype)
        return (dobs, dact, dlw, None, None, None, None, *flat_grads)


def _specs(k, flat, layout):
    stacked, E, L = layout
    if stacked:
        return [k.critic_spec([(flat[2 * j][c], None if flat[2 * j + 1] is None else flat[2 * j + 1][c])
                               for j in range(L)]) for c in range(E)]
    return [k.critic_spec([(flat[2 * L * c + 2 * j], flat[2 * L * c + 2 * j + 1]) for j in range(L)])
            for c in range(E)]


_FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_unsupported(obs, actions, layers) -> Optional[str]:
    """Why the fused kernel cannot run this problem (None when it can)."""
    k = _kernels()
    tensors = [obs, actions] + [t for c in layers for wb in c for t in wb if t is not None]
    if any(t.dtype not in _FLOAT_KERNEL_DTYPES for t in tensors):
        return "the kernels take fp32/fp16/bf16 tensors"
    if len({t.device for t in tensors}) != 1:
        return "all tensors must be on one device"
    S, A = obs.shape[1], actions.shape[2]
    shapes = [[tuple(w.shape) for w, _ in c] for c in layers]
    if any(sh != shapes[0] for sh in shapes):
        return "the critics must all have the same layer shapes"
    return k.unsupported_reason(S, A, shapes[0])


def sampled_q_log_mean_exp(
    obs: torch.Tensor,
    actions: torch.Tensor,
    critics: Sequence[CriticLike],
    log_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = "k",
    *,
    return_q: bool = False,
    precision: str = "tf32",
    backend: Optional[str] = None,
    groups: Optional[int] = None,
):
    """Per critic and state, the log-mean-exp over K sampled actions of Q(s, a_k) (+ log-weights).

    Args:
        obs: (B, S) states.
        actions: (B, K, A) action samples (typically detached policy samples).
        critics: one entry per critic, each an ``nn.Module`` of Linear layers or a sequence of
            ``(weight, bias)`` pairs / ``nn.Linear`` (first weight (H, S + A) applied to
            ``concat(s, a)``, ELU after every layer but the last, last weight (1, H_last)); or a
            stacked ensemble: ``[(weight (E, out, in), bias (E, out)), ...]`` or a module with
            ``stacked_layers()``.
        log_weights: optional (K,) or (B, K) added to Q before the reduction (importance weights,
            e.g. ``-log q(a_k | s)`` for CQL's log-sum-exp over policy and uniform proposals).
        normalizer: ``"k"`` subtracts log K (log-mean-exp), ``"batch"`` log B (the official MISA
            code), ``"none"`` nothing (log-sum-exp), or a number to subtract.
        return_q: also return the per-sample Q values (C, B, K) (detached, fp32).
        precision: Triton dot precision: ``"tf32"`` (default), ``"bf16"`` or ``"ieee"`` (fp32).
            Accumulation is fp32 throughout. Ignored by the torch reference.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (see :mod:`misa_fast.ops.dispatch`).
        groups: Triton backward only: number of state groups (programs along B); default by device.

    Returns:
        (C, B) fp32 tensor (and the (C, B, K) Q values if ``return_q``). Differentiable w.r.t. the
        critic parameters, obs, actions and log_weights.
    """
    layers, stacked = _per_critic(critics)
    if not layers:
        raise ValueError("no critics")
    _check_shapes(obs, actions, layers)
    B, K = actions.shape[0], actions.shape[1]
    if precision not in ("tf32", "bf16", "ieee", "fp32"):
        raise ValueError(f"precision must be 'tf32', 'bf16' or 'ieee', got {precision!r}")
    norm = _normalizer_value(normalizer, K, B)
    use_triton = resolve_backend(backend, obs, actions, layers[0][0][0]) == "triton"
    if use_triton:
        why = _triton_unsupported(obs, actions, layers)
        if why is not None:
            if requested_backend(backend) == "triton":
                raise ValueError(f"sampled_q_log_mean_exp: the Triton kernel does not support this call: {why}")
            use_triton = False
    if not use_triton:
        return sampled_q_log_mean_exp_reference(obs, actions, layers, log_weights, norm, return_q)
    k = _kernels()
    lw = _log_weights(log_weights, B, K)
    if lw is not None and lw.dtype not in _FLOAT_KERNEL_DTYPES:
        lw = lw.float()
    if stacked is not None:
        flat = [t for wb in stacked for t in wb]
        layout = (True, len(layers), len(stacked))
    else:
        flat = [t for c in layers for wb in c for t in wb]
        layout = (False, len(layers), len(layers[0]))
    out, q = SampledQLogMeanExpFunction.apply(obs, actions, lw, norm, k.PRECISIONS[precision], groups, layout, *flat)
    return (out, q) if return_q else out


class SampledQLogMeanExp(nn.Module):
    """``nn.Module`` form of :func:`sampled_q_log_mean_exp`; the critics are passed per call
    (the module owns no parameters, so dropping it into an agent does not re-register them)."""

    def __init__(self, normalizer: Normalizer = "k", precision: str = "tf32", backend: Optional[str] = None):
        super().__init__()
        self.normalizer, self.precision, self.backend = normalizer, precision, backend

    def forward(self, obs, actions, critics, log_weights=None, return_q: bool = False):
        return sampled_q_log_mean_exp(obs, actions, critics, log_weights, self.normalizer, return_q=return_q,
                                      precision=self.precision, backend=self.backend)

    def extra_repr(self) -> str:
        return f"normalizer={self.normalizer!r}, precision={self.precision!r}"
