"""Several seeds of one learner trained as one learner (``misa-fast train --seeds 0-4``).

A *group* is a learner of the same class (``MISA`` or ``TD3``, see misa_fast.agents.learner) whose
tensors — parameters, target copies, temperatures, the adapted HMC step size — are the members'
tensors stacked on a leading member dimension M by ``torch.func.stack_module_state``, with Adam
built over them by the learner's own factory (its moments stacked too; Adam is elementwise, so it
steps each member exactly as that member's own Adam would). Its ``update`` is the one a single run
calls, with the learner's loss function under ``torch.func.vmap`` over the member dimension
(``Learner.for_members``): the members' losses are summed before the one backward pass and no
operation mixes members, so each gets exactly its own gradient.

Member m is the single run with seed ``seeds[m]``: it starts from that run's initial networks and
draws its noise from its own generator (a torch generator is one stream, so the noise of an update
is drawn member after member, then stacked); the batches come from the members' own index streams.

:func:`stack_agents` builds a group from M agents (fresh or loaded from checkpoints);
:func:`member_state_dicts` splits its state back into M ordinary single-run state dicts.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

from torch import Tensor
from torch.utils import _pytree as pytree

from misa_fast.agents.learner import stack_tree

__all__ = ["parse_seeds", "stack_agents", "member_state_dicts", "stack_tree"]

MAX_MEMBERS = 256


def parse_seeds(text: str) -> List[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,3,7"`` -> [0, 3, 7]; ranges and lists mix (``"0-2,10"``).
    Raises ValueError naming ``--seeds`` for anything else, repeated seeds included."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--seeds: expected seeds such as 0-4 or 0,3,7, got an empty value")
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(f"--seeds: {part!r} in {text!r} is not a seed (a non-negative integer) or a range "
                             "first-last such as 0-4")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"--seeds: the range {part!r} ends before it starts; write it as {last}-{first}")
        if len(seeds) + last - first + 1 > MAX_MEMBERS:  # before building a range of any length
            raise ValueError(f"--seeds: {text!r} gives more than {MAX_MEMBERS} seeds")
        seeds.extend(range(first, last + 1))
        if len(seeds) > MAX_MEMBERS:
            raise ValueError(f"--seeds: {text!r} gives more than {MAX_MEMBERS} seeds")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds: seed {repeated[0]} appears twice in {text!r}; each member needs its own seed")
    return seeds


def stack_agents(agents: Sequence):
    """One group training the M given agents (same class, same configuration but for the seed; each
    may come from its own checkpoint, all at the same step). The given agents are left as they are."""
    agents = list(agents)
    if not agents:
        raise ValueError("stack_agents: no agents")
    first = agents[0]
    cls = type(first)
    for agent in agents[1:]:
        if type(agent) is not cls:
            raise ValueError(f"stack_agents: members must be one learner, got {cls.__name__} and "
                             f"{type(agent).__name__}")
        if agent.config.replace(seed=0) != first.config.replace(seed=0):
            raise ValueError("stack_agents: members may differ only in their seed")
        if agent.step != first.step:
            raise ValueError(f"stack_agents: members are at different steps ({first.step} and {agent.step})")
    return cls.group_of(agents)


def member_state_dicts(group) -> List[dict]:
    """The members' ordinary single-run state dicts (what ``checkpoint.pt`` of a run with that seed
    holds), copied out of the group."""
    state = group.state_dict()
    out = []
    for m, (config, generator) in enumerate(zip(group.member_configs, group.member_generators)):
        member = _split_state(state, m)
        member["config"] = config.to_dict()
        member["generator"] = generator.get_state()
        out.append(member)
    return out


# Shared by the members (they always take the same steps) or replaced per member.
_UNSTACKED = ("generator", "generator_device", "config", "step", "vae_trained", "schedulers")


def _split_state(state: dict, m: int) -> dict:
    out = {}
    for key, value in state.items():
        if key in _UNSTACKED or value is None:
            out[key] = value
        elif key == "optimizers":
            out[key] = {name: {"state": {i: {k: (v.clone() if k == "step" else v[m].clone()) for k, v in e.items()}
                                         for i, e in opt["state"].items()},
                               "param_groups": opt["param_groups"]} for name, opt in value.items()}
        else:
            out[key] = pytree.tree_map(lambda x: x[m].clone() if isinstance(x, Tensor) else x, value)
    return out


def _state_tensors(learner) -> Dict[str, Tensor]:
    """Every tensor the learner computes with, by path (``critic.weights.0``, ``log_alpha``)."""
    return learner.state_tensors()
