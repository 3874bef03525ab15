"""Every algorithm ``misa-fast train --algo NAME`` knows, as a setting of one of two learners.

The paper's ablations (Table 1) and CQL are settings of the one MISA learner (``MISAConfig``);
TD3+BC and SPOT are settings of the one deterministic-actor learner (``TD3Config``). An entry is
the learner family plus the config values that define the method; the domain preset (locomotion,
antmaze, ...) comes first, the algorithm's values next, the user's ``--set`` last.
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
        Algorithm("td3bc", "td3", "TD3+BC: deterministic actor, -lambda Q/mean|Q| + (pi(s) - a)^2",
                  {"behavior_reg": "bc"}),
        Algorithm("spot", "td3", "SPOT: TD3 with a VAE behaviour-density regulariser (pretrained VAE)",
                  {"behavior_reg": "vae"}, per_dataset="misa_fast.agents.td3_config:spot_values_for"),
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
