"""Every algorithm ``misa-fast train --algo NAME`` knows, as a setting of one of three learners.

The paper's ablations (Table 1), CQL, SAC-N and EDAC are settings of the MISA learner
(``MISAConfig``); TD3+BC, SPOT and ReBRAC of the deterministic-actor learner (``TD3Config``); BC,
10%BC, AWAC, OneStep RL and IQL of the weighted-regression learner (``WeightedConfig``). An entry is
the learner family plus the config values that define the method; the domain preset (locomotion,
antmaze, ...) comes first, the algorithm's values next, the values its paper gives for the dataset
after them, the user's ``--set`` last.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, Optional

from misa_fast.errors import UserError

_NO_HMC = {"use_hmc": False}


@dataclass(frozen=True)
class Family:
    """A learner: its config class, its domain presets and its class, as ``module:attribute`` paths
    (imported when first used, so listing the algorithms imports no learner)."""

    config: str
    preset: str  # preset(domain) -> config
    learner: str
    obs_norm: str = "none"  # the state normalisation of the family's official codes

    def load(self, what: str):
        module, _, attribute = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attribute)


FAMILIES: Dict[str, Family] = {
    "misa": Family("misa_fast.agents.misa_config:MISAConfig", "misa_fast.agents.misa_config:preset",
                   "misa_fast.agents.misa:MISA"),
    # TD3+BC and SPOT normalise states per dimension (both official codes).
    "td3": Family("misa_fast.agents.td3_config:TD3Config", "misa_fast.agents.td3_config:td3_preset",
                  "misa_fast.agents.td3:TD3", obs_norm="per-dim"),
    # BC, 10%BC, AWAC, OneStep, IQL: CORL's BC, AWAC and IQL normalise states per dimension (OneStep's
    # official code does not: its entry says so).
    "weighted": Family("misa_fast.agents.weighted_config:WeightedConfig",
                       "misa_fast.agents.weighted_config:weighted_preset", "misa_fast.agents.weighted:Weighted",
                       obs_norm="per-dim"),
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # a key of FAMILIES
    summary: str
    overrides: Dict[str, object] = field(default_factory=dict)
    # None: the family's. A method whose official code differs from its family's says so here.
    obs_norm: Optional[str] = None
    # The reward transform per domain where the method's official code has its own (misa_fast.data.
    # transforms.REWARD_TRANSFORMS); other domains keep the dataset domain's.
    reward_transforms: Dict[str, str] = field(default_factory=dict)
    # ``module:function`` giving the config values a method's paper sets per dataset (name -> dict).
    per_dataset: Optional[str] = None

    @property
    def default_obs_norm(self) -> str:
        return self.obs_norm if self.obs_norm is not None else FAMILIES[self.family].obs_norm

    def dataset_values(self, dataset_name: Optional[str]) -> dict:
        if self.per_dataset is None or dataset_name is None:
            return {}
        module, _, function = self.per_dataset.partition(":")
        return dict(getattr(importlib.import_module(module), function)(dataset_name))


ALGORITHMS: Dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("misa", "misa", "MISA, eq. 10 with the HMC-corrected actor gradient (the default)"),
        Algorithm("misa-dv", "misa", "MISA-DV, eq. 9: one log-mean-exp over the whole batch",
                  {"energy_bound": "dv", **_NO_HMC}),
        Algorithm("misa-f", "misa", "MISA-f, eq. 8: mean exp(Q - 1)", {"energy_bound": "f", **_NO_HMC}),
        # Without an energy term there is no gap for a domain preset's Lagrange budget: ba drops it.
        Algorithm("ba", "misa", "Barber-Agakov bound only: no energy terms (SAC + log-likelihood BC)",
                  {"energy_bound": "none", "lagrange": False, **_NO_HMC}),
        Algorithm("misa-biased", "misa", "MISA without the HMC correction term of the actor", dict(_NO_HMC)),
        Algorithm("misa-t", "misa", "MISA with a separate energy network T_psi and plain TD critics",
                  {"energy_network": "separate", "lagrange": False}),
        Algorithm("no-ba", "misa", "MISA without the log pi(a_D|s) term of the actor", {"use_ba": False}),
        # CQL(H) with importance sampling, SAC actor; values as in JaxCQL (the lineage of the official
        # MISA code): 10 actions per proposal, w_q 5, policy and critic lr 3e-4, no BC term.
        Algorithm("cql", "misa", "CQL(H): importance-sampled log-sum-exp over uniform and policy proposals",
                  {"energy_bound": "cql", "use_ba": False, "bc_weight": 1.0, "num_samples": 10,
                   "policy_lr": 3e-4, **_NO_HMC}),
        # SAC-N / EDAC (An et al. 2021) as in CORL's sac_n.py / edac.py: N ReLU critics of 3x256 (one
        # batched product), soft TD target, actor alpha log pi - min_i Q_i, lr 3e-4 everywhere, no BC
        # term; N (and eta) per dataset from misa_config. A domain preset's Lagrange budget is dropped;
        # CORL trains both on raw rewards in every domain (normalize_reward: false).
        Algorithm("sac-n", "misa", "SAC-N: SAC with N clipped critics (min over the ensemble), no behaviour term",
                  {"energy_bound": "none", "use_ba": False, "bc_weight": 1.0, "lagrange": False,
                   "backup_entropy": True, "network_style": "edac", "num_critics": 10,
                   "policy_hidden": (256, 256, 256), "critic_hidden": (256, 256, 256), "policy_lr": 3e-4,
                   "critic_lr": 3e-4, "alpha_lr": 3e-4, **_NO_HMC},
                  reward_transforms={"antmaze": "none", "adroit": "none", "kitchen": "none"},
                  per_dataset="misa_fast.agents.misa_config:sac_n_values_for"),
        Algorithm("edac", "misa", "EDAC: SAC-N plus eta * the diversity of the critics' dQ/da at the data",
                  {"energy_bound": "none", "use_ba": False, "bc_weight": 1.0, "lagrange": False,
                   "backup_entropy": True, "network_style": "edac", "num_critics": 10, "diversity_weight": 1.0,
                   "policy_hidden": (256, 256, 256), "critic_hidden": (256, 256, 256), "policy_lr": 3e-4,
                   "critic_lr": 3e-4, "alpha_lr": 3e-4, **_NO_HMC},
                  reward_transforms={"antmaze": "none", "adroit": "none", "kitchen": "none"},
                  per_dataset="misa_fast.agents.misa_config:edac_values_for"),
        Algorithm("td3bc", "td3", "TD3+BC: deterministic actor, -lambda Q/mean|Q| + (pi(s) - a)^2",
                  {"behavior_reg": "bc"}),
        Algorithm("spot", "td3", "SPOT: TD3 with a VAE behaviour-density regulariser (pretrained VAE)",
                  {"behavior_reg": "vae"}, per_dataset="misa_fast.agents.td3_config:spot_values_for"),
        # The weighted-regression family (weighted_config): values as in CORL (any_percent_bc.py, awac.py,
        # iql.py and their configs) and OneStep's official code; the domain presets carry IQL's expectile,
        # beta and adroit/kitchen actor dropout (the others switch the dropout off) and AWAC's lambda.
        Algorithm("bc", "weighted", "BC: deterministic tanh actor, mean squared error to the data actions",
                  {"policy": "deterministic", "critic_target": "none", "weight": "none",
                   "actor_lr_schedule": "constant", "actor_dropout": 0.0}),
        Algorithm("10bc", "weighted", "10%BC: BC on the 10% of episodes with the highest returns",
                  {"policy": "deterministic", "critic_target": "none", "weight": "none",
                   "actor_lr_schedule": "constant", "actor_dropout": 0.0, "top_fraction": 0.1}),
        # CORL's AWAC antmaze configs set normalize_reward (r - 1, as IQL's).
        Algorithm("awac", "weighted", "AWAC: Gaussian actor, exp(A / lambda)-weighted likelihood, TD on pi's actions",
                  {"policy": "gaussian", "critic_target": "policy", "weight": "awac", "tanh_mean": False,
                   "actor_lr_schedule": "constant", "actor_dropout": 0.0},
                  reward_transforms={"antmaze": "iql-antmaze"}),
        # OneStep (official code, exp_weight pi): 1024x2 networks, lr 1e-4, batch 512, one SARSA Q,
        # beta's and pi's log-std squashed into [-5, 0], temperature 0.01, raw states and rewards.
        Algorithm("onestep", "weighted", "OneStep RL: BC beta, its Q^beta, one exp(beta A)-weighted improvement of pi",
                  {"policy": "gaussian", "critic_target": "behavior", "weight": "iql", "log_std": "state",
                   "log_std_min": -5.0, "log_std_max": 0.0, "num_critics": 1, "beta": 0.01, "actor_lr": 1e-4,
                   "critic_lr": 1e-4, "behavior_lr": 1e-4, "batch_size": 512, "actor_lr_schedule": "constant",
                   "actor_dropout": 0.0},
                  obs_norm="none"),
        Algorithm("iql", "weighted", "IQL: expectile V, TD to V(s'), exp(beta (Q - V))-weighted log-likelihood",
                  {"policy": "gaussian", "critic_target": "value", "weight": "iql"},
                  reward_transforms={"locomotion": "iql-locomotion", "antmaze": "iql-antmaze"}),
        # ReBRAC as in its reference JAX code (CORL's rebrac.py): 3x256 ReLU networks with LayerNorm in
        # the critics, hidden biases 0.1, output layers U(+-1e-3) / U(+-3e-3), the actor on min_i Q_i,
        # locomotion's batch 1024 and lr 1e-3; raw states, and adroit's raw rewards. The penalties (and
        # antmaze's / adroit's lr, batch, gamma) per dataset from td3_config.
        Algorithm("rebrac", "td3", "ReBRAC: TD3+BC with LayerNorm critics and BC penalties on actor and critic target",
                  {"behavior_reg": "rebrac", "actor_q": "min", "actor_hidden": (256, 256, 256),
                   "critic_hidden": (256, 256, 256), "critic_layer_norm": True, "actor_layer_norm": False,
                   "hidden_bias_init": 0.1, "actor_init_w": 1e-3, "critic_init_w": 3e-3, "actor_dropout": 0.0,
                   "batch_size": 1024, "actor_lr": 1e-3, "critic_lr": 1e-3},
                  obs_norm="none", reward_transforms={"adroit": "none", "antmaze": "rebrac-antmaze"},
                  per_dataset="misa_fast.agents.td3_config:rebrac_values_for"),
    ]
}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"--algo: unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def config_class(family: str):
    return FAMILIES[family].load("config")


def build_config(name: str, domain: str, dataset_name: Optional[str] = None, **fields):
    """The config of algorithm ``name`` for a domain preset and a dataset: the family's preset, the
    algorithm's values, the values its paper gives for the dataset, then ``fields`` (seed, device,
    shapes)."""
    algo = get(name)
    cfg = FAMILIES[algo.family].load("preset")(domain)
    return cfg.replace(**{**algo.overrides, **algo.dataset_values(dataset_name), **fields})


def make_agent(cfg):
    """The learner a config belongs to."""
    return FAMILIES[family_of(cfg)].load("learner")(cfg)


def family_of(cfg) -> str:
    for name, family in FAMILIES.items():
        if isinstance(cfg, family.load("config")):
            return name
    raise TypeError(f"{type(cfg).__name__} is not the config of a misa-fast learner")


def agent_from_checkpoint(state: dict, device: str = "cpu", source: str = "the checkpoint"):
    """The trained agent of a checkpoint written by ``misa-fast train`` or ``finetune``. A state
    that does not describe one (an unknown algorithm, a config or networks that do not fit) is a
    UserError naming ``source``."""
    try:
        algo = get(state["run"]["algo"])
        cfg = config_class(algo.family).from_dict({**state["agent_config"], "device": str(device)})
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source}: not the settings of a misa-fast agent ({' '.join(str(err).split())})") from None
    agent = make_agent(cfg)
    load_agent_state(agent, state["agent"], source)
    return agent


def load_agent_state(agent, agent_state, source: str) -> None:
    """``agent.load_state_dict`` with a state that does not fit the agent refused in one line."""
    try:
        agent.load_state_dict(agent_state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise UserError(f"{source}: its networks do not fit its config ({' '.join(str(err).split())[:300]})") from None
