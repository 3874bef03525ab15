"""Several seeds of one learner trained as one agent (``misa-fast train --seeds 0-4``).

A *stacked* agent is an ordinary agent object of the same class (``MISA`` or ``TD3``) in which every
tensor of its state (parameters, target copies, temperatures, the adapted HMC step size, the Adam
moments) carries a leading member dimension M. Its ``update`` is the same method a single run
calls: the loss computation runs once for all members through ``torch.func.vmap`` (batched matmuls
over the members' stacked weights), and the optimizer steps, the Polyak update and the step-size
adaptation are elementwise, so they run unchanged on the stacked tensors. Because the members'
losses are summed before the one backward pass and no operation mixes members, each member gets
exactly its own gradient.

Member m is the single run with seed ``seeds[m]``: it starts from that run's initial networks (each
agent is built from its own seed, then stacked), and its noise comes from its own generator. The
generators are the one thing that cannot be stacked (a torch generator is one stream), so the noise
of an update is drawn member after member, then stacked; the batches likewise come from the
members' own index streams.

:func:`stack_agents` builds a stacked agent from M agents (fresh or loaded from checkpoints);
:func:`member_state_dicts` splits its state back into M ordinary single-run state dicts.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from misa_fast.ops.dispatch import member_map

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


# --------------------------------------------------------------------------------------------------
# pytrees of per-member values
def stack_tree(trees: Sequence):
    """One pytree whose tensor leaves are the members' leaves stacked on a new leading dimension
    (None and non-tensor leaves must agree and are kept)."""
    flat = [pytree.tree_flatten(t) for t in trees]
    spec = flat[0][1]
    leaves = []
    for values in zip(*(f[0] for f in flat)):
        leaves.append(torch.stack(values) if isinstance(values[0], Tensor) else values[0])
    return pytree.tree_unflatten(leaves, spec)


def _tensor_leaves(tree):
    leaves, spec = pytree.tree_flatten(tree)
    where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    return [leaves[i] for i in where], (leaves, spec, where)


def _rebuild(tensors, layout):
    leaves, spec, where = layout
    leaves = list(leaves)
    for i, t in zip(where, tensors):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, spec)


# --------------------------------------------------------------------------------------------------
# the tensors of an agent's state
def _state_tensors(agent) -> Dict[str, Tensor]:
    """Every tensor the agent computes with, by attribute path: module parameters and buffers
    (``critic.weights.0``) and tensors held directly (``log_alpha``, ``hmc_log_step_size``)."""
    found: Dict[str, Tensor] = {}
    for name, value in vars(agent).items():
        if isinstance(value, nn.Module):
            for sub, tensor in value.named_parameters(recurse=True):
                found[f"{name}.{sub}"] = tensor
            for sub, tensor in value.named_buffers(recurse=True):
                found[f"{name}.{sub}"] = tensor
        elif isinstance(value, Tensor):
            found[name] = value
    return found


def _owner(agent, path: str):
    """(object, attribute name) that holds the tensor at ``path``."""
    *parents, leaf = path.split(".")
    obj = agent
    for part in parents:
        obj = getattr(obj, part)
    return obj, leaf


def _get(obj, leaf: str):
    if isinstance(obj, nn.Module):
        if leaf in obj._parameters:
            return obj._parameters[leaf]
        if leaf in obj._buffers:
            return obj._buffers[leaf]
    return getattr(obj, leaf)


def _put(obj, leaf: str, value) -> None:
    # Straight into the module's tables: a plain (batched) tensor may stand in for a Parameter for
    # the duration of one call, which nn.Module.__setattr__ would refuse.
    if isinstance(obj, nn.Module):
        if leaf in obj._parameters:
            obj._parameters[leaf] = value
            return
        if leaf in obj._buffers:
            obj._buffers[leaf] = value
            return
    object.__setattr__(obj, leaf, value)


# --------------------------------------------------------------------------------------------------
# building and splitting a stacked agent
_UNSTACKED = ("generator", "generator_device", "config", "step", "vae_trained")


def _stack_states(states: Sequence[dict]) -> dict:
    """M single-run state dicts -> one (the optimizers' step counts, schedulers and scalars are
    shared: members always take the same steps)."""
    first = states[0]
    out = {}
    for key, value in first.items():
        if key in _UNSTACKED or value is None:
            out[key] = value
        elif key == "optimizers":
            out[key] = {name: _stack_optimizer([s[key][name] for s in states]) for name in value}
        elif key == "schedulers":
            out[key] = value
        else:
            out[key] = stack_tree([s[key] for s in states])
    return out


def _stack_optimizer(states: Sequence[dict]) -> dict:
    state = {}
    for index, entry in states[0]["state"].items():
        state[index] = {k: (v if k == "step" else torch.stack([s["state"][index][k] for s in states]))
                        for k, v in entry.items()}
    return {"state": state, "param_groups": states[0]["param_groups"]}


def _split_state(state: dict, m: int) -> dict:
    out = {}
    for key, value in state.items():
        if key in _UNSTACKED or value is None:
            out[key] = value
        elif key == "optimizers":
            out[key] = {name: {"state": {i: {k: (v.clone() if k == "step" else v[m].clone()) for k, v in e.items()}
                                         for i, e in opt["state"].items()},
                               "param_groups": opt["param_groups"]} for name, opt in value.items()}
        elif key == "schedulers":
            out[key] = value
        else:
            out[key] = pytree.tree_map(lambda x: x[m].clone() if isinstance(x, Tensor) else x, value)
    return out


def stack_agents(agents: Sequence):
    """One stacked agent computing the M given agents (same class, same configuration but for the
    seed; each may come from its own checkpoint, all at the same step). The given agents are left
    as they are."""
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
    stacked = cls(first.config)
    swapped: Dict[int, Tensor] = {}
    members = [_state_tensors(a) for a in agents]
    for path, tensor in _state_tensors(stacked).items():
        value = torch.stack([m[path].detach() for m in members])
        if isinstance(tensor, nn.Parameter):
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        obj, leaf = _owner(stacked, path)
        _put(obj, leaf, value)
        swapped[id(tensor)] = value
    for name, optimizer in stacked.optimizers.items():
        groups = [dict(g, params=[swapped[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
        rebuilt = type(optimizer)(groups)
        stacked.optimizers[name] = rebuilt
        schedulers = getattr(stacked, "schedulers", {})
        if name in schedulers:
            scheduler = schedulers[name]
            schedulers[name] = type(scheduler)(rebuilt, scheduler.lr_lambdas[0])
    stacked.load_state_dict(_stack_states([a.state_dict() for a in agents]))
    stacked.member_seeds = [a.config.seed for a in agents]
    stacked.member_generators = [_clone_generator(a.generator) for a in agents]
    stacked.member_configs = [a.config for a in agents]
    # The members' own generators draw everything; the agent's own is a stand-in its state_dict reads.
    stacked.generator = torch.Generator(device=first.generator.device)
    stacked.map_members = _MemberMap(stacked)
    stacked.draw_noise = functools.partial(draw_member_noise, stacked, cls.draw_noise.__get__(stacked))
    return stacked


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def member_state_dicts(stacked) -> List[dict]:
    """The members' ordinary single-run state dicts (what ``checkpoint.pt`` of a run with that seed
    holds), copied out of the stacked agent."""
    state = stacked.state_dict()
    out = []
    for m, (config, generator) in enumerate(zip(stacked.member_configs, stacked.member_generators)):
        member = _split_state(state, m)
        member["config"] = config.to_dict()
        member["generator"] = generator.get_state()
        out.append(member)
    return out


def draw_member_noise(stacked, draw: Callable, *args):
    """``draw(*args)`` (an agent's ``draw_noise``) once per member from that member's generator,
    stacked: the numbers each single run would draw."""
    noises, own = [], stacked.generator
    try:
        for generator in stacked.member_generators:
            stacked.generator = generator
            noises.append(draw(*args))
    finally:
        stacked.generator = own
    return stack_tree(noises)


class _MemberMap:
    """``agent.map_members(fn, *args)`` on a stacked agent: ``fn(*args)`` (a method of the agent)
    for every member at once, under ``torch.func.vmap`` over the member dimension of the agent's
    tensors and of every tensor in ``args``. Returns ``fn``'s result with stacked tensors."""

    def __init__(self, agent):
        self.agent = agent
        # Found once: read at every call, the agent's attributes would make torch.compile guard on
        # (and recompile for) every one of them, its step counter included.
        self.owners = [_owner(agent, path) for path in _state_tensors(agent)]

    def __call__(self, fn: Callable, *args):
        owners = self.owners
        tensors = [_get(obj, leaf) for obj, leaf in owners]
        arg_tensors, arg_layout = _tensor_leaves(args)
        out_layout = {}

        def one_member(state, inputs):
            saved = [_get(obj, leaf) for obj, leaf in owners]
            for (obj, leaf), value in zip(owners, state):
                _put(obj, leaf, value)
            try:
                result = fn(*_rebuild(inputs, arg_layout))
            finally:
                for (obj, leaf), value in zip(owners, saved):
                    _put(obj, leaf, value)
            values, out_layout["layout"] = _tensor_leaves(result)
            return values

        with member_map():
            values = torch.func.vmap(one_member, randomness="error")(tensors, arg_tensors)
        return _rebuild(values, out_layout["layout"])


def single_call(fn: Callable, *args):
    """``map_members`` of a single agent: the call itself."""
    return fn(*args)
