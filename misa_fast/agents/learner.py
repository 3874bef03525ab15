"""What MISA and TD3 share: a learner is data plus pure functions.

The data: ``networks``, one ``nn.Module`` holding every tensor the losses read (networks, target
copies, temperatures, the HMC step size), the optimizers over them, a generator, a step counter.
The functions: a loss function ``losses(tensors, batch, noise) -> result`` that runs the learner's
loss module through ``torch.func.functional_call`` on ``tensors`` (a dict path -> tensor, the
module's own tensors for a single run), and the learner's ``update``, which calls a loss function,
steps the optimizers and moves the targets.

Several seeds trained together (``misa-fast train --seeds``, :mod:`misa_fast.agents.members`) are
one learner of the same class whose tensors are the members' tensors stacked on a leading member
dimension by ``torch.func.stack_module_state``; its ``networks`` is then only the layout (on the
meta device) that ``functional_call`` fills in. :meth:`Learner.for_members` turns a loss function
into the group's: ``torch.func.vmap`` over that member dimension. Everything else in ``update``
(Adam, the Polyak update, the step-size adaptation) is elementwise, so the same code steps one
run or M members.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from misa_fast.ops.dispatch import member_map

Tensors = Dict[str, Tensor]


class Learner:
    """The data every learner has and the functions that read it (see the module docstring).

    A subclass sets ``config``, ``device``, ``networks``, ``generator``, ``optimizers``, ``step``
    and ``_tensors = module_tensors(networks)``, and provides ``noise_function(config, generator,
    *args)`` (the random numbers of one update, drawn from one generator), ``make_optimizers(config,
    tensors)`` and, if it schedules learning rates, ``make_schedulers(config, optimizers)``."""

    # A group of seeds (misa_fast.agents.members): the members' seeds, generators and configurations.
    member_seeds: Optional[List[int]] = None
    member_generators: Optional[List[torch.Generator]] = None
    member_configs: Optional[list] = None
    networks: nn.Module

    @staticmethod
    def make_schedulers(config, optimizers) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """The learning-rate schedulers of ``optimizers`` by name (none unless a learner has some)."""
        return {}

    # -- the state ------------------------------------------------------------------------------------
    def state_tensors(self) -> Tensors:
        """Every tensor the losses read, by path in ``networks`` (``critic.weights.0``, ``log_alpha``):
        the modules' own parameters and buffers for a single run (found once: loading a state copies
        into them, it never replaces them), the stacked ones for a group."""
        return self._tensors

    def module_state(self, name: str) -> Optional[dict]:
        """The ``state_dict`` of the network ``name`` (None if the learner has none): the module's own
        for a single run, the member-stacked tensors under the same keys for a group."""
        module = getattr(self.networks, name)
        if module is None:
            return None
        if self.member_seeds is None:
            return module.state_dict()
        prefix = name + "."
        return {path[len(prefix):]: tensor.detach() for path, tensor in self._tensors.items()
                if path.startswith(prefix)}

    def parameters_of(self, name: str) -> List[Tensor]:
        """The parameters of the network ``name`` in ``parameters()`` order (what its optimizer steps)."""
        tensors = self.state_tensors()
        return [tensors[f"{name}.{sub}"] for sub, _ in getattr(self.networks, name).named_parameters()]

    @torch.no_grad()
    def polyak_update(self, target: str, online: str, tau: float) -> None:
        """target <- (1 - tau) * target + tau * online, for every parameter (one fused foreach op)."""
        torch._foreach_lerp_(self.parameters_of(target), self.parameters_of(online), tau)

    # -- the functions --------------------------------------------------------------------------------
    def for_members(self, fn: Callable) -> Callable:
        """``fn(tensors, *args)`` as this learner calls it: ``fn`` itself for a single run; for a group,
        ``fn`` under ``torch.func.vmap`` over the leading member dimension of the tensors and of
        every tensor in ``args`` (the result's tensors get that dimension too; None stays None)."""
        if self.member_seeds is None:
            return fn

        def one_member(*args):
            return TensorLeaves.of(fn(*args))

        def group_call(*args):
            in_dims = pytree.tree_map(lambda x: 0 if isinstance(x, Tensor) else None, args)
            with member_map():  # the registered operators launch once for every member
                packed = torch.func.vmap(one_member, in_dims=in_dims, randomness="error")(*args)
            return packed.unpack()

        return group_call

    def draw_noise(self, *args, **kwargs):
        """The random numbers of one update (``noise_function``) from the learner's generator; for a
        group, from each member's own generator (the numbers each single run draws), stacked."""
        if self.member_generators is None:
            return self.noise_function(self.config, self.generator, *args, **kwargs)
        return stack_tree([self.noise_function(config, generator, *args, **kwargs)
                           for config, generator in zip(self.member_configs, self.member_generators)])

    # -- a group --------------------------------------------------------------------------------------
    @classmethod
    def group_of(cls, agents: Sequence["Learner"]) -> "Learner":
        """One learner training the given ones as members (same class and configuration but for the
        seed, same step); see misa_fast.agents.members. The given agents are left as they are."""
        first = agents[0]
        group = cls(first.config)
        params, buffers = torch.func.stack_module_state([agent.networks for agent in agents])
        group._tensors = {**params, **buffers}
        group.networks.to("meta")  # the layout functional_call fills in: no member's values
        group.optimizers = cls.make_optimizers(group.config, group._tensors)
        for name, optimizer in group.optimizers.items():
            optimizer.load_state_dict(_stack_optimizer_states([a.optimizers[name].state_dict() for a in agents]))
        # Rebuilt by the learner's own factory, then given the members' (shared) counters.
        group.schedulers = cls.make_schedulers(group.config, group.optimizers)
        for name, scheduler in group.schedulers.items():
            scheduler.load_state_dict(first.schedulers[name].state_dict())
        group.step = first.step
        group.member_seeds = [a.config.seed for a in agents]
        group.member_configs = [a.config for a in agents]
        group.member_generators = [_clone_generator(a.generator) for a in agents]
        # The members' own generators draw everything; this one only fills the state_dict's slot.
        group.generator = torch.Generator(device=first.generator.device)
        group.join_members(agents)
        return group

    def join_members(self, agents: Sequence["Learner"]) -> None:
        """Learner-specific state of a group beyond tensors and optimizers (none here)."""


class TensorLeaves:
    """A pytree as one pytree node whose children are only its tensor leaves; its other leaves (None)
    and its layout are the node's context. vmap carries the tensors out and rebuilds the node from
    the spec, so ``unpack`` gives the pytree back with batched tensors."""

    def __init__(self, tensors: Sequence[Tensor], layout: tuple):
        self.tensors, self.layout = list(tensors), layout

    @classmethod
    def of(cls, tree) -> "TensorLeaves":
        leaves, spec = pytree.tree_flatten(tree)
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        others = tuple(None if isinstance(leaf, Tensor) else leaf for leaf in leaves)
        is_tensor = tuple(isinstance(leaf, Tensor) for leaf in leaves)
        return cls(tensors, (spec, others, is_tensor))

    def unpack(self):
        spec, others, is_tensor = self.layout
        tensors = iter(self.tensors)
        return pytree.tree_unflatten([next(tensors) if t else other for other, t in zip(others, is_tensor)], spec)


pytree.register_pytree_node(TensorLeaves, lambda node: (node.tensors, node.layout),
                            lambda tensors, layout: TensorLeaves(tensors, layout),
                            serialized_type_name="misa_fast.agents.learner.TensorLeaves")


def tensors_under(tensors: Tensors, name: str) -> List[Tensor]:
    """The tensors of the network ``name`` (paths ``name.*``), in order: what its optimizer steps."""
    return [tensor for path, tensor in tensors.items() if path.startswith(name + ".")]


def module_tensors(module: nn.Module) -> Tensors:
    """A module's parameters and buffers by path (the tensors themselves, not copies)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _stack_optimizer_states(states: Sequence[dict]) -> dict:
    """M optimizer state dicts -> one over the stacked parameters (the step counts are shared:
    members always take the same steps)."""
    state = {}
    for index, entry in states[0]["state"].items():
        state[index] = {k: (v if k == "step" else torch.stack([s["state"][index][k] for s in states]))
                        for k, v in entry.items()}
    return {"state": state, "param_groups": states[0]["param_groups"]}


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def stack_tree(trees: Sequence):
    """One pytree whose tensor leaves are the members' leaves stacked on a new leading dimension
    (None and non-tensor leaves must agree and are kept)."""
    flat = [pytree.tree_flatten(t) for t in trees]
    leaves = [torch.stack(values) if isinstance(values[0], Tensor) else values[0]
              for values in zip(*(f[0] for f in flat))]
    return pytree.tree_unflatten(leaves, flat[0][1])


def as_batch(batch: Mapping, device) -> tuple:
    """(obs, actions, rewards, next_obs, dones) as float32 tensors on ``device``; rewards and dones
    (B,), or (M, B) for the (M, B, ...) batch of a group."""

    def get(key):
        return torch.as_tensor(batch[key], dtype=torch.float32, device=device)

    actions = get("actions")
    rows = actions.shape[:-1]
    return get("observations"), actions, get("rewards").reshape(rows), get("next_observations"), \
        get("terminals").reshape(rows)


def next_actions_of(batch: Mapping, device, config) -> tuple:
    """(the batch's ``next_actions``,) when ``config.reads_next_actions`` (OneStep's SARSA target,
    ReBRAC's critic penalty), else (): what a learner appends to :func:`as_batch`'s tuple."""
    if not getattr(config, "reads_next_actions", False):
        return ()
    if "next_actions" not in batch:
        raise ValueError("this algorithm reads the data's next actions: the batch needs 'next_actions' (prepare the "
                         "data with next_actions=True; the C++ replay buffer holds only the five transition fields)")
    return (torch.as_tensor(batch["next_actions"], dtype=torch.float32, device=device),)
