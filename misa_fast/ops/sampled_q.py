"""Fused sampled-Q log-sum-exp over K action samples per state, for each critic of an ensemble.

    out[c, b] = T * log( sum_k exp(Q_c(s_b, a_bk) / T + logw_bk) ) - normalizer

with ``Q_c`` the critic as given: an MLP on ``concat(s, a)`` whose layers and activations are read
from the objects passed (:mod:`misa_fast.ops.critics`), never assumed. With ``normalizer="k"``, no
log-weights and T = 1 this is ``log_mean_exp_k Q_c(s_b, a_bk)``, the MISA critic regulariser; with
per-sample log-weights (``-log proposal density``), ``normalizer="none"`` and CQL's temperature
``T = cql_temp`` it is CQL(H)'s importance-sampled log-sum-exp.

- :func:`sampled_q_values_reference` / :func:`sampled_q_log_mean_exp_reference`: plain torch.
- :class:`SampledQLogMeanExpFunction`: autograd.Function over the Triton kernels
  (``kernels/sampled_q_kernels.py``); differentiable w.r.t. every weight and bias, obs, actions and the
  log-weights (each computed only when required).
- :func:`sampled_q_log_mean_exp`: dispatcher (Triton for CUDA tensors, the reference elsewhere).
- :class:`SampledQLogMeanExp`: ``nn.Module`` wrapper holding the options.

Critics: a sequence with one entry per critic (an ``nn.Module``, or ``(weight, bias)`` pairs /
``nn.Linear`` with ``activation=``), or a stacked ensemble (``[(weight (E, out, in), bias (E,
out)), ...]`` with ``activation=``, or a module with ``stacked_layers()`` such as
``misa_fast.nets.TwinCritic``, whose layers carry its activation; gradients then come back stacked,
without per-critic copies). What the kernels take and what happens to the rest: see
:func:`sampled_q_log_mean_exp`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from misa_fast.nets import apply_activation
from misa_fast.ops.critics import Critic, CriticArchitectureError, CriticSet, module_q, resolve_critics
from misa_fast.ops.dispatch import requested_backend, resolve_backend, resolve_precision
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
    from misa_fast.kernels import sampled_q_kernels as k

    return k


# ----------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------
def critic_layers(critic: CriticLike) -> List[Layer]:
    """The ``(weight, bias)`` pairs of a critic, first layer first (the Linear layers only: what
    runs between them is read by the ops themselves, see :mod:`misa_fast.ops.critics`)."""
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


def _temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


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


def _check_shapes(obs: torch.Tensor, actions: torch.Tensor, cset: CriticSet) -> None:
    if obs.dim() != 2 or actions.dim() != 3 or actions.shape[0] != obs.shape[0]:
        raise ValueError(f"expected obs (B, S) and actions (B, K, A), got {tuple(obs.shape)} and "
                         f"{tuple(actions.shape)}")
    if actions.shape[1] == 0:
        raise ValueError("no action samples (K = 0)")
    SA = obs.shape[1] + actions.shape[2]
    for name, c in zip(cset.names, cset.critics):
        if c.modeled and c.layers[0][0].shape[1] != SA:
            raise ValueError(f"{name}: first layer expects {c.layers[0][0].shape[1]} inputs, obs + action dims "
                             f"are {SA}")


def _compute_dtype(obs, actions, cset: CriticSet, log_weights=None) -> torch.dtype:
    """float64 if any input or weight is float64 (computed in float64), float32 otherwise."""
    tensors = [obs, actions, log_weights] + [t for c in cset.critics if c.modeled for wb in c.layers for t in wb]
    tensors += [p for c in cset.critics if not c.modeled for p in c.module.parameters()]
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def _critic_q(obs: torch.Tensor, actions: torch.Tensor, critic: Critic, dtype: torch.dtype) -> torch.Tensor:
    """Q (B, K) of one critic: the modeled MLP with the first layer split into its state half
    (computed once per state) and its action half, or an opaque module's own forward."""
    if not critic.modeled:
        return module_q(critic, obs, actions, dtype)
    S = obs.shape[1]
    c = critic.layers
    w0, b0 = c[0]
    w0 = w0.to(dtype)
    hs = F.linear(obs.to(dtype), w0[:, :S], None if b0 is None else b0.to(dtype))  # (B, H)
    h = apply_activation(hs.unsqueeze(1) + F.linear(actions.to(dtype), w0[:, S:]), critic.activations[0])
    for (w, b), act in zip(c[1:-1], critic.activations[1:]):
        h = apply_activation(F.linear(h, w.to(dtype), None if b is None else b.to(dtype)), act)
    w, b = c[-1]
    return F.linear(h, w.to(dtype), None if b is None else b.to(dtype)).squeeze(-1)


def _reference(obs, actions, cset: CriticSet, log_weights, normalizer, return_q, temperature):
    B, K = actions.shape[0], actions.shape[1]
    dtype = _compute_dtype(obs, actions, cset, log_weights)
    q = torch.stack([_critic_q(obs, actions, c, dtype) for c in cset.critics])
    T = _temperature(temperature)
    v = q if T == 1.0 else q / T
    lw = _log_weights(log_weights, B, K)
    if lw is not None:
        v = v + lw.to(dtype)
    lse = logsumexp_safe(v, -1)
    out = (lse if T == 1.0 else T * lse) - _normalizer_value(normalizer, K, B)
    return (out, q.detach()) if return_q else out


def sampled_q_values_reference(obs: torch.Tensor, actions: torch.Tensor, critics, activation=None) -> torch.Tensor:
    """Q_c(s_b, a_bk) -> (n_critics, B, K) in plain torch (float64 if any input is, else float32);
    ``critics`` and ``activation`` as :func:`sampled_q_log_mean_exp`."""
    cset = resolve_critics(critics, activation, obs, actions)
    _check_shapes(obs, actions, cset)
    dtype = _compute_dtype(obs, actions, cset)
    return torch.stack([_critic_q(obs, actions, c, dtype) for c in cset.critics])


def sampled_q_log_mean_exp_reference(
    obs: torch.Tensor,
    actions: torch.Tensor,
    critics,
    log_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = "k",
    return_q: bool = False,
    *,
    temperature: float = 1.0,
    activation=None,
):
    """Plain-torch version of :func:`sampled_q_log_mean_exp` (same arguments, same results)."""
    cset = resolve_critics(critics, activation, obs, actions)
    _check_shapes(obs, actions, cset)
    return _reference(obs, actions, cset, log_weights, normalizer, return_q, temperature)


# ----------------------------------------------------------------------------------------------
# Triton autograd function
# ----------------------------------------------------------------------------------------------
class SampledQLogMeanExpFunction(torch.autograd.Function):
    """Triton forward (fused MLP + online log-sum-exp per state) and recomputing Triton backward.

    ``forward(obs, actions, log_weights_bk_or_None, cfg, layout, *flat)``: ``cfg = (norm,
    precision_code, groups, activation_code, activation_param, temperature)``; ``layout = (stacked,
    n_critics, n_layers)``; with ``stacked`` False, ``flat`` holds for each critic, for each layer,
    weight then bias (a bias may be None); with ``stacked`` True, for each layer the (E, out, in)
    weight then the (E, out) bias. Returns ``(out (E, B), q (E, B, K))``; q (unscaled by the
    temperature) is not differentiable. Gradients come back in the same layout (stacked ones without
    copies).
    """

    @staticmethod
    def forward(ctx, obs, actions, log_weights, cfg, layout, *flat):
        k = _kernels()
        norm, precision, _groups, act_code, act_param, temperature = cfg
        B, K, _ = actions.shape
        _, E, _ = layout
        dev = obs.device
        out = torch.empty((E, B), device=dev, dtype=torch.float32)
        lse = torch.empty((E, B), device=dev, dtype=torch.float32)
        q = torch.empty((E, B, K), device=dev, dtype=torch.float32)
        for c, spec in enumerate(_specs(k, flat, layout)):
            k.sampled_q_fwd(obs, actions, log_weights, spec, norm, precision, q[c], lse[c], out[c],
                            activation=(act_code, act_param), temperature=temperature)
        ctx.save_for_backward(obs, actions, log_weights, q, lse, *flat)
        ctx.cfg, ctx.layout = cfg, layout
        ctx.mark_non_differentiable(q)
        return out, q

    @staticmethod
    def backward(ctx, g_out, _g_q):
        k = _kernels()
        obs, actions, log_weights, q, lse, *flat = ctx.saved_tensors
        _norm, precision, groups, act_code, act_param, temperature = ctx.cfg
        n_fixed = 5
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
                                    precision, active=active, dobs=dobs, dact=dact, groups=groups,
                                    activation=(act_code, act_param), temperature=temperature)
            for i, p in enumerate(flat):
                if wants[i]:
                    gr = grads[i] if stacked else grads[i % (2 * L)][i // (2 * L)]
                    flat_grads[i] = gr.to(p.dtype).view(p.shape)
        dlw = None
        if need_lw:
            # d out / d logw_bk = T * softmax_k(q_b / T + logw_b)
            lse_safe = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)
            p = torch.exp(q / temperature + log_weights.float() - lse_safe.unsqueeze(-1))  # (E, B, K)
            dlw = (temperature * p * g_out.unsqueeze(-1)).sum(0).to(log_weights.dtype)
        if dobs is not None:
            dobs = dobs.to(obs.dtype)
        if dact is not None:
            dact = dact.to(actions.dtype)
        return (dobs, dact, dlw, None, None, *flat_grads)


def _specs(k, flat, layout):
    stacked, E, L = layout
    if stacked:
        return [k.critic_spec([(flat[2 * j][c], None if flat[2 * j + 1] is None else flat[2 * j + 1][c])
                               for j in range(L)]) for c in range(E)]
    return [k.critic_spec([(flat[2 * L * c + 2 * j], flat[2 * L * c + 2 * j + 1]) for j in range(L)])
            for c in range(E)]


_FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_unsupported(obs, actions, cset: CriticSet, log_weights) -> Optional[str]:
    """Why the fused kernel cannot run this problem (None when it can)."""
    k = _kernels()
    opaque = cset.opaque()
    if opaque:
        return "; ".join(f"{name} cannot be read as an MLP: {why}" for name, why in opaque)
    act = cset.activation()
    if act is None:
        acts = sorted({str(a) for c in cset.critics for a in c.activations})
        return f"the kernel applies one activation everywhere, these critics use {', '.join(acts)}"
    if act.name not in k.ACTIVATIONS:
        return f"activation {act} is not compiled into the kernel"
    layers = [c.layers for c in cset.critics]
    tensors = [obs, actions] + [t for c in layers for wb in c for t in wb if t is not None]
    if log_weights is not None:
        tensors.append(log_weights)
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 tensors: the kernels compute in float32 (the torch path keeps float64)"
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
    critics,
    log_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = "k",
    *,
    temperature: float = 1.0,
    activation=None,
    return_q: bool = False,
    precision: Optional[str] = None,
    backend: Optional[str] = None,
    groups: Optional[int] = None,
):
    """Per critic and state, ``T * logsumexp_k(Q(s, a_k) / T + log_w_k) - normalizer``.

    Args:
        obs: (B, S) states.
        actions: (B, K, A) action samples (typically detached policy / proposal samples).
        critics: a sequence of critics, each an ``nn.Module`` (its Linear layers and activation
            modules are read, and checked once against its own forward) or a sequence of
            ``(weight, bias)`` pairs / ``nn.Linear`` (first weight (H, S + A) applied to
            ``concat(s, a)``, last weight (1, H_last)); or a stacked ensemble
            ``[(weight (E, out, in), bias (E, out)), ...]`` or a module with ``stacked_layers()``
            (``misa_fast.nets.TwinCritic``). See :mod:`misa_fast.ops.critics`.
        log_weights: optional (K,) or (B, K) added to Q / T before the reduction (importance
            weights, e.g. ``-log q(a_k | s)`` for CQL's log-sum-exp over uniform and policy
            proposals).
        normalizer: ``"k"`` subtracts log K (log-mean-exp), ``"batch"`` log B (the official MISA
            code), ``"none"`` nothing (log-sum-exp), or a number to subtract (after the scaling by T).
        temperature: T > 0 (CQL's ``cql_temp``); 1 by default.
        activation: the activation between the layers of plain tensors (``"relu"``, ``"elu"``,
            ``"leaky_relu"``, ``"silu"``, ``"tanh"``, ``"gelu"``, ``"gelu_tanh"``, an activation
            module such as ``nn.LeakyReLU(0.2)``, or ``misa_fast.nets.Activation``). Required for
            plain tensors (they do not say which activation they were trained with) unless they carry
            it (``misa_fast.nets.StackedLayers``); for modules that apply their activation in
            ``forward`` (no activation modules); otherwise it must agree with what the modules hold
            or the layers carry (a contradiction raises).
        return_q: also return the per-sample Q values (C, B, K) (detached, not divided by T).
        precision: Triton dot precision: ``"tf32"``, ``"bf16"`` or ``"ieee"`` (fp32); None (default)
            follows ``torch.get_float32_matmul_precision()`` ("highest" -> ieee, "high" -> tf32,
            "medium" -> bf16). Accumulation is fp32 throughout. Ignored by the torch path.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (see :mod:`misa_fast.ops.dispatch`).
        groups: Triton backward only: number of state groups (programs along B); default by device.

    What runs where: the Triton kernels take MLP critics of 1 to 4 hidden layers, widths up to 256
    (action dim up to 32), one activation of the list above everywhere, all critics the same
    shapes, fp32/fp16/bf16 tensors (computed in fp32). Anything else — float64, an opaque module
    (see :mod:`misa_fast.ops.critics`), mixed activations, wider layers — runs the torch path under
    ``"auto"`` (float64 stays float64; an opaque module is evaluated by its own forward) and raises
    ``ValueError`` naming the reason under ``"triton"``. Plain tensors without an activation, or an
    ``activation=`` that contradicts a module, raise everywhere.

    Returns:
        (C, B) tensor (float64 if any input is, else float32) and the (C, B, K) Q values if
        ``return_q``. Differentiable w.r.t. the critic parameters, obs, actions and log_weights.
    """
    cset = resolve_critics(critics, activation, obs, actions)
    _check_shapes(obs, actions, cset)
    B, K = actions.shape[0], actions.shape[1]
    precision = resolve_precision(precision)
    T = _temperature(temperature)
    norm = _normalizer_value(normalizer, K, B)
    first = next((c.layers[0][0] for c in cset.critics if c.modeled), None)
    use_triton = resolve_backend(backend, obs, actions, first) == "triton"
    if use_triton:
        why = _triton_unsupported(obs, actions, cset, log_weights)
        if why is not None:
            if requested_backend(backend) == "triton":
                raise CriticArchitectureError(
                    f"sampled_q_log_mean_exp: the Triton kernel does not support this call: {why}")
            use_triton = False
    if not use_triton:
        return _reference(obs, actions, cset, log_weights, norm, return_q, T)
    k = _kernels()
    lw = _log_weights(log_weights, B, K)
    act = cset.activation()
    if cset.stacked is not None:
        flat = [t for wb in cset.stacked for t in wb]
        layout = (True, len(cset.critics), len(cset.stacked))
    else:
        flat = [t for c in cset.critics for wb in c.layers for t in wb]
        layout = (False, len(cset.critics), len(cset.critics[0].layers))
    cfg = (norm, k.PRECISIONS[precision], groups, k.ACTIVATIONS[act.name], float(act.param), T)
    out, q = SampledQLogMeanExpFunction.apply(obs, actions, lw, cfg, layout, *flat)
    return (out, q) if return_q else out


class SampledQLogMeanExp(nn.Module):
    """``nn.Module`` form of :func:`sampled_q_log_mean_exp`; the critics are passed per call
    (the module owns no parameters, so dropping it into an agent does not re-register them)."""

    def __init__(self, normalizer: Normalizer = "k", precision: Optional[str] = None, backend: Optional[str] = None,
                 temperature: float = 1.0, activation=None):
        super().__init__()
        self.normalizer, self.precision, self.backend = normalizer, precision, backend
        self.temperature = _temperature(temperature)
        self.activation = activation

    def forward(self, obs, actions, critics, log_weights=None, return_q: bool = False):
        return sampled_q_log_mean_exp(obs, actions, critics, log_weights, self.normalizer, return_q=return_q,
                                      temperature=self.temperature, activation=self.activation,
                                      precision=self.precision, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"normalizer={self.normalizer!r}, temperature={self.temperature:g}, precision={self.precision!r}"
                + ("" if self.activation is None else f", activation={self.activation!r}"))
