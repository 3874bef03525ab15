"""Member-steps/s of several seeds trained in one process (``misa-fast train --seeds``) beside one
run.

    OMP_NUM_THREADS=2 pytest bench/bench_members.py --benchmark-json bench/results/members-<device>-<date>.json
    python -m bench.members_table bench/results/members-<device>-<date>.json      # the README table

Each case is one full update of M members (batch sampling included) through the trainer's step
(``misa_fast.training.backends.make_step``): M = 1 is a single run (its own agent and C++
prefetcher, as ``misa-fast train --seed N``), M > 1 the M seeds as one stacked agent with the C++
sampler's M index streams (as ``misa-fast train --seeds``). M separate processes run one after
another give M = 1's member-steps/s, so the ratio of a row's M-member figure to its M = 1 figure
is the gain over separate runs. ``extra_info`` records ``member_steps_per_s`` = M / median seconds.

Workloads: the ``pendulum`` preset (256x256 networks, K=10, the embedded dataset's shapes), the
same with 64x64 networks (``pendulum-64``), and the locomotion preset (hopper's shapes) at K=10
and K=50, faithful and parallel HMC, eager; the pendulum workloads also compiled at M = 1 and 4.
Under ``--benchmark-disable`` (CI) only the eager pendulum-64 cases up to M=4 run, once each, as a
check that every path runs.
"""
import numpy as np
import pytest
import torch

from misa_fast.agents import MISA, members
from misa_fast.agents.misa_config import preset
from misa_fast.replay.sources import MemberStreams, make_source
from misa_fast.training.backends import make_step
from misa_fast.training.runtime import tune_host_allocator

tune_host_allocator()  # as the trainer does

WORKLOADS = {
    "pendulum": ("pendulum", (3, 1), {}),
    "pendulum-64": ("pendulum", (3, 1), {"policy_hidden": (64, 64), "critic_hidden": (64, 64)}),
    "loco-K10-faithful": ("locomotion", (11, 3), {"num_samples": 10, "hmc_mode": "faithful"}),
    "loco-K10-parallel": ("locomotion", (11, 3), {"num_samples": 10, "hmc_mode": "parallel"}),
    "loco-K50-faithful": ("locomotion", (11, 3), {"num_samples": 50, "hmc_mode": "faithful"}),
    "loco-K50-parallel": ("locomotion", (11, 3), {"num_samples": 50, "hmc_mode": "parallel"}),
}
MEMBERS = (1, 2, 4, 8)
# compiled: the pendulum workloads at M = 1 and 4 (a group's first compile unrolls its whole HMC chain:
# minutes per case on a 2-core CPU)
CASES = [(w, m, backend) for w in WORKLOADS for m in MEMBERS for backend in ("eager", "compiled")
         if backend == "eager" or (w.startswith("pendulum") and m in (1, 4))]


def transitions(obs_dim: int, act_dim: int, rows: int = 20_000) -> dict:
    """Random transitions of the workload's shapes (the timing does not depend on their values)."""
    rng = np.random.default_rng(0)
    columns = {"observations": obs_dim, "actions": act_dim, "rewards": 0, "next_observations": obs_dim,
               "terminals": 0}
    data = {k: rng.normal(size=(rows, w) if w else rows).astype(np.float32) for k, w in columns.items()}
    data["actions"] = np.tanh(data["actions"])
    data["terminals"] = (data["terminals"] > 2.3).astype(np.float32)
    return data


def build(workload: str, count: int, backend: str):
    """A function doing one update of ``count`` members."""
    name, (obs_dim, act_dim), overrides = WORKLOADS[workload]
    data = transitions(obs_dim, act_dim)
    agents = [MISA(preset(name).replace(obs_dim=obs_dim, act_dim=act_dim, device="cpu", seed=seed, **overrides))
              for seed in range(count)]
    batch_size = agents[0].config.batch_size
    if backend == "compiled":
        torch._dynamo.reset()
    if count > 1:  # as misa-fast train --seeds: the C++ sampler's streams, one data copy
        streams = MemberStreams("prefetch", data, batch_size, list(range(count)), "cpu")
        return make_step(members.stack_agents(agents), streams, backend)
    return make_step(agents[0], make_source("prefetch", data, batch_size, 0, "cpu"), backend)


@pytest.mark.parametrize("workload, count, backend", CASES, ids=[f"{w}-M{m}-{b}" for w, m, b in CASES])
def test_member_steps(benchmark, workload, count, backend):
    disabled = benchmark.disabled
    if disabled and (workload != "pendulum-64" or count > 4 or backend != "eager"):
        pytest.skip("timing case: runs with the benchmark enabled")
    step = build(workload, count, backend)
    step()  # warm-up (allocator; compiled: the compile)
    # This VM's step times vary by up to 1.5x from run to run: many rounds where they are cheap.
    rounds = {"pendulum-64": 20, "pendulum": 10, "loco-K10-faithful": 5, "loco-K10-parallel": 5}.get(workload, 3)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1 if not disabled else 0, iterations=1)
    if not disabled:
        benchmark.extra_info.update(members=count, workload=workload, backend=backend,
                                    member_steps_per_s=count / benchmark.stats.stats.median)
