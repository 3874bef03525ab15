"""The deterministic-actor learner: TD3 (Fujimoto et al. 2018) with a behaviour regulariser on the
actor, ``behavior_reg="bc"`` = TD3+BC (Fujimoto & Gu 2021), ``"vae"`` = SPOT (Wu et al. 2022; docs:
the design page), ``"rebrac"`` = ReBRAC (Tarasov et al. 2023: TD3+BC with LayerNorm critics, deeper
networks, its own actor penalty and a penalty on the critic's target action, ``critic_bc_coef``,
which reads the batch's ``next_actions``). One class, the variants are configuration (``TD3Config``).

One ``update(batch)`` follows the official PyTorch code step for step: the twin critics take a TD
step towards r + gamma (1 - d) min_i Q'_i(s', clip(pi'(s') + clip(0.2 eps, +-0.5), -1, 1)); every
``policy_freq``-th update the actor then takes a step on its loss, evaluated with the *updated*
first critic Q1 (as in the official code), and the target actor and critics move by Polyak
averaging. Sequential, unlike MISA's simultaneous step: so that a non-finite actor loss still leaves
the agent as it was, the critic step of an actor update is undone (parameters and Adam state) before
``NonFiniteLossError`` is raised.

As for MISA (misa_fast.agents.learner), :class:`TD3Networks` holds the tensors and computes the
two losses, :func:`td3_losses` runs them on explicit tensors, and :meth:`TD3.update` steps.

SPOT needs its VAE pretrained on the data first: ``needs_pretraining`` / ``pretrain_vae(batches,
steps)``; the state dict records whether that happened, so a resumed run does not pretrain again.
Randomness (target smoothing noise and dropout masks: :func:`draw_td3_noise`; VAE latents,
exploration) comes from ``self.generator`` (seeded from config.seed), saved in ``state_dict``: a
resume is bit-identical on CPU.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misa_fast import nets
from misa_fast.agents import losses
from misa_fast.agents import vae as vae_lib
from misa_fast.agents.learner import Learner, as_batch, module_tensors, next_actions_of, stack_tree, tensors_under
from misa_fast.agents.misa import NonFiniteLossError, derive_seeds, numpy_io, raise_if_not_finite
from misa_fast.agents.td3_config import TD3Config

# The actor metrics of each variant (returned by every update: the last actor step's values).
_ACTOR_METRICS = {
    "bc": ("actor_loss", "actor_q_term", "actor_bc_term", "actor_lambda", "q_pi"),
    "vae": ("actor_loss", "actor_q_term", "actor_density_term", "actor_lambda", "q_pi", "neg_log_density"),
    "rebrac": ("actor_loss", "actor_q_term", "actor_bc_term", "actor_lambda", "q_pi"),
}
# Must match the architecture for a checkpoint to load.
_ARCHITECTURE_KEYS = ("obs_dim", "act_dim", "actor_hidden", "critic_hidden", "num_critics", "critic_activation",
                      "behavior_reg", "vae_hidden", "vae_latent", "actor_layer_norm", "critic_layer_norm")


class DeterministicActor(nn.Module):
    """MLP (ReLU) -> tanh, action in [-1, 1]. Dropout (official SPOT: after each hidden Linear) is
    applied through masks passed to ``forward``, drawn by the agent from its own generator, so the
    module itself is deterministic: ``act`` (evaluation, export) never drops anything.
    ``layer_norm``: a LayerNorm after each hidden activation (ReBRAC's optional actor LayerNorm);
    it draws nothing from ``generator``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 generator: Optional[torch.Generator] = None, init_w: Optional[float] = None,
                 layer_norm: bool = False):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        sizes = [obs_dim, *hidden]
        self.hidden = nn.ModuleList(
            vae_lib.torch_default_linear(fan_in, fan_out, generator) for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
        self.out = vae_lib.torch_default_linear(sizes[-1], act_dim, generator, init_w)
        # Only when asked: a plain actor's state dict keeps its keys.
        self.norms = nn.ModuleList(nn.LayerNorm(h, eps=nets.LAYER_NORM_EPS) for h in hidden) if layer_norm else None

    def forward(self, obs: Tensor, masks: Sequence[Tensor] = ()) -> Tensor:
        """masks: () or one (B, H_i) scaled keep-mask per hidden layer."""
        h = obs
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if masks:
                h = h * masks[i]
            h = F.relu(h)
            if self.norms is not None:
                h = self.norms[i](h)
        return torch.tanh(self.out(h))

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Deterministic evaluation action pi(s), no dropout."""
        return self.forward(obs)


class TD3Noise(NamedTuple):
    """The randomness of one update, in the order it is drawn from the agent's generator."""

    target: Tensor  # (B, A) standard normal: target policy smoothing
    target_masks: Tuple[Tensor, ...]  # dropout keep-masks of the target actor at s' (() without dropout)
    actor_masks: Tuple[Tensor, ...] = ()  # ... of the actor at s (actor steps)
    density: Optional[Tensor] = None  # (B, L, D) VAE latent noise of -log pi_beta (SPOT actor steps)


def draw_td3_noise(cfg: TD3Config, generator: torch.Generator, batch_size: int, actor_step: bool) -> TD3Noise:
    """The randomness of one update, drawn from ``generator`` in a fixed order."""
    device, dropout = generator.device, cfg.resolved_actor_dropout

    def masks():
        if dropout == 0.0:
            return ()
        return tuple((torch.rand((batch_size, h), generator=generator, device=device) >= dropout)
                     .float().div_(1.0 - dropout) for h in cfg.actor_hidden)

    target = torch.randn((batch_size, cfg.act_dim), generator=generator, device=device)
    noise = TD3Noise(target=target, target_masks=masks())
    if actor_step:
        density = None
        if cfg.behavior_reg == "vae":
            latent = cfg.resolved_vae_latent(cfg.act_dim)
            density = torch.randn((batch_size, cfg.density_samples, latent), generator=generator, device=device)
        noise = noise._replace(actor_masks=masks(), density=density)
    return noise


class TD3Networks(nn.Module):
    """Every tensor TD3's losses read (actor, twin critics, their targets, SPOT's VAE) and the two
    losses of an update, ``forward("critic" | "actor", batch, noise)``. Run it through
    :func:`td3_losses` on explicit tensors; it changes nothing itself."""

    def __init__(self, cfg: TD3Config, device: torch.device):
        super().__init__()
        self.config = cfg
        init_generator = torch.Generator().manual_seed(derive_seeds(cfg.seed)[0])  # CPU: same init everywhere
        obs_dim, act_dim = cfg.obs_dim, cfg.act_dim
        self.policy = DeterministicActor(obs_dim, act_dim, cfg.actor_hidden, init_generator, cfg.actor_init_w,
                                         layer_norm=cfg.actor_layer_norm)
        self.critic = nets.EnsembleCritic(obs_dim, act_dim, cfg.critic_hidden, cfg.num_critics, init_generator,
                                          activation=cfg.critic_activation, layer_norm=cfg.critic_layer_norm)
        _torch_default_init_(self.critic, init_generator, cfg.critic_init_w)
        if cfg.hidden_bias_init is not None:  # after the draws: every other initial value stays as without it
            with torch.no_grad():
                for bias in [layer.bias for layer in self.policy.hidden] + list(self.critic.biases)[:-1]:
                    bias.fill_(cfg.hidden_bias_init)
        self.vae: Optional[vae_lib.ConditionalVAE] = None
        if cfg.behavior_reg == "vae":
            self.vae = vae_lib.ConditionalVAE(obs_dim, act_dim, cfg.vae_hidden, cfg.resolved_vae_latent(act_dim),
                                              init_generator).to(device).requires_grad_(False)
        self.policy.to(device)
        self.critic.to(device)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    def forward(self, part: str, batch: tuple, noise: TD3Noise) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The ``part`` ("critic" or "actor") loss of one update and its metrics."""
        return self.critic_loss(batch, noise) if part == "critic" else self.actor_loss(batch, noise)

    def critic_loss(self, batch: tuple, noise: TD3Noise) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The critics' loss (the sum of their TD errors to the clipped double-Q target of the
        smoothed target action, less ReBRAC's penalty with ``critic_bc_coef``) and its metrics.
        batch: (obs, actions, rewards, next_obs, dones[, next_actions of the data])."""
        cfg = self.config
        obs, actions, rewards, next_obs, dones = batch[:5]
        penalty = None
        with torch.no_grad():
            next_actions = losses.smoothed_target_action(self.target_policy(next_obs, noise.target_masks), noise.target,
                                                         cfg.policy_noise, cfg.noise_clip)
            next_q = self.target_critic(next_obs, next_actions)
            if cfg.critic_bc_coef > 0:  # min_i (Q'_i - c) = min_i Q'_i - c: ReBRAC's penalised target
                penalty = losses.next_action_penalty(next_actions, batch[5])
                next_q = next_q - cfg.critic_bc_coef * penalty
            target = losses.td_target(rewards, dones, next_q, cfg.gamma)
        q_data = self.critic(obs, actions)
        td = losses.td_loss(q_data, target)
        critic_loss = td.sum()  # the official sum of the critics' MSEs
        metrics = {"critic_loss": critic_loss, "q_target": target.mean()}
        if penalty is not None:
            metrics["critic_bc_penalty"] = penalty.mean()
        for i in range(cfg.num_critics):
            metrics[f"q{i + 1}_data"] = q_data[i].mean()
            metrics[f"q{i + 1}_td_loss"] = td[i]
        return critic_loss, metrics

    def actor_loss(self, batch: tuple, noise: TD3Noise) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The actor's loss at pi(s) under Q1 (official TD3+BC / SPOT: the first critic only) or the
        minimum over the critics (``actor_q="min"``, ReBRAC), through detached critic weights so
        only the actor gets a gradient."""
        cfg = self.config
        obs, actions = batch[0], batch[1]
        pi = self.policy(obs, noise.actor_masks)
        layers = self.critic.stacked_layers(detach=True)  # its layer norms travel with it
        if cfg.actor_q == "first":
            layers = layers.select(slice(0, 1))
        q = nets.ensemble_q(layers, nets.state_half(layers, obs), pi, cfg.critic_activation)
        q_pi = q[0] if cfg.actor_q == "first" else q.min(dim=0).values
        if cfg.behavior_reg == "bc":
            loss, terms = losses.td3bc_actor_loss(q_pi, pi, actions, cfg.bc_alpha)
        elif cfg.behavior_reg == "rebrac":
            loss, terms = losses.rebrac_actor_loss(q_pi, pi, actions, cfg.actor_bc_coef)
        else:
            neg_log_density = vae_lib.neg_log_density(self.vae, obs, pi, cfg.vae_beta, noise.density,
                                                      cfg.density_estimator)
            loss, terms = losses.spot_actor_loss(q_pi, neg_log_density, cfg.spot_lambda, cfg.spot_normalize_q)
            terms["neg_log_density"] = neg_log_density.mean()
        return loss, {"actor_loss": loss, "q_pi": q_pi.mean(), **terms}


def td3_losses(networks: TD3Networks, part: str) -> Callable:
    """TD3's ``part`` ("critic" or "actor") loss function ``losses(tensors, batch, noise) -> (loss,
    metrics)``: ``networks``' forward run by ``torch.func.functional_call`` on ``tensors``."""

    def losses(tensors: Dict[str, Tensor], batch: tuple, noise: TD3Noise):
        return torch.func.functional_call(networks, tensors, (part, batch, noise))

    return losses


class TD3(Learner):
    """``TD3(config)``; ``update(batch) -> metrics`` (detached 0-dim tensors, no host sync apart from
    the optional finite check). Batch as for :class:`misa_fast.agents.MISA`."""

    noise_function = staticmethod(draw_td3_noise)

    def __init__(self, config: TD3Config, obs_dim: Optional[int] = None, act_dim: Optional[int] = None):
        obs_dim = obs_dim if obs_dim is not None else config.obs_dim
        act_dim = act_dim if act_dim is not None else config.act_dim
        if obs_dim is None or act_dim is None:
            raise ValueError("TD3 needs obs_dim and act_dim (in the config or as arguments)")
        self.config = cfg = config.replace(obs_dim=obs_dim, act_dim=act_dim)
        self.device = torch.device(cfg.device)
        self.dropout = cfg.resolved_actor_dropout
        self.networks = TD3Networks(cfg, self.device)
        self._tensors = module_tensors(self.networks)
        self.vae_trained = False
        self.generator = torch.Generator(device=self.device).manual_seed(derive_seeds(cfg.seed)[1])
        self.optimizers = self.make_optimizers(cfg, self.state_tensors())
        self.schedulers = self.make_schedulers(cfg, self.optimizers)
        nan = torch.tensor(math.nan, device=self.device)
        self._actor_metrics: Dict[str, Tensor] = {k: nan for k in _ACTOR_METRICS[cfg.behavior_reg]}  # none yet
        self.step = 0

    @staticmethod
    def make_optimizers(cfg: TD3Config, tensors: Dict[str, Tensor]) -> Dict[str, torch.optim.Optimizer]:
        def of(name):
            return tensors_under(tensors, name)

        return {"policy": torch.optim.Adam(of("policy"), lr=cfg.actor_lr),
                "critic": torch.optim.Adam(of("critic"), lr=cfg.critic_lr)}

    def join_members(self, agents) -> None:
        self.vae_trained = agents[0].vae_trained
        self._actor_metrics = stack_tree([a._actor_metrics for a in agents])

    # The networks by name (for a group, the layout only: its values are in state_tensors()).
    policy = property(lambda self: self.networks.policy)
    critic = property(lambda self: self.networks.critic)
    target_policy = property(lambda self: self.networks.target_policy)
    target_critic = property(lambda self: self.networks.target_critic)
    vae = property(lambda self: self.networks.vae)

    # ----------------------------------------------------------------------------------------------
    @property
    def needs_pretraining(self) -> bool:
        """True while SPOT's VAE has not been pretrained (never for TD3+BC)."""
        return self.vae is not None and not self.vae_trained

    @property
    def pretrain_steps(self) -> int:
        return self.config.vae_steps if self.vae is not None else 0

    def pretrain_vae(self, batches, steps: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
        """Fits the VAE to the (observations, actions) of ``next(batches)`` (a trainer data source, or
        any iterable of batch dicts) by SPOT's loss, Adam lr ``vae_lr``, one latent sample per row;
        ``steps`` defaults to ``pretrain_steps``. Marks the VAE trained and returns the last batch's
        loss. Raises NonFiniteLossError (before that step's update; the VAE stays untrained)."""
        if self.vae is None:
            raise RuntimeError("only SPOT (behavior_reg='vae') has a VAE to pretrain")
        from tqdm.auto import tqdm

        cfg, vae = self.config, self.vae
        steps = self.pretrain_steps if steps is None else steps
        if not hasattr(batches, "__next__"):  # the trainer's sources are next()-only; lists/iterables work too
            batches = iter(batches)
        optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
        vae.requires_grad_(True)
        last: Dict[str, float] = {}
        try:
            for i in tqdm(range(steps), disable=not progress, desc="VAE pretraining (phase 1 of 2)", unit="step",
                          dynamic_ncols=True, mininterval=1.0):
                batch = next(batches)
                obs, actions = _as_tensor(batch["observations"], self.device), _as_tensor(batch["actions"], self.device)
                noise = torch.randn((obs.shape[0], 1, vae.latent_dim), generator=self.generator, device=self.device)
                loss = vae_lib.vae_loss(vae, obs, actions, cfg.vae_beta, noise).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.check_finite:
                    self._check_finite({"vae_loss": loss}, {"vae_loss": list(vae.parameters())}, step=i)
                optimizer.step()
                if i == steps - 1:
                    last = {"vae_loss": float(loss.detach())}
        finally:
            optimizer.zero_grad(set_to_none=True)
            vae.requires_grad_(False)
        self.vae_trained = True
        return last

    # ----------------------------------------------------------------------------------------------
    def is_actor_step(self, step: Optional[int] = None) -> bool:
        """Whether update number ``step`` (0-based; default: the next) updates the actor and targets:
        the official code's total_it % policy_freq == 0 with total_it counting from 1."""
        step = self.step if step is None else step
        return (step + 1) % self.config.policy_freq == 0

    def loss_function(self, part: str) -> Callable:
        """The ``part`` ("critic" or "actor") loss function for every member (vmapped for a group)."""
        return self.for_members(td3_losses(self.networks, part))

    def update(self, batch: Mapping, noise: Optional[TD3Noise] = None) -> Dict[str, Tensor]:
        """One critic step; every ``policy_freq``-th call also an actor step and the target update.

        Raises NonFiniteLossError, leaving every parameter, optimizer state, target and the step
        counter as they were, if a loss or gradient is not finite (with ``check_finite``)."""
        if self.needs_pretraining:
            raise RuntimeError("SPOT's VAE is not trained: call pretrain_vae(batches) first (the trainer does)")
        cfg = self.config
        batch = as_batch(batch, self.device) + next_actions_of(batch, self.device, cfg)
        actor_step = self.is_actor_step()
        if noise is None:
            noise = self.draw_noise(batch[1].shape[-2], actor_step)
        tensors = self.state_tensors()
        critic_loss, metrics = self.loss_function("critic")(tensors, batch, noise)
        critic_opt = self.optimizers["critic"]
        critic_opt.zero_grad(set_to_none=True)
        (critic_loss if self.member_seeds is None else critic_loss.sum()).backward()
        checked = {"critic_loss": critic_loss}
        params = {"critic_loss": self.parameters_of("critic")}
        if not actor_step:
            if cfg.check_finite:
                self._check_finite(checked, params)
            critic_opt.step()
        else:
            undo = _snapshot(critic_opt) if cfg.check_finite else None
            critic_opt.step()
            actor_loss, actor_metrics = self.loss_function("actor")(tensors, batch, noise)
            self.optimizers["policy"].zero_grad(set_to_none=True)
            (actor_loss if self.member_seeds is None else actor_loss.sum()).backward()
            if cfg.check_finite:
                checked["actor_loss"] = actor_loss
                params["actor_loss"] = self.parameters_of("policy")
                try:
                    self._check_finite(checked, params)
                except NonFiniteLossError:
                    _restore(critic_opt, undo)
                    raise
            self.optimizers["policy"].step()
            self.polyak_update("target_critic", "critic", cfg.tau)
            self.polyak_update("target_policy", "policy", cfg.tau)
            self._actor_metrics = {k: v.detach() for k, v in actor_metrics.items()}
        self.step += 1
        return {**{k: v.detach() for k, v in metrics.items()}, **self._actor_metrics}

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    @numpy_io
    def act(self, obs):
        """Deterministic action pi(s); numpy in -> numpy out, tensor in -> tensor out."""
        return self.policy.act(obs)

    @torch.no_grad()
    @numpy_io
    def act_explore(self, obs, noise_std: float = 0.1, generator: Optional[torch.Generator] = None):
        """clip(pi(s) + noise_std * eps, -1, 1), the TD3 exploration of online fine-tuning (official
        expl_noise 0.1). eps comes from ``generator``, by default the agent's own."""
        action = self.policy.act(obs)
        generator = self.generator if generator is None else generator
        eps = torch.randn(action.shape, generator=generator, device=self.device)
        return (action + noise_std * eps).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs (tensors are references, as nn.Module's)."""
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "policy": self.module_state("policy"),
            "critic": self.module_state("critic"),
            "target_policy": self.module_state("target_policy"),
            "target_critic": self.module_state("target_critic"),
            "vae": self.module_state("vae"),
            "vae_trained": self.vae_trained,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "actor_metrics": dict(self._actor_metrics),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
        }

    def load_state_dict(self, state: Mapping) -> None:
        saved = TD3Config.from_dict(state["config"])
        for key in _ARCHITECTURE_KEYS:
            if getattr(saved, key) != getattr(self.config, key):
                raise ValueError(
                    f"checkpoint has {key}={getattr(saved, key)!r}, agent has {getattr(self.config, key)!r}")
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.target_policy.load_state_dict(state["target_policy"])
        self.target_critic.load_state_dict(state["target_critic"])
        if self.vae is not None:
            self.vae.load_state_dict(state["vae"])
        self.vae_trained = bool(state["vae_trained"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self._actor_metrics = {k: v.detach().clone().to(self.device) for k, v in state["actor_metrics"].items()}
        # A CPU and a CUDA generator state are different things (see MISA.load_state_dict).
        if state.get("generator_device", self.device.type) == self.device.type:
            self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])

    # ----------------------------------------------------------------------------------------------
    def _check_finite(self, losses_out: Dict[str, Tensor], params: Dict[str, list], step: Optional[int] = None) -> None:
        """One host sync: every loss and the gradient sum of the parameters it drives."""
        names = list(losses_out) + [f"{name.removesuffix('_loss')}_grad" for name in params]
        raise_if_not_finite(losses_out, params.values(), names, self.step if step is None else step,
                            self.member_seeds)


# --------------------------------------------------------------------------------------------------
def _torch_default_init_(critic: nets.EnsembleCritic, generator: torch.Generator, init_w: Optional[float]) -> None:
    """Re-initialise the stacked critics as PyTorch's default nn.Linear (the official TD3+BC / SPOT
    critics): weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the output layer U(-init_w,
    init_w) when given (SPOT's antmaze critic_init_w)."""
    with torch.no_grad():
        for i, (weight, bias) in enumerate(zip(critic.weights, critic.biases)):
            last = i == len(critic.weights) - 1
            bound = init_w if last and init_w is not None else 1.0 / math.sqrt(weight.shape[-1])
            weight.uniform_(-bound, bound, generator=generator)
            bias.uniform_(-bound, bound, generator=generator)


def _params(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _snapshot(optimizer: torch.optim.Optimizer):
    """Copies of an optimizer's parameters and per-parameter state (Adam's moments and step count),
    to undo its next step."""
    params = _params(optimizer)
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]  # {} before step 1
    return [p.detach().clone() for p in params], state


def _restore(optimizer: torch.optim.Optimizer, snapshot) -> None:
    """Undo: copy back in place (the tensors keep their identity), or drop state a step created."""
    values, states = snapshot
    with torch.no_grad():
        for p, value, saved in zip(_params(optimizer), values, states):
            p.copy_(value)
            if not saved:
                optimizer.state.pop(p, None)
            for k, v in saved.items():
                optimizer.state[p][k].copy_(v)


def _as_tensor(x, device) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=device)

