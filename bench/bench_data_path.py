"""Per-batch latency of the two data paths (misa_fast.replay.sources): the dataset resident on the device
with on-device index sampling (``DeviceSource``: one randint + one index_select) and the C++
prefetcher (``PrefetchSource``: a worker thread gathers batches ahead into a ring of slots; on CUDA
the slots are pinned and each batch is copied with ``non_blocking=True``).

    pytest bench/bench_data_path.py --benchmark-json bench/results/data-<device>-<date>.json
    python -m bench.summarize bench/results/data-<device>-<date>.json

B=256 from a 1M-row dataset (the size of the D4RL locomotion datasets), hopper and halfcheetah
widths. A call is ``next(source)`` in a tight loop, so the prefetcher's figure is the larger of its
hand-over cost and its worker's gather rate; inside training the worker overlaps the step. On CUDA
each call ends with a synchronize, so it is the latency until the batch is usable on the device.
"""
import numpy as np
import pytest
import torch

from misa_fast.replay.sources import DeviceSource, PrefetchSource

SHAPES = {"hopper": (11, 3), "halfcheetah": (17, 6)}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
SOURCES = {"device": DeviceSource, "prefetch": PrefetchSource}
ROWS, BATCH = 1_000_000, 256


def dataset(obs_dim, act_dim, rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((rows, obs_dim), dtype=np.float32),
        "actions": rng.uniform(-0.99, 0.99, size=(rows, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(rows, dtype=np.float32),
        "next_observations": rng.standard_normal((rows, obs_dim), dtype=np.float32),
        "terminals": (rng.random(rows) < 0.01).astype(np.float32),
    }


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped_data(request):
    return request.param, dataset(*SHAPES[request.param])


@pytest.mark.parametrize("kind", list(SOURCES))
@pytest.mark.parametrize("device", DEVICES)
def test_next_batch(benchmark, shaped_data, device, kind):
    shape, data = shaped_data
    source = SOURCES[kind](data, BATCH, seed=0, device=device)
    try:
        if device == "cuda":
            def fetch():
                batch = next(source)
                torch.cuda.synchronize()
                return batch
        else:
            def fetch():
                return next(source)

        first = fetch()
        assert first["observations"].shape == (BATCH, SHAPES[shape][0])
        assert first["rewards"].shape == (BATCH,)
        benchmark.group = f"data-{device}-{shape}"
        benchmark.extra_info.update(source=kind, shape=shape, batch_size=BATCH, rows=ROWS,
                                    device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    threads=torch.get_num_threads())
        benchmark(fetch)
    finally:
        source.close()
