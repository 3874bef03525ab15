"""Mutual-information lower bounds I(S; A) of MISA (paper section 4.2, appendix A.1) on a batch.

With a policy pi (the variational conditional) and an energy function T (MISA uses the critic Q):

- I_BA      = E_D[log pi(a|s) - log p(a)]                                   Barber-Agakov (eq. 7)
- I_MISA-f  = I_BA + E_D[T(s, a)] - E_{s~D, a~pi}[exp(T(s, a) - 1)]           eq. 8 (f-divergence dual)
- I_MISA-DV = I_BA + E_D[T(s, a)] - log E_{s~D, a~pi}[exp T(s, a)]            eq. 9 (Donsker-Varadhan)
- I_MISA    = I_BA + E_D[T(s, a)] - E_{s~D}[log E_{a~pi(.|s)} exp T(s, a)]    eq. 10 (per-state DV)

Orderings (Theorem 4.1): I >= I_MISA >= I_MISA-DV >= I_MISA-f for every pi and T, and I >= I_BA.
I_MISA >= I_MISA-DV >= I_MISA-f also holds *deterministically* for the sample estimates computed from
the same K samples per state (Jensen across states; log x <= x / e). I_BA <= I_MISA-f is *not* a
theorem for an arbitrary T (T = 0 gives I_BA - 1/e); only sup_T I_MISA-f >= I_BA holds, since the
constant T = 1 gives equality (as does any constant T for I_MISA-DV and I_MISA). For a fixed pi the
energy bounds reach I at T(s, a) = log p(a|s) - log pi(a|s) + c: c = 1 for MISA-f, any constant c for
MISA-DV, any c(s) for MISA.

Monte-Carlo caveat: the BA and MISA-f estimates are unbiased, but the log of a sample mean is biased
low (Jensen), so the MISA and MISA-DV *estimates* are biased high by about Var(e^T) / (2 K E[e^T]^2)
per state (over all B * K samples for DV, so far less): with few samples the MISA estimate can
exceed I.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor

from misa_fast import nets, ops

__all__ = ["MIBounds", "Policy", "Energy", "mi_bounds", "estimate_bounds"]


class MIBounds(NamedTuple):
    """The four bounds, 0-dim differentiable tensors (``._asdict()`` for logging)."""

    ba: Tensor
    misa_f: Tensor
    misa_dv: Tensor
    misa: Tensor


class Policy(Protocol):
    """What :func:`estimate_bounds` needs of a policy that is not a ``TanhGaussianPolicy``.

    ``log_prob(obs (N, S), actions (N, A)) -> (N,)``, and ``sample(obs (N, S), generator=...)`` that
    returns actions (N, A), or a tuple whose first item is the actions (as ``TanhGaussianPolicy.sample``
    does). Samples that carry a gradient (reparameterised) pass it on to the bounds."""

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor: ...

    def sample(self, obs: Tensor, generator: Optional[torch.Generator] = None): ...


Energy = Union[nets.EnsembleCritic, Callable[[Tensor, Tensor], Tensor]]


def _check_shape(name: str, x: Tensor, expected: Sequence[Optional[int]], what: str) -> None:
    """Raise ValueError unless x has len(expected) dims matching ``expected`` (None: any size)."""
    if x.dim() != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")


def mi_bounds(
    log_pi_data: Tensor, energy_data: Tensor, energy_samples: Tensor, log_marginal: Optional[Tensor] = None
) -> MIBounds:
    """The four bounds from per-sample quantities of a batch of B states with K policy samples each.

    log_pi_data (B,): log pi(a_D | s); energy_data (B,): T(s, a_D); energy_samples (B, K): T(s, a_k)
    with a_k ~ pi(.|s); log_marginal (B,): log p(a_D), the marginal density of the data actions. It is
    rarely known, and it is the same for every policy and energy: ``None`` drops the -E log p(a) term,
    so every bound is shifted by the same constant -H(A) (differences and orderings are unchanged).

    Differentiable in every input; reductions run in at least float32 with stable log-sum-exps (the
    per-state one is ``ops.log_mean_exp``: the Triton kernel on CUDA), so energies of any magnitude
    give finite MISA and MISA-DV. MISA-f is -inf when E exp(T - 1) overflows: the bound really is that
    low there. The f partition E exp(T - 1) is computed as exp(log E e^T - 1) from the DV one, so
    MISA-f <= MISA-DV (x / e >= log x) holds for the estimates up to rounding."""
    _check_shape("log_pi_data", log_pi_data, (None,), "(B,)")
    B = log_pi_data.shape[0]
    if B == 0:
        raise ValueError("log_pi_data must have shape (B,) with B >= 1, got (0,)")
    _check_shape("energy_data", energy_data, (B,), f"(B,) = ({B},)")
    _check_shape("energy_samples", energy_samples, (B, None), f"(B, K) = ({B}, K)")
    if energy_samples.shape[1] == 0:
        raise ValueError(f"energy_samples must have shape (B, K) with K >= 1, got {tuple(energy_samples.shape)}")
    if log_marginal is not None:
        _check_shape("log_marginal", log_marginal, (B,), f"(B,) = ({B},)")

    dtype = torch.promote_types(torch.promote_types(log_pi_data.dtype, energy_data.dtype), energy_samples.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    log_ratio = log_pi_data.to(dtype)
    if log_marginal is not None:
        log_ratio = log_ratio - log_marginal.to(dtype)
    ba = log_ratio.mean()
    data_term = ba + energy_data.to(dtype).mean()
    per_state = ops.log_mean_exp(energy_samples.to(dtype), dim=1)  # log E_k exp T(s, a_k), (B,)
    # log E_{s,k} exp T: every state has K samples, so the log-mean-exp of the per-state ones.
    log_partition = ops.log_mean_exp(per_state, dim=0)
    return MIBounds(
        ba=ba,
        misa_f=data_term - torch.exp(log_partition - 1.0),
        misa_dv=data_term - log_partition,
        misa=data_term - per_state.mean(),
    )


def _energy_values(energy: Energy, obs: Tensor, actions: Tensor, samples: Tensor) -> Tuple[Tensor, Tensor]:
    """T(s, a_D) (B,) and T(s, a_k) (B, K). An ``EnsembleCritic`` gives min over its critics (the
    energy of MISA's actor and HMC target), its layer-1 state half computed once for all K samples."""
    B, K, A = samples.shape
    if isinstance(energy, nets.EnsembleCritic):
        layers = energy.stacked_layers()
        half = nets.state_half(layers, obs)
        return (nets.ensemble_q(layers, half, actions).min(dim=0).values,
                nets.ensemble_q(layers, half, samples).min(dim=0).values)
    t_data = energy(obs, actions)
    _check_shape("energy(observations, actions)", t_data, (B,), f"(B,) = ({B},)")
    t_samples = energy(obs.repeat_interleave(K, dim=0), samples.reshape(B * K, A))
    _check_shape("energy(observations, samples)", t_samples, (B * K,), f"(B * K,) = ({B * K},)")
    return t_data, t_samples.reshape(B, K)


def estimate_bounds(
    policy: Union[nets.TanhGaussianPolicy, Policy],
    energy: Energy,
    observations: Tensor,
    actions: Tensor,
    num_samples: int = 50,
    log_marginal: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    detach_samples: bool = False,
) -> MIBounds:
    """The four bounds on a batch (observations (B, S), dataset actions (B, A)) with K = num_samples
    fresh samples a_k ~ pi(.|s) per state, all bounds from the *same* samples.

    policy: a ``TanhGaussianPolicy`` (one network pass; the (B, K, A) noise drawn in one call from
    ``generator``) or any :class:`Policy` (sampled on the observations repeated K times).
    energy: an ``EnsembleCritic`` (min over critics; for one critic pass ``lambda o, a: critic(o, a)[i]``)
    or a callable ``energy(obs (N, S), actions (N, A)) -> (N,)``.

    Gradients: the energy's parameters get them through both energy terms; the policy's through
    log pi(a_D|s) and, unless ``detach_samples``, through the reparameterised samples (the pathwise
    gradient of the estimate, an alternative to the log-derivative form of paper eq. 24, which MISA
    estimates with HMC). ``detach_samples=True`` is the critic loss's view: samples are constants, and
    the policy's gradient is that of I_BA alone. ``log_marginal``: see :func:`mi_bounds`;
    ``generator`` must live on the observations' device."""
    _check_shape("observations", observations, (None, None), "(B, S)")
    B = observations.shape[0]
    _check_shape("actions", actions, (B, None), f"(B, A) = ({B}, A)")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    for name, x, attr in (("observations", observations, "obs_dim"), ("actions", actions, "act_dim")):
        want = getattr(policy, attr, None)
        if want is not None and x.shape[1] != want:
            raise ValueError(f"{name} must have {want} columns ({type(policy).__name__}.{attr}), "
                             f"got shape {tuple(x.shape)}")
    K, A = num_samples, actions.shape[1]

    if isinstance(policy, nets.TanhGaussianPolicy):
        mean, std = policy.dist_params(observations)
        log_pi_data = nets.tanh_gaussian_log_prob(mean, std, actions)
        noise = torch.randn((B, K, A), generator=generator, device=mean.device, dtype=mean.dtype)
        samples, _ = nets.tanh_gaussian_sample(mean.unsqueeze(1), std.unsqueeze(1), noise)
    else:
        log_pi_data = policy.log_prob(observations, actions)
        _check_shape("policy.log_prob(observations, actions)", log_pi_data, (B,), f"(B,) = ({B},)")
        out = policy.sample(observations.repeat_interleave(K, dim=0), generator=generator)
        samples = out[0] if isinstance(out, (tuple, list)) else out
        _check_shape("policy.sample(observations repeated K times)", samples, (B * K, A),
                     f"(B * K, A) = ({B * K}, {A})")
        samples = samples.reshape(B, K, A)
    if detach_samples:
        samples = samples.detach()
    energy_data, energy_samples = _energy_values(energy, observations, actions, samples)
    return mi_bounds(log_pi_data, energy_data, energy_samples, log_marginal)
