"""Hyperparameters of the deterministic-actor learner (``misa_fast.agents.td3``): TD3+BC, SPOT and
ReBRAC, presets per domain, SPOT's lambda and ReBRAC's penalties per dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from misa_fast.agents.config_base import ConfigBase, preset_name_for_env

# ---------------------------------------------------------------------------------------------------
# The deterministic-actor learner (misa_fast.agents.TD3): TD3+BC and SPOT are its two settings of
# ``behavior_reg``. Values marked "official" are those of the authors' PyTorch code: TD3+BC
# (github sfujim/TD3_BC, main.py) and SPOT (github thuml/SPOT, main.py, train_vae.py, configs/).
# ReBRAC (Tarasov et al. 2023) is the third setting; its values are those of the authors' JAX code
# as CORL keeps it (algorithms/offline/rebrac.py, configs/offline/rebrac/*), marked "ReBRAC".
# Where this learner departs from that code: the actor steps on updates 2, 4, ... (TD3's official
# count) where the reference steps on 1, 3, .... Its antmaze rewards (r * 100) are the data
# transform "rebrac-antmaze" (misa_fast.data.transforms), named in its algorithm entry.
BehaviorReg = Literal["bc", "vae", "rebrac"]
DensityEstimator = Literal["elbo", "iwae"]
Activation = Literal["relu", "elu"]
ActorQ = Literal["first", "min"]


@dataclass(frozen=True)
class TD3Config(ConfigBase):
    # --- run -------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    obs_dim: Optional[int] = None
    act_dim: Optional[int] = None

    # --- networks (official: 256-256 ReLU MLPs, PyTorch's default nn.Linear init) ------------------
    actor_hidden: Tuple[int, ...] = (256, 256)
    critic_hidden: Tuple[int, ...] = (256, 256)
    num_critics: int = 2
    critic_activation: Activation = "relu"
    # Dropout after every hidden layer of the actor while training (also in the target actor, as in
    # the official code, whose target copy is never put in eval mode). None -> 0.1 for SPOT
    # (official), 0 for TD3+BC (official: no dropout). SPOT's antmaze configs use 0.
    actor_dropout: Optional[float] = None
    # Output layer init U(-w, w) for weights and bias instead of the default; SPOT's antmaze configs:
    # actor 1e-3, critic 3e-3. None: PyTorch's default init (official elsewhere).
    actor_init_w: Optional[float] = None
    critic_init_w: Optional[float] = None
    # Every hidden layer's bias set to this constant (actor and critics) instead of the default
    # init; ReBRAC: 0.1 (its EDAC-style init). None: PyTorch's default (official TD3+BC / SPOT).
    hidden_bias_init: Optional[float] = None
    # LayerNorm after every hidden activation (ReBRAC's reference: Linear -> ReLU -> LayerNorm).
    # ReBRAC: critics True, actor False.
    actor_layer_norm: bool = False
    critic_layer_norm: bool = False

    # --- TD3 (official, both methods) ------------------------------------------------------------
    gamma: float = 0.99
    tau: float = 5e-3  # Polyak rate of the target actor and critics, applied on actor steps only
    batch_size: int = 256
    actor_lr: float = 3e-4  # SPOT antmaze: 1e-4
    critic_lr: float = 3e-4
    policy_noise: float = 0.2  # target policy smoothing: std of the noise on the target action
    noise_clip: float = 0.5  # ... clipped to +-noise_clip
    policy_freq: int = 2  # one actor (and target) update every policy_freq critic updates

    # --- behaviour regularisation ----------------------------------------------------------------
    behavior_reg: BehaviorReg = "bc"  # "bc": TD3+BC, "vae": SPOT, "rebrac": ReBRAC
    bc_alpha: float = 2.5  # TD3+BC: lambda = alpha / mean|Q(s, pi(s))| (official)
    # The actor's Q(s, pi(s)): "first" = Q1 (official TD3+BC / SPOT), "min" = min over the critics
    # (ReBRAC).
    actor_q: ActorQ = "first"
    # ReBRAC's actor: mean_s [actor_bc_coef * ||pi(s) - a||^2 - Q(s, pi(s)) / mean|Q|] (squared
    # error summed over action dims). Per dataset see ``rebrac_values_for``; 1.0 is the reference
    # code's default, which none of its dataset configs uses.
    actor_bc_coef: float = 1.0
    # ReBRAC's critic target: r + gamma (1 - d) (min_i Q'_i(s', a') - critic_bc_coef ||a' - a'_D||^2),
    # a' the smoothed target action and a'_D the dataset's next action (the batch's
    # ``next_actions``). Any behavior_reg; 0 (the default: TD3+BC, SPOT) leaves the target as TD3's
    # and the data need no next actions.
    critic_bc_coef: float = 0.0
    # SPOT: weight of -log pi_beta(pi(s)|s). Per dataset see ``spot_lambda_for``; 0.1 is the
    # official value for hopper medium / medium-replay (the official CLI default, 1.0, is never used).
    spot_lambda: float = 0.1
    spot_normalize_q: bool = True  # SPOT: -Q / mean|Q| (official; its --without_Q_norm turns it off)

    # --- SPOT's conditional VAE (official, train_vae.py) -----------------------------------------
    vae_hidden: Tuple[int, ...] = (750, 750)
    vae_latent: Optional[int] = None  # None -> 2 * act_dim
    vae_beta: float = 0.5  # KL weight of the training loss; the decoder's std is sqrt(beta / 4)
    vae_lr: float = 1e-3
    vae_steps: int = 100_000  # pretraining iterations on batches of batch_size (official 1e5, 256)
    # -log pi_beta: "elbo" = the VAE's training loss (official default), "iwae" = minus the L-sample
    # importance-weighted estimate of log pi_beta, a log-mean-exp over L = density_samples samples.
    density_estimator: DensityEstimator = "elbo"
    density_samples: int = 1  # official num_samples = 1

    # --- safety ----------------------------------------------------------------------------------
    check_finite: bool = True

    def validate(self) -> None:
        for name in ("num_critics", "batch_size", "policy_freq", "density_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("obs_dim", "act_dim", "vae_latent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if self.vae_steps < 0:
            raise ValueError(f"config key 'vae_steps' must be >= 0, got {self.vae_steps}")
        hidden = self.actor_hidden + self.critic_hidden + self.vae_hidden
        if not self.actor_hidden or not self.critic_hidden or not self.vae_hidden or min(hidden) < 1:
            raise ValueError("hidden sizes must be non-empty tuples of positive ints")
        for name in ("actor_lr", "critic_lr", "vae_lr", "vae_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("policy_noise", "noise_clip", "bc_alpha", "spot_lambda", "actor_bc_coef", "critic_bc_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("actor_init_w", "critic_init_w"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0 or none, got {getattr(self, name)}")
        if not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError("tau and gamma must lie in [0, 1]")
        if self.actor_dropout is not None and not 0.0 <= self.actor_dropout < 1.0:
            raise ValueError(f"actor_dropout must lie in [0, 1), got {self.actor_dropout}")

    @property
    def reads_next_actions(self) -> bool:
        """Whether updates read the batch's ``next_actions`` (ReBRAC's critic penalty): the data
        preparation adds them for such a config."""
        return self.critic_bc_coef > 0.0

    @property
    def resolved_actor_dropout(self) -> float:
        if self.actor_dropout is not None:
            return self.actor_dropout
        return 0.1 if self.behavior_reg == "vae" else 0.0

    def resolved_vae_latent(self, act_dim: int) -> int:
        return 2 * act_dim if self.vae_latent is None else self.vae_latent


# Domain settings of the TD3 family. antmaze: SPOT's official antmaze configs (the agent's side;
# the reward (0 at the goal, -1 elsewhere) and no state normalisation belong to the data loader).
TD3_PRESETS: dict[str, dict] = {
    "locomotion": {},
    "antmaze": {"actor_lr": 1e-4, "actor_dropout": 0.0, "actor_init_w": 1e-3, "critic_init_w": 3e-3},
    "adroit": {},
    "kitchen": {},
    # The embedded Pendulum dataset: smaller networks and a short VAE pretraining, for CPU minutes.
    "pendulum": {"actor_hidden": (64, 64), "critic_hidden": (64, 64), "vae_hidden": (64, 64), "vae_steps": 2_000},
}


def td3_preset(name: str, **overrides) -> TD3Config:
    """The TD3-family config for a domain (see ``TD3_PRESETS``), plus overrides."""
    if name not in TD3_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TD3_PRESETS)}")
    return TD3Config().replace(**{**TD3_PRESETS[name], **overrides})


# SPOT's lambda per D4RL dataset (official configs/offline/*.yml); keys are matched against the
# dataset name with the version suffix dropped ("hopper-medium-v2" -> "hopper-medium").
SPOT_LAMBDAS: dict[str, float] = {
    "hopper-medium": 0.1, "hopper-medium-replay": 0.1, "hopper-medium-expert": 0.2,
    "walker2d-medium": 0.2, "walker2d-medium-replay": 0.2, "walker2d-medium-expert": 0.5,
    "halfcheetah-medium": 0.05, "halfcheetah-medium-replay": 0.05, "halfcheetah-medium-expert": 1.0,
    "antmaze-umaze": 0.25, "antmaze-umaze-diverse": 0.25,
    "antmaze-medium-play": 0.05, "antmaze-medium-diverse": 0.025,
    "antmaze-large-play": 0.025, "antmaze-large-diverse": 0.025,
}
SPOT_DEFAULT_LAMBDA = 0.1


def spot_lambda_for(dataset_name: str) -> float:
    """SPOT's lambda for a D4RL-style dataset name or file path: the longest ``SPOT_LAMBDAS`` key the
    name starts with, followed by nothing or "-..." ("hopper-medium-expert-v2" -> 0.2,
    "data/walker2d-medium.hdf5" -> 0.2, "hopper-medium-replay-local" -> 0.1). Names the official
    configs do not cover get 0.1 (``SPOT_DEFAULT_LAMBDA``, hopper-medium's value)."""
    key = _table_key(dataset_name, SPOT_LAMBDAS)
    return SPOT_LAMBDAS[key] if key is not None else SPOT_DEFAULT_LAMBDA


def _file_stem(dataset_name: str) -> str:
    """The dataset name of a name or file path: last path part, lower case, no file suffix."""
    name = dataset_name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for suffix in (".hdf5", ".h5", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _table_key(dataset_name: str, table: dict) -> Optional[str]:
    """The longest key of ``table`` the dataset's name starts with, followed by nothing or "-..."."""
    name = _file_stem(dataset_name)
    matches = [key for key in table if name == key or name.startswith(key + "-")]
    return max(matches, key=len) if matches else None


def spot_values_for(dataset_name: str) -> dict:
    """SPOT's per-dataset config values (its lambda)."""
    return {"spot_lambda": spot_lambda_for(dataset_name)}


# ReBRAC's penalties per D4RL dataset, (actor_bc_coef, critic_bc_coef): the authors' tuned values
# as CORL's configs/offline/rebrac/<task>/<dataset>.yaml give them (CORL notes its ReBRAC is the
# authors' code); matched as SPOT's lambdas are.
REBRAC_BC_COEFS: dict[str, Tuple[float, float]] = {
    "halfcheetah-random": (0.001, 0.1), "halfcheetah-medium": (0.001, 0.01), "halfcheetah-expert": (0.01, 0.01),
    "halfcheetah-medium-expert": (0.01, 0.1), "halfcheetah-medium-replay": (0.01, 0.001),
    "halfcheetah-full-replay": (0.001, 0.1),
    "hopper-random": (0.001, 0.01), "hopper-medium": (0.01, 0.01), "hopper-expert": (0.1, 0.1),
    "hopper-medium-expert": (0.1, 0.01), "hopper-medium-replay": (0.05, 0.5), "hopper-full-replay": (0.01, 0.01),
    "walker2d-random": (0.01, 0.0), "walker2d-medium": (0.05, 0.1), "walker2d-expert": (0.01, 0.5),
    "walker2d-medium-expert": (0.01, 0.01), "walker2d-medium-replay": (0.05, 0.01),
    "walker2d-full-replay": (0.01, 0.01),
    "antmaze-umaze": (0.003, 0.002), "antmaze-umaze-diverse": (0.003, 0.001),
    "antmaze-medium-play": (0.001, 0.0005), "antmaze-medium-diverse": (0.001, 0.0),
    "antmaze-large-play": (0.002, 0.001), "antmaze-large-diverse": (0.002, 0.002),
    "pen-human": (0.1, 0.5), "pen-cloned": (0.05, 0.5), "pen-expert": (0.01, 0.01),
    "door-human": (0.1, 0.1), "door-cloned": (0.01, 0.1), "door-expert": (0.05, 0.01),
    "hammer-human": (0.01, 0.5), "hammer-cloned": (0.1, 0.5), "hammer-expert": (0.01, 0.01),
    "relocate-human": (0.1, 0.01), "relocate-cloned": (0.1, 0.01), "relocate-expert": (0.05, 0.01),
}
# Names the configs do not cover get hopper-medium's penalties (as SPOT's default lambda).
REBRAC_DEFAULT_BC_COEFS = REBRAC_BC_COEFS["hopper-medium"]
# What ReBRAC's configs change per domain beyond the penalties; locomotion's values (lr 1e-3, batch
# 1024, gamma 0.99) are the algorithm's own (misa_fast.agents.algorithms).
REBRAC_DOMAIN_VALUES: dict[str, dict] = {
    "antmaze": {"actor_lr": 3e-4, "critic_lr": 5e-5, "batch_size": 256, "gamma": 0.999},
    "adroit": {"actor_lr": 3e-4, "critic_lr": 3e-4, "batch_size": 256},
}


def rebrac_values_for(dataset_name: str) -> dict:
    """ReBRAC's per-dataset config values: its two penalties (``REBRAC_BC_COEFS``, matched as
    :func:`spot_lambda_for` matches; hopper-medium's for other names) and the learning rates, batch
    size and discount of the dataset's domain where ReBRAC's configs set them (antmaze, adroit)."""
    key = _table_key(dataset_name, REBRAC_BC_COEFS)
    actor, critic = REBRAC_BC_COEFS[key] if key is not None else REBRAC_DEFAULT_BC_COEFS
    return {**REBRAC_DOMAIN_VALUES.get(_domain(dataset_name), {}), "actor_bc_coef": actor, "critic_bc_coef": critic}


def _domain(dataset_name: str) -> Optional[str]:
    """The preset a dataset name or file path picks (a Minari id by its middle part), or None."""
    for candidate in (_file_stem(dataset_name), dataset_name):
        try:
            return preset_name_for_env(candidate)
        except ValueError:
            continue
    return None
