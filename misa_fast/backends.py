"""How one training step runs: ``--backend eager|compiled|graph``.

    step = make_step(agent, source, "graph")   # once, before the loop
    metrics = step()                            # one full update, batch sampling included

- ``eager``: ``agent.update(next(source))``, any learner, any device.
- ``compiled``: the MISA learner's loss computation (critic, HMC sampler, actor, temperatures)
  through ``torch.compile`` (inductor); the noise is drawn eagerly before it, because dynamo and
  explicit ``torch.Generator`` arguments do not mix, and backward and the optimizer steps stay
  eager. The first step compiles (tens of seconds on CPU; the faithful HMC chain is unrolled, so
  compile time grows with burn-in + K). The fused Triton ops are autograd Functions dynamo cannot
  trace into: on CUDA they are graph breaks, so ``compiled`` is a comparison point there, ``graph``
  the fast path.
- ``graph``: CUDA only. The whole update — drawing the batch indices from the device-resident
  dataset, the noise, every loss with the fused ops, backward, the four Adam steps, the Polyak
  target update and the adapted HMC step size — is captured once into a CUDA graph with static
  input buffers and replayed each step: one launch instead of hundreds. Requirements it checks:
  ``--device cuda``, the device-resident data source, a constant learning rate (a schedule changes
  a Python float the graph has baked in). Adam runs with ``capturable=True``. The agent's and the
  source's generators are registered with the graph, so replays draw fresh random numbers.
  Non-finite losses cannot stop a captured step before it applies: the check runs after each
  replay and raises ``NonFiniteLossError`` then; the trainer's last good checkpoint is untouched,
  the in-memory agent is not rolled back.

State stays with the agent and the source: their ``state_dict`` / ``load_state_dict`` work as
before with every backend (loading copies into the captured tensors; see ``GraphStep.load``).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
from torch import Tensor

BACKENDS = ("eager", "compiled", "graph")
Metrics = Dict[str, Tensor]


def make_step(agent, source, backend: str = "eager") -> Callable[[], Metrics]:
    """A callable doing one full update on the next batch of ``source``; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return EagerStep(agent, source)
    if not hasattr(agent, "compute_losses"):
        raise ValueError(f"--backend {backend}: supported for the MISA-family algorithms only (use eager)")
    return CompiledStep(agent, source) if backend == "compiled" else GraphStep(agent, source)


class EagerStep:
    kind = "eager"

    def __init__(self, agent, source):
        self.agent, self.source = agent, source

    def __call__(self) -> Metrics:
        return self.agent.update(next(self.source))


class CompiledStep:
    kind = "compiled"

    def __init__(self, agent, source, **compile_options):
        self.agent, self.source = agent, source
        # An instance attribute shadows the method, so agent.update runs the compiled losses.
        agent.compute_losses = torch.compile(type(agent).compute_losses.__get__(agent), dynamic=False,
                                             **compile_options)

    def __call__(self) -> Metrics:
        batch = next(self.source)
        noise = self.agent.draw_noise(self.agent.config.batch_size)
        return self.agent.update(batch, noise)


def _make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam with ``capturable=True``: its step counters live on the device (graph-safe)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():
        if "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


class GraphStep:
    kind = "graph"

    def __init__(self, agent, source, warmup: int = 3):
        from misa_fast.samplers import DeviceSource

        cfg = agent.config
        if agent.device.type != "cuda":
            raise ValueError("--backend graph needs a CUDA device (--device cuda); use eager or compiled on CPU")
        if not isinstance(source, DeviceSource):
            raise ValueError("--backend graph samples batches inside the graph: use --data-source device (or auto)")
        if cfg.lr_schedule != "constant":
            raise ValueError("--backend graph needs lr_schedule=constant (a schedule changes a learning rate the "
                             "captured graph has baked in)")
        self.agent, self.source = agent, source
        self.check_finite = cfg.check_finite
        for optimizer in agent.optimizers.values():
            _make_capturable(optimizer, agent.device)
        self.batch = source.static_batch()

        # Warm-up steps on a side stream (lazy allocations, cuBLAS handles, Adam state) must not
        # change the run: snapshot everything and put it back before capturing.
        saved_agent = copy.deepcopy(agent.state_dict())
        saved_source = copy.deepcopy(source.state_dict())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.load(saved_agent, saved_source)

        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(agent.generator)
        self.graph.register_generator_state(source.generator)
        step_before = agent.step
        with torch.cuda.graph(self.graph):
            self.metrics = self._body()
            self.finite = torch.stack([v for v in self.metrics.values()]).isfinite().all()
        # Capturing recorded the work without running it: undo the step counters it advanced.
        agent.step = step_before
        for scheduler in agent.schedulers.values():
            scheduler.last_epoch -= 1
            scheduler._step_count -= 1

    def _body(self) -> Metrics:
        self.source.refill(self.batch)
        noise = self.agent.draw_noise(self.agent.config.batch_size)
        return self.agent.update(self.batch, noise, check_finite=False)

    def __call__(self) -> Metrics:
        """Replays the captured update. The returned tensors are the graph's static outputs: read
        (or clone) them before the next call."""
        from misa_fast.agents import NonFiniteLossError

        self.graph.replay()
        self.agent.step += 1
        for scheduler in self.agent.schedulers.values():
            scheduler.last_epoch += 1
            scheduler._step_count += 1
        if self.check_finite and not bool(self.finite):
            bad = next(name for name, value in self.metrics.items() if not bool(value.isfinite()))
            raise NonFiniteLossError(bad, self.agent.step - 1)
        return self.metrics

    def load(self, agent_state: dict, source_state: dict) -> None:
        """Restore agent and source in place (parameters, buffers, Adam moments and counters,
        generators): the captured graph keeps pointing at the same tensors."""
        agent = self.agent
        for name in ("policy", "critic", "target_critic", "energy"):
            module = getattr(agent, name, None)
            if module is not None and agent_state.get(name) is not None:
                module.load_state_dict(agent_state[name])  # nn.Module copies into existing tensors
        with torch.no_grad():
            agent.log_alpha.copy_(agent_state["log_alpha"])
            agent.log_alpha_prime.copy_(agent_state["log_alpha_prime"])
            agent.hmc_log_step_size.copy_(agent_state["hmc_log_step_size"])
            for name, optimizer in agent.optimizers.items():
                saved = agent_state["optimizers"][name]["state"]
                params = [p for g in optimizer.param_groups for p in g["params"]]
                for index, param in enumerate(params):
                    for key, value in saved.get(index, {}).items():
                        current = optimizer.state[param].get(key)
                        if torch.is_tensor(current):
                            current.copy_(value)
                        else:
                            optimizer.state[param][key] = value.to(agent.device) if torch.is_tensor(value) else value
                    if index not in saved:
                        # The snapshot predates this state. Zero moments and step equal a fresh
                        # Adam, and the tensors must stay: state created during capture would be
                        # re-initialised by every replay.
                        for value in optimizer.state[param].values():
                            if torch.is_tensor(value):
                                value.zero_()
        agent.generator.set_state(agent_state["generator"].cpu())
        agent.step = int(agent_state["step"])
        self.source.load_state_dict(source_state)
