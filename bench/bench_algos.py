"""Per-step latency of every method ``misa-fast train --algo`` knows — one full update, batch
sampling included — with its locomotion defaults on hopper shapes (hopper-medium-v2's per-dataset
values: EDAC's 50 critics, ReBRAC's coefficients), and SAC-N / EDAC at N = 10 and 50 critics, which
shows what one stacked ensemble product costs as N grows.

    OMP_NUM_THREADS=1 pytest bench/bench_algos.py --benchmark-json bench/results/algos-cpu-<date>.json
    pytest bench/bench_algos.py -k "edac or sac-n"                 # the ensemble rows only

Under ``--benchmark-disable`` (CI) every case runs once as a correctness check. The CUDA rows run
where a GPU is (``-m gpu``).
"""
import time

import pytest

from bench.bench_step import DEVICES, SHAPES, random_dataset, record, rounds_for, synced
from misa_fast.agents import algorithms as algos
from misa_fast.replay.sources import DeviceSource
from misa_fast.training.backends import make_step
from misa_fast.training.runtime import tune_host_allocator

tune_host_allocator()

METHODS = ["bc", "10bc", "awac", "onestep", "iql", "td3bc", "cql", "misa", "sac-n", "edac", "rebrac"]
ENSEMBLE_SIZES = [10, 50]
DATASET = "hopper-medium-v2"


def make_method_step(algo: str, device: str, **overrides):
    """(the eager step of ``algo`` on a random hopper-shaped dataset, seconds its first call took)."""
    obs_dim, act_dim = SHAPES["hopper"]
    cfg = algos.build_config(algo, "locomotion", DATASET, obs_dim=obs_dim, act_dim=act_dim, device=device,
                             **overrides)
    agent = algos.make_agent(cfg)
    data = random_dataset(obs_dim, act_dim)
    if getattr(cfg, "reads_next_actions", False):
        data["next_actions"] = data["actions"][::-1].copy()
    source = DeviceSource(data, cfg.batch_size, seed=0, device=device)
    start = time.perf_counter()
    step = make_step(agent, source, "eager")
    step()
    return step, time.perf_counter() - start, cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", [a for a in METHODS if a in algos.ALGORITHMS])
def test_method_step(benchmark, device, algo):
    step, first, cfg = make_method_step(algo, device)
    benchmark.group = f"algos-{device}-hopper"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, "eager", first, shape="hopper", algo=algo, batch_size=cfg.batch_size,
           critics=getattr(cfg, "num_critics", None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critics", ENSEMBLE_SIZES, ids=[f"N{n}" for n in ENSEMBLE_SIZES])
@pytest.mark.parametrize("algo", [a for a in ("sac-n", "edac") if a in algos.ALGORITHMS])
def test_ensemble_step(benchmark, device, algo, critics):
    step, first, cfg = make_method_step(algo, device, num_critics=critics)
    benchmark.group = f"ensemble-{device}-{algo}"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, "eager", first, shape="hopper", algo=algo, critics=critics)
