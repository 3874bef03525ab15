"""Per-step latency of the MISA training step — one full update, batch sampling included — across
HMC modes, K, burn-in, shapes, devices and backends (misa_fast.training.backends: eager, compiled, graph).
The reference configuration is B=256, K=50, 2x256 MLPs.

    # the full suite on this machine (compiled cases compile first: ~10-40 s each on a 2-core CPU)
    OMP_NUM_THREADS=2 pytest bench/bench_step.py --benchmark-json bench/results/step-<device>-<date>.json
    pytest bench/bench_step.py -k "hopper and faithful-K50-BI5"      # the headline rows only
    pytest bench/bench_step.py -k "not compiled"                      # skip the compiles
    python -m bench.summarize bench/results/step-<device>-<date>.json    # table + PNG, speed-up over eager

Under ``--benchmark-disable`` (CI) every case runs once as a correctness check, except the compiled
ones: compiling a configuration takes 10-40 s on a 2-core CPU, so only the no-HMC hopper case
compiles there (tests/training/test_backends.py checks the compiled step against eager). ``graph`` is
CUDA only. Each case records steps/s, the time 1M steps would take and the first call's time
(compile / capture included) in ``extra_info``.
"""
import time

import numpy as np
import pytest
import torch

from misa_fast.agents import MISA
from misa_fast.agents.misa_config import preset
from misa_fast.replay.sources import DeviceSource
from misa_fast.training.backends import make_step
from misa_fast.training.runtime import tune_host_allocator

tune_host_allocator()  # as the trainer does

SHAPES = {"hopper": (11, 3), "halfcheetah": (17, 6)}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
BACKENDS = ["eager", "compiled", pytest.param("graph", marks=pytest.mark.gpu)]
# (hmc_mode, K, burn_in): every mode at the reference K=50, the paper's smaller K, and burn-in 1.
CASES = [
    ("faithful", 50, 5), ("adaptive", 50, 5), ("parallel", 50, 5),
    ("faithful", 20, 5), ("faithful", 5, 5), ("parallel", 20, 5), ("parallel", 5, 5),
    ("faithful", 50, 1), ("parallel", 50, 1),
]
DATASET_ROWS = 50_000


def random_dataset(obs_dim, act_dim, rows=DATASET_ROWS, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-0.99, 0.99, size=(rows, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=rows).astype(np.float32),
        "next_observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
        "terminals": (rng.random(rows) < 0.01).astype(np.float32),
    }


def random_batch(obs_dim, act_dim, batch_size, device, seed=0):
    """One fixed batch (for timing ``agent.update`` alone)."""
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


def make_train_step(shape, device, backend, step_options=None, **overrides):
    """(the backend's step, seconds its first call took: compile / capture / allocator warm-up)."""
    obs_dim, act_dim = SHAPES[shape]
    agent, _ = make_agent(shape, device, **overrides)
    source = DeviceSource(random_dataset(obs_dim, act_dim), agent.config.batch_size, seed=0, device=device)
    if backend == "compiled":
        torch._dynamo.reset()  # each case compiles from scratch (first_call_s; inductor's disk cache stays)
    start = time.perf_counter()
    step = make_step(agent, source, backend, **(step_options or {}))
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return step, time.perf_counter() - start


def synced(step, device):
    if device != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize()

    return run


def skip_unless_runnable(request, device, backend, cheap):
    if backend == "graph" and device != "cuda":
        pytest.skip("the graph backend is CUDA only")
    if backend == "compiled" and device == "cpu" and not cheap and request.config.getoption("benchmark_disable"):
        pytest.skip("compiled CPU cases compile for 10-40 s each: under --benchmark-disable only the no-HMC one runs "
                    "(run the suite with benchmarks enabled for all of them)")


def record(benchmark, device, backend, first_call_s, **params):
    stats = benchmark.stats.stats if benchmark.stats else None
    benchmark.extra_info.update(params, backend=backend, threads=torch.get_num_threads(),
                                first_call_s=first_call_s,
                                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    if stats is not None and stats.median > 0:
        benchmark.extra_info["steps_per_s"] = 1.0 / stats.median
        benchmark.extra_info["hours_per_1M_steps"] = stats.median * 1e6 / 3600


def rounds_for(device):
    return 10 if device == "cpu" else 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode, k, burn_in", CASES, ids=[f"{m}-K{k}-BI{b}" for m, k, b in CASES])
def test_train_step(benchmark, request, backend, device, shape, mode, k, burn_in):
    skip_unless_runnable(request, device, backend, cheap=False)
    step, first = make_train_step(shape, device, backend, hmc_mode=mode, num_samples=k, hmc_burn_in=burn_in)
    benchmark.group = f"step-{device}-{shape}"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, backend, first, shape=shape, hmc_mode=mode, num_samples=k, burn_in=burn_in)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["faithful", "adaptive"], ids=["pre_tanh-K50-BI5", "pre_tanh-adaptive-K50-BI5"])
def test_train_step_pre_tanh(benchmark, request, backend, device, shape, mode):
    """The pre-tanh sampler (hmc_space=pre_tanh) at the reference case: its cost beside the rows
    above (same chain length; a rotation and a tanh per leapfrog step instead of an atanh)."""
    skip_unless_runnable(request, device, backend, cheap=False)
    step, first = make_train_step(shape, device, backend, hmc_mode=mode, hmc_space="pre_tanh", num_samples=50,
                                  hmc_burn_in=5)
    benchmark.group = f"step-{device}-{shape}"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, backend, first, shape=shape, hmc_mode=mode, hmc_space="pre_tanh", num_samples=50,
           burn_in=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_without_hmc(benchmark, request, backend, device):
    """The same learner with the HMC correction off (MISA-biased): what the sampler costs."""
    skip_unless_runnable(request, device, backend, cheap=True)
    step, first = make_train_step("hopper", device, backend, use_hmc=False)
    benchmark.group = f"step-{device}-hopper"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, backend, first, shape="hopper", hmc_mode="off", num_samples=50, burn_in=0)


# The eq. 15 estimators side by side (unbiased_estimator): the paper's HMC, post-tanh (faithful, the
# official sampler) and pre-tanh, and SNIS over the log-partition's K samples (no chain), at K=10 and 50.
ESTIMATORS = {
    "hmc-faithful": {"unbiased_estimator": "hmc", "hmc_mode": "faithful", "hmc_space": "post_tanh"},
    "hmc-pre_tanh": {"unbiased_estimator": "hmc", "hmc_mode": "faithful", "hmc_space": "pre_tanh"},
    "snis": {"unbiased_estimator": "snis"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [10, 50], ids=["K10", "K50"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_train_step_estimator(benchmark, request, backend, device, estimator, k):
    """One update of the hopper-shaped learner per eq. 15 estimator (burn-in 5 for the HMC rows):
    what the chain costs against SNIS, which reuses the critic's K samples and Q values.

        OMP_NUM_THREADS=2 pytest bench/bench_step.py -k estimator \\
            --benchmark-json bench/results/step-estimators-<device>-<date>.json
    """
    skip_unless_runnable(request, device, backend, cheap=False)
    overrides = dict(ESTIMATORS[estimator], num_samples=k, hmc_burn_in=5)
    step, first = make_train_step("hopper", device, backend, **overrides)
    benchmark.group = f"estimators-{device}-hopper"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, backend, first, shape="hopper", estimator=estimator, num_samples=k,
           burn_in=5 if estimator != "snis" else 0, **{key: v for key, v in overrides.items() if key != "num_samples"})


@pytest.mark.parametrize("backend", ["compiled-unrolled"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["hopper"])
@pytest.mark.parametrize("mode, k, burn_in", [("faithful", 50, 5)], ids=["faithful-K50-BI5"])
def test_train_step_with_the_chain_unrolled(benchmark, request, backend, device, shape, mode, k, burn_in):
    """The reference case with the HMC chain unrolled into the compiled loss graph (hmc_piece=0)
    instead of compiled pieces of 5 transitions: minutes of compiling on a CPU, for how much? The
    report sets it beside the eager and compiled rows of the same case from the same run."""
    skip_unless_runnable(request, device, "compiled", cheap=False)
    step, first = make_train_step(shape, device, "compiled", step_options={"hmc_piece": 0}, hmc_mode=mode,
                                  num_samples=k, hmc_burn_in=burn_in)
    benchmark.group = f"step-{device}-{shape}"
    benchmark.pedantic(synced(step, device), rounds=rounds_for(device), iterations=1, warmup_rounds=1)
    record(benchmark, device, backend, first, shape=shape, hmc_mode=mode, num_samples=k, burn_in=burn_in)


# fp32 products in fp32 ("highest") or, on a CPU, in bfloat16 with fp32 accumulation ("medium",
# oneDNN; AVX-512 BF16 / AMX): the faithful reference case and SNIS at K=10 and 50, eager and compiled.
PRECISION_CASES = {"faithful-K50-BI5": {"hmc_mode": "faithful", "num_samples": 50, "hmc_burn_in": 5},
                   "faithful-K10-BI5": {"hmc_mode": "faithful", "num_samples": 10, "hmc_burn_in": 5},
                   "snis-K50": {"unbiased_estimator": "snis", "num_samples": 50},
                   "snis-K10": {"unbiased_estimator": "snis", "num_samples": 10}}


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("precision", ["highest", "medium"])
@pytest.mark.parametrize("case", list(PRECISION_CASES))
def test_train_step_cpu_precision(benchmark, request, backend, precision, case):
    """One hopper-shaped update on the CPU at each matmul precision (misa-fast train
    --matmul-precision), side by side in one run:

        OMP_NUM_THREADS=1 pytest bench/bench_step.py -k cpu_precision \\
            --benchmark-json bench/results/step-precision-cpu-<date>.json
    """
    from misa_fast.training.runtime import matmul_precision

    if request.config.getoption("benchmark_disable") and (backend == "compiled" or case != "snis-K10"):
        pytest.skip("under --benchmark-disable one cheap eager case per precision runs (compiles take 10-40 s)")
    with matmul_precision(precision):
        step, first = make_train_step("hopper", "cpu", backend, **PRECISION_CASES[case])
        benchmark.group = f"precision-cpu-hopper-{case}"
        benchmark.pedantic(step, rounds=rounds_for("cpu"), iterations=1, warmup_rounds=1)
    record(benchmark, "cpu", backend, first, shape="hopper", case=case, matmul_precision=precision,
           **PRECISION_CASES[case])
