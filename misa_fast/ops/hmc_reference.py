"""Hamiltonian Monte Carlo for the unbiased actor gradient of MISA (paper eq. 15), plain torch.

The target, per state s, is the tilted policy p(a|s) ~ pi(a|s) exp(min_i Q_i(s, a)). Two spaces:

  "post_tanh" (the official sampler) chains move the action a itself (tanh Jacobian included in
              log pi); positions outside the open box (-1, 1)^A have density 0, so a proposal that
              leaves it at any leapfrog position is rejected. Unit-mass Gaussian momentum.
  "pre_tanh"  chains move the whitened pre-tanh action z = (atanh(a) - mu(s)) / sigma(s): the
              target is N(z; 0, I) exp(Q(s, tanh(mu + sigma z))), whose samples map to exactly the
              same p(a|s) (a = tanh(u) with u ~ N(mu, sigma) tilted by exp(Q)). There is no support
              boundary, and the whitening is the policy's per-state std used as the mass matrix, so
              one step size serves every state and dimension. The Gaussian part is integrated
              exactly (a rotation of (z, p) by the step size, "split" HMC), only Q's gradient
              kicks the momentum: with Q = 0 every transition is accepted and a total rotation of
              pi/2 (the default step size, pi / (2 L)) draws an independent policy sample, however
              far in the tail the chain starts.
              Samples are returned as actions and as pre-tanh u (``HMCResult.pre_tanh``), so
              log pi of a sample never goes through atanh(+-1).

``leapfrog_steps`` leapfrog steps per transition, Metropolis accept/reject. This file is the
reference for the fused kernel, and it is also the eager implementation the agent runs.

Modes (B states, K samples per state):
  "faithful"  one chain per state started at the dataset action; ``burn_in`` transitions, then the
              states after each of the next K transitions are the samples (burn_in + K transitions,
              the official sampler).
  "adaptive"  the faithful chain with a per-chain step size adapted during burn-in only (adapting
              while recording would break detailed balance): after each burn-in transition
              log(step) += adapt_rate * (acceptance probability - target_accept). The acceptance
              probability min(1, exp(-dH)) is used rather than the 0/1 decision: same fixed point,
              less noise. With 5 burn-in transitions this mostly refines; the agent carries the
              geometric mean of the adapted step sizes over to the next training step.
  "parallel"  K independent chains per state (chain b*K + k samples state b), each started at the
              dataset action and run burn_in + 1 transitions; the last state of each is a sample.
              K times the FLOPs, burn_in + 1 sequential transitions instead of burn_in + K.

Randomness enters only through ``HMCNoise``: momentum (T, C, A) standard normal and uniform (T, C)
in [0, 1), T transitions, C chains. Transition t uses momentum[t] and accepts iff
uniform[t] < min(1, exp(-dH)). Supplying the noise makes the sampler deterministic, so a fused
implementation can be compared with this one exactly.

The core loop ``run_chains`` takes any log-density closure x -> (log p(x), grad log p(x)); the fast
closure ``policy_q_log_density`` computes the gradient analytically from precomputed policy
mean/std and the critics' state halves (computed once per training step, not per leapfrog).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from misa_fast.nets import ATANH_LIMIT, Layers, ensemble_q_and_action_grad, layers_activation, tanh_log_det_jacobian

MODES = ("faithful", "adaptive", "parallel")
SPACES = ("post_tanh", "pre_tanh")
# Bounds of the adapted step size: keeps a chain that met a cliff from freezing or exploding.
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 10.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)



def default_step_size(space: str, leapfrog_steps: int) -> float:
    """1 post-tanh (the official sampler's); pre-tanh, a quarter rotation per transition
    (L * step = pi / 2): with Q = 0 each transition then draws a fresh policy sample from any start,
    whereas a larger rotation carries a chain started far in one tail (a dataset action the policy
    finds unlikely) to the far side of the other, where the tilt can reject it again and again."""
    return 0.5 * math.pi / leapfrog_steps if space == "pre_tanh" else 1.0


def max_step_size(leapfrog_steps: int, split: bool) -> float:
    """Upper bound of an adapted step size. Split (pre-tanh) chains: a quarter period of the exact
    Gaussian rotation per transition (L * step = pi / 2 already proposes an independent policy
    sample; towards L * step = pi the chain would only flip z -> -z, and adaptation, which sees a
    high acceptance there, would walk into that resonance)."""
    return 0.5 * math.pi / leapfrog_steps if split else MAX_STEP_SIZE


LogDensity = Callable[[Tensor], Tuple[Tensor, Tensor]]  # x (C, A) -> (log p (C,), grad (C, A))


class HMCNoise(NamedTuple):
    momentum: Tensor  # (T, C, A) standard normal
    uniform: Tensor  # (T, C) uniform in [0, 1)


class HMCResult(NamedTuple):
    samples: Tensor  # (B, K, A), no gradient
    accept_rate: Tensor  # 0-dim: fraction of accepted transitions (all T transitions, all chains)
    accept_prob: Tensor  # 0-dim: mean Metropolis acceptance probability
    step_size: Tensor  # (C,) per-chain step size after adaptation (the input when not adapting)
    accepted: Tensor  # (T, C) bool, the accept decisions
    pre_tanh: Optional[Tensor] = None  # (B, K, A) atanh of the samples, exact ("pre_tanh" space only)


class ChainOutput(NamedTuple):
    states: Tensor  # (R, C, A): the states after transitions record_from .. T-1
    accepted: Tensor  # (T, C) bool
    accept_prob: Tensor  # (T, C)
    step_size: Tensor  # (C,)


def layout(mode: str, batch_size: int, num_samples: int, burn_in: int) -> Tuple[int, int]:
    """(number of chains C, number of transitions T) of a mode."""
    if mode in ("faithful", "adaptive"):
        return batch_size, burn_in + num_samples
    if mode == "parallel":
        return batch_size * num_samples, burn_in + 1
    raise ValueError(f"unknown HMC mode {mode!r}; choose one of {MODES}")


def draw_noise(
    mode: str,
    batch_size: int,
    num_samples: int,
    burn_in: int,
    act_dim: int,
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> HMCNoise:
    """All the randomness of one ``hmc_sample`` call; momentum is drawn first, then uniforms."""
    chains, transitions = layout(mode, batch_size, num_samples, burn_in)
    momentum = torch.randn((transitions, chains, act_dim), generator=generator, device=device, dtype=dtype)
    uniform = torch.rand((transitions, chains), generator=generator, device=device, dtype=dtype)
    return HMCNoise(momentum, uniform)


def check_noise(noise: HMCNoise, mode: str, transitions: int, chains: int, act_dim: int) -> None:
    """Supplied noise must have the shapes ``draw_noise`` would give this call."""
    if noise.momentum.shape != (transitions, chains, act_dim) or noise.uniform.shape != (transitions, chains):
        raise ValueError(
            f"HMC noise for mode {mode!r} needs momentum {(transitions, chains, act_dim)} and uniform "
            f"{(transitions, chains)}, got {tuple(noise.momentum.shape)} and {tuple(noise.uniform.shape)}"
        )


# --------------------------------------------------------------------------------------------------
class Transitions(NamedTuple):
    x: Tensor  # (C, A) state after the last transition
    log_p: Tensor  # (C,) log density there
    grad: Tensor  # (C, A) its gradient (cached for the next transition)
    step: Tensor  # (C,) step size for the next transition
    states: Tensor  # (n, C, A) the state after each transition
    accepted: Tensor  # (n, C) bool
    accept_prob: Tensor  # (n, C) Metropolis acceptance probability


def hmc_transitions(
    log_density: LogDensity,
    x: Tensor,
    log_p: Tensor,
    grad: Tensor,
    step: Tensor,
    momentum: Tensor,
    uniform: Tensor,
    leapfrog_steps: int,
    adapt: bool = False,
    target_accept: float = 0.65,
    adapt_rate: float = 0.5,
    split: bool = False,
) -> Transitions:
    """n = len(momentum) consecutive HMC transitions of C chains from x (with its cached log p and
    gradient): momentum (n, C, A), uniform (n, C); ``adapt`` moves the per-chain step sizes towards
    ``target_accept`` after each. The unit that ``run_chains`` runs, eagerly or through one compiled
    graph (see ``compiled_transitions``).

    ``split``: the target is N(x; 0, I) exp(log_density(x)); the Gaussian part is integrated exactly
    (a rotation of (x, p) by the step size), ``log_density`` only kicks the momentum (Strang
    splitting: still volume-preserving and reversible, so the Metropolis step stays exact)."""
    states, accepted, accept_prob = [], [], []
    for t in range(momentum.shape[0]):
        eps, p0 = step.unsqueeze(-1), momentum[t]
        if split:
            cos, sin = torch.cos(eps), torch.sin(eps)
        # Leapfrog: half momentum step, (full position step, full momentum step) x L with the last
        # momentum step halved. The gradient at the current state is cached from the last transition.
        p = p0 + 0.5 * eps * grad
        x_new, in_support = x, None
        for leap in range(leapfrog_steps):
            if split:
                x_new, p = x_new * cos + p * sin, p * cos - x_new * sin
            else:
                x_new = x_new + eps * p
            log_p_new, grad_new = log_density(x_new)
            finite = torch.isfinite(log_p_new)
            in_support = finite if in_support is None else in_support & finite
            p = p + (0.5 if leap == leapfrog_steps - 1 else 1.0) * eps * grad_new
        # log of the Metropolis ratio exp(-H(x', p') + H(x, p)), H = -log p(x) + |p|^2 / 2
        kinetic_new, kinetic = 0.5 * (p * p).sum(-1), 0.5 * (p0 * p0).sum(-1)
        if split:  # the Gaussian part of -log p
            kinetic_new, kinetic = kinetic_new + 0.5 * (x_new * x_new).sum(-1), kinetic + 0.5 * (x * x).sum(-1)
        log_ratio = (log_p_new - kinetic_new) - (log_p - kinetic)
        # Acceptance probability min(1, exp(log_ratio)); 0 off the support or for a NaN ratio (an
        # overflowing trajectory), so neither the decision nor the step-size adaptation sees a NaN.
        prob = torch.exp(log_ratio.clamp(max=0.0)).nan_to_num_(nan=0.0)
        prob = torch.where(in_support, prob, torch.zeros_like(prob))
        accept = uniform[t] < prob
        x = torch.where(accept.unsqueeze(-1), x_new, x)
        log_p = torch.where(accept, log_p_new, log_p)
        grad = torch.where(accept.unsqueeze(-1), grad_new, grad)
        if adapt:
            step = (step * torch.exp(adapt_rate * (prob - target_accept))).clamp(
                MIN_STEP_SIZE, max_step_size(leapfrog_steps, split))
        states.append(x)
        accepted.append(accept)
        accept_prob.append(prob)
    return Transitions(x, log_p, grad, step, torch.stack(states), torch.stack(accepted), torch.stack(accept_prob))


# What run_chains runs, and in pieces of how many transitions: hmc_transitions eagerly in one piece
# per adaptation phase, or compiled (``compiled_transitions``) in short pieces; the innermost block
# wins. A module-level stack, so that the switch needs no new argument through the agent and the
# ops, and dynamo can trace the read (it cannot trace a ContextVar's), so that a whole chain also
# traces inside a stacked agent's member vmap.
_runner: list = [(hmc_transitions, None)]

# Transitions per compiled piece. At the reference case on a 2-core CPU (full training step, one run of
# `pytest bench/bench_step.py -k "faithful-K50-BI5-hopper-cpu and not adaptive"`): pieces of 5 take
# 210 ms a step and 55 s to compile, the whole chain unrolled 192 ms and 193 s, eager 321 ms.
COMPILED_PIECE = 5


@contextlib.contextmanager
def compiled_transitions(piece: int = COMPILED_PIECE, **compile_options) -> Iterator[None]:
    """Within the block, ``run_chains`` runs the chain ``piece`` transitions at a time through
    ``torch.compile`` of :func:`hmc_transitions` (log density included): a handful of graphs (one
    per piece length and adaptation flag) reused by every piece of every call. Same noise, same
    arithmetic up to float rounding. ``compile_options`` go to ``torch.compile``
    (default ``dynamic=False``)."""
    if piece < 1:
        raise ValueError(f"compiled_transitions: piece must be >= 1, got {piece}")
    try:
        compiled = _compiled_transitions(tuple(sorted(compile_options.items())))
    except TypeError:  # an unhashable option (a dict of inductor options): compiled for this block only
        compiled = torch.compile(hmc_transitions, **{"dynamic": False, **compile_options})
    with chain_runner(compiled, int(piece)):
        yield


@contextlib.contextmanager
def chain_runner(run: Callable[..., Transitions], piece: Optional[int]) -> Iterator[None]:
    """Within the block, ``run_chains`` runs ``run`` (:func:`hmc_transitions` or a compiled copy)
    ``piece`` transitions at a time (None: each adaptation phase in one piece)."""
    _runner.append((run, piece))
    try:
        yield
    finally:
        _runner.pop()


@functools.lru_cache(maxsize=None)
def _compiled_transitions(options: Tuple[Tuple[str, object], ...]) -> Callable[..., Transitions]:
    return torch.compile(hmc_transitions, **{"dynamic": False, **dict(options)})


def run_chains(
    log_density: LogDensity,
    init: Tensor,
    noise: HMCNoise,
    *,
    leapfrog_steps: int,
    step_size: Union[float, Tensor],
    record_from: int = 0,
    adapt_steps: int = 0,
    target_accept: float = 0.65,
    adapt_rate: float = 0.5,
    split: bool = False,
) -> ChainOutput:
    """Generic HMC on C chains of dimension A for T = len(noise.momentum) transitions.

    ``log_density`` returns -inf outside the support (and any finite gradient there); a transition
    whose leapfrog path leaves the support is rejected. Step sizes are per chain; during the first
    ``adapt_steps`` transitions they adapt towards ``target_accept`` (see module docstring).
    ``split``: the target is N(x; 0, I) times exp(log_density) (see :func:`hmc_transitions`)."""
    transitions, chains, _ = noise.momentum.shape
    run, piece = _runner[-1]
    x = init
    log_p, grad = log_density(x)
    step = torch.as_tensor(step_size, dtype=x.dtype, device=x.device).expand(chains).clone()
    # Pieces never straddle the end of adaptation (the flag is constant within a piece).
    adapt_steps = min(max(adapt_steps, 0), transitions)
    bounds = []
    for start, stop in ((0, adapt_steps), (adapt_steps, transitions)):
        size = piece or max(stop - start, 1)
        bounds += [(a, min(a + size, stop)) for a in range(start, stop, size)]
    states, accepted, accept_prob = [], [], []
    for start, stop in bounds:
        x, log_p, grad, step, piece_states, piece_accepted, piece_prob = run(
            log_density, x, log_p, grad, step, noise.momentum[start:stop], noise.uniform[start:stop], leapfrog_steps,
            start < adapt_steps, target_accept, adapt_rate, split)
        if stop > record_from:
            states.append(piece_states[max(record_from - start, 0):])
        accepted.append(piece_accepted)
        accept_prob.append(piece_prob)
    empty = init.new_zeros((0, *init.shape))
    return ChainOutput(
        torch.cat(states) if states else empty, torch.cat(accepted), torch.cat(accept_prob), step
    )


# --------------------------------------------------------------------------------------------------
QAndGrad = Callable[[Tensor], Tuple[Tensor, Tensor]]  # a (C, A) -> (Q (C,), dQ/da (C, A))


def critic_min_q(critic_layers: Layers, state_half: Tensor, repeats: int = 1, activation=None) -> QAndGrad:
    """a -> (min_i Q_i(s, a), its gradient in a) from stacked (E, out, in) critic layers and their
    layer-1 state halves (E, C // repeats, H1), chains grouped by state in runs of ``repeats``; the
    gradient is the argmin critic's. ``activation``: the critics' hidden activation (None: the one
    the layers carry, ``misa_fast.nets.StackedLayers``, else ELU)."""
    activation = layers_activation(critic_layers, activation)

    def q_and_grad(a: Tensor) -> Tuple[Tensor, Tensor]:
        q, grad_q = ensemble_q_and_action_grad(critic_layers, state_half, a, repeats, activation)
        q_min, index = q.min(dim=0)
        return q_min, grad_q.gather(0, index.view(1, -1, 1).expand(1, *a.shape)).squeeze(0)

    return q_and_grad


def tilted_log_density(q_and_grad: QAndGrad, mean: Tensor, std: Tensor, space: str = "post_tanh") -> LogDensity:
    """The chain's log density of the tilted policy pi(a|s) exp(Q(s, a)) with its exact gradient.

    mean, std: (C, A) pre-tanh policy parameters per chain. "post_tanh": x = a, log pi(a) + Q(a),
    -inf outside (-1, 1)^A. "pre_tanh": x = z = (atanh(a) - mean) / std, only the tilt
    Q(tanh(mean + std z)) (the N(z; 0, I) part is the split integrator's: ``run_chains(split=True)``).
    Everything is treated as a constant (call under no_grad or with detached inputs)."""
    if space == "pre_tanh":

        def pre_tanh_density(z: Tensor) -> Tuple[Tensor, Tensor]:
            a = torch.tanh(mean + std * z)
            q, grad_q = q_and_grad(a)
            # dQ/dz = dQ/da * (1 - a^2) * std; (1 - a)(1 + a) is 0, not negative, at a saturated tanh
            return q, grad_q * ((1.0 - a) * (1.0 + a) * std)

        return pre_tanh_density
    if space != "post_tanh":
        raise ValueError(f"unknown HMC space {space!r}; choose one of {SPACES}")
    inv_std = 1.0 / std
    log_norm = -(torch.log(std) + _HALF_LOG_2PI).sum(-1)

    def log_density(a: Tensor) -> Tuple[Tensor, Tensor]:
        inside = (a.abs() < 1.0).all(dim=-1)
        a = torch.where(inside.unsqueeze(-1), a, torch.zeros_like(a))  # keep the arithmetic finite
        u = torch.atanh(a)
        z = (u - mean) * inv_std
        log_pi = log_norm - (0.5 * z * z + tanh_log_det_jacobian(u)).sum(-1)
        # d/da: (d/du)(du/da) with d/du log pi = -z/std + 2 tanh(u) and du/da = 1 / (1 - a^2);
        # (1 - a)(1 + a) keeps its precision near |a| = 1 where 1 - a*a would not.
        grad_pi = (2.0 * a - z * inv_std) / ((1.0 - a) * (1.0 + a))
        q_min, grad_q = q_and_grad(a)
        log_p = torch.where(inside, log_pi + q_min, torch.full_like(q_min, -math.inf))
        return log_p, torch.where(inside.unsqueeze(-1), grad_pi + grad_q, torch.zeros_like(a))

    return log_density


def policy_q_log_density(
    mean: Tensor, std: Tensor, critic_layers: Layers, state_half: Tensor, repeats: int = 1,
    space: str = "post_tanh", activation=None,
) -> LogDensity:
    """The MISA target's chain density (see :func:`tilted_log_density`) for stacked critic layers
    and their layer-1 state halves (E, C // repeats, H1), chains grouped by state in runs of
    ``repeats``; ``activation`` as :func:`critic_min_q`."""
    return tilted_log_density(critic_min_q(critic_layers, state_half, repeats, activation), mean, std, space)


def autograd_log_density(log_prob_fn: Callable[[Tensor], Tensor]) -> LogDensity:
    """Wrap any differentiable x (C, A) -> log p (C,) into a closure with its autograd gradient
    (for targets without an analytic gradient, and to check the fast closure)."""

    def log_density(x: Tensor) -> Tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = log_prob_fn(x)
            (grad,) = torch.autograd.grad(log_p.sum(), x)
        grad = torch.where(torch.isfinite(log_p).unsqueeze(-1), grad, torch.zeros_like(grad))
        return log_p.detach(), grad

    return log_density


@torch.no_grad()
def sample_tilted(
    policy_mean: Tensor,
    policy_std: Tensor,
    q_and_grad: QAndGrad,
    init_actions: Tensor,
    *,
    space: str = "post_tanh",
    mode: str = "faithful",
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
) -> HMCResult:
    """K samples per state of pi(a|s) exp(Q(s, a)) / Z(s) for any Q given as ``q_and_grad``:
    a (C, A) -> (Q (C,), dQ/da (C, A)), C chains (in "parallel" mode chain b*K + k samples state b).
    :func:`hmc_sample` is this with the critics' min Q; the known-target checks call it with a
    hand-written Q. Arguments as :func:`hmc_sample`."""
    if step_size is None:
        step_size = default_step_size(space, leapfrog_steps)
    batch, act_dim = init_actions.shape
    chains, transitions = layout(mode, batch, num_samples, burn_in)
    if noise is None:
        noise = draw_noise(
            mode, batch, num_samples, burn_in, act_dim, generator, init_actions.device, init_actions.dtype
        )
    else:
        check_noise(noise, mode, transitions, chains, act_dim)
    mean, std = policy_mean.detach(), policy_std.detach()
    init = init_actions.detach().clamp(-init_clip, init_clip)
    repeats = num_samples if mode == "parallel" else 1
    if repeats > 1:  # chain b*K + k belongs to state b
        mean, std, init = (t.repeat_interleave(repeats, dim=0) for t in (mean, std, init))
    if space == "pre_tanh":
        init = (torch.atanh(init) - mean) / std
    if adapt is None:
        adapt = mode == "adaptive"
    out = run_chains(
        tilted_log_density(q_and_grad, mean, std, space),
        init,
        noise,
        leapfrog_steps=leapfrog_steps,
        step_size=step_size,
        record_from=burn_in,
        adapt_steps=burn_in if adapt else 0,
        target_accept=target_accept,
        adapt_rate=adapt_rate,
        split=space == "pre_tanh",
    )
    states = out.states  # (R, C, A)
    if space == "pre_tanh":
        states = mean + std * states  # the pre-tanh actions u of each chain
    if mode == "parallel":
        states = states[-1].view(batch, num_samples, act_dim)  # chain b*K + k -> (b, k)
    else:
        states = states.transpose(0, 1)  # (K, B, A) -> (B, K, A)
    pre_tanh = states if space == "pre_tanh" else None
    samples = torch.tanh(states) if space == "pre_tanh" else states
    return HMCResult(
        samples=samples,
        accept_rate=out.accepted.float().mean(),
        accept_prob=out.accept_prob.mean(),
        step_size=out.step_size,
        accepted=out.accepted,
        pre_tanh=pre_tanh,
    )


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
) -> HMCResult:
    """K samples per state of pi(a|s) exp(min_i Q_i(s, a)) / Z(s) by HMC.

    policy_mean, policy_std: (B, A) pre-tanh policy parameters at the states (computed once per
    training step); critic_layers / state_half: the online critics as stacked layers and their
    layer-1 state halves (E, B, H1); init_actions: (B, A) dataset actions, clipped to +-init_clip.
    space: "post_tanh" (the official sampler) or "pre_tanh" (see the module docstring); in
    "pre_tanh" the step size is the rotation angle of one leapfrog step.
    step_size: a scalar or a (C,) per-chain tensor; None: ``default_step_size(space, leapfrog_steps)``.
    adapt: None -> mode == "adaptive".
    noise: supplied HMCNoise (see ``draw_noise`` for shapes) or None to draw it from ``generator``.
    activation: the critics' hidden activation; None: the one ``critic_layers`` carry
    (``EnsembleCritic.stacked_layers()``), else ELU.
    Returns HMCResult with samples (B, K, A) (and their pre-tanh values in "pre_tanh" space)."""
    repeats = num_samples if mode == "parallel" else 1
    activation = layers_activation(critic_layers, activation)
    # the state halves are broadcast over a state's chains, not copied
    q_and_grad = critic_min_q([(w.detach(), b.detach()) for w, b in critic_layers], state_half.detach(), repeats,
                              activation)
    return sample_tilted(
        policy_mean, policy_std, q_and_grad, init_actions, space=space, mode=mode, num_samples=num_samples,
        burn_in=burn_in, leapfrog_steps=leapfrog_steps, step_size=step_size, adapt=adapt,
        target_accept=target_accept, adapt_rate=adapt_rate, noise=noise, generator=generator, init_clip=init_clip,
    )


# --------------------------------------------------------------------------------------------------
def effective_sample_size(series: Tensor) -> Tensor:
    """ESS of each row of ``series`` (N, K), a chain's K consecutive values of a scalar statistic:
    K / (1 + 2 sum_t rho_t) with the autocorrelations rho_t summed up to the first non-positive
    one (Geyer's initial positive sequence, simplified), clamped to [1, K]. A constant row (a chain
    that never moved) has ESS 1. A few fixed-shape tensor ops, no host sync (CUDA-graph safe)."""
    n, k = series.shape
    x = series - series.mean(dim=1, keepdim=True)
    # lag-t autocovariances from the zero-padded windows x[t:t+K]
    windows = torch.nn.functional.pad(x, (0, k)).unfold(1, k, 1)[:, :k]  # (N, K lags, K)
    acov = torch.einsum("nk,ntk->nt", x, windows) / k
    var = acov[:, :1]
    moving = var.squeeze(1) > 1e-12 * (series.abs().amax(dim=1) ** 2 + 1e-30)
    rho = acov[:, 1:] / var.clamp_min(1e-30)
    rho_sum = (rho * torch.cumprod((rho > 0).to(rho.dtype), dim=1)).sum(dim=1)
    ess = (k / (1.0 + 2.0 * rho_sum)).clamp(1.0, float(k))
    return torch.where(moving, ess, torch.ones_like(ess))


def chain_diagnostics(result: HMCResult, policy_mean: Tensor, policy_std: Tensor, init_actions: Tensor,
                      init_clip: float = 0.999) -> dict:
    """Per-update diagnostics of an ``hmc_sample`` result (0-dim tensors, no host sync):
    hmc_dist_a / hmc_dist_u, the mean Euclidean distance of the recorded samples from the (clipped)
    dataset action in action and in pre-tanh space, and hmc_ess, the mean over chains of the ESS of
    the whitened pre-tanh sample's mean over action dimensions (sequential modes: one chain per
    state; "parallel" samples come from K different chains, so their ESS says nothing and is
    not reported)."""
    a_data = init_actions.detach().clamp(-init_clip, init_clip).unsqueeze(1)  # (B, 1, A)
    u_data = torch.atanh(a_data)
    samples = result.samples
    u = result.pre_tanh if result.pre_tanh is not None else torch.atanh(samples.clamp(-ATANH_LIMIT, ATANH_LIMIT))
    out = {
        "hmc_dist_a": (samples - a_data).norm(dim=-1).mean(),
        "hmc_dist_u": (u - u_data).norm(dim=-1).mean(),
    }
    if result.accepted.shape[1] == samples.shape[0]:  # one chain per state
        z = ((u - policy_mean.detach().unsqueeze(1)) / policy_std.detach().unsqueeze(1)).mean(-1)  # (B, K)
        out["hmc_ess"] = effective_sample_size(z).mean()
    return out
