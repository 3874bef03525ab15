"""The losses of the MISA learner as plain functions (docs: the design page, the losses).

Each function detaches what its loss must not differentiate (targets, temperatures, multipliers,
samples), so "each loss updates only its own parameters" holds by construction: the agent can sum
all losses and run one backward pass.

Shapes: E critics, B states, K samples per state, A action dims. Per-critic quantities are (E, ...).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from misa_fast import nets, ops
from misa_fast.nets import Layers, ensemble_q


# --------------------------------------------------------------------------------------------------
# critic
def td_target(rewards: Tensor, dones: Tensor, next_q: Tensor, gamma: float) -> Tensor:
    """y = r + gamma * (1 - d) * min_i Q_target_i(s', a'), no entropy backup, no gradient. (B,)"""
    return (rewards + gamma * (1.0 - dones) * next_q.min(dim=0).values).detach()


def td_loss(q_data: Tensor, target: Tensor) -> Tensor:
    """mean_s (Q_i(s, a) - y)^2 for every critic: (E,)."""
    return (q_data - target.detach()).pow(2).mean(dim=1)


def log_norm(kind: str, num_samples: int, batch_size: int) -> float:
    """The constant subtracted from logsumexp_k: log K (a true log-mean-exp) or, as in the official
    code, log(batch size)."""
    return math.log(num_samples if kind == "k" else batch_size)


def sampled_q(layers: Layers, obs: Tensor, actions: Tensor, state_half: Optional[Tensor] = None) -> Tensor:
    """Q of K sampled actions for every state and critic: actions (B, K, A) -> (E, B, K).

    layers: the critics' stacked layers (``EnsembleCritic.stacked_layers()``); state_half: their
    layer-1 state halves (E, B, H1) if already computed (shared by the K samples of a state)."""
    return ensemble_q(layers, nets.state_half(layers, obs) if state_half is None else state_half, actions)


class LogPartition(NamedTuple):
    """What :func:`sampled_q_log_mean_exp` returns."""

    values: Tensor  # (E, B): logsumexp_k (Q_i(s, a_k) + log_weights_k) - norm per critic and state
    q: Optional[Tensor]  # (E, B, K): the detached per-sample Q values it came from; None unless asked for


def sampled_q_log_mean_exp(
    layers: Layers,
    obs: Tensor,
    actions: Tensor,
    norm: float,
    state_half: Optional[Tensor] = None,
    log_weights: Optional[Tensor] = None,
    precision: str = "tf32",
    return_q: bool = False,
) -> LogPartition:
    """logsumexp_k (Q_i(s, a_k) + log_weights_k) - norm for every critic and state: (E, B). Each
    critic uses its own Q. ``log_weights`` (B, K): CQL's importance weights, -log proposal density.
    ``precision``: the fused kernel's dot precision ("tf32", "ieee" or "bf16"; see
    :func:`misa_fast.ops.sampled_q_log_mean_exp`); the torch path below is fp32 whatever it says.
    ``return_q``: also return the per-sample Q values (E, B, K), detached (the fused op's own, not a
    second evaluation): the SNIS weights of the actor's correction term. Asked for only where
    needed: the fused kernel then also writes them out.

    The single place the agent evaluates a log-partition. Where the ops dispatch picks Triton
    (CUDA tensors, or forced with ``MISA_FAST_OPS=triton``) this is the fused kernel, which
    recomputes the state half in-kernel and never materialises the (B*K, H) activations; otherwise
    it is the eager torch code below, sharing the precomputed state half."""
    # members=True: under a stacked agent's member vmap the operator's vmap rule launches the kernel
    # once for every member, at the precision a single run uses
    if ops.resolve_backend(None, obs, actions, members=True) == "triton":  # falls back itself for unsupported shapes
        out = ops.sampled_q_log_mean_exp(obs, actions, layers, log_weights, normalizer=norm, precision=precision,
                                         return_q=return_q)
        return LogPartition(*out) if return_q else LogPartition(out, None)
    q = sampled_q(layers, obs, actions, state_half)
    v = q if log_weights is None else q + log_weights
    return LogPartition(torch.logsumexp(v, dim=2) - norm, q.detach() if return_q else None)


def cql_proposals(
    mean: Tensor, std: Tensor, next_mean: Tensor, next_std: Tensor, noise: Tensor, next_noise: Tensor, uniform: Tensor
) -> Tuple[Tensor, Tensor]:
    """CQL(H)'s importance-sampled proposals for the log-sum-exp at s (Kumar et al. 2020, as in
    JaxCQL with ``cql_importance_sample``): N uniform actions on [-1, 1]^A, N policy samples at s
    and N policy samples at s' (all evaluated by Q at s). Returns actions (B, 3N, A) and their
    log-weights -log q(a) (B, 3N), both without gradient. noise/next_noise: (B, N, A) standard
    normal; uniform: (B, N, A) on [-1, 1]."""
    with torch.no_grad():
        here, log_pi_here = nets.tanh_gaussian_sample(mean.unsqueeze(1), std.unsqueeze(1), noise)
        there, log_pi_there = nets.tanh_gaussian_sample(next_mean.unsqueeze(1), next_std.unsqueeze(1), next_noise)
        uniform_log_w = torch.full(uniform.shape[:2], uniform.shape[2] * math.log(2.0), device=uniform.device)
        actions = torch.cat([uniform, here, there], dim=1)
        log_weights = torch.cat([uniform_log_w, -log_pi_here, -log_pi_there], dim=1)
    return actions, log_weights


class EnergyGap(NamedTuple):
    """What :func:`energy_gap` returns, per critic."""

    gap: Tensor  # (E,): E_s[log-partition] - E_D[Q(s, a)], the critic regulariser
    partition: Tensor  # (E,): the log-partition term alone
    q_samples: Optional[Tensor]  # (E, B, K), detached: the Q values of the log-partition; None unless asked for


def energy_gap(
    bound: str,
    q_data: Tensor,
    layers: Layers,
    obs: Tensor,
    sample_actions: Tensor,
    norm: float,
    state_half: Optional[Tensor] = None,
    log_weights: Optional[Tensor] = None,
    precision: str = "tf32",
    return_q: bool = False,
) -> EnergyGap:
    """The critic regulariser "diff" per critic, E_s[log-partition] - E_D[Q(s, a)], and the
    log-partition term alone (both (E,)); with ``return_q`` ("misa" bound only) also the detached
    per-sample Q values (E, B, K) the log-partition was computed from, else ``q_samples`` is None.
    ``sample_actions`` (B, K, A) are policy samples at s (for "cql", the proposals of
    :func:`cql_proposals` with their ``log_weights``).

    misa (eq. 10): mean_s [log mean_k exp Q(s, a_k)]      (normalised by ``norm``)
    dv   (eq. 9):  log mean_{s,k} exp Q(s, a_k)
    f    (eq. 8):  mean_{s,k} exp(Q(s, a_k) - 1)
    cql  (paper section 4.4): mean_s [log sum_k exp(Q(s, a_k) - log q(a_k))], importance-sampled

    ``precision``: dot precision of the fused log-partition ("misa" and "cql" bounds on the Triton
    path); "dv" and "f" always run the fp32 torch code.
    """
    data_term = q_data.mean(dim=1)
    if return_q and bound != "misa":
        raise ValueError(f"return_q needs the 'misa' bound (per-state samples), got {bound!r}")
    q_samples = None
    if bound == "misa":
        per_state = sampled_q_log_mean_exp(layers, obs, sample_actions, norm, state_half,
                                           precision=precision, return_q=return_q)
        partition, q_samples = per_state.values.mean(dim=1), per_state.q
    elif bound == "cql":
        if log_weights is None:
            raise ValueError("energy bound 'cql' needs the proposals' log_weights")
        partition = sampled_q_log_mean_exp(layers, obs, sample_actions, 0.0, state_half, log_weights,
                                           precision).values.mean(dim=1)
    elif bound == "dv":
        q = sampled_q(layers, obs, sample_actions, state_half).flatten(1)
        partition = torch.logsumexp(q, dim=1) - math.log(q.shape[1])
    elif bound == "f":
        partition = torch.exp(sampled_q(layers, obs, sample_actions, state_half) - 1.0).mean(dim=(1, 2))
    else:
        raise ValueError(f"unknown energy bound {bound!r}")
    return EnergyGap(partition - data_term, partition, q_samples)


def alpha_prime_value(log_alpha_prime: Tensor, lo: float, hi: float) -> Tensor:
    """alpha' = exp(log alpha') clipped to [lo, hi] (official: [0, 1e6])."""
    return log_alpha_prime.exp().clamp(lo, hi)


def conservative_penalty(
    gap: Tensor, min_q_weight: float, alpha_prime: Optional[Tensor] = None, tau: float = 0.0
) -> Tensor:
    """w_q * gap, or under Lagrange alpha' * w_q * (gap - tau) with alpha' held fixed. (E,)"""
    if alpha_prime is None:
        return min_q_weight * gap
    return alpha_prime.detach() * min_q_weight * (gap - tau)


def alpha_prime_loss(alpha_prime: Tensor, gap: Tensor, min_q_weight: float, tau: float) -> Tensor:
    """alpha' maximises alpha' * w_q * (gap - tau) (averaged over critics): it grows while the gap
    exceeds the budget tau and shrinks towards 0 below it. The gap is held fixed."""
    return -(alpha_prime * min_q_weight * (gap.detach() - tau)).mean()


def critic_loss(td: Tensor, penalty: Tensor) -> Tensor:
    """Sum over critics of TD error + regulariser (each critic only sees its own terms)."""
    return td.sum() + penalty.sum()


# --------------------------------------------------------------------------------------------------
# actor and temperature
# Below this mean Kish ESS per state the SNIS estimate rests on one or two samples: the trainer warns.
SNIS_ESS_WARN = 2.0


class SNISSamples(NamedTuple):
    """The inputs of the SNIS estimate of the actor's correction term (eq. 15), both detached."""

    pre_tanh: Tensor  # (B, K, A): the K policy samples at s before tanh (exact log pi where tanh saturates)
    weights: Tensor  # (B, K): their self-normalised weights, :func:`snis_weights`


def snis_weights(q_samples: Tensor) -> Tensor:
    """Self-normalised importance weights of K policy samples for the tilted policy
    p(a|s) ~ pi(a|s) exp(min_i Q_i(s, a)): w_k = softmax_k(min_i Q_i(s, a_k)), detached. With the
    policy itself as proposal, pi cancels from the weight. q_samples (E, B, K) -> (B, K)."""
    return torch.softmax(q_samples.detach().min(dim=0).values.float(), dim=-1)


def kish_ess(weights: Tensor) -> Tensor:
    """Kish's effective sample size 1 / sum_k w_k^2 of normalised weights (B, K) -> (B,): K for
    equal weights, 1 when one sample carries all the weight."""
    return 1.0 / weights.pow(2).sum(dim=-1)


def snis_diagnostics(weights: Tensor) -> Dict[str, Tensor]:
    """The Kish ESS of the SNIS weights per state: its mean and 5th percentile over the batch (linear
    interpolation, as ``torch.quantile``, from a sort: no host sync, so it can be graph-captured)."""
    ess = kish_ess(weights.detach())
    ordered = ess.sort().values
    position = 0.05 * (ordered.shape[0] - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, ordered.shape[0] - 1)
    p05 = ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])
    return {"snis_ess": ess.mean(), "snis_ess_p05": p05}


def actor_loss(
    alpha: Tensor,
    log_pi_new: Tensor,
    q_new: Tensor,
    bc_weight: float,
    log_pi_data: Optional[Tensor] = None,
    log_pi_mcmc: Optional[Tensor] = None,
    unbiased_weight: float = 0.0,
    mcmc_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """bc_weight * mean(alpha log pi(a~|s) - log pi(a_D|s)) - mean(Q(s, a~)) + w_u mean log pi(a_mcmc|s).

    q_new must come from critics whose weights are detached (only the path through a~ may carry a
    gradient); alpha is detached here. ``log_pi_data`` None drops the BA term ("no-BA");
    ``log_pi_mcmc`` None drops the HMC correction ("MISA-biased"). ``log_pi_mcmc`` is (B, K) (or
    (B,)); with ``mcmc_weights`` (B, K), normalised per state (SNIS), the correction is
    w_u mean_s sum_k w_k log pi(a_k|s) instead of the plain mean over samples. Returns (loss, terms)."""
    terms = {
        "actor_entropy_term": bc_weight * alpha.detach() * log_pi_new.mean(),
        "actor_q_term": -q_new.mean(),
    }
    if log_pi_data is not None:
        terms["actor_ba_term"] = -bc_weight * log_pi_data.mean()
    if log_pi_mcmc is not None:
        if mcmc_weights is None:
            terms["actor_unbiased_term"] = unbiased_weight * log_pi_mcmc.mean()
        else:
            terms["actor_unbiased_term"] = unbiased_weight * (mcmc_weights.detach() * log_pi_mcmc).sum(-1).mean()
    return sum(terms.values()), terms


def alpha_loss(log_alpha: Tensor, log_pi_new: Tensor, target_entropy: float) -> Tensor:
    """SAC temperature loss in the official (JaxCQL) form -log_alpha * mean(log pi + H_target):
    alpha grows while the policy's entropy is below the target."""
    return -(log_alpha * (log_pi_new.detach() + target_entropy)).mean()


# --------------------------------------------------------------------------------------------------
# ensembles of critics (SAC-N, EDAC)
def soft_td_target(rewards: Tensor, dones: Tensor, next_q: Tensor, next_log_pi: Tensor, alpha: Tensor,
                   gamma: float) -> Tensor:
    """SAC's target y = r + gamma * (1 - d) * (min_i Q_target_i(s', a') - alpha * log pi(a'|s')), no
    gradient (alpha held fixed). next_q (E, B), next_log_pi (B,) -> (B,)."""
    soft_value = next_q.min(dim=0).values - alpha.detach() * next_log_pi
    return (rewards + gamma * (1.0 - dones) * soft_value).detach()


def _activation_and_slope(z: Tensor, activation: nets.Activation) -> Tuple[Tensor, Tensor]:
    """(act(z), act'(z)) out of place, so that autograd differentiates both (the slope of ELU
    depends on z, hence on the critic weights; ReLU's is piecewise constant)."""
    name, param = activation
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    if name == "elu":
        slope = torch.where(z > 0, torch.ones_like(z), param * torch.exp(z.clamp(max=0.0)))
        return torch.nn.functional.elu(z, alpha=param), slope
    raise ValueError(f"dQ/da in closed form supports ReLU and ELU critics, got {activation}")


def q_and_action_grad(layers: Layers, state_half: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
    """Q_i(s, a) (E, B) and dQ_i/da (E, B, A) of every critic, for actions (B, A), by an explicit
    backward pass through the MLP written with differentiable, out-of-place ops: unlike
    ``nets.ensemble_q_and_action_grad`` (the HMC sampler's, no graph), the gradient is itself
    differentiable w.r.t. the critic weights, and, being plain tensor ops, it works under the
    members' vmap and torch.compile, where ``torch.autograd.grad`` cannot run. ``layers`` carry the
    activation (``EnsembleCritic.stacked_layers()``); state_half: their layer-1 state half (E, B, H1)."""
    activation = nets.layers_activation(layers) or nets.Activation("elu", 1.0)
    w_action = layers[0][0][:, :, -actions.shape[-1]:]  # (E, H1, A)
    z = torch.matmul(actions, w_action.transpose(1, 2)) + state_half
    slopes = []
    for weight, bias in layers[1:]:
        h, slope = _activation_and_slope(z, activation)
        slopes.append(slope)
        z = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
    grad = slopes[-1] * layers[-1][0]  # dQ/dz of the last hidden layer: (E, B, H) * (E, 1, H)
    for (weight, _), slope in zip(reversed(layers[1:-1]), reversed(slopes[:-1])):
        grad = torch.bmm(grad, weight) * slope
    return z.squeeze(-1), torch.bmm(grad, w_action)


DIVERSITY_EPS = 1e-10  # added to |dQ_i/da| before normalising (the official EDAC code's and CORL's)


def ensemble_diversity(action_grad: Tensor) -> Tensor:
    """EDAC's ensemble-diversity term: mean over the batch of
    (1 / (N - 1)) sum_{i != j} <g_i, g_j>, g_i = dQ_i/da / (|dQ_i/da| + eps). action_grad (N, B, A).

    The pair sum is |sum_i g_i|^2 - sum_i |g_i|^2 (the same value and gradient as masking the
    diagonal of the N x N Gram matrix, in O(N) instead of O(N^2) per state)."""
    num_critics = action_grad.shape[0]
    unit = action_grad / (torch.linalg.vector_norm(action_grad, dim=-1, keepdim=True) + DIVERSITY_EPS)
    pairs = unit.sum(dim=0).pow(2).sum(dim=-1) - unit.pow(2).sum(dim=(0, 2))  # (B,)
    return pairs.mean() / (num_critics - 1)


# --------------------------------------------------------------------------------------------------
# TD3 family (TD3+BC, SPOT)
def smoothed_target_action(next_action: Tensor, noise: Tensor, policy_noise: float, noise_clip: float) -> Tensor:
    """TD3's target policy smoothing: clip(pi'(s') + clip(sigma * eps, -c, c), -1, 1), no gradient.
    noise: standard normal, shape of ``next_action``."""
    smoothing = (policy_noise * noise).clamp(-noise_clip, noise_clip)
    return (next_action + smoothing).clamp(-1.0, 1.0).detach()


def q_scale(q_pi: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha / mean|Q(s, pi(s))|, held fixed: TD3+BC's lambda (alpha = 2.5) and SPOT's Q
    normalisation (alpha = 1), which make the actor's Q term scale-free."""
    return alpha / q_pi.detach().abs().mean()


def td3bc_actor_loss(q_pi: Tensor, policy_actions: Tensor, data_actions: Tensor, alpha: float
                     ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """TD3+BC: -lambda * mean Q(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean|Q| (fixed).

    q_pi must come from critics whose weights carry no gradient (only pi(s) may). The squared error
    is averaged over batch and action dims (the official F.mse_loss). Returns (loss, terms)."""
    lam = q_scale(q_pi, alpha)
    terms = {
        "actor_q_term": -lam * q_pi.mean(),
        "actor_bc_term": (policy_actions - data_actions.detach()).pow(2).mean(),
    }
    return terms["actor_q_term"] + terms["actor_bc_term"], {**terms, "actor_lambda": lam}


def spot_actor_loss(q_pi: Tensor, neg_log_density: Tensor, lam: float, normalize_q: bool = True
                    ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SPOT: -mean Q(s, pi(s)) / mean|Q| (fixed) + lambda * mean(-log pi_beta(pi(s)|s)).

    neg_log_density (B,) comes from the frozen VAE evaluated at pi(s) (the gradient reaches the
    actor through the action only). ``normalize_q`` False is the official --without_Q_norm."""
    scale = q_scale(q_pi) if normalize_q else torch.ones((), device=q_pi.device)
    terms = {"actor_q_term": -scale * q_pi.mean(), "actor_density_term": lam * neg_log_density.mean()}
    return terms["actor_q_term"] + terms["actor_density_term"], {**terms, "actor_lambda": scale}


def rebrac_actor_loss(q_pi: Tensor, policy_actions: Tensor, data_actions: Tensor, bc_coef: float
                      ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ReBRAC: mean_s [bc_coef * ||pi(s) - a||^2 - lambda Q(s, pi(s))], lambda = 1 / mean|Q| (fixed).

    Unlike TD3+BC the coefficient weighs the BC term, not Q, and the squared error is summed over
    action dims (the reference code's), then averaged over the batch. q_pi must come from critics
    whose weights carry no gradient. Returns (loss, terms)."""
    lam = q_scale(q_pi)
    terms = {
        "actor_q_term": -lam * q_pi.mean(),
        "actor_bc_term": bc_coef * (policy_actions - data_actions.detach()).pow(2).sum(-1).mean(),
    }
    return terms["actor_q_term"] + terms["actor_bc_term"], {**terms, "actor_lambda": lam}


def next_action_penalty(next_actions: Tensor, data_next_actions: Tensor) -> Tensor:
    """ReBRAC's critic penalty ||a' - a'_D||^2 per row (summed over action dims), no gradient: a' the
    smoothed target action at s', a'_D the dataset's next action. (..., A) -> (...)."""
    return (next_actions - data_next_actions).pow(2).sum(-1).detach()
