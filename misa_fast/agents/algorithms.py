"""Every algorithm ``misa-fast train --algo NAME`` knows, as a setting of one of two learners.

The paper's ablations (Table 1) and CQL are settings of the one MISA learner (``MISAConfig``);
TD3+BC and SPOT are settings of the one deterministic-actor learner (``TD3Config``). An entry is
the learner family plus the config values that define the method; the domain preset (locomotion,
antmaze, ...) comes first, the algorithm's values next, the user's ``--set`` last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from misa_fast.errors import UserError

_NO_HMC = {"use_hmc": False}


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # "misa" (MISAConfig, agents.MISA) or "td3" (TD3Config, agents.TD3)
    summary: str
    overrides: Dict[str, object] = field(default_factory=dict)

    @property
    def default_obs_norm(self) -> str:
        """TD3+BC and SPOT normalise states per dimension (both official codes); MISA does not."""
        return "per-dim" if self.family == "td3" else "none"


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
                  {"behavior_reg": "vae"}),
    ]
}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"--algo: unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def config_class(family: str):
    from misa_fast.agents import misa_config as config
    from misa_fast.agents import td3_config

    return config.MISAConfig if family == "misa" else td3_config.TD3Config


def build_config(name: str, domain: str, dataset_name: Optional[str] = None, **fields):
    """The config of algorithm ``name`` for a domain preset, with ``fields`` (seed, device, shapes)."""
    from misa_fast.agents import misa_config as config_lib
    from misa_fast.agents import td3_config

    algo = get(name)
    if algo.family == "misa":
        cfg = config_lib.preset(domain)
        return cfg.replace(**{**algo.overrides, **fields})
    cfg = td3_config.td3_preset(domain)
    values = dict(algo.overrides)
    if algo.overrides.get("behavior_reg") == "vae" and dataset_name is not None:
        values["spot_lambda"] = td3_config.spot_lambda_for(dataset_name)
    return cfg.replace(**{**values, **fields})


def make_agent(cfg):
    """The learner for a config: MISA for a MISAConfig, TD3 for a TD3Config."""
    from misa_fast import agents

    return agents.MISA(cfg) if family_of(cfg) == "misa" else agents.TD3(cfg)


def family_of(cfg) -> str:
    from misa_fast.agents.misa_config import MISAConfig

    return "misa" if isinstance(cfg, MISAConfig) else "td3"


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
