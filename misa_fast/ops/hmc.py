"""Fused HMC sampler for the MISA target: the whole chain in one Triton launch (``kernels/hmc_kernels.py``).

:func:`hmc_sample` has the signature and the return type (:class:`misa_fast.ops.hmc_reference.HMCResult`) of the
torch reference :func:`misa_fast.ops.hmc_reference.hmc_sample`, plus ``precision`` and ``backend``. It runs the
Triton kernel for CUDA tensors and the reference otherwise (``backend=``, :func:`use_backend` or
``MISA_FAST_OPS`` force either; see :mod:`misa_fast.ops.dispatch`).

Noise, two ways:

- ``noise=HMCNoise(momentum (T, C, A), uniform (T, C))`` supplied: the kernel consumes exactly what
  the reference consumes, transition by transition; with ``precision="ieee"`` it reproduces the
  reference's accept decisions and samples to float rounding (a decision can only differ where
  ``uniform`` and the acceptance probability agree to ~1e-6).
- ``noise=None``: the reference draws ``draw_noise(..., generator)``; the kernel instead draws ONE
  int64 seed from ``generator`` (or the default generator of the device), as a device tensor (no
  host sync, CUDA-graph capturable), and generates momentum and uniforms in-kernel (Philox). Same
  distribution, different stream: the samples are statistically, not numerically, those of the
  reference. Determinism and resume follow the generator's state, as with the reference.

Precision of the hidden-layer dots on the GPU (default: PyTorch's own
``torch.get_float32_matmul_precision()``, "highest" -> ieee, "high" -> tf32, "medium" -> bf16): ``"tf32"``, ``"tf32x3"``
(three tf32 products, ~fp32 accuracy on tensor cores; the chain is bound by streaming weights from
L2, so the extra MMAs are expected to cost little; the GPU check times it. It is what the MISA agent runs: its config's
``hmc_precision`` defaults to it), ``"ieee"`` (fp32 FMA dots: agreement with the reference to float
rounding) or ``"bf16"`` (bf16 weights and activations, half the L2 traffic, a coarser target).
tf32 rounds the dot inputs to 10 mantissa bits: Q carries a relative error of ~1e-3, i.e. an
absolute error of ~0.1-0.5 at |Q| ~ 100-500 (locomotion returns), which perturbs the target exp(Q)
accordingly. The chain state, momentum, log-densities and the Metropolis ratio are fp32 in all
cases. The reference ignores ``precision``. Registers, spills and the MMA instructions of every
configuration, per architecture: bench/results/kernels-aot-2026-12-02.md.

Critics: stacked layers (weights (E, out, in)) and their activation, read from the layers
(``EnsembleCritic.stacked_layers()`` carries it) or given as ``activation=``; plain tensors without
one are refused (``CriticArchitectureError``), never computed as some default network. Supported by
the kernel: 1 to 4 hidden layers with one of ReLU, ELU(alpha), LeakyReLU(slope), SiLU, Tanh, GELU
(exact or tanh) everywhere, hidden widths <= 256, action dim 1..32, fp32/fp16/bf16 tensors on one
device. Anything else (5 or more hidden layers, wider layers, float64) runs the reference under
``"auto"`` (float64 stays float64) and raises ``ValueError`` (``CriticArchitectureError``) under
``"triton"``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from misa_fast.nets import ACTIVATION_NAMES, Layers, layers_activation
from misa_fast.ops import hmc_reference as hmc_lib
from misa_fast.ops.critics import CriticArchitectureError
from misa_fast.ops.dispatch import kernel_runs_on, requested_backend, resolve_backend, resolve_precision
from misa_fast.ops.hmc_reference import HMCNoise, HMCResult, layout

__all__ = ["hmc_sample", "hmc_sample_reference", "hmc_chains_op"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _activation(critic_layers, activation):
    carried = layers_activation(critic_layers)
    explicit = layers_activation([], activation)
    if carried is not None and explicit is not None and carried != explicit:
        raise CriticArchitectureError(f"hmc_sample: activation={explicit} was given but the critic layers carry "
                                      f"{carried} (the network they came from)")
    spec = layers_activation(critic_layers, activation)
    if spec is None:
        raise CriticArchitectureError(
            "hmc_sample: plain (weight, bias) tensors do not say which activation runs between the critic layers; "
            f"pass activation= (one of {ACTIVATION_NAMES} or an activation module such as nn.ReLU()), or the layers "
            "of a misa_fast.nets.EnsembleCritic (stacked_layers() carries its activation)")
    return spec


def hmc_sample_reference(policy_mean, policy_std, critic_layers, state_half, init_actions, *, activation=None, **kw):
    """The torch reference :func:`misa_fast.ops.hmc_reference.hmc_sample` with the activation resolved as
    :func:`hmc_sample` resolves it (required for plain tensors)."""
    return hmc_lib.hmc_sample(policy_mean, policy_std, critic_layers, state_half, init_actions,
                              activation=_activation(critic_layers, activation), **kw)


def _kernels():
    from misa_fast.kernels import hmc_kernels as k

    return k


def k_activations():
    return _kernels().ACTIVATIONS


def _triton_unsupported(policy_mean, policy_std, layers, state_half, init_actions, noise, step_size,
                        chains) -> Optional[str]:
    """Why the fused kernel cannot run this call (None when it can)."""
    k = _kernels()
    weights = [t for wb in layers for t in wb if t is not None]
    tensors = [policy_mean, policy_std, state_half, init_actions, *weights]
    if noise is not None:
        tensors += [noise.momentum, noise.uniform]
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "float64 tensors: the kernel computes in float32 (the torch path keeps float64)"
    if any(t.dtype not in _FLOATS for t in tensors if t is not None):
        return "the kernel takes fp32/fp16/bf16 tensors"
    if torch.is_tensor(step_size) and step_size.numel() not in (1, chains):
        return f"step_size has {step_size.numel()} entries, expected 1 or {chains}"  # the reference raises
    if len({t.device for t in tensors}) != 1:
        return "all tensors must be on one device"
    B, A = init_actions.shape
    if policy_mean.shape != (B, A) or policy_std.shape != (B, A):
        return "policy mean/std must be (B, A) like init_actions"
    shapes = [tuple(w.shape) for w, _ in layers]
    if any(len(s) != 3 for s in shapes):
        return "critic weights must be stacked (E, out, in)"
    S = shapes[0][2] - A
    why = k.unsupported_reason(S, A, shapes)
    if why is not None:
        return why
    E, H0 = shapes[0][0], shapes[0][1]
    if tuple(state_half.shape) != (E, B, H0):
        return f"state_half must be (E, B, H0) = {(E, B, H0)}, got {tuple(state_half.shape)}"
    if any(w.shape[0] != E for w in weights):
        return "all critic layers must stack the same number of critics"
    return None


@torch.no_grad()
def hmc_sample(
    policy_mean: Tensor,
    policy_std: Tensor,
    critic_layers: Layers,
    state_half: Tensor,
    init_actions: Tensor,
    *,
    mode: str = "faithful",
    space: str = "post_tanh",
    num_samples: int = 50,
    burn_in: int = 5,
    leapfrog_steps: int = 2,
    step_size: Union[float, Tensor, None] = None,
    adapt: Optional[bool] = None,
    target_accept: float = 0.65,
    adapt_rate: float = 0.5,
    noise: Optional[HMCNoise] = None,
    generator: Optional[torch.Generator] = None,
    init_clip: float = 0.999,
    activation=None,
    precision: Optional[str] = None,
    backend: Optional[str] = None,
) -> HMCResult:
    """K samples per state of pi(a|s) exp(min_i Q_i(s, a)) / Z(s) by HMC; see
    :func:`misa_fast.ops.hmc_reference.hmc_sample` for the arguments and the modes ("faithful", "adaptive",
    "parallel") and spaces ("post_tanh", "pre_tanh"). ``activation``: the critics' hidden activation
    (a name of ``misa_fast.nets.ACTIVATION_NAMES``, an activation module, or ``Activation``);
    required unless ``critic_layers`` carry it (``EnsembleCritic.stacked_layers()`` does).
    ``precision``: Triton dot precision ("tf32", "tf32x3", "ieee" or "bf16"; None follows
    ``torch.get_float32_matmul_precision()``: "highest" -> ieee, "high" -> tf32, "medium" -> bf16);
    ``backend``: "triton", "torch" or "auto". Returns :class:`misa_fast.ops.hmc_reference.HMCResult`: samples
    (B, K, A), accept_rate and accept_prob (0-dim), step_size (C,) after adaptation, accepted (T, C)
    bool."""
    precision = resolve_precision(precision, ("tf32", "tf32x3", "bf16", "ieee", "fp32"))
    act = _activation(critic_layers, activation)
    if leapfrog_steps < 1:
        raise ValueError(f"leapfrog_steps must be >= 1, got {leapfrog_steps}")
    if space not in hmc_lib.SPACES:
        raise ValueError(f"unknown HMC space {space!r}; choose one of {hmc_lib.SPACES}")
    if step_size is None:
        step_size = hmc_lib.default_step_size(space, leapfrog_steps)
    batch, act_dim = init_actions.shape
    chains, transitions = layout(mode, batch, num_samples, burn_in)
    kw = dict(mode=mode, space=space, num_samples=num_samples, burn_in=burn_in, leapfrog_steps=leapfrog_steps,
              step_size=step_size, adapt=adapt, target_accept=target_accept, adapt_rate=adapt_rate, noise=noise,
              generator=generator, init_clip=init_clip, activation=act)
    layers = [(w, b) for w, b in critic_layers]
    if not _use_kernel(backend, policy_mean, policy_std, layers, state_half, init_actions, noise, step_size,
                       chains, act):
        return hmc_lib.hmc_sample(policy_mean, policy_std, layers, state_half, init_actions, **kw)
    if noise is not None:
        hmc_lib.check_noise(noise, mode, transitions, chains, act_dim)
    return _sample_with_kernel(policy_mean, policy_std, layers, state_half, init_actions, chains=chains,
                               transitions=transitions, precision=precision, **kw)


def _use_kernel(backend, policy_mean, policy_std, layers, state_half, init_actions, noise, step_size, chains,
                act) -> bool:
    """Whether the Triton kernel runs this call; raises when it was asked for and cannot."""
    if resolve_backend(backend, policy_mean, policy_std, state_half, init_actions, layers[0][0],
                       members=True) != "triton":
        return False
    why = _triton_unsupported(policy_mean, policy_std, layers, state_half, init_actions, noise, step_size, chains)
    if why is None and act.name not in k_activations():
        why = f"activation {act} is not compiled into the kernel"
    if why is not None and requested_backend(backend) == "triton":
        raise CriticArchitectureError(f"hmc_sample: the Triton kernel does not support this call: {why}")
    return why is None


def _sample_with_kernel(policy_mean, policy_std, layers, state_half, init_actions, *, chains, transitions,
                        precision, mode, space, num_samples, burn_in, leapfrog_steps, step_size, adapt,
                        target_accept, adapt_rate, noise, generator, init_clip, activation) -> HMCResult:
    """The whole chain in one launch of the registered operator (inside a stacked agent's vmap its
    vmap rule launches every member's chains at once)."""
    k = _kernels()
    dev = init_actions.device
    batch, act_dim = init_actions.shape
    if torch.is_tensor(step_size):
        step = step_size.detach().to(device=dev, dtype=torch.float32).reshape(-1).expand(chains).contiguous()
    else:
        step = torch.full((chains,), float(step_size), device=dev, dtype=torch.float32)
    seed = momentum = uniform = None
    if noise is None:
        gen_dev = generator.device if generator is not None else dev
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev, dtype=torch.int64).to(dev)
    else:
        momentum, uniform = noise.momentum.detach(), noise.uniform.detach()
    if adapt is None:
        adapt = mode == "adaptive"
    options = dict(
        transitions=transitions, leapfrog_steps=leapfrog_steps, repeats=num_samples if mode == "parallel" else 1,
        record_from=burn_in, adapt_steps=burn_in if adapt else 0, target_accept=target_accept,
        adapt_rate=adapt_rate, init_clip=init_clip, precision=precision, split=space == "pre_tanh",
        max_step=hmc_lib.max_step_size(leapfrog_steps, space == "pre_tanh"), activation=activation.name,
        activation_param=float(activation.param),
    )
    tensors = (policy_mean.detach(), policy_std.detach(), init_actions.detach(), state_half.detach(), step,
               momentum, uniform, seed)
    weights = [w.detach() for w, _ in layers]
    biases = [None if b is None else b.detach() for _, b in layers]
    out = k.HMCKernelOutput(*hmc_chains_op(*tensors, weights, biases, **options))
    # parallel: chain b*K + k -> (b, k); else (B, K, A), chain b recorded K times
    states = out.states.view(batch, num_samples, act_dim) if mode == "parallel" else out.states
    pre_tanh = None
    if space == "pre_tanh":  # the kernel recorded u
        pre_tanh = states.to(init_actions.dtype)
        states = torch.tanh(states)
    return HMCResult(samples=states.to(init_actions.dtype), accept_rate=out.accepted.float().mean(),
                     accept_prob=out.accept_prob.mean(), step_size=out.step_size, accepted=out.accepted,
                     pre_tanh=pre_tanh)


# ----------------------------------------------------------------------------------------------
# the registered operator: torch.ops.misa_fast.hmc_chains
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("misa_fast::hmc_chains", mutates_args=())
def hmc_chains_op(
    mean: Tensor,
    std: Tensor,
    init: Tensor,
    state_half: Tensor,
    step_size: Tensor,
    momentum: Optional[Tensor],
    uniform: Optional[Tensor],
    seed: Optional[Tensor],
    weights: List[Tensor],
    biases: List[Optional[Tensor]],
    transitions: int,
    leapfrog_steps: int,
    repeats: int,
    record_from: int,
    adapt_steps: int,
    target_accept: float,
    adapt_rate: float,
    init_clip: float,
    precision: str,
    split: bool,
    max_step: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One launch of the HMC kernel (``kernels/hmc_kernels.py``, ``hmc_chains``): ``(states (C, R, A),
    accepted (T, C) bool, accept_prob (T, C), step_size (C,))`` for C = B * repeats chains, R =
    transitions - record_from recorded states; with a leading member dimension M on every operand
    (``mean`` (M, B, A), weights (M, E, out, in), ...) the chains of M members in one launch, the
    outputs with that dimension too. Noise: ``momentum`` (T, C, A) and ``uniform`` (T, C), or a
    one-element int64 ``seed`` of the in-kernel stream. Nothing is differentiable. Runs where a
    Triton kernel runs (CUDA, or the interpreter); :func:`hmc_sample` takes the torch reference
    elsewhere."""
    tensors = [mean, std, init, state_half, step_size, momentum, uniform, *weights, *biases]
    if not kernel_runs_on(*tensors):
        raise RuntimeError("misa_fast::hmc_chains runs the Triton kernel: it needs CUDA tensors (or the Triton "
                           "interpreter, TRITON_INTERPRET=1); hmc_sample computes the torch reference elsewhere")
    k = _kernels()
    out = k.hmc_chains(mean, std, init, list(zip(weights, biases)), state_half, step_size, transitions=transitions,
                       leapfrog_steps=leapfrog_steps, repeats=repeats, record_from=record_from,
                       adapt_steps=adapt_steps, target_accept=target_accept, adapt_rate=adapt_rate,
                       init_clip=init_clip, momentum=momentum, uniform=uniform, seed=seed,
                       precision=k.PRECISIONS[precision], split=split, max_step=max_step,
                       activation=(k.ACTIVATIONS[activation], activation_param))
    # accepted is the kernel's uint8 buffer viewed as bool: an operator returns a tensor of its own
    return out.states, out.accepted.clone(), out.accept_prob, out.step_size


@hmc_chains_op.register_fake
def _(mean, std, init, state_half, step_size, momentum, uniform, seed, weights, biases, transitions, leapfrog_steps,
      repeats, record_from, adapt_steps, target_accept, adapt_rate, init_clip, precision, split, max_step,
      activation, activation_param):
    lead = tuple(mean.shape[:-2])  # (M,) for several members, () for one
    B, A = init.shape[-2:]
    C, T = B * repeats, transitions
    f32 = dict(dtype=torch.float32)
    return (mean.new_empty(lead + (C, max(0, T - record_from), A), **f32),
            mean.new_empty(lead + (T, C), dtype=torch.bool), mean.new_empty(lead + (T, C), **f32),
            mean.new_empty(lead + (C,), **f32))


def _hmc_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)
    ctx.list_lengths = (len(inputs[8]), None if all(b is None for b in inputs[9]) else len(inputs[9]))


def _hmc_backward(ctx, *_grads):
    # the samples carry no gradient (hmc_sample runs under no_grad); a list of biases that are all
    # None is one leaf of the inputs' structure
    n_weights, n_biases = ctx.list_lengths
    return (None,) * 8 + ([None] * n_weights, None if n_biases is None else [None] * n_biases) + (None,) * 13


hmc_chains_op.register_autograd(_hmc_backward, setup_context=_hmc_setup)


@hmc_chains_op.register_vmap
def _(info, in_dims, mean, std, init, state_half, step_size, momentum, uniform, seed, weights, biases, *options):
    """Under ``torch.func.vmap`` over members (a stacked agent, misa_fast.agents.members): the chains
    of every member in one launch, each member reading its own critics and policy statistics."""
    def stacked(t, dim):
        if t is None:
            return None
        if dim is None:  # shared by every member: the same tensor for each
            return t.expand(info.batch_size, *t.shape)
        return t.movedim(dim, 0)

    dims = list(in_dims)
    w_dims = dims[8] if isinstance(dims[8], (list, tuple)) else [dims[8]] * len(weights)
    b_dims = dims[9] if isinstance(dims[9], (list, tuple)) else [dims[9]] * len(biases)
    operands = [stacked(t, d) for t, d in zip((mean, std, init, state_half, step_size, momentum, uniform), dims)]
    if seed is not None and dims[7] is not None:
        seed = seed.movedim(dims[7], 0)[0]  # one in-kernel stream; the members differ by their counters
    out = hmc_chains_op(*operands, seed, [stacked(w, d) for w, d in zip(weights, w_dims)],
                        [stacked(b, d) for b, d in zip(biases, b_dims)], *options)
    return out, (0, 0, 0, 0)
