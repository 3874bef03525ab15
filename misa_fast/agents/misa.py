"""The MISA learner (docs: the design page, "The MISA learner"): twin critics with the mutual-information regulariser, a
tanh-Gaussian actor with the BA term and the HMC-corrected log-mean-exp gradient, SAC temperature,
optional Lagrange multiplier on the regulariser.

Data plus pure functions (misa_fast.agents.learner): :class:`MISANetworks` holds every tensor the
losses read and computes them in ``forward``; :func:`misa_losses` is the loss function
``losses(tensors, batch, noise)`` (that forward through ``torch.func.functional_call``, the HMC
sampler a parameter); :meth:`MISA.update` takes a loss function (its own by default, the compiled
backend's compiled one, a group's vmapped one) and does the rest. One update is, as in the official
JAX code, a *simultaneous* step: every loss is computed at the current parameters (critic, alpha',
actor, alpha), one backward pass of their sum gives each parameter group only its own loss's
gradient (the loss functions detach everything else, and the actor sees the critics through
detached weights), all optimizers step, then the target critics move by Polyak averaging towards
the updated critics.

SAC-N and EDAC (An et al. 2021) are settings of this learner (misa_config, algorithms): no energy or
BA term, N critics (one stacked ensemble), the soft TD target and, for EDAC, the ensemble-diversity
term, whose dQ_i/da comes in closed form from :func:`losses.q_and_action_grad` (differentiable,
vmap- and compile-safe, unlike ``torch.autograd.grad``).

Randomness goes through ``self.generator`` (seeded from config.seed) in a fixed order, see
:func:`draw_update_noise`; ``state_dict`` saves it with everything else, so a resumed run is
bit-identical on CPU.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable, Dict, Mapping, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from misa_fast import nets, ops
from misa_fast.agents import losses
from misa_fast.agents.learner import Learner, as_batch, module_tensors, tensors_under
from misa_fast.agents.losses import SNISSamples
from misa_fast.agents.misa_config import MISAConfig
from misa_fast.ops import hmc_reference as hmc_lib

# Which optimizer each loss drives.
LOSS_OWNER = {
    "critic_loss": "critic",
    "alpha_prime_loss": "alpha_prime",
    "actor_loss": "policy",
    "alpha_loss": "alpha",
    "energy_loss": "energy",  # MISA-T's separate energy network T_psi
}


def numpy_io(method):
    """For an agent's ``method(self, obs, ...)``: a numpy observation gives a numpy action, a tensor
    gives a tensor; the method itself sees a float32 tensor on the agent's device."""

    @functools.wraps(method)
    def wrapper(self, obs, *args, **kwargs):
        if isinstance(obs, np.ndarray):
            return method(self, torch.as_tensor(obs, dtype=torch.float32, device=self.device), *args,
                          **kwargs).cpu().numpy()
        return method(self, obs.to(self.device, torch.float32), *args, **kwargs)

    return wrapper


class NonFiniteLossError(FloatingPointError):
    """A loss (or its gradient) was NaN/inf. Raised before any optimizer step: parameters,
    optimizer states, targets and the step counter are those of the last good step."""

    def __init__(self, term: str, step: int, members: Optional[Dict[int, str]] = None):
        self.term, self.step = term, step
        # A stacked agent (misa_fast.agents.members): member index -> its first non-finite term.
        self.members = dict(members) if members else {}
        super().__init__(f"non-finite {term} at step {step}; no parameter was updated")

    def __reduce__(self):  # copies and pickles (a sweep's worker hands it to the driver) keep term and step
        return type(self), (self.term, self.step, self.members)


class UpdateNoise(NamedTuple):
    """All the randomness of one update, in the order it is drawn from the agent's generator."""

    policy: Tensor  # (B, A) standard normal: a~ ~ pi(.|s)
    next_policy: Tensor  # (B, A): a' ~ pi(.|s') for the TD target
    samples: Optional[Tensor]  # (B, K, A): the K policy samples of the log-partition term
    hmc: Optional[hmc_lib.HMCNoise]
    # CQL only: N policy samples at s' (B, N, A) and N uniform actions on [-1, 1] (B, N, A).
    next_samples: Optional[Tensor] = None
    uniform: Optional[Tensor] = None


class LossOutput(NamedTuple):
    losses: Dict[str, Tensor]  # name -> scalar loss, keys of LOSS_OWNER
    metrics: Dict[str, Tensor]  # name -> detached 0-dim tensor
    hmc: Optional[hmc_lib.HMCResult]


class CriticLosses(NamedTuple):
    """The critic side of one update (``MISANetworks._critic_losses``)."""

    losses: Dict[str, Tensor]  # critic_loss; energy_loss (MISA-T) and alpha_prime_loss (Lagrange) where used
    metrics: Dict[str, Tensor]
    snis: Optional[SNISSamples]  # the actor's SNIS inputs under unbiased_estimator="snis", else None


class ActorLosses(NamedTuple):
    """The actor side of one update (``MISANetworks._actor_losses``)."""

    losses: Dict[str, Tensor]  # actor_loss; alpha_loss with auto_alpha
    metrics: Dict[str, Tensor]


def draw_update_noise(cfg: MISAConfig, generator: torch.Generator, batch_size: int) -> UpdateNoise:
    """All the randomness of one update, drawn from ``generator`` in a fixed order."""
    act_dim, device = cfg.act_dim, generator.device

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device)

    noise = UpdateNoise(
        policy=randn(batch_size, act_dim),
        next_policy=randn(batch_size, act_dim),
        samples=randn(batch_size, cfg.num_samples, act_dim) if cfg.energy_bound != "none" else None,
        hmc=hmc_lib.draw_noise(cfg.hmc_mode, batch_size, cfg.num_samples, cfg.hmc_burn_in, act_dim, generator, device)
        if cfg.hmc_chain
        else None,
    )
    if cfg.energy_bound == "cql":
        shape = (batch_size, cfg.num_samples, act_dim)
        uniform = torch.rand(shape, generator=generator, device=device) * 2.0 - 1.0
        noise = noise._replace(next_samples=randn(*shape), uniform=uniform)
    return noise


LossFunction = Callable[[Dict[str, Tensor], tuple, UpdateNoise], LossOutput]

# Critics with their own metrics (TD error, Q at the data, gap). A larger ensemble (SAC-N's 50 to 500)
# logs its mean and spread instead: hundreds of columns, and as many small ops per step, say nothing.
PER_CRITIC_METRICS = 10


def critic_metrics(td: Tensor, q_data: Tensor) -> Dict[str, Tensor]:
    """Each critic's TD error and mean Q at the data, or, beyond ``PER_CRITIC_METRICS`` critics,
    the ensemble's mean Q at the data and its spread (std over critics, mean over the batch)."""
    num_critics = q_data.shape[0]
    if num_critics > PER_CRITIC_METRICS:
        return {"q_data": q_data.mean(), "q_data_std": q_data.std(dim=0).mean()}
    metrics = {}
    for i in range(num_critics):
        metrics[f"q{i + 1}_td_loss"] = td[i]
        metrics[f"q{i + 1}_data"] = q_data[i].mean()
    return metrics


EDAC_HIDDEN_BIAS = 0.1  # hidden-layer bias of the EDAC networks (actor and critics)
EDAC_CRITIC_OUTPUT = 3e-3  # U(+-) of the critics' output layer, weight and bias
EDAC_ACTOR_OUTPUT = 1e-3  # U(+-) of the actor's mean and log-std heads, weight and bias


@torch.no_grad()
def edac_init_(policy: Optional[nets.TanhGaussianPolicy], critic: nets.EnsembleCritic,
               generator: torch.Generator) -> None:
    """The EDAC networks' initialisation (official code and CORL), in place: hidden weights
    U(+-1/sqrt(fan_in)) (torch's nn.Linear default), hidden biases 0.1, output layers U(+-3e-3)
    (critics) and U(+-1e-3) (actor, both heads), and the actor's log std read directly from its
    output: log_std = clip(raw, -5, 2), the multiplier and offset fixed at 1 and 0 (no gradient).

    Deviations: each reference takes one network's hidden bound from the layer's output width
    instead of its fan-in (the official actor: rlkit's fanin_init reads size(0) of an (out, in)
    weight; CORL's critics: kaiming_uniform on an (in, out) weight). Here the true fan-in is used
    everywhere, as by the official critics and CORL's actor; only the first layer differs (the others
    are square). The policy's mean stays clipped to [-9, 9] (the references do not clip it)."""
    if policy is not None:
        linears = [m for m in policy.net if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            bound = 1.0 / math.sqrt(layer.weight.shape[-1])
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.fill_(EDAC_HIDDEN_BIAS)
        for tensor in (linears[-1].weight, linears[-1].bias):
            tensor.uniform_(-EDAC_ACTOR_OUTPUT, EDAC_ACTOR_OUTPUT, generator=generator)
        policy.log_std_multiplier.fill_(1.0).requires_grad_(False)
        policy.log_std_offset.fill_(0.0).requires_grad_(False)
    last = len(critic.weights) - 1
    for i, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
        if i == last:
            weight.uniform_(-EDAC_CRITIC_OUTPUT, EDAC_CRITIC_OUTPUT, generator=generator)
            bias.uniform_(-EDAC_CRITIC_OUTPUT, EDAC_CRITIC_OUTPUT, generator=generator)
        else:
            bound = 1.0 / math.sqrt(weight.shape[-1])
            weight.uniform_(-bound, bound, generator=generator)
            bias.fill_(EDAC_HIDDEN_BIAS)


class MISANetworks(nn.Module):
    """Every tensor MISA's losses read — policy, critics, target critics, T_psi (MISA-T), the two
    temperatures, the adapted HMC step size — and, as ``forward``, the losses of one update.
    Run it through :func:`misa_losses` on explicit tensors; it changes nothing itself."""

    def __init__(self, cfg: MISAConfig, device: torch.device):
        super().__init__()
        self.config = cfg
        self.target_entropy = cfg.resolved_target_entropy(cfg.act_dim)
        init_seed, _ = derive_seeds(cfg.seed)
        init_generator = torch.Generator().manual_seed(init_seed)  # CPU: same init on every device
        obs_dim, act_dim = cfg.obs_dim, cfg.act_dim
        edac = cfg.network_style == "edac"
        activation = "relu" if edac else "elu"
        self.policy = nets.TanhGaussianPolicy(obs_dim, act_dim, cfg.policy_hidden, init_generator).to(device)
        self.critic = nets.EnsembleCritic(obs_dim, act_dim, cfg.critic_hidden, cfg.num_critics,
                                          init_generator, activation=activation).to(device)
        if edac:  # redrawn after the flax init: the "misa" style draws exactly what it always did
            edac_init_(self.policy, self.critic, init_generator)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # MISA-T: one extra network T_psi (no target copy: it never enters a TD target).
        self.energy = None
        if cfg.energy_network == "separate":
            self.energy = nets.EnsembleCritic(obs_dim, act_dim, cfg.critic_hidden, 1, init_generator,
                                              activation=activation).to(device)
            if edac:
                edac_init_(None, self.energy, init_generator)
        self.log_alpha = nn.Parameter(torch.tensor(cfg.log_alpha_init, device=device),
                                      requires_grad=cfg.auto_alpha)
        self.log_alpha_prime = nn.Parameter(torch.tensor(cfg.log_alpha_prime_init, device=device))
        # Adaptive HMC carries the (geometric mean) adapted step size from one update to the next.
        self.register_buffer("hmc_log_step_size", torch.tensor(math.log(cfg.resolved_hmc_step_size), device=device))
        self.register_buffer("fixed_hmc_step_size", torch.tensor(cfg.resolved_hmc_step_size, device=device))

    def hmc_step_size(self) -> Tensor:
        """The HMC step size of the next update (0-dim; adapts across updates when adapting)."""
        return self.hmc_log_step_size.exp() if self.config.adapt_hmc else self.fixed_hmc_step_size

    def forward(self, batch: tuple, noise: UpdateNoise, run_chain: Callable = ops.hmc_sample) -> LossOutput:
        """Every loss of one update at the current parameters, plus metrics. ``run_chain``: the HMC
        sampler (``ops.hmc_sample``'s signature; the compiled backend passes its piecewise runner)."""
        obs, actions = batch[0], batch[1]
        # Computed once and shared: the policy at s (a~, log pi(a_D|s), the K samples, the HMC target,
        # log pi(a_mcmc|s)) and layer 1's state half of the critics (Q(s, a_D), the K samples and,
        # detached, the HMC target and the actor's Q(s, a~)).
        mean, std = self.policy.dist_params(obs)
        state_half = self.critic.first_layer_state_half(obs)
        energy_half = state_half if self.energy is None else self.energy.first_layer_state_half(obs)
        critic = self._critic_losses(batch, mean, std, state_half, energy_half, noise)
        metrics = dict(critic.metrics)
        hmc_result = self._hmc_samples(run_chain, actions, mean, std, energy_half, noise, metrics)
        actor = self._actor_losses(actions, mean, std, state_half, noise, hmc_result, critic.snis)
        # Losses in a fixed order (critic side, then actor side): their sum is the one backward pass.
        losses_out = {**critic.losses, **actor.losses}
        metrics.update(actor.metrics)
        metrics.update(losses_out)
        metrics = {name: value.detach() for name, value in metrics.items()}
        return LossOutput(losses_out, metrics, hmc_result)

    def _critic_losses(self, batch: tuple, mean, std, state_half, energy_half, noise) -> CriticLosses:
        """TD error + the mutual-information regulariser (and the Lagrange multiplier's loss). With a
        separate energy network (MISA-T) the regulariser trains T_psi instead and the critics see
        only the TD error.

        Under ``unbiased_estimator="snis"`` the result also carries the K policy samples' pre-tanh
        values (B, K, A) and their SNIS weights softmax_k(min_i Q_i(s, a_k)) (B, K) from the Q values
        of this log-partition term (the energy network's for MISA-T), both detached."""
        cfg = self.config
        obs, actions, rewards, next_obs, dones = batch
        losses_out: Dict[str, Tensor] = {}
        metrics: Dict[str, Tensor] = {}
        # TD target: one reparameterised a' ~ pi(.|s'), min of the target critics; no entropy backup
        # (the official MISA code) unless backup_entropy (SAC-N, EDAC).
        with torch.no_grad():
            next_mean, next_std = self.policy.dist_params(next_obs)
            next_actions, next_log_pi = nets.tanh_gaussian_sample(next_mean, next_std, noise.next_policy)
            next_q = self.target_critic(next_obs, next_actions)
            if cfg.backup_entropy:  # SAC-N / EDAC: the soft value of s'
                target = losses.soft_td_target(rewards, dones, next_q, next_log_pi, self.log_alpha.exp(), cfg.gamma)
            else:
                target = losses.td_target(rewards, dones, next_q, cfg.gamma)
        layers = self.critic.stacked_layers()
        diversity = None
        if cfg.diversity_weight > 0:  # EDAC: Q and dQ/da at the data from one differentiable pass
            q_data, action_grad = losses.q_and_action_grad(layers, state_half, actions)
            diversity = losses.ensemble_diversity(action_grad)
            metrics["diversity_loss"] = diversity
        else:
            q_data = nets.ensemble_q(layers, state_half, actions)
        td = losses.td_loss(q_data, target)
        penalty = torch.zeros_like(td)
        snis = None
        if cfg.energy_bound != "none":
            log_weights = None
            if cfg.energy_bound == "cql":
                sample_actions, log_weights = losses.cql_proposals(
                    mean, std, next_mean, next_std, noise.samples, noise.next_samples, noise.uniform)
            else:
                with torch.no_grad():  # K fresh policy samples at s; only the critics see them
                    sample_pre_tanh = mean.unsqueeze(1) + std.unsqueeze(1) * noise.samples
                    sample_actions = torch.tanh(sample_pre_tanh)
            norm = losses.log_norm(cfg.lse_norm, cfg.num_samples, actions.shape[0])
            energy_layers, energy_data = layers, q_data
            if self.energy is not None:
                energy_layers = self.energy.stacked_layers()
                energy_data = nets.ensemble_q(energy_layers, energy_half, actions)
            regulariser = losses.energy_gap(
                cfg.energy_bound, energy_data, energy_layers, obs, sample_actions, norm, energy_half, log_weights,
                snis_q_precision(cfg) if cfg.snis_term else cfg.sampled_q_precision, return_q=cfg.snis_term)
            gap = regulariser.gap
            if cfg.snis_term:  # the same samples and Q values: no second critic evaluation
                snis = SNISSamples(sample_pre_tanh, losses.snis_weights(regulariser.q_samples))
                metrics.update(losses.snis_diagnostics(snis.weights))
            alpha_prime = None
            if cfg.lagrange:
                alpha_prime = losses.alpha_prime_value(self.log_alpha_prime, cfg.alpha_prime_min, cfg.alpha_prime_max)
                losses_out["alpha_prime_loss"] = losses.alpha_prime_loss(
                    alpha_prime, gap, cfg.min_q_weight, cfg.lagrange_tau
                )
                metrics["alpha_prime"] = alpha_prime
            metrics["lme_gap"] = gap.mean()
            metrics["log_partition"] = regulariser.partition.mean()
            if self.energy is not None:
                # T_psi maximises the bound E_D[T] - E_s[log-partition], i.e. minimises the gap.
                losses_out["energy_loss"] = gap.sum()
            else:
                penalty = losses.conservative_penalty(gap, cfg.min_q_weight, alpha_prime, cfg.lagrange_tau)
                if cfg.num_critics <= PER_CRITIC_METRICS:
                    metrics.update({f"q{i + 1}_lme_gap": gap[i] for i in range(cfg.num_critics)})
        losses_out["critic_loss"] = losses.critic_loss(td, penalty)
        if diversity is not None:
            losses_out["critic_loss"] = losses_out["critic_loss"] + cfg.diversity_weight * diversity
        metrics["td_loss"] = td.sum()
        metrics["critic_penalty"] = penalty.sum()
        metrics.update(critic_metrics(td, q_data))
        metrics["q_target"] = target.mean()
        return CriticLosses(losses_out, metrics, snis)

    def _hmc_samples(self, run_chain, actions, mean, std, energy_half, noise, metrics) -> Optional[hmc_lib.HMCResult]:
        """Samples of pi(a|s) exp(min_i Q_i(s, a)) / Z(s) (online critics; T_psi for MISA-T), started
        at the dataset actions."""
        cfg = self.config
        if not cfg.hmc_chain:  # off, or the SNIS estimate of the correction term (no chain at all)
            return None
        # The fused one-launch chain on CUDA (same noise, same result), the torch reference elsewhere.
        result = run_chain(
            mean,
            std,
            (self.critic if self.energy is None else self.energy).stacked_layers(detach=True),
            energy_half,
            actions,
            mode=cfg.hmc_mode,
            space=cfg.hmc_space,
            num_samples=cfg.num_samples,
            burn_in=cfg.hmc_burn_in,
            leapfrog_steps=cfg.hmc_leapfrog_steps,
            step_size=self.hmc_step_size(),
            adapt=cfg.adapt_hmc,
            target_accept=cfg.hmc_target_accept,
            adapt_rate=cfg.hmc_adapt_rate,
            noise=noise.hmc,
            precision=cfg.hmc_precision,
        )
        metrics["hmc_accept_rate"] = result.accept_rate
        metrics["hmc_accept_prob"] = result.accept_prob
        metrics["hmc_step_size"] = result.step_size.mean()
        metrics.update(hmc_lib.chain_diagnostics(result, mean, std, actions))
        return result

    def _actor_losses(self, actions, mean, std, state_half, noise, hmc_result,
                      snis: Optional[SNISSamples] = None) -> ActorLosses:
        """Actor loss (BA term, Q, HMC correction) and the SAC temperature loss. ``snis``: the
        samples and weights of the SNIS correction term, from ``_critic_losses``."""
        cfg = self.config
        losses_out: Dict[str, Tensor] = {}
        metrics: Dict[str, Tensor] = {}
        new_actions, log_pi_new = nets.tanh_gaussian_sample(mean, std, noise.policy)
        # Q(s, a~) through detached critic weights: only the policy gets this gradient.
        q_new = nets.ensemble_q(self.critic.stacked_layers(detach=True), state_half.detach(), new_actions)
        q_new = q_new.min(dim=0).values
        if cfg.actor_q_scale is not None:
            metrics["actor_lambda"] = losses.q_scale(q_new, cfg.actor_q_scale)
            q_actor = metrics["actor_lambda"] * q_new
        else:
            q_actor = q_new
        log_pi_data = nets.tanh_gaussian_log_prob(mean, std, actions) if cfg.use_ba else None
        log_pi_mcmc = mcmc_weights = None
        if snis is not None:  # eq. 15 by SNIS: sum_k w_k log pi_theta(a_k|s) over the log-partition's samples
            mcmc_weights = snis.weights
            log_pi_mcmc = nets.tanh_gaussian_log_prob_pre_tanh(mean.unsqueeze(1), std.unsqueeze(1), snis.pre_tanh)
        elif hmc_result is not None:  # samples carry no gradient; log pi of them does (eq. 15)
            if hmc_result.pre_tanh is not None:  # exact, even where tanh saturates to +-1
                log_pi_mcmc = nets.tanh_gaussian_log_prob_pre_tanh(mean.unsqueeze(1), std.unsqueeze(1),
                                                                   hmc_result.pre_tanh)
            else:
                log_pi_mcmc = nets.tanh_gaussian_log_prob(mean.unsqueeze(1), std.unsqueeze(1), hmc_result.samples)
        alpha = self.log_alpha.exp()
        losses_out["actor_loss"], terms = losses.actor_loss(
            alpha, log_pi_new, q_actor, cfg.bc_weight, log_pi_data, log_pi_mcmc, cfg.unbiased_weight, mcmc_weights
        )
        metrics.update(terms)
        metrics["q_pi"] = q_new.mean()
        metrics["log_pi"] = log_pi_new.mean()
        if log_pi_data is not None:
            metrics["log_pi_data"] = log_pi_data.mean()
        metrics["alpha"] = alpha
        if cfg.auto_alpha:
            losses_out["alpha_loss"] = losses.alpha_loss(self.log_alpha, log_pi_new, self.target_entropy)
        return ActorLosses(losses_out, metrics)


def misa_losses(networks: MISANetworks, run_chain: Callable = ops.hmc_sample) -> LossFunction:
    """MISA's loss function ``losses(tensors, batch, noise) -> LossOutput``: ``networks``' forward run
    by ``torch.func.functional_call`` on ``tensors`` (paths as in ``networks.named_parameters()``
    and ``named_buffers()``). No state is read or changed but what is passed in."""

    def losses(tensors: Dict[str, Tensor], batch: tuple, noise: UpdateNoise) -> LossOutput:
        return torch.func.functional_call(networks, tensors, (batch, noise, run_chain))

    return losses


class MISA(Learner):
    """``MISA(config)``; ``update(batch) -> metrics``.

    batch: mapping with observations (B, S), actions (B, A), rewards (B,) or (B, 1),
    next_observations (B, S), terminals (B,) or (B, 1); tensors or numpy arrays.
    Metrics are detached 0-dim tensors on the agent's device (no host sync per step): convert them
    with ``float()`` when logging."""

    noise_function = staticmethod(draw_update_noise)

    def __init__(self, config: MISAConfig, obs_dim: Optional[int] = None, act_dim: Optional[int] = None):
        obs_dim = obs_dim if obs_dim is not None else config.obs_dim
        act_dim = act_dim if act_dim is not None else config.act_dim
        if obs_dim is None or act_dim is None:
            raise ValueError("MISA needs obs_dim and act_dim (in the config or as arguments)")
        self.config = cfg = config.replace(obs_dim=obs_dim, act_dim=act_dim)
        self.device = torch.device(cfg.device)
        self.networks = MISANetworks(cfg, self.device)
        self._tensors = module_tensors(self.networks)
        self.target_entropy = self.networks.target_entropy
        self.generator = torch.Generator(device=self.device).manual_seed(derive_seeds(cfg.seed)[1])
        self.optimizers = self.make_optimizers(cfg, self.state_tensors())
        self.schedulers = self.make_schedulers(cfg, self.optimizers)
        self.step = 0

    @staticmethod
    def make_optimizers(cfg: MISAConfig, tensors: Dict[str, Tensor]) -> Dict[str, torch.optim.Optimizer]:
        """One Adam per loss (LOSS_OWNER) over ``tensors`` (a single run's or a group's)."""

        def of(name):
            return tensors_under(tensors, name)

        optimizers = {
            "policy": torch.optim.Adam(of("policy"), lr=cfg.policy_lr),
            "critic": torch.optim.Adam(of("critic"), lr=cfg.critic_lr),
            "alpha": torch.optim.Adam([tensors["log_alpha"]], lr=cfg.alpha_lr),
            "alpha_prime": torch.optim.Adam([tensors["log_alpha_prime"]], lr=cfg.alpha_prime_lr),
        }
        if cfg.energy_network == "separate":
            optimizers["energy"] = torch.optim.Adam(of("energy"), lr=cfg.energy_lr)
        return optimizers

    @staticmethod
    def make_schedulers(cfg: MISAConfig, optimizers) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """The paper's cosine schedule of the policy and critic learning rates (or constant)."""

        def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state_dict skips it
            if cfg.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.lr_decay_steps) / cfg.lr_decay_steps))

        return {name: torch.optim.lr_scheduler.LambdaLR(optimizers[name], lr_factor) for name in ("policy", "critic")}

    # The networks by name (for a group, the layout only: its values are in state_tensors()).
    policy = property(lambda self: self.networks.policy)
    critic = property(lambda self: self.networks.critic)
    target_critic = property(lambda self: self.networks.target_critic)
    energy = property(lambda self: self.networks.energy)
    log_alpha = property(lambda self: self.state_tensors()["log_alpha"])
    log_alpha_prime = property(lambda self: self.state_tensors()["log_alpha_prime"])
    hmc_log_step_size = property(lambda self: self.state_tensors()["hmc_log_step_size"])

    @property
    def hmc_step_size(self) -> Tensor:
        """The HMC step size of the next update (0-dim; adapts across updates when adapting)."""
        tensors = self.state_tensors()
        return tensors["hmc_log_step_size"].exp() if self.config.adapt_hmc else tensors["fixed_hmc_step_size"]

    # ----------------------------------------------------------------------------------------------
    def loss_function(self, run_chain: Callable = ops.hmc_sample) -> LossFunction:
        """This learner's loss function for every member (one vmapped call for a group)."""
        return self.for_members(misa_losses(self.networks, run_chain))

    def compute_losses(self, batch: Mapping, noise: Optional[UpdateNoise] = None) -> LossOutput:
        """Every loss of one update at the current parameters, plus metrics. No parameter changes."""
        batch = as_batch(batch, self.device)
        noise = self.draw_noise(batch[1].shape[-2]) if noise is None else noise
        return self.loss_function()(self.state_tensors(), batch, noise)

    def update(self, batch: Mapping, noise: Optional[UpdateNoise] = None, check_finite: Optional[bool] = None,
               losses: Optional[LossFunction] = None) -> Dict[str, Tensor]:
        """One simultaneous gradient step of every loss, then the Polyak target update.

        ``losses``: the loss function to step on (default ``loss_function()``; the compiled backend
        passes its compiled one). Raises NonFiniteLossError (before any optimizer step) if a loss or
        gradient is not finite and ``check_finite`` (default: the config's) is on. The CUDA-graph
        backend turns it off inside the graph (a host sync cannot be captured): the graph tests the
        losses and gradients on the device and misa_fast.training.backends reads that flag after
        the replay."""
        batch = as_batch(batch, self.device)
        if noise is None:
            noise = self.draw_noise(batch[1].shape[-2])
        tensors = self.state_tensors()
        out = (losses or self.loss_function())(tensors, batch, noise)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # One backward pass: each loss reaches only its own parameters (see module docstring); the
        # members of a group share no operation, so each gets only its own gradient.
        total = sum(out.losses.values())
        (total if self.member_seeds is None else total.sum()).backward()
        if self.config.check_finite if check_finite is None else check_finite:
            self._check_finite(out.losses)
        for name in out.losses:
            self.optimizers[LOSS_OWNER[name]].step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.polyak_update("target_critic", "critic", self.config.tau)
        if out.hmc is not None and self.config.adapt_hmc:
            # In place: a captured CUDA graph keeps reading this tensor's memory.
            log_step = out.hmc.step_size.log().detach()
            tensors["hmc_log_step_size"].copy_(log_step.mean(-1))
        self.step += 1
        return out.metrics

    @torch.no_grad()
    @numpy_io
    def act(self, obs):
        """Deterministic action tanh(mean); numpy in -> numpy out, tensor in -> tensor out."""
        return self.policy.act(obs)

    @torch.no_grad()
    @numpy_io
    def act_explore(self, obs, noise_std: Optional[float] = None, generator: Optional[torch.Generator] = None):
        """Exploration action for online fine-tuning: a sample of the tanh-Gaussian policy (SAC's
        exploration; ``noise_std`` is accepted for interface parity with TD3 and ignored)."""
        mean, std = self.policy.dist_params(obs)
        noise = torch.randn(mean.shape, generator=generator, device=self.device)
        return nets.tanh_gaussian_sample(mean, std, noise)[0]

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs (tensors are references, as nn.Module's)."""
        tensors = self.state_tensors()
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "policy": self.module_state("policy"),
            "critic": self.module_state("critic"),
            "target_critic": self.module_state("target_critic"),
            "energy": self.module_state("energy"),
            "log_alpha": tensors["log_alpha"].detach(),
            "log_alpha_prime": tensors["log_alpha_prime"].detach(),
            "hmc_log_step_size": tensors["hmc_log_step_size"],
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
        }

    def load_state_dict(self, state: Mapping) -> None:
        saved = MISAConfig.from_dict(state["config"])
        for key in ("obs_dim", "act_dim", "policy_hidden", "critic_hidden", "num_critics", "energy_network",
                    "network_style"):  # the style picks the critics' activation: same shapes, another network
            if getattr(saved, key) != getattr(self.config, key):
                raise ValueError(
                    f"checkpoint has {key}={getattr(saved, key)!r}, agent has {getattr(self.config, key)!r}"
                )
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        if self.energy is not None:
            self.energy.load_state_dict(state["energy"])
        with torch.no_grad():  # in place: the optimizers and a captured CUDA graph hold these tensors
            self.log_alpha.copy_(state["log_alpha"])
            self.log_alpha_prime.copy_(state["log_alpha_prime"])
            self.hmc_log_step_size.copy_(state["hmc_log_step_size"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        # A CPU and a CUDA generator state are different things: across device types the stream
        # stays freshly seeded (such a resume is not bit-identical anyway).
        if state.get("generator_device", self.device.type) == self.device.type:
            self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])

    def _check_finite(self, losses_out: Dict[str, Tensor]) -> None:
        """One host sync: every loss, and the gradient of every group a loss drives."""
        groups = {name: self.optimizers[LOSS_OWNER[name]].param_groups[0]["params"] for name in losses_out}
        names = list(losses_out) + [f"{LOSS_OWNER[name]}_grad" for name in losses_out]
        raise_if_not_finite(losses_out, groups.values(), names, self.step, self.member_seeds)


# How finely each dot precision rounds (tf32x3 is fp32-accurate), and what the sampled-Q kernel, which
# has no tf32x3, computes in its place.
_PRECISION_FINENESS = {"bf16": 0, "tf32": 1, "tf32x3": 2, "ieee": 2}
_SAMPLED_Q_EQUIVALENT = {"bf16": "bf16", "tf32": "tf32", "tf32x3": "ieee", "ieee": "ieee"}


def snis_q_precision(cfg: MISAConfig) -> str:
    """The sampled-Q precision of the log-partition whose Q values give the SNIS weights:
    softmax_k(min_i Q) moves a weight by e^(+-e) for an absolute Q error e, so those Q values are
    computed at the HMC term's precision (fp32 dots for tf32x3), or at sampled_q_precision if finer."""
    hmc = _SAMPLED_Q_EQUIVALENT[cfg.hmc_precision]
    finer = _PRECISION_FINENESS[hmc] > _PRECISION_FINENESS[cfg.sampled_q_precision]
    return hmc if finer else cfg.sampled_q_precision


def raise_if_not_finite(losses_out: Dict[str, Tensor], param_groups, names, step: int, member_seeds=None) -> None:
    """One host sync over every loss and the gradient sum of each parameter group; raises
    NonFiniteLossError naming the first bad term (of each member, for a stacked agent)."""
    if member_seeds is None:
        grad_sums = [torch.stack([p.grad.sum() for p in params if p.grad is not None]).sum() for params in param_groups]
    else:
        count = len(member_seeds)
        grad_sums = [torch.stack([p.grad.reshape(count, -1).sum(1) for p in params if p.grad is not None]).sum(0)
                     for params in param_groups]
    values = torch.stack([loss.detach() for loss in losses_out.values()] + grad_sums)
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    if member_seeds is None:
        bad = next(name for name, ok in zip(names, finite.tolist()) if not ok)
        raise NonFiniteLossError(bad, step)
    bad_members = {}
    for m, column in enumerate(finite.T.tolist()):
        if not all(column):
            bad_members[m] = next(name for name, ok in zip(names, column) if not ok)
    first = min(bad_members)
    raise NonFiniteLossError(bad_members[first], step, bad_members)


def derive_seeds(seed: int):
    """Two independent 63-bit seeds (network init, sampling) from one config seed."""
    words = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return [int(w) & (2**63 - 1) for w in words]
