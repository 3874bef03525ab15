"""Hyperparameters of the weighted-regression learner (``misa_fast.agents.weighted``): BC, 10%BC,
AWAC, OneStep RL and IQL as settings of one config, with presets per domain.

Values marked "CORL" are those of the single-file implementations in github corl-team/CORL
(algorithms/offline/any_percent_bc.py, awac.py, iql.py, their TrainConfig defaults and the
configs/offline/<method>/<dataset>.yaml files the published scores were run with); "OneStep" marks
the authors' code (github davidbrandfonbrener/onestep-rl, config/). What an algorithm sets (which
policy, critic and weight) lives in its entry in misa_fast.agents.algorithms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from misa_fast.agents.config_base import ConfigBase

# The actor: "deterministic" (tanh MLP, squared error to the data action: CORL BC) or "gaussian"
# (a diagonal Gaussian, the data action's log-likelihood: AWAC, OneStep, IQL).
Policy = Literal["deterministic", "gaussian"]
# What the critics regress to. "none": no critic (BC). "policy": r + gamma (1 - d) min_i Q'_i(s',
# a' ~ pi(s')) (AWAC). "behavior": OneStep's Q^beta by SARSA, r + gamma (1 - d) min_i Q'_i(s', a'),
# a' the data's next action, with beta a Gaussian fitted to the data by BC alongside. "value":
# r + gamma (1 - d) V(s'), V fitted by expectile regression to min_i Q'_i(s, a) (IQL).
CriticTarget = Literal["none", "policy", "behavior", "value"]
# The weight of a data action in the actor loss. "none": 1 (BC). "awac": exp(A / awac_lambda) with
# A = min Q(s, a) - min Q(s, a~ ~ pi(s)). "iql": exp(beta A) with A = min Q'(s, a) - V(s) (IQL) or
# A = Q^beta(s, a) - mean_k Q^beta(s, a_k ~ beta(s)) (OneStep). Both clipped at exp_adv_max.
Weight = Literal["none", "awac", "iql"]
# The Gaussian's log-std: "global", one learned vector, hard-clipped to [log_std_min, log_std_max]
# (CORL AWAC and IQL); "state", a second head of the network, squashed into that range by tanh
# (OneStep's GaussMLP).
LogStd = Literal["global", "state"]
LRSchedule = Literal["constant", "cosine"]


@dataclass(frozen=True)
class WeightedConfig(ConfigBase):
    """The defaults are IQL's (CORL iql.py); the other methods change what their Algorithm entry says."""

    # --- run -------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    obs_dim: Optional[int] = None
    act_dim: Optional[int] = None

    # --- the method ------------------------------------------------------------------------------
    policy: Policy = "gaussian"
    critic_target: CriticTarget = "value"
    weight: Weight = "iql"
    # 10%BC: learn from the transitions of this share of the episodes with the highest returns. A
    # data option (the trainer passes it to misa_fast.data.prepare); the learner never reads it.
    top_fraction: float = 1.0

    # --- networks (ReLU MLPs, PyTorch's default nn.Linear init, as CORL) --------------------------
    # None: the method's own, see ``resolved_hidden``: CORL AWAC 256-256-256, OneStep 1024-1024,
    # otherwise 256-256 (CORL BC and IQL). The behaviour policy beta uses actor_hidden (OneStep: the
    # same GaussMLP for beta and pi).
    actor_hidden: Optional[Tuple[int, ...]] = None
    critic_hidden: Optional[Tuple[int, ...]] = None
    value_hidden: Optional[Tuple[int, ...]] = None
    num_critics: int = 2  # CORL AWAC and IQL: twin critics; OneStep's SARSA Q: one
    # Dropout after every hidden layer of the actor in its loss (official IQL: 0.1 on adroit and
    # kitchen, see the presets); masks come from the agent's generator, acting never drops.
    actor_dropout: float = 0.0
    tanh_mean: bool = True  # Gaussian mean tanh(MLP) (CORL IQL, OneStep); CORL AWAC: the MLP itself
    log_std: LogStd = "global"
    log_std_min: float = -20.0  # CORL AWAC and IQL: [-20, 2]; OneStep: [-5, 0]
    log_std_max: float = 2.0

    # --- optimisation (CORL: Adam, lr 3e-4 everywhere, batch 256) ---------------------------------
    gamma: float = 0.99
    tau: float = 5e-3  # Polyak rate of the target critics, every update
    batch_size: int = 256
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    behavior_lr: float = 3e-4
    # CORL IQL: the actor's lr follows CosineAnnealingLR(T_max = max_timesteps = 1e6); the others
    # keep it constant. Here the factor stays at its minimum (0) after lr_decay_steps.
    actor_lr_schedule: LRSchedule = "cosine"
    lr_decay_steps: int = 1_000_000

    # --- the weights -----------------------------------------------------------------------------
    expectile: float = 0.7  # IQL's tau (CORL iql_tau; locomotion); antmaze preset 0.9
    beta: float = 3.0  # IQL's inverse temperature (locomotion); antmaze 10, adroit/kitchen 0.5
    # AWAC's temperature lambda: CORL awac.py's default 1.0; its published configs use 1/3 on
    # Gym-MuJoCo and 0.1 on antmaze and adroit (the presets).
    awac_lambda: float = 1.0
    exp_adv_max: float = 100.0  # CORL EXP_ADV_MAX; OneStep's max_weight
    # OneStep: the actions a_k ~ beta drawn per state for the advantage's baseline E_beta Q(s, .)
    # (official n_samples 10).
    num_samples: int = 10

    # --- safety ----------------------------------------------------------------------------------
    check_finite: bool = True

    def validate(self) -> None:
        for name in ("num_critics", "batch_size", "num_samples", "lr_decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("obs_dim", "act_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("actor_hidden", "critic_hidden", "value_hidden"):
            hidden = getattr(self, name)
            if hidden is not None and (not hidden or min(hidden) < 1):
                raise ValueError(f"config key {name!r} must be a non-empty tuple of positive ints or none")
        for name in ("actor_lr", "critic_lr", "value_lr", "behavior_lr", "awac_lambda", "exp_adv_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"config key 'beta' must be >= 0, got {self.beta}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"config key 'top_fraction' must lie in (0, 1], got {self.top_fraction}")
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"config key 'expectile' must lie in (0, 1), got {self.expectile}")
        if not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError("tau and gamma must lie in [0, 1]")
        if not 0.0 <= self.actor_dropout < 1.0:
            raise ValueError(f"actor_dropout must lie in [0, 1), got {self.actor_dropout}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError(f"log_std_min ({self.log_std_min}) must be below log_std_max ({self.log_std_max})")
        self._validate_method()

    def _validate_method(self) -> None:
        """The combinations that define a method: a weight needs the critic its advantage reads."""
        if (self.weight == "none") != (self.critic_target == "none"):
            raise ValueError(f"weight={self.weight!r} with critic_target={self.critic_target!r}: BC has neither "
                             "(both 'none'); every weighted method needs a critic")
        if self.weight == "iql" and self.critic_target not in ("value", "behavior"):
            raise ValueError("weight='iql' needs critic_target 'value' (IQL: A = Q - V) or 'behavior' "
                             f"(OneStep: A = Q - E_beta Q), got {self.critic_target!r}")
        if self.weight == "awac" and self.critic_target != "policy":
            raise ValueError(f"weight='awac' needs critic_target='policy' (AWAC), got {self.critic_target!r}")

    @property
    def reads_next_actions(self) -> bool:
        """Whether updates read the batch's ``next_actions``: OneStep's SARSA target (the data
        preparation adds them for such a config)."""
        return self.critic_target == "behavior"

    def resolved_hidden(self, network: str) -> Tuple[int, ...]:
        """The hidden sizes of ``network`` ("actor", "critic" or "value"): the field, or the method's."""
        hidden = getattr(self, f"{network}_hidden")
        if hidden is not None:
            return hidden
        if self.weight == "awac":
            return (256, 256, 256)  # CORL AWAC: hidden_dim 256, three hidden layers (actor and critics)
        if self.critic_target == "behavior":
            return (1024, 1024)  # OneStep: width 1024, depth 2 (beta, Q and pi)
        return (256, 256)


# Domain settings of the weighted family. Every method reads only its own keys (awac_lambda: AWAC;
# expectile and beta: IQL, OneStep sets its own beta); the IQL paper's actor dropout on adroit and
# kitchen is switched off again by the other methods' Algorithm entries. The reward transforms and
# state normalisation belong to the data loader (misa_fast.agents.algorithms).
WEIGHTED_PRESETS: dict[str, dict] = {
    "locomotion": {"awac_lambda": 0.3333},  # CORL AWAC configs: 0.3333 on every Gym-MuJoCo dataset
    "antmaze": {"expectile": 0.9, "beta": 10.0, "awac_lambda": 0.1},  # IQL paper / CORL; CORL AWAC configs
    # IQL paper (official kitchen_config, also used for adroit): expectile 0.7, beta 0.5, dropout 0.1;
    # CORL AWAC adroit configs: lambda 0.1.
    "adroit": {"expectile": 0.7, "beta": 0.5, "actor_dropout": 0.1, "awac_lambda": 0.1},
    "kitchen": {"expectile": 0.7, "beta": 0.5, "actor_dropout": 0.1},
    # The embedded Pendulum dataset: small networks, for CPU minutes.
    "pendulum": {"actor_hidden": (64, 64), "critic_hidden": (64, 64), "value_hidden": (64, 64)},
}


def weighted_preset(name: str, **overrides) -> WeightedConfig:
    """The weighted-family config for a domain (see ``WEIGHTED_PRESETS``), plus overrides."""
    if name not in WEIGHTED_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(WEIGHTED_PRESETS)}")
    return WeightedConfig().replace(**{**WEIGHTED_PRESETS[name], **overrides})
