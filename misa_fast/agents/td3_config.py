"""Hyperparameters of the deterministic-actor learner (``misa_fast.agents.td3``): TD3+BC and SPOT,
presets per domain and SPOT's lambda per dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from misa_fast.agents.config_base import ConfigBase

# ---------------------------------------------------------------------------------------------------
# The deterministic-actor learner (misa_fast.agents.TD3): TD3+BC and SPOT are its two settings of
# ``behavior_reg``. Values marked "official" are those of the authors' PyTorch code: TD3+BC
# (github sfujim/TD3_BC, main.py) and SPOT (github thuml/SPOT, main.py, train_vae.py, configs/).
BehaviorReg = Literal["bc", "vae"]
DensityEstimator = Literal["elbo", "iwae"]
Activation = Literal["relu", "elu"]


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
    behavior_reg: BehaviorReg = "bc"  # "bc": TD3+BC, "vae": SPOT
    bc_alpha: float = 2.5  # TD3+BC: lambda = alpha / mean|Q(s, pi(s))| (official)
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
        for name in ("policy_noise", "noise_clip", "bc_alpha", "spot_lambda"):
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
    name = dataset_name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for suffix in (".hdf5", ".h5", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    matches = [key for key in SPOT_LAMBDAS if name == key or name.startswith(key + "-")]
    return SPOT_LAMBDAS[max(matches, key=len)] if matches else SPOT_DEFAULT_LAMBDA


def spot_values_for(dataset_name: str) -> dict:
    """SPOT's per-dataset config values (its lambda)."""
    return {"spot_lambda": spot_lambda_for(dataset_name)}
