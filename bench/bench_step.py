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


# Backends (misa_fast.backends): the full step including batch sampling from the device-resident
# dataset. Compiling the faithful K=50 chain takes minutes on a 2-core CPU (the chain is unrolled),
# so the CPU compiled case uses K=5; CUDA runs every backend at the reference K=50.
BACKEND_CASES = [
    pytest.param("cpu", "eager", 5, id="cpu-eager-K5"),
    pytest.param("cpu", "compiled", 5, id="cpu-compiled-K5"),
    pytest.param("cpu", "eager", 50, id="cpu-eager-K50"),
    *[pytest.param("cuda", backend, 50, id=f"cuda-{backend}-K50", marks=pytest.mark.gpu)
      for backend in ("eager", "compiled", "graph")],
]


@pytest.mark.parametrize("mode", ["faithful", "parallel"])
@pytest.mark.parametrize("device, backend, k", BACKEND_CASES)
def test_backend_step(benchmark, device, backend, k, mode):
    from bench.launch_counts import hopper_like_data
    from misa_fast.backends import make_step
    from misa_fast.samplers import DeviceSource

    if device == "cpu" and mode == "parallel" and k == 50:
        pytest.skip("parallel chains at K=50 on CPU: see test_update_step")
    agent, _ = make_agent("hopper", device, hmc_mode=mode, num_samples=k)
    step = make_step(agent, DeviceSource(hopper_like_data(), agent.config.batch_size, 0, device), backend)

    def timed():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    timed()  # compile / capture
    benchmark.group = f"backend-{device}-{mode}-K{k}"
    benchmark.extra_info["backend"] = backend
    benchmark.pedantic(timed, rounds=5 if device == "cpu" else 50, iterations=1, warmup_rounds=1)
    record(benchmark, device)
