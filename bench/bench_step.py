"""Per-step latency of the MISA update (batch already sampled), across HMC modes, K, burn-in,
shapes and devices. The reference configuration is B=256, K=50, 2x256 MLPs.

    pytest bench/bench_step.py --benchmark-columns=median,iqr,ops --benchmark-json bench/results/step-<device>-<date>.json
    pytest bench/bench_step.py -k "hopper and K50"          # the headline rows only

Each case records steps/s and the time 1M steps would take in ``extra_info``.
"""
import pytest
import torch

from misa_fast.agents import MISA
from misa_fast.config import preset
from misa_fast.runtime import tune_host_allocator

tune_host_allocator()  # as the trainer does

SHAPES = {"hopper": (11, 3), "halfcheetah": (17, 6)}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# (hmc_mode, K, burn_in): every mode at the reference K=50, the paper's smaller K, and burn-in 1.
CASES = [
    ("faithful", 50, 5), ("adaptive", 50, 5), ("parallel", 50, 5),
    ("faithful", 20, 5), ("faithful", 5, 5), ("parallel", 20, 5), ("parallel", 5, 5),
    ("faithful", 50, 1), ("parallel", 50, 1),
]


def random_batch(obs_dim, act_dim, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "observations": torch.randn(batch_size, obs_dim, generator=g),
        "actions": torch.rand(batch_size, act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(batch_size, generator=g),
        "next_observations": torch.randn(batch_size, obs_dim, generator=g),
        "terminals": (torch.rand(batch_size, generator=g) < 0.01).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def make_agent(shape, device, **overrides):
    obs_dim, act_dim = SHAPES[shape]
    cfg = preset("locomotion").replace(obs_dim=obs_dim, act_dim=act_dim, device=device, **overrides)
    return MISA(cfg), random_batch(obs_dim, act_dim, cfg.batch_size, device)


def timed_update(agent, batch, device):
    def step():
        agent.update(batch)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def record(benchmark, device):
    stats = benchmark.stats.stats if benchmark.stats else None
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if stats is not None and stats.median > 0:
        benchmark.extra_info["steps_per_s"] = 1.0 / stats.median
        benchmark.extra_info["hours_per_1M_steps"] = stats.median * 1e6 / 3600


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode, k, burn_in", CASES, ids=[f"{m}-K{k}-BI{b}" for m, k, b in CASES])
def test_update_step(benchmark, device, shape, mode, k, burn_in):
    agent, batch = make_agent(shape, device, hmc_mode=mode, num_samples=k, hmc_burn_in=burn_in)
    step = timed_update(agent, batch, device)
    step()  # warm-up (allocator, lazy init)
    benchmark.group = f"step-{device}-{shape}"
    rounds = 5 if device == "cpu" else 50
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, device)


@pytest.mark.parametrize("device", DEVICES)
def test_update_step_without_hmc(benchmark, device):
    """The same learner with the HMC correction off (MISA-biased): what the sampler costs."""
    agent, batch = make_agent("hopper", device, use_hmc=False)
    step = timed_update(agent, batch, device)
    step()
    benchmark.group = f"step-{device}-hopper"
    benchmark.pedantic(step, rounds=5 if device == "cpu" else 50, iterations=1, warmup_rounds=1)
    record(benchmark, device)
