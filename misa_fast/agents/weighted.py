"""The weighted-regression learner: BC, 10%BC, AWAC (Nair et al. 2020), OneStep RL (Brandfonbrener
et al. 2021) and IQL (Kostrikov et al. 2021) as settings of one class (``WeightedConfig``).

Every one of them fits the actor to the data actions, each action weighted by how much better than
the policy's own it looks: BC weights all alike; AWAC, OneStep and IQL weight by exp(advantage),
and differ only in the critic the advantage comes from (``critic_target``):

- BC: no critic. Deterministic actor, mean squared error to the data action (CORL any_percent_bc).
- AWAC: twin critics regress to r + gamma (1 - d) min_i Q'_i(s', a'), a' ~ pi(s');
  A = min_i Q_i(s, a) - min_i Q_i(s, a~), a~ ~ pi(s); w = min(exp(A / lambda), exp_adv_max).
- OneStep: a Gaussian beta fitted to the data by BC; Q^beta regresses by SARSA to
  r + gamma (1 - d) min_i Q'_i(s', a'), a' the data's next action;
  A = Q^beta(s, a) - mean_k Q^beta(s, a_k), a_k ~ beta(s); w = min(exp(beta_T A), exp_adv_max).
- IQL: V regresses to the tau-expectile of min_i Q'_i(s, a); the critics to r + gamma (1 - d)
  V(s'); A = min_i Q'_i(s, a) - V(s); w = min(exp(beta_T A), exp_adv_max).

The actor loss is -mean(w log pi(a|s)) for the Gaussian actor (mean tanh(MLP), or the MLP itself for
AWAC; a learned log-std), mean(w |pi(s) - a|^2) for the deterministic one.

One ``update`` is a *simultaneous* step, as MISA's (misa_fast.agents.learner): every loss is computed
at the current parameters (they detach what they must not train), one backward pass, every
optimizer steps, the actor's cosine schedule (IQL) advances, the target critics move by Polyak
averaging. That is CORL iql.py's order exactly (V, Q and the actor all read the pre-update networks).
Deviations, each where its code is: CORL awac.py steps the critics first and computes the actor's
advantage with the updated critics (here: the critics of the same update, one step older); OneStep's
official code trains beta, then Q^beta, then pi, one after the other, pi starting from beta (here:
all three together, pi from scratch).

As for the other learners, :class:`WeightedNetworks` holds every tensor the losses read and computes
them in ``forward``; :func:`weighted_losses` runs it through ``torch.func.functional_call`` on
explicit tensors, so several seeds train as one group (misa_fast.agents.members). All randomness of
an update (dropout masks, policy and behaviour samples: :func:`draw_weighted_noise`) comes from the
agent's generator, saved in ``state_dict``: a resume is bit-identical on CPU.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from misa_fast import nets
from misa_fast.agents import losses
from misa_fast.agents.learner import Learner, as_batch, module_tensors, next_actions_of, tensors_under
from misa_fast.agents.misa import derive_seeds, numpy_io, raise_if_not_finite
from misa_fast.agents.td3 import DeterministicActor, _torch_default_init_
from misa_fast.agents.vae import torch_default_linear
from misa_fast.agents.weighted_config import WeightedConfig

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Which optimizer each loss drives.
LOSS_OWNER = {"actor_loss": "policy", "critic_loss": "critic", "value_loss": "value", "behavior_loss": "behavior"}
# Must match for a checkpoint to load (hidden sizes are compared resolved).
_ARCHITECTURE_KEYS = ("obs_dim", "act_dim", "policy", "critic_target", "num_critics", "log_std", "tanh_mean")
_NETWORKS = ("policy", "behavior", "critic", "target_critic", "value")


# --------------------------------------------------------------------------------------------------
# the loss functions
def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """IQL's value loss mean |tau - 1(u < 0)| u^2 for u = Q(s, a) - V(s) (CORL asymmetric_l2_loss)."""
    return (torch.abs(expectile - (diff < 0).to(diff.dtype)) * diff.pow(2)).mean()


def exp_advantage_weights(advantage: Tensor, scale: float, max_weight: float) -> Tensor:
    """min(exp(scale * A), max_weight), no gradient: IQL's and OneStep's exp(beta A) (scale beta),
    AWAC's exp(A / lambda) (scale 1 / lambda)."""
    return torch.exp(scale * advantage.detach()).clamp(max=max_weight)


def weighted_log_likelihood_loss(log_prob: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """-mean(w log pi(a|s)); weights None: -mean log pi(a|s) (Gaussian BC, OneStep's beta)."""
    return -log_prob.mean() if weights is None else -(weights.detach() * log_prob).mean()


def weighted_squared_error_loss(pred: Tensor, actions: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """The deterministic actor's loss. weights None: mean over batch and action dims of (pi(s) - a)^2
    (CORL BC's F.mse_loss); else mean_s w |pi(s) - a|^2 (CORL IQL's deterministic actor)."""
    err = (pred - actions.detach()).pow(2)
    return err.mean() if weights is None else (weights.detach() * err.sum(-1)).mean()


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(a; mean, diag exp(log_std)^2), summed over the last dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(-1)


# --------------------------------------------------------------------------------------------------
# networks
class GaussianActor(nn.Module):
    """MLP (ReLU) -> a diagonal Gaussian over actions, without tanh squashing (CORL AWAC and IQL,
    OneStep's GaussMLP): mean tanh(MLP) or the MLP itself (``tanh_mean``); log-std either one learned
    vector (init 0) hard-clipped to [lo, hi] ("global") or a second output head squashed into
    [lo, hi] by tanh ("state"). Dropout as DeterministicActor's: masks passed to the forward.
    ``act`` is the mean clipped to [-1, 1] (linear, relu, tanh, chunk, clamp: exportable)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], generator: Optional[torch.Generator] = None,
                 log_std: str = "global", log_std_min: float = -20.0, log_std_max: float = 2.0, tanh_mean: bool = True):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.state_std, self.tanh_mean = log_std == "state", tanh_mean
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        sizes = [obs_dim, *hidden]
        self.hidden = nn.ModuleList(torch_default_linear(i, o, generator) for i, o in zip(sizes[:-1], sizes[1:]))
        self.out = torch_default_linear(sizes[-1], act_dim * (2 if self.state_std else 1), generator)
        if self.state_std:
            self.register_parameter("log_std", None)
        else:
            self.log_std = nn.Parameter(torch.zeros(act_dim))

    def _heads(self, obs: Tensor, masks: Sequence[Tensor] = ()) -> Tuple[Tensor, Optional[Tensor]]:
        h = obs
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if masks:
                h = h * masks[i]
            h = torch.relu(h)
        out = self.out(h)
        mean, raw_std = out.chunk(2, dim=-1) if self.state_std else (out, None)
        return (torch.tanh(mean) if self.tanh_mean else mean), raw_std

    def dist_params(self, obs: Tensor, masks: Sequence[Tensor] = ()) -> Tuple[Tensor, Tensor]:
        """(mean, log_std), each (..., A)."""
        mean, raw_std = self._heads(obs, masks)
        lo, hi = self.log_std_min, self.log_std_max
        if raw_std is not None:  # OneStep's soft clamp
            log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw_std) + 1.0)
        else:
            log_std = self.log_std.clamp(lo, hi).expand_as(mean)
        return mean, log_std

    def log_prob(self, obs: Tensor, actions: Tensor, masks: Sequence[Tensor] = ()) -> Tensor:
        """log pi(a|s) of the (unsquashed) Gaussian: (B,)."""
        mean, log_std = self.dist_params(obs, masks)
        return gaussian_log_prob(mean, log_std, actions)

    def sample(self, obs: Tensor, noise: Tensor) -> Tensor:
        """clip(mean + std * eps, -1, 1) for standard normal ``noise`` (B, A), or (B, K, A) for K
        samples per state (CORL AWAC clips its samples the same way)."""
        mean, log_std = self.dist_params(obs)
        if noise.dim() == mean.dim() + 1:
            mean, log_std = mean.unsqueeze(-2), log_std.unsqueeze(-2)
        return (mean + torch.exp(log_std) * noise).clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """The deterministic evaluation action: the mean, clipped to [-1, 1], no dropout."""
        return self._heads(obs)[0].clamp(-1.0, 1.0)


class ValueNetwork(nn.Module):
    """IQL's V(s): MLP (ReLU) -> one number, PyTorch's default init. forward: (B, S) -> (B,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int], generator: Optional[torch.Generator] = None):
        super().__init__()
        sizes = [obs_dim, *hidden, 1]
        self.layers = nn.ModuleList(torch_default_linear(i, o, generator) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, obs: Tensor) -> Tensor:
        h = obs
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h).squeeze(-1)


class WeightedNoise(NamedTuple):
    """The randomness of one update, in the order it is drawn from the agent's generator."""

    actor_masks: Tuple[Tensor, ...]  # dropout keep-masks of the actor in its loss (() without dropout)
    next_policy: Optional[Tensor] = None  # (B, A): a' ~ pi(s') of AWAC's target (Gaussian actor)
    policy: Optional[Tensor] = None  # (B, A): a~ ~ pi(s) of AWAC's advantage (Gaussian actor)
    behavior: Optional[Tensor] = None  # (B, K, A): a_k ~ beta(s) of OneStep's advantage baseline


def draw_weighted_noise(cfg: WeightedConfig, generator: torch.Generator, batch_size: int) -> WeightedNoise:
    """The randomness of one update, drawn from ``generator`` in a fixed order."""
    device, dropout, act_dim = generator.device, cfg.actor_dropout, cfg.act_dim

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device)

    masks: Tuple[Tensor, ...] = ()
    if dropout > 0.0:
        masks = tuple((torch.rand((batch_size, h), generator=generator, device=device) >= dropout)
                      .float().div_(1.0 - dropout) for h in cfg.resolved_hidden("actor"))
    gaussian = cfg.policy == "gaussian"
    noise = WeightedNoise(actor_masks=masks)
    if cfg.critic_target == "policy" and gaussian:
        noise = noise._replace(next_policy=randn(batch_size, act_dim))
    if cfg.weight == "awac" and gaussian:
        noise = noise._replace(policy=randn(batch_size, act_dim))
    if cfg.critic_target == "behavior":
        noise = noise._replace(behavior=randn(batch_size, cfg.num_samples, act_dim))
    return noise


class WeightedNetworks(nn.Module):
    """Every tensor the losses read (actor; for the weighted methods the critics and their targets;
    IQL's V; OneStep's beta) and the losses of one update, ``forward(batch, noise) -> (losses,
    metrics)``. Run it through :func:`weighted_losses` on explicit tensors; it changes nothing."""

    def __init__(self, cfg: WeightedConfig, device: torch.device):
        super().__init__()
        self.config = cfg
        init_generator = torch.Generator().manual_seed(derive_seeds(cfg.seed)[0])  # CPU: same init everywhere
        obs_dim, act_dim, actor_hidden = cfg.obs_dim, cfg.act_dim, cfg.resolved_hidden("actor")

        def gaussian():
            return GaussianActor(obs_dim, act_dim, actor_hidden, init_generator, cfg.log_std, cfg.log_std_min,
                                 cfg.log_std_max, cfg.tanh_mean)

        self.policy = (DeterministicActor(obs_dim, act_dim, actor_hidden, init_generator)
                       if cfg.policy == "deterministic" else gaussian()).to(device)
        self.behavior: Optional[GaussianActor] = gaussian().to(device) if cfg.critic_target == "behavior" else None
        self.critic: Optional[nets.EnsembleCritic] = None
        self.target_critic: Optional[nets.EnsembleCritic] = None
        if cfg.critic_target != "none":
            self.critic = nets.EnsembleCritic(obs_dim, act_dim, cfg.resolved_hidden("critic"), cfg.num_critics,
                                              init_generator, activation="relu")
            _torch_default_init_(self.critic, init_generator, None)
            self.critic.to(device)
            self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.value: Optional[ValueNetwork] = None
        if cfg.critic_target == "value":
            self.value = ValueNetwork(obs_dim, cfg.resolved_hidden("value"), init_generator).to(device)

    def forward(self, batch: tuple, noise: WeightedNoise) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Every loss of one update (by name, see LOSS_OWNER) and the metrics."""
        cfg = self.config
        obs, actions = batch[0], batch[1]
        out: Dict[str, Tensor] = {}
        metrics: Dict[str, Tensor] = {}
        v = None
        if self.critic is not None:
            out["critic_loss"], critic_metrics = self.critic_loss(batch, noise)
            metrics.update(critic_metrics)
        if self.value is not None:
            with torch.no_grad():
                q_target_data = self.target_critic(obs, actions).min(dim=0).values
            v = self.value(obs)
            out["value_loss"] = expectile_loss(q_target_data - v, cfg.expectile)
            metrics["v_mean"] = v.mean()
        if self.behavior is not None:
            out["behavior_loss"] = weighted_log_likelihood_loss(self.behavior.log_prob(obs, actions))
        weights = None
        if cfg.weight != "none":
            advantage = q_target_data - v.detach() if v is not None else self.advantage(batch, noise)
            scale = 1.0 / cfg.awac_lambda if cfg.weight == "awac" else cfg.beta
            weights = exp_advantage_weights(advantage, scale, cfg.exp_adv_max)
            metrics.update(advantage=advantage.mean(), weight_mean=weights.mean(), weight_max=weights.max())
        out["actor_loss"] = self.actor_loss(batch, noise, weights)
        metrics.update(out)
        return out, metrics

    def _policy_action(self, obs: Tensor, noise: Optional[Tensor]) -> Tensor:
        """a ~ pi(s) (Gaussian actor, clipped) or pi(s) (deterministic), without dropout."""
        return self.policy(obs) if noise is None else self.policy.sample(obs, noise)

    def critic_loss(self, batch: tuple, noise: WeightedNoise) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Every critic's TD error to the method's target, and metrics. CORL AWAC sums the critics'
        MSEs, CORL IQL averages them (the same gradient direction; kept for Adam's epsilon)."""
        cfg = self.config
        obs, actions, rewards, next_obs, dones = batch[:5]
        with torch.no_grad():
            if cfg.critic_target == "policy":
                next_q = self.target_critic(next_obs, self._policy_action(next_obs, noise.next_policy))
            elif cfg.critic_target == "behavior":
                next_q = self.target_critic(next_obs, batch[5]).min(dim=0, keepdim=True).values  # SARSA: the data's a'
            else:
                next_q = self.value(next_obs).unsqueeze(0)
            target = losses.td_target(rewards, dones, next_q, cfg.gamma)
        q_data = self.critic(obs, actions)
        td = losses.td_loss(q_data, target)
        loss = td.mean() if cfg.critic_target == "value" else td.sum()
        return loss, {"q_mean": q_data.mean(), "q_target": target.mean()}

    def advantage(self, batch: tuple, noise: WeightedNoise) -> Tensor:
        """A(s, a) of AWAC (min Q(s, a) - min Q(s, a~ ~ pi(s))) or OneStep (Q^beta(s, a) - mean_k
        Q^beta(s, a_k ~ beta(s)), official n_samples 10), with the current critics, no gradient."""
        obs, actions = batch[0], batch[1]
        with torch.no_grad():
            q_data = self.critic(obs, actions).min(dim=0).values
            if self.config.critic_target == "behavior":
                samples = self.behavior.sample(obs, noise.behavior)  # (B, K, A)
                baseline = self.critic(obs, samples).min(dim=0).values.mean(dim=-1)
            else:
                baseline = self.critic(obs, self._policy_action(obs, noise.policy)).min(dim=0).values
        return q_data - baseline

    def actor_loss(self, batch: tuple, noise: WeightedNoise, weights: Optional[Tensor]) -> Tensor:
        """The (weighted) regression of the actor onto the data actions."""
        obs, actions = batch[0], batch[1]
        if self.config.policy == "deterministic":
            return weighted_squared_error_loss(self.policy(obs, noise.actor_masks), actions, weights)
        return weighted_log_likelihood_loss(self.policy.log_prob(obs, actions, noise.actor_masks), weights)


def weighted_losses(networks: WeightedNetworks) -> Callable:
    """The loss function ``losses(tensors, batch, noise) -> (losses, metrics)``: ``networks``'
    forward run by ``torch.func.functional_call`` on ``tensors``."""

    def losses_fn(tensors: Dict[str, Tensor], batch: tuple, noise: WeightedNoise):
        return torch.func.functional_call(networks, tensors, (batch, noise))

    return losses_fn


# --------------------------------------------------------------------------------------------------
class Weighted(Learner):
    """``Weighted(config)``; ``update(batch) -> metrics`` (detached 0-dim tensors, no host sync apart
    from the optional finite check). Batch as for :class:`misa_fast.agents.MISA`."""

    noise_function = staticmethod(draw_weighted_noise)
    needs_pretraining = False
    pretrain_steps = 0

    def __init__(self, config: WeightedConfig, obs_dim: Optional[int] = None, act_dim: Optional[int] = None):
        obs_dim = obs_dim if obs_dim is not None else config.obs_dim
        act_dim = act_dim if act_dim is not None else config.act_dim
        if obs_dim is None or act_dim is None:
            raise ValueError("Weighted needs obs_dim and act_dim (in the config or as arguments)")
        self.config = cfg = config.replace(obs_dim=obs_dim, act_dim=act_dim)
        self.device = torch.device(cfg.device)
        self.networks = WeightedNetworks(cfg, self.device)
        self._tensors = module_tensors(self.networks)
        self.generator = torch.Generator(device=self.device).manual_seed(derive_seeds(cfg.seed)[1])
        self.optimizers = self.make_optimizers(cfg, self.state_tensors())
        self.schedulers = self.make_schedulers(cfg, self.optimizers)
        self.step = 0

    @staticmethod
    def make_optimizers(cfg: WeightedConfig, tensors: Dict[str, Tensor]) -> Dict[str, torch.optim.Optimizer]:
        """One Adam per network that has a loss (LOSS_OWNER), over ``tensors`` (a run's or a group's)."""

        def of(name):
            return tensors_under(tensors, name)

        lrs = {"policy": cfg.actor_lr, "critic": cfg.critic_lr, "value": cfg.value_lr, "behavior": cfg.behavior_lr}
        return {name: torch.optim.Adam(of(name), lr=lr) for name, lr in lrs.items() if of(name)}

    @staticmethod
    def make_schedulers(cfg: WeightedConfig, optimizers) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """IQL's cosine decay of the actor's lr (CORL: CosineAnnealingLR over max_timesteps), or none."""
        if cfg.actor_lr_schedule == "constant":
            return {}

        def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state_dict skips it
            return 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.lr_decay_steps) / cfg.lr_decay_steps))

        return {"policy": torch.optim.lr_scheduler.LambdaLR(optimizers["policy"], lr_factor)}

    # The networks by name (for a group, the layout only: its values are in state_tensors()).
    policy = property(lambda self: self.networks.policy)
    behavior = property(lambda self: self.networks.behavior)
    critic = property(lambda self: self.networks.critic)
    target_critic = property(lambda self: self.networks.target_critic)
    value = property(lambda self: self.networks.value)

    # ----------------------------------------------------------------------------------------------
    def loss_function(self) -> Callable:
        """This learner's loss function for every member (one vmapped call for a group)."""
        return self.for_members(weighted_losses(self.networks))

    def compute_losses(self, batch: Mapping, noise: Optional[WeightedNoise] = None):
        """Every loss of one update at the current parameters, plus metrics. No parameter changes."""
        batch = as_batch(batch, self.device) + next_actions_of(batch, self.device, self.config)
        noise = self.draw_noise(batch[1].shape[-2]) if noise is None else noise
        return self.loss_function()(self.state_tensors(), batch, noise)

    def update(self, batch: Mapping, noise: Optional[WeightedNoise] = None) -> Dict[str, Tensor]:
        """One simultaneous gradient step of every loss, then the lr schedule and the Polyak update.

        Raises NonFiniteLossError (before any optimizer step: the agent stays as it was) if a loss
        or gradient is not finite and ``check_finite`` is on."""
        batch = as_batch(batch, self.device) + next_actions_of(batch, self.device, self.config)
        if noise is None:
            noise = self.draw_noise(batch[1].shape[-2])
        out, metrics = self.loss_function()(self.state_tensors(), batch, noise)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # Each loss reaches only its own network (the others are read under no_grad or detached);
        # the members of a group share no operation, so each gets only its own gradient.
        total = sum(out.values())
        (total if self.member_seeds is None else total.sum()).backward()
        if self.config.check_finite:
            self._check_finite(out)
        for name in out:
            self.optimizers[LOSS_OWNER[name]].step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        if self.critic is not None:
            self.polyak_update("target_critic", "critic", self.config.tau)
        self.step += 1
        return {k: v.detach() for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    @numpy_io
    def act(self, obs):
        """Deterministic action (the Gaussian's mean, clipped; or pi(s)); numpy in -> numpy out."""
        return self.policy.act(obs)

    @torch.no_grad()
    @numpy_io
    def act_explore(self, obs, noise_std: float = 0.1, generator: Optional[torch.Generator] = None):
        """Exploration for online fine-tuning, eps from ``generator`` (default: the agent's own): the
        deterministic actor as TD3, clip(pi(s) + noise_std * eps, -1, 1); the Gaussian actor samples
        itself, clip(mean + std * eps, -1, 1) (CORL's actors in training mode; noise_std unused)."""
        generator = self.generator if generator is None else generator
        if isinstance(self.policy, GaussianActor):
            mean, log_std = self.policy.dist_params(obs)
            eps = torch.randn(mean.shape, generator=generator, device=self.device)
            return (mean + torch.exp(log_std) * eps).clamp(-1.0, 1.0)
        action = self.policy.act(obs)
        eps = torch.randn(action.shape, generator=generator, device=self.device)
        return (action + noise_std * eps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs (tensors are references, as nn.Module's)."""
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            **{name: self.module_state(name) for name in _NETWORKS},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
        }

    def load_state_dict(self, state: Mapping) -> None:
        saved = WeightedConfig.from_dict(state["config"])
        mismatched = [(key, getattr(saved, key), getattr(self.config, key)) for key in _ARCHITECTURE_KEYS
                      if getattr(saved, key) != getattr(self.config, key)]
        for net in ("actor", "critic", "value"):
            if saved.resolved_hidden(net) != self.config.resolved_hidden(net):
                mismatched.append((f"{net}_hidden", saved.resolved_hidden(net), self.config.resolved_hidden(net)))
        if mismatched:
            key, theirs, ours = mismatched[0]
            raise ValueError(f"checkpoint has {key}={theirs!r}, agent has {ours!r}")
        for name in _NETWORKS:
            module = getattr(self.networks, name)
            if module is not None:
                module.load_state_dict(state[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        # A CPU and a CUDA generator state are different things (see MISA.load_state_dict).
        if state.get("generator_device", self.device.type) == self.device.type:
            self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])

    def _check_finite(self, losses_out: Dict[str, Tensor]) -> None:
        """One host sync: every loss, and the gradient of the network each loss drives."""
        groups = [self.optimizers[LOSS_OWNER[name]].param_groups[0]["params"] for name in losses_out]
        names = list(losses_out) + [f"{LOSS_OWNER[name]}_grad" for name in losses_out]
        raise_if_not_finite(losses_out, groups, names, self.step, self.member_seeds)
