"""How one training step runs: ``--backend eager|compiled|graph``. A backend wraps a function; it
never changes the agent.

    step = make_step(agent, source, "compiled")   # once, after any checkpoint was loaded
    metrics = step()                               # one full update, batch sampling included
    step.check()                                   # before saving a checkpoint (graph: see check_every)

Every backend ends in the learner's one ``update(batch, noise, losses=...)`` (misa_fast.agents.learner):
the losses from a loss function ``losses(tensors, batch, noise)``, one backward pass, the Adam
steps, the Polyak update and the HMC step-size adaptation. What ``misa-fast train --backend
compiled --seeds 0-4`` runs: the trainer stacks the five seeds into one group learner
(misa_fast.agents.members); :class:`CompiledStep` holds ``torch.compile(group.loss_function())``,
the MISA loss function under ``vmap`` over the member dimension with the HMC chain unrolled in it;
each step takes the five members' batches (M, B, ...), draws each member's noise from its own
generator (eagerly, stacked) and calls ``group.update(batch, noise, losses=<the compiled one>)``:
one compiled forward and backward for all five, then eager Adam, Polyak and step size over the
stacked tensors.

- ``eager``: ``agent.update(next(source))``; any learner, any device.
- ``compiled``: ``agent.update(batch, noise, losses=self.losses)`` with ``self.losses =
  torch.compile(agent.loss_function(run_chain))`` (inductor, ``dynamic=False``): the MISA loss
  function (critics, HMC sampler, actor, temperatures) compiled, forward and backward. The noise of
  the update is drawn eagerly before it (dynamo and explicit ``torch.Generator`` arguments do not
  mix); the optimizer steps and the Polyak update stay eager (on CPU they are ~1% of a step:
  compiling them does not pay for its compile time). A single run's HMC chain is not unrolled into
  that graph (burn-in + K transitions: minutes of compiling at K=50 on a 2-core CPU): ``run_chain``
  is :func:`chain_in_pieces`, which runs it in pieces of ``hmc_piece`` transitions through one
  compiled graph per piece shape (``misa_fast.ops.hmc_reference.compiled_transitions``), so the
  first step compiles in 10-60 s there, and inductor's FX-graph cache makes later runs start faster
  (with ``unbiased_estimator=snis`` there is no chain: the loss function is one compiled graph).
  For several seeds (``--seeds``) the compiled graph is the whole member vmap with the chain
  unrolled in it (dynamo cannot break a graph inside vmap): a longer first compile (about 2
  minutes at K=10 on a 2-core CPU, cached by inductor for later runs). On CUDA the fused Triton
  ops may make dynamo break the graph: there ``compiled`` is a comparison point and ``graph`` the
  fast path.
- ``graph``: CUDA only. The whole update — drawing the batch from the device-resident dataset, the
  noise, every loss with the fused ops, backward, the Adam steps, the Polyak target update and the
  adapted HMC step size — is captured once into a CUDA graph with static buffers and replayed each
  step: one graph launch instead of hundreds of kernel launches. Requirements, checked: a CUDA
  device and a constant learning rate (a schedule changes a Python float that the captured Adam
  kernels have baked in). Adam is switched to ``capturable=True``. The agent's and the source's
  generators are registered with the graph, so each replay draws fresh random numbers — the same
  ones eager would draw (graph-safe Philox offsets), hence the same run for the same seed.
  Batches: with a :class:`DeviceSource` the index draw and gather are inside the graph; any other
  source (the C++ prefetcher) is read eagerly and copied into the static batch before each replay.
  Non-finite values: a host check cannot run inside a graph, so the losses and gradients are
  tested on the device by the graph and the flag is read after the replay (every ``check_every``
  replays and on ``check()``). A non-finite step is therefore detected *after* it was applied:
  :class:`NonFiniteStepApplied` (a ``NonFiniteLossError``) is raised, the trainer's last good
  checkpoint is untouched, but the in-memory agent is not rolled back.

State stays with the agent and the source: their ``state_dict`` work as before with every backend.
To load state *after* a graph was captured use ``step.load_state_dict(agent_state, source_state)``:
it copies into the captured tensors (``MISA.load_state_dict`` alone rebinds the Adam moments, which
the graph would then no longer see).
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from misa_fast import ops
from misa_fast.agents.misa import MISA, NonFiniteLossError
from misa_fast.ops import hmc_reference as hmc_lib
from misa_fast.replay.buffer import FIELDS

BACKENDS = ("eager", "compiled", "graph")
RECOMPILE_LIMIT = 64  # compiled configurations per function and process (see CompiledStep)
Metrics = Dict[str, Tensor]


def make_step(agent, source, backend: str = "eager", **options) -> "TrainStep":
    """A :class:`TrainStep` doing one full update on the next batch of ``source`` per call.

    Build it after loading any checkpoint into ``agent`` and ``source``. ``options`` go to the
    backend's class (``CompiledStep``: torch.compile keywords; ``GraphStep``: ``warmup``,
    ``check_every``)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return EagerStep(agent, source, **options)
    if not isinstance(agent, MISA):
        raise ValueError(f"--backend {backend} is implemented for the MISA-family algorithms only; "
                         f"use --backend eager for {type(agent).__name__}")
    if backend == "graph" and agent.member_seeds is not None:
        raise ValueError("--backend graph captures one seed's update: with --seeds use --backend eager or compiled, "
                         "or train each seed in its own process")
    return CompiledStep(agent, source, **options) if backend == "compiled" else GraphStep(agent, source, **options)


class TrainStep:
    """One full training update per call (batch sampling included), returning the agent's metrics
    (detached 0-dim device tensors). The agent and the source keep owning all state."""

    kind = "eager"

    def __init__(self, agent, source):
        self.agent, self.source = agent, source

    def __call__(self) -> Metrics:
        return self.agent.update(next(self.source))

    def check(self) -> None:
        """Raise if a non-finite step was applied and not yet reported (graph backend only)."""

    def load_state_dict(self, agent_state: Mapping, source_state: Optional[Mapping] = None) -> None:
        """Load agent (and source) state into the running backend."""
        self.agent.load_state_dict(agent_state)
        if source_state is not None:
            _load_source(self.source, source_state)

    def close(self) -> None:
        """Release what the backend holds (the step object is unusable afterwards); the agent was
        never changed by it."""


class EagerStep(TrainStep):
    kind = "eager"

    def __init__(self, agent, source):
        super().__init__(agent, source)
        # A checkpoint written under the graph backend carries Adam's capturable=True (restored by
        # Optimizer.load_state_dict): back to the default, which CPU tensors require.
        for optimizer in _optimizers(agent):
            set_capturable(optimizer, False)


class CompiledStep(TrainStep):
    """``hmc_piece``: transitions per compiled piece of the HMC chain (see the module docstring);
    0 unrolls the whole chain into the loss graph instead (minutes of compiling on a CPU for ~9%
    less step time). Other keywords go to ``torch.compile``."""

    kind = "compiled"

    def __init__(self, agent, source, dynamic: bool = False, hmc_piece: int = hmc_lib.COMPILED_PIECE,
                 **compile_options):
        if hmc_piece < 0:
            raise ValueError(f"CompiledStep: hmc_piece must be >= 0 (0: unroll the whole chain), got {hmc_piece}")
        super().__init__(agent, source)
        for optimizer in _optimizers(agent):
            set_capturable(optimizer, False)
        # dynamo keeps compiled code per function, not per agent: every configuration compiled in this
        # process (shapes, K, HMC mode, piece lengths) is one more entry, and past the default limit
        # of 8 it silently runs the function eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        run_chain = ops.hmc_sample
        # A group's graph is its whole member vmap, the chain unrolled in it (dynamo cannot break a
        # graph inside vmap); a single run's chain runs in compiled pieces unless hmc_piece is 0.
        if agent.member_seeds is None and hmc_piece > 0 and agent.config.hmc_chain:
            run_chain = chain_in_pieces(hmc_piece, dynamic=dynamic, **compile_options)
        self.losses = torch.compile(agent.loss_function(run_chain), dynamic=dynamic, **compile_options)

    def __call__(self) -> Metrics:
        batch = next(self.source)
        noise = self.agent.draw_noise(_batch_size(batch))  # eager: the generator stays out of dynamo
        return self.agent.update(batch, noise, losses=self.losses)


def chain_in_pieces(piece: int, **compile_options):
    """An HMC chain runner (``ops.hmc_sample``'s signature) whose Python loop stays outside the
    compiled loss graph (a graph break) and runs ``piece`` transitions at a time through a few
    compiled graphs; the chain's samples carry no gradient, so autograd loses nothing at the break."""

    @torch.compiler.disable
    def run_chain(*args, **kwargs):
        with hmc_lib.compiled_transitions(piece, **compile_options):
            return ops.hmc_sample(*args, **kwargs)

    return run_chain


class NonFiniteStepApplied(NonFiniteLossError):
    """A non-finite loss or gradient found after a CUDA-graph step had been applied: the in-memory
    agent is not rolled back (its parameters may be NaN); the trainer's last good checkpoint is
    untouched. ``applied`` tells it apart from the eager error (raised before any update)."""

    applied = True

    def __init__(self, term: str, step: int):
        self.term, self.step = term, step
        FloatingPointError.__init__(self, f"non-finite {term} found after step {step}: the CUDA-graph step had "
                                          "already been applied (the in-memory agent is not rolled back)")


class GraphStep(TrainStep):
    """The whole update captured in one CUDA graph; see the module docstring.

    ``warmup``: eager iterations on a side stream before capture (lazy allocations, Triton and
    cuBLAS initialisation, Adam state), undone afterwards, so the run continues from the state the
    agent and the source had. ``check_every``: replays between reads of the device-side finite flag
    (1: every step, one host sync per step; 0: only in ``check()``). The flag is sticky: a check
    covers every replay since the previous one. With ``check_finite=False`` in the agent's config
    nothing is checked."""

    kind = "graph"

    def __init__(self, agent, source, warmup: int = 3, check_every: int = 1):
        cfg = agent.config
        if agent.device.type != "cuda":
            raise ValueError(f"--backend graph needs a CUDA device (--device cuda; the agent is on {agent.device}): "
                             "use --backend eager or compiled on a CPU")
        if cfg.lr_schedule != "constant":
            raise ValueError(f"--backend graph needs lr_schedule='constant', not {cfg.lr_schedule!r}: a schedule "
                             "changes learning rates that the captured Adam kernels have baked in")
        if warmup < 1:
            raise ValueError("GraphStep: warmup must be >= 1 (CUDA graphs need warm-up iterations before capture)")
        device = agent.device if agent.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._setup(agent, source, device, check_every)
        with torch.cuda.device(device):
            saved_agent = self._warm_up(warmup)
            self.graph = torch.cuda.CUDAGraph()
            # Registered generators: each replay draws the next numbers of their streams (graph-safe
            # Philox offsets), and get_state/set_state keep working between replays.
            self.graph.register_generator_state(agent.generator)
            if self.sample_in_graph:
                self.graph.register_generator_state(source.generator)
            with torch.cuda.graph(self.graph):
                self.metrics = self._body()
        # Capture recorded the work without running it, but Python-side counters advanced: undo.
        agent.step = int(saved_agent["step"])
        for name, scheduler in agent.schedulers.items():
            scheduler.load_state_dict(saved_agent["schedulers"][name])

    def _setup(self, agent, source, device: torch.device, check_every: int) -> None:
        """Static buffers and flags (device-agnostic: the CPU tests drive ``_body`` through it)."""
        from misa_fast.replay.sources import DeviceSource

        TrainStep.__init__(self, agent, source)
        cfg = agent.config
        self.device = device
        self.check_finite = bool(cfg.check_finite)
        self.check_every, self._since_check = int(check_every), 0
        self.capturable = device.type == "cuda"
        for optimizer in agent.optimizers.values():
            set_capturable(optimizer, self.capturable)
        # Batches: drawn inside the graph from a device-resident dataset, else copied in before replay.
        self.sample_in_graph = isinstance(source, DeviceSource) and _same_device(source.device, device)
        if self.sample_in_graph:
            self.batch = source.static_batch()
        else:
            B, S, A = cfg.batch_size, cfg.obs_dim, cfg.act_dim
            shapes = {"observations": (B, S), "actions": (B, A), "rewards": (B,), "next_observations": (B, S),
                      "terminals": (B,)}
            self.batch = {f: torch.zeros(shapes[f], device=device) for f in FIELDS}
        self._ok = torch.ones((), dtype=torch.bool, device=device)

    def _warm_up(self, iterations: int) -> dict:
        """Runs the body eagerly (on a side stream on CUDA, as the CUDA-graphs docs require: lazy
        allocations, Triton/cuBLAS initialisation, Adam state), then puts the agent and the source
        back in place, so the captured run continues from where they were. Returns the agent state."""
        saved_agent = copy.deepcopy(self.agent.state_dict())
        saved_source = copy.deepcopy(self.source.state_dict()) if self.sample_in_graph else None
        if self.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(iterations):
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(iterations):
                self._body()
        self.load_state_dict(saved_agent, saved_source)
        return saved_agent

    # -- the captured work ----------------------------------------------------------------------------
    def _body(self) -> Metrics:
        agent = self.agent
        if self.sample_in_graph:
            self.source.refill(self.batch)
        noise = agent.draw_noise(_batch_size(self.batch))
        metrics = agent.update(self.batch, noise, check_finite=False)
        # What MISA._check_finite tests eagerly: every loss (they are among the metrics) and every
        # gradient (still in .grad after the optimizer steps).
        grads = [p.grad.sum() for opt in agent.optimizers.values() for p in _params(opt) if p.grad is not None]
        self._ok.logical_and_(torch.stack([*metrics.values(), *grads]).isfinite().all())
        return metrics

    # -- per step -------------------------------------------------------------------------------------
    def __call__(self) -> Metrics:
        """Replays the captured update. The returned tensors are the graph's static outputs: read
        (or clone) them before the next call."""
        if not self.sample_in_graph:
            batch = next(self.source)
            for key, static in self.batch.items():
                static.copy_(torch.as_tensor(batch[key]).reshape(static.shape), non_blocking=True)
        self.graph.replay()
        self.agent.step += 1
        for scheduler in self.agent.schedulers.values():  # constant: only the counters (saved state)
            scheduler.last_epoch += 1
            scheduler._step_count += 1
        self._since_check += 1
        if self.check_every > 0 and self._since_check >= self.check_every:
            self.check()
        return self.metrics

    def check(self) -> None:
        """Reads the sticky device flag (one host sync); raises :class:`NonFiniteStepApplied` if a
        replay since the previous check gave a non-finite loss or gradient."""
        self._since_check = 0
        if not self.check_finite or bool(self._ok):
            return
        bad = next((name for name, value in self.metrics.items() if not bool(value.isfinite())), "gradient")
        raise NonFiniteStepApplied(bad, self.agent.step)

    def load_state_dict(self, agent_state: Mapping, source_state: Optional[Mapping] = None) -> None:
        """Load into the captured tensors (parameters, Adam moments and counters, HMC step size,
        generators), so the graph keeps reading and writing what the agent saves."""
        load_state_in_place(self.agent, agent_state)
        for optimizer in self.agent.optimizers.values():
            set_capturable(optimizer, self.capturable)
        if source_state is not None:
            _load_source(self.source, source_state)
        self._ok.fill_(True)
        self._since_check = 0

    def close(self) -> None:
        self.graph.reset()


# ---------------------------------------------------------------------------------------------------
def load_state_in_place(agent, state: Mapping) -> None:
    """``agent.load_state_dict(state)`` that leaves every tensor a captured CUDA graph may hold where
    it was: the official loader runs (validation, tensors copied in place, generator, counters),
    then the tensors it rebinds — the Adam state — are copied back into the previous ones. Adam
    state absent from ``state`` (a checkpoint from before the first step) is zeroed, which is
    exactly a fresh Adam (moments 0, step 0)."""
    before = {name: {p: dict(opt.state[p]) for p in _params(opt) if p in opt.state}
              for name, opt in agent.optimizers.items()}
    agent.load_state_dict(state)
    with torch.no_grad():
        for name, opt in agent.optimizers.items():
            for param, old in before[name].items():
                new = opt.state[param]
                for key, tensor in old.items():
                    if not torch.is_tensor(tensor):
                        new.setdefault(key, tensor)
                        continue
                    if key in new:
                        tensor.copy_(new[key])
                    else:
                        tensor.zero_()
                    new[key] = tensor


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch an Adam-style optimizer's ``capturable`` flag, moving its step counters to where that
    mode keeps them (the parameter's device as float32 when capturable, the CPU otherwise)."""
    if not any("capturable" in group for group in optimizer.param_groups):
        return
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and torch.is_tensor(state.get("step")):
                step = state["step"]
                target = param.device if capturable else torch.device("cpu")
                if step.device != target:
                    state["step"] = step.to(device=target, dtype=torch.float32)


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _optimizers(agent):
    optimizers = getattr(agent, "optimizers", None)
    return list(optimizers.values()) if isinstance(optimizers, Mapping) else []


def _params(optimizer: torch.optim.Optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _batch_size(batch: Mapping) -> int:
    return int(torch.as_tensor(batch["actions"]).shape[-2])  # (B, A), or (M, B, A) for stacked members


def _load_source(source, state: Mapping) -> None:
    if not hasattr(source, "load_state_dict"):
        raise TypeError(f"{type(source).__name__} restores its position at construction: recreate it with "
                        "make_source(..., state=...)")
    source.load_state_dict(state)
