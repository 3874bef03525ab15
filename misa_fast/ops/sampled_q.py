"""Fused sampled-Q log-sum-exp over K action samples per state, for each critic of an ensemble.

    out[c, b] = T * log( sum_k exp(Q_c(s_b, a_bk) / T + logw_bk) ) - normalizer

with ``Q_c`` the critic as given: an MLP on ``concat(s, a)`` whose layers and activations are read
from the objects passed (:mod:`misa_fast.ops.critics`), never assumed. With ``normalizer="k"``, no
log-weights and T = 1 this is ``log_mean_exp_k Q_c(s_b, a_bk)``, the MISA critic regulariser; with
per-sample log-weights (``-log proposal density``), ``normalizer="none"`` and CQL's temperature
``T = cql_temp`` it is CQL(H)'s importance-sampled log-sum-exp.

- :func:`sampled_q_values_reference` / :func:`sampled_q_log_mean_exp_reference`: plain torch.
- :func:`sampled_q_op`: the operator ``torch.ops.misa_fast.sampled_q_log_mean_exp`` over the Triton
  kernels (``kernels/sampled_q_kernels.py``) on flat member-stacked tensors: fake implementation
  (compile, export), autograd through ``torch.ops.misa_fast.sampled_q_log_mean_exp_backward``
  (every weight and bias, obs, actions and the log-weights, each computed only when required) and a
  vmap rule (the members of a stacked agent in the launches of one call).
- :func:`sampled_q_log_mean_exp`: dispatcher (the operator for CUDA tensors, the reference elsewhere).
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

from misa_fast.nets import Activation, apply_activation
from misa_fast.ops.critics import Critic, CriticArchitectureError, CriticSet, module_q, resolve_critics
from misa_fast.ops.dispatch import kernel_runs_on, requested_backend, resolve_backend, resolve_precision
from misa_fast.ops.log_mean_exp import logsumexp_safe

__all__ = [
    "sampled_q_log_mean_exp",
    "sampled_q_log_mean_exp_reference",
    "sampled_q_values_reference",
    "sampled_q_op",
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
# On the CPU the MLP's elementwise work (bias, activation, their backward) is memory-bound: it runs on
# blocks of states whose hidden activations stay in cache (about 1 MiB of fp32 per intra-op thread,
# each thread taking its share of the rows), as a loop over proposals would, and the activation is
# applied in place where its backward needs only its result.
_CPU_BLOCK_ELEMENTS = 1 << 18


def _activate_fresh(z: torch.Tensor, act: Activation) -> torch.Tensor:
    """act(z) for a ``z`` no other op saved (a fresh matmul or sum): in place where autograd allows."""
    name, param = act
    if name == "relu":
        return torch.relu_(z)
    if name == "elu" and param >= 0:
        return F.elu(z, alpha=param, inplace=True)
    if name == "tanh":
        return torch.tanh_(z)
    return apply_activation(z, act)


def _critic_q(obs: torch.Tensor, actions: torch.Tensor, critic: Critic, dtype: torch.dtype) -> torch.Tensor:
    """Q (B, K) of one critic: the modeled MLP with the first layer split into its state half
    (computed once per state) and its action half, or an opaque module's own forward."""
    if not critic.modeled:
        return module_q(critic, obs, actions, dtype)
    B, K = actions.shape[0], actions.shape[1]
    S = obs.shape[1]
    layers = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in critic.layers]
    w0, b0 = layers[0]
    hs = F.linear(obs.to(dtype), w0[:, :S], b0)  # (B, H0)
    w0_actions = w0[:, S:].contiguous()  # sliced once, not once per block (and its gradient once)
    block = B
    if obs.device.type == "cpu" and not torch.compiler.is_compiling():
        per_block = _CPU_BLOCK_ELEMENTS * torch.get_num_threads()
        block = max(1, per_block // (K * max(w.shape[0] for w, _ in layers)))
    qs = []
    for hs_block, act_block in zip(hs.split(block), actions.to(dtype).split(block)):
        rows = hs_block.shape[0] * K
        z = hs_block.unsqueeze(1) + F.linear(act_block, w0_actions)  # (b, K, H0)
        # in place on z itself: on a view of it autograd would copy the gradient (CopySlices)
        h = _activate_fresh(z, critic.activations[0]).view(rows, -1)
        for (w, b), act in zip(layers[1:-1], critic.activations[1:]):
            h = _activate_fresh(F.linear(h, w, b), act)
        w, b = layers[-1]
        qs.append(F.linear(h, w, b).view(-1, K))
    return qs[0] if len(qs) == 1 else torch.cat(qs)


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


_FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# the registered operator: torch.ops.misa_fast.sampled_q_log_mean_exp
# ----------------------------------------------------------------------------------------------
# Every tensor of the operator carries a leading member dimension M (1 for a single run): the vmap
# rule of a stacked agent's members (misa_fast.agents.members) folds the vmapped dimension into it,
# so that all members run in the launches of one call, at the precision a single run uses.
def _critic_layers(weights, biases, c: int):
    """Critic c's layers, with their member dimension."""
    return [(w[:, c], None if b is None else b[:, c]) for w, b in zip(weights, biases)]


def _kernel_supports(obs, actions, log_weights, weights, biases, activation: str) -> bool:
    k = _kernels()
    tensors = [obs, actions, log_weights, *weights, *biases]
    if not kernel_runs_on(*tensors) or activation not in k.ACTIVATIONS:
        return False
    if any(t is not None and t.dtype not in _FLOAT_KERNEL_DTYPES for t in tensors):
        return False
    return k.unsupported_reason(obs.shape[-1], actions.shape[-1], [tuple(w.shape[2:]) for w in weights]) is None


def _stacked_q(obs, actions, weights, biases, activation: Activation) -> torch.Tensor:
    """Q (M, E, B, K) of member-stacked critics in plain torch (float64 if any input is)."""
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64
                                 for t in [obs, actions, *weights, *biases]) else torch.float32
    S = obs.shape[-1]
    w0 = weights[0].to(dtype)
    hs = obs.to(dtype).unsqueeze(1) @ w0[..., :S].transpose(-1, -2)  # (M, E, B, H0)
    if biases[0] is not None:
        hs = hs + biases[0].to(dtype).unsqueeze(-2)
    ha = actions.to(dtype).unsqueeze(1) @ w0[..., S:].transpose(-1, -2).unsqueeze(2)  # (M, E, B, K, H0)
    h = apply_activation(hs.unsqueeze(-2) + ha, activation)
    for i, (w, b) in enumerate(zip(weights[1:], biases[1:])):
        h = h @ w.to(dtype).transpose(-1, -2).unsqueeze(2)
        if b is not None:
            h = h + b.to(dtype)[:, :, None, None, :]
        if i < len(weights) - 2:
            h = apply_activation(h, activation)
    return h.squeeze(-1)


def _log_partition(q, log_weights, normalizer: float, temperature: float):
    v = q if temperature == 1.0 else q / temperature
    if log_weights is not None:
        v = v + log_weights.to(q.dtype).unsqueeze(1)
    lse = logsumexp_safe(v, -1)
    return (lse if temperature == 1.0 else temperature * lse) - normalizer, lse


@torch.library.custom_op("misa_fast::sampled_q_log_mean_exp", mutates_args=())
def sampled_q_op(
    obs: torch.Tensor,
    actions: torch.Tensor,
    log_weights: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    normalizer: float,
    temperature: float,
    activation: str,
    activation_param: float,
    precision: str,
    groups: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (M, E, B), q (M, E, B, K), lse (M, E, B))`` for obs (M, B, S), actions (M, B, K, A),
    log_weights None or (M, B, K) (any strides, 0 included), weights[l] (M, E, out, in) and biases[l]
    (M, E, out) or None: E same-shaped MLP critics of M members (M = 1 for one run), one
    ``activation`` (a name of ``misa_fast.nets.ACTIVATION_NAMES`` with its ELU alpha / leaky slope)
    between the layers. ``out = T * lse - normalizer`` with ``lse = logsumexp_k(q / T + logw)``;
    q (not divided by T) and lse are not differentiable. The Triton kernels where they run (CUDA
    or the interpreter, fp32/fp16/bf16, the shapes they take) at dot ``precision``, the torch
    reference elsewhere."""
    if _kernel_supports(obs, actions, log_weights, weights, biases, activation):
        return _kernel_forward(obs, actions, log_weights, weights, biases, normalizer, temperature, activation,
                               activation_param, precision)
    q = _stacked_q(obs, actions, weights, biases, Activation(activation, activation_param))
    out, lse = _log_partition(q, log_weights, normalizer, temperature)
    return out, q, lse


def _kernel_forward(obs, actions, log_weights, weights, biases, normalizer, temperature, activation,
                    activation_param, precision):
    """One launch per critic for every member (the kernels' grid axis for the member)."""
    k = _kernels()
    M, E = weights[0].shape[:2]
    B, K = actions.shape[1], actions.shape[2]
    out = obs.new_empty((M, E, B), dtype=torch.float32)
    lse = torch.empty_like(out)
    q = obs.new_empty((M, E, B, K), dtype=torch.float32)
    for c in range(E):
        k.sampled_q_fwd(obs, actions, log_weights, k.critic_spec(_critic_layers(weights, biases, c)), normalizer,
                        k.PRECISIONS[precision], q[:, c], lse[:, c], out[:, c],
                        activation=(k.ACTIVATIONS[activation], activation_param), temperature=temperature)
    return out, q, lse


def _result_dtype(obs, actions, log_weights, weights, biases) -> torch.dtype:
    tensors = [obs, actions, log_weights, *weights, *biases]
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@sampled_q_op.register_fake
def _(obs, actions, log_weights, weights, biases, normalizer, temperature, activation, activation_param, precision,
      groups):
    M, E = weights[0].shape[:2]
    B, K = actions.shape[1], actions.shape[2]
    dtype = _result_dtype(obs, actions, log_weights, weights, biases)
    return (obs.new_empty((M, E, B), dtype=dtype), obs.new_empty((M, E, B, K), dtype=dtype),
            obs.new_empty((M, E, B), dtype=dtype))


@torch.library.custom_op("misa_fast::sampled_q_log_mean_exp_backward", mutates_args=())
def sampled_q_backward_op(
    grad_out: torch.Tensor,
    obs: torch.Tensor,
    actions: torch.Tensor,
    log_weights: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    q: torch.Tensor,
    lse: torch.Tensor,
    normalizer: float,
    temperature: float,
    activation: str,
    activation_param: float,
    precision: str,
    groups: Optional[int],
    needs: List[bool],
) -> List[torch.Tensor]:
    """Gradients of ``sum(grad_out * out)`` w.r.t. ``[obs, actions, *weights, *biases]`` where
    ``needs`` says so (an empty tensor elsewhere, a missing bias included), without the
    log-weights' (the autograd formula computes that one from q and lse)."""
    if _kernel_supports(obs, actions, log_weights, weights, biases, activation):
        return _kernel_backward(grad_out, obs, actions, log_weights, weights, biases, q, lse, temperature,
                                activation, activation_param, precision, groups, needs)
    inputs = [obs, actions, *weights, *biases]
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    if not wanted:
        return [obs.new_empty(0) for _ in inputs]
    L = len(weights)
    lw = None if log_weights is None else log_weights.detach()
    act = Activation(activation, activation_param)

    def out_of(*chosen):
        values = list(inputs)
        for i, t in zip(wanted, chosen):
            values[i] = t
        o, a, *layers = values
        return _log_partition(_stacked_q(o, a, layers[:L], layers[L:], act), lw, normalizer, temperature)[0]

    # torch.func, not torch.autograd: an operator's implementation runs below the autograd keys
    out, vjp = torch.func.vjp(out_of, *[inputs[i].detach() for i in wanted])
    grads = dict(zip(wanted, vjp(grad_out.to(out.dtype))))
    return [grads[i].to(t.dtype) if i in grads else obs.new_empty(0) for i, t in enumerate(inputs)]


def _kernel_backward(grad_out, obs, actions, log_weights, weights, biases, q, lse, temperature, activation,
                     activation_param, precision, groups, needs):
    """The backward kernels' launches, each for every member."""
    k = _kernels()
    E = weights[0].shape[1]
    L = len(weights)
    dobs = torch.empty(obs.shape, device=obs.device, dtype=torch.float32) if needs[0] else None
    dact = torch.empty(actions.shape, device=actions.device, dtype=torch.float32) if needs[1] else None
    specs = [k.critic_spec(_critic_layers(weights, biases, c)) for c in range(E)]
    grads = k.sampled_q_bwd(obs, actions, log_weights, specs, q, lse, grad_out.float(), k.PRECISIONS[precision],
                            dobs=dobs, dact=dact, groups=groups,
                            activation=(k.ACTIVATIONS[activation], activation_param), temperature=temperature)
    # the kernel's order: weight then bias of each layer, each (M, E, ...)
    layer_grads = [grads[2 * j] for j in range(L)] + [grads[2 * j + 1] for j in range(L)]
    inputs = [obs, actions, *weights, *biases]

    def own(grad, like):  # views of one reduced buffer are copied: an operator's outputs may not alias
        out = grad.to(like.dtype).view(like.shape)
        return out.clone() if out.data_ptr() == grad.data_ptr() else out

    return [obs.new_empty(0) if not need or t is None else (d.to(t.dtype) if i < 2 else own(d, t))
            for i, (d, t, need) in enumerate(zip([dobs, dact, *layer_grads], inputs, needs))]


@sampled_q_backward_op.register_fake
def _(grad_out, obs, actions, log_weights, weights, biases, q, lse, normalizer, temperature, activation,
      activation_param, precision, groups, needs):
    inputs = [obs, actions, *weights, *biases]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None
            else obs.new_empty(0) for t, need in zip(inputs, needs)]


def _sampled_q_setup(ctx, inputs, output):
    obs, actions, log_weights, weights, biases, *options = inputs
    _out, q, lse = output
    ctx.save_for_backward(obs, actions, log_weights, q, lse, *weights, *[b for b in biases if b is not None])
    ctx.has_bias = [b is not None for b in biases]
    ctx.options = options
    ctx.needs = [t is not None and t.requires_grad for t in [obs, actions, *weights, *biases]]
    ctx.mark_non_differentiable(q, lse)


def _first_order_only(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` behind a node that raises when it is differentiated (a double backward): the formula
    holds q and lse constant, so its own derivative would silently drop their terms."""
    if not torch.is_grad_enabled() or not grad.requires_grad:
        return grad
    return torch._C._functions.DelayedError(
        b"sampled_q_log_mean_exp: second-order gradients are not supported by the fused kernel's "
        b"backward; use backend='torch' for a double backward", 1)(grad)


def _sampled_q_backward(ctx, grad_out, _grad_q, _grad_lse):
    obs, actions, log_weights, q, lse, *layers = ctx.saved_tensors
    L = len(ctx.has_bias)
    weights, present = layers[:L], iter(layers[L:])
    biases = [next(present) if has else None for has in ctx.has_bias]
    normalizer, temperature, activation, activation_param, precision, groups = ctx.options
    grads = sampled_q_backward_op(grad_out, obs, actions, log_weights, weights, biases, q, lse, normalizer,
                                  temperature, activation, activation_param, precision, groups, ctx.needs)
    grads = [gr if need else None for gr, need in zip(grads, ctx.needs)]
    dlw = None
    if log_weights is not None and log_weights.requires_grad:
        # d out / d logw_bk = T * softmax_k(q_b / T + logw_b), summed over the critics
        lse_safe = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)
        p = torch.exp(q / temperature + log_weights.to(q.dtype).unsqueeze(1) - lse_safe.unsqueeze(-1))
        dlw = _first_order_only((temperature * p * grad_out.to(q.dtype).unsqueeze(-1)).sum(1).to(log_weights.dtype))
    # a list of biases that are all None is one leaf of the inputs' structure: its gradient is one None
    bias_grads = grads[2 + L:] if any(ctx.has_bias) else None
    return (grads[0], grads[1], dlw, grads[2:2 + L], bias_grads, None, None, None, None, None, None)


sampled_q_op.register_autograd(_sampled_q_backward, setup_context=_sampled_q_setup)


def _with_members(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    """A vmapped operand with the vmapped dimension folded into its member dimension (a shared
    operand repeated for every vmapped entry: a stride-0 view where its member dimension is 1)."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


@sampled_q_op.register_vmap
def _(info, in_dims, obs, actions, log_weights, weights, biases, *options):
    V = info.batch_size
    obs_d, act_d, lw_d, w_d, b_d = in_dims[:5]
    w_d = w_d if isinstance(w_d, (list, tuple)) else [w_d] * len(weights)
    b_d = b_d if isinstance(b_d, (list, tuple)) else [b_d] * len(biases)
    folded = sampled_q_op(_with_members(obs, obs_d, V), _with_members(actions, act_d, V),
                          _with_members(log_weights, lw_d, V),
                          [_with_members(w, d, V) for w, d in zip(weights, w_d)],
                          [_with_members(b, d, V) for b, d in zip(biases, b_d)], *options)
    return tuple(t.reshape(V, -1, *t.shape[1:]) for t in folded), (0, 0, 0)


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


def _use_kernel(backend, obs, actions, cset: CriticSet, log_weights) -> bool:
    """Whether the Triton kernels run this call; raises when they were asked for and cannot."""
    first = next((c.layers[0][0] for c in cset.critics if c.modeled), None)
    if resolve_backend(backend, obs, actions, first, members=True) != "triton":
        return False
    why = _triton_unsupported(obs, actions, cset, log_weights)
    if why is not None and requested_backend(backend) == "triton":
        raise CriticArchitectureError(f"sampled_q_log_mean_exp: the Triton kernel does not support this call: {why}")
    return why is None


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
    if not _use_kernel(backend, obs, actions, cset, log_weights):
        return _reference(obs, actions, cset, log_weights, norm, return_q, T)
    lw = _log_weights(log_weights, B, K)
    act = cset.activation()
    weights, biases = _stacked_layers(cset)
    out, q, _lse = sampled_q_op(obs.unsqueeze(0), actions.unsqueeze(0), None if lw is None else lw.unsqueeze(0),
                                [w.unsqueeze(0) for w in weights],
                                [None if b is None else b.unsqueeze(0) for b in biases],
                                norm, T, act.name, float(act.param), precision, groups)
    return (out[0], q[0]) if return_q else out[0]


def _stacked_layers(cset: CriticSet):
    """Per layer, the (E, out, in) weights and (E, out) biases of the critics (None: no bias at all):
    a stacked ensemble's own tensors, or per-critic layers stacked (gradients flow back to each)."""
    if cset.stacked is not None:
        return [w for w, _ in cset.stacked], [b for _, b in cset.stacked]
    weights, biases = [], []
    for j in range(len(cset.critics[0].layers)):
        layer = [c.layers[j] for c in cset.critics]
        weights.append(torch.stack([w for w, _ in layer]))
        if all(b is None for _, b in layer):
            biases.append(None)
        else:
            biases.append(torch.stack([w.new_zeros(w.shape[0]) if b is None else b for w, b in layer]))
    return weights, biases


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
