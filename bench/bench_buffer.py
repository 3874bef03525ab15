"""Replay-buffer micro-benchmarks: drawing B=256 transitions from 1M, hopper (11/3) and
halfcheetah (17/6) shapes, against numpy fancy indexing and torch indexing of the same arrays.

    pytest bench/bench_buffer.py --benchmark-columns=median,iqr,ops --benchmark-sort=name
"""
import time

import numpy as np
import pytest
import torch

from misa_fast import ReplayBuffer
from misa_fast.replay.buffer import FIELDS

N, BATCH = 1_000_000, 256
SHAPES = {"hopper": (11, 3), "halfcheetah": (17, 6)}


def random_dataset(obs_dim, act_dim, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((n, obs_dim), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(n, dtype=np.float32),
        "next_observations": rng.standard_normal((n, obs_dim), dtype=np.float32),
        "terminals": (rng.random(n) < 0.01).astype(np.float32),
    }


@pytest.fixture(scope="module", params=list(SHAPES))
def dataset(request):
    obs_dim, act_dim = SHAPES[request.param]
    return request.param, random_dataset(obs_dim, act_dim)


@pytest.fixture(scope="module")
def buffer(dataset):
    _, data = dataset
    return ReplayBuffer.from_arrays(data, seed=0)


def test_add_1m_transitions(benchmark, dataset):
    name, data = dataset
    benchmark.group = f"add-1M-{name}"

    def load():
        ReplayBuffer.from_arrays(data)

    benchmark.pedantic(load, rounds=3, iterations=1)


def test_sample(benchmark, dataset, buffer):
    benchmark.group = f"sample-B256-{dataset[0]}"
    batch = benchmark(buffer.sample, BATCH)
    assert batch["observations"].shape[0] == BATCH


def test_sample_into(benchmark, dataset, buffer):
    benchmark.group = f"sample-B256-{dataset[0]}"
    out = {f: torch.from_numpy(a) for f, a in buffer.empty_batch(BATCH).items()}
    benchmark(buffer.sample_into, out)


def test_prefetcher_consumer(benchmark, dataset, buffer):
    """What a training step pays for its batch when the worker keeps up: the untimed setup stands
    in for the step's own work (a MISA step takes milliseconds), giving the worker time to refill."""
    benchmark.group = f"sample-B256-{dataset[0]}"
    with buffer.prefetcher(BATCH, depth=4) as batches:
        next(batches)
        benchmark.pedantic(batches.__next__, setup=lambda: time.sleep(200e-6), rounds=2000, iterations=1)


def test_numpy_fancy_indexing(benchmark, dataset):
    name, data = dataset
    benchmark.group = f"sample-B256-{name}"
    rng = np.random.default_rng(0)

    def draw():
        idx = rng.integers(0, N, BATCH)
        return {f: data[f][idx] for f in FIELDS}

    benchmark(draw)


def test_torch_indexing(benchmark, dataset):
    name, data = dataset
    benchmark.group = f"sample-B256-{name}"
    tensors = {f: torch.from_numpy(a) for f, a in data.items()}
    gen = torch.Generator().manual_seed(0)

    def draw():
        idx = torch.randint(0, N, (BATCH,), generator=gen)
        return {f: t.index_select(0, idx) for f, t in tensors.items()}

    benchmark(draw)
