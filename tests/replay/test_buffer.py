"""ReplayBuffer and Prefetcher: stored rows, sampling law, determinism, validation, persistence."""
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from misa_fast import ReplayBuffer
from misa_fast.replay.buffer import FIELDS

OBS, ACT = 4, 2


def make_rows(n, start=0):
    """Transition i carries its id in every field, so a sampled row reveals which transition it
    came from and whether its five fields belong together."""
    ids = np.arange(start, start + n, dtype=np.float32)
    return {
        "observations": np.repeat(ids[:, None], OBS, axis=1),
        "actions": -np.repeat(ids[:, None], ACT, axis=1),
        "rewards": 2 * ids,
        "next_observations": np.repeat(ids[:, None], OBS, axis=1) + 0.5,
        "terminals": (np.arange(start, start + n) % 2).astype(np.float32),
    }


def row_ids(batch):
    """The transition ids of a batch, after checking every row is one transition."""
    obs = np.asarray(batch["observations"])
    ids = obs[:, 0]
    np.testing.assert_array_equal(obs, np.repeat(ids[:, None], OBS, axis=1))
    np.testing.assert_array_equal(np.asarray(batch["actions"]), -np.repeat(ids[:, None], ACT, axis=1))
    np.testing.assert_array_equal(np.asarray(batch["rewards"]), 2 * ids)
    np.testing.assert_array_equal(np.asarray(batch["next_observations"]), obs + 0.5)
    np.testing.assert_array_equal(np.asarray(batch["terminals"]), ids.astype(np.int64) % 2)
    return ids.astype(np.int64)


def filled(n=100, capacity=None, seed=0):
    buf = ReplayBuffer(capacity or n, OBS, ACT, seed=seed)
    buf.add(**make_rows(n))
    return buf


def test_sampled_rows_are_whole_transitions_from_the_buffer():
    buf = filled(60, capacity=100)
    batch = buf.sample(1000)
    assert set(batch) == set(FIELDS)
    assert batch["observations"].shape == (1000, OBS) and batch["rewards"].shape == (1000,)
    assert all(a.dtype == np.float32 for a in batch.values())
    ids = row_ids(batch)
    assert ids.min() >= 0 and ids.max() < 60
    assert len(np.unique(ids)) == 60  # 1000 draws from 60 rows: P(missing one) ~ 1e-5


def test_sampling_is_uniform_chi_square():
    n, draws = 40, 40_000
    buf = filled(n, seed=123)
    counts = np.bincount(row_ids(buf.sample(draws)), minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_same_seed_same_batches_different_seed_different():
    a, b, c = filled(seed=5), filled(seed=5), filled(seed=6)
    for _ in range(3):
        ia, ib, ic = (row_ids(x.sample(64)) for x in (a, b, c))
        np.testing.assert_array_equal(ia, ib)
        assert not np.array_equal(ia, ic)


def test_ring_overwrites_oldest_first():
    buf = ReplayBuffer(10, OBS, ACT)
    buf.add(**make_rows(7))
    buf.add(**make_rows(7, start=100))
    assert len(buf) == 10 and buf.position == 4
    assert set(row_ids(buf.sample(3000))) == {4, 5, 6, 100, 101, 102, 103, 104, 105, 106}
    stored = row_ids(buf.storage())
    np.testing.assert_array_equal(stored, [103, 104, 105, 106, 4, 5, 6, 100, 101, 102])


def test_single_add_larger_than_capacity_keeps_its_last_rows():
    buf = ReplayBuffer(4, OBS, ACT)
    buf.add(**make_rows(10, start=50))
    assert len(buf) == 4
    assert set(row_ids(buf.storage())) == {56, 57, 58, 59}


def test_add_converts_safe_dtypes_and_accepts_column_vectors():
    buf = ReplayBuffer(8, OBS, ACT)
    rows = make_rows(3)
    buf.add(rows["observations"].astype(np.float64), rows["actions"].astype(np.int32),
            rows["rewards"][:, None], rows["next_observations"], rows["terminals"].astype(bool))
    row_ids(buf.storage())
    buf.add(**{k: torch.from_numpy(v) for k, v in make_rows(2, start=3).items()})  # CPU tensors too
    np.testing.assert_array_equal(row_ids(buf.storage()), [0, 1, 2, 3, 4])


def _bad(field, value):
    rows = make_rows(5)
    rows[field] = value
    return rows


@pytest.mark.parametrize(
    "rows, match",
    [
        (_bad("observations", np.zeros(5, np.float32)), r"observations: expected shape \(N, 4\), got \(5,\)"),
        (_bad("observations", np.zeros((5, 3), np.float32)), r"observations: expected shape \(N, 4\), got \(5, 3\)"),
        (_bad("actions", np.zeros((5, 3), np.float32)), r"actions: expected shape \(5, 2\), got \(5, 3\)"),
        (_bad("actions", np.zeros((4, 2), np.float32)), r"actions: expected 5 rows to match observations, got 4"),
        (_bad("rewards", np.zeros((5, 2), np.float32)), r"rewards: expected shape \(5,\) or \(N, 1\), got \(5, 2\)"),
        (_bad("next_observations", np.zeros((6, 4), np.float32)), r"next_observations: expected 5 rows"),
        (_bad("terminals", np.zeros((5, 1, 1))), r"terminals: expected shape \(5,\)"),
        (_bad("rewards", np.array(["a"] * 5)), r"rewards: expected a real numeric array .* got dtype <U1"),
        (_bad("actions", np.zeros((5, 2), np.complex64)), r"actions: .*got dtype complex64"),
        (_bad("rewards", np.array([0, 1, np.nan, 0, 0], np.float32)),
         r"rewards: expected finite values, got .*nan.* at row 2"),
        (_bad("observations", np.full((5, 4), np.inf)), r"observations: expected finite values, got .*inf.* at row 0"),
        (_bad("terminals", np.array([0, 0, 0.5, 0, 0])), r"terminals: expected values in \{0, 1\}, got 0.5 at row 2"),
    ],
)
def test_add_rejects_bad_fields_by_name(rows, match):
    buf = ReplayBuffer(10, OBS, ACT)
    with pytest.raises(ValueError, match=match):
        buf.add(**rows)
    assert len(buf) == 0  # nothing partial was written


@pytest.mark.parametrize("args, match", [((0, 4, 2), "capacity"), ((10, 0, 2), "obs_dim"), ((10, 4, -1), "act_dim")])
def test_constructor_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        ReplayBuffer(*args)


def test_empty_buffer_and_bad_batch_size():
    buf = ReplayBuffer(10, OBS, ACT)
    with pytest.raises(ValueError, match="empty ReplayBuffer"):
        buf.sample(4)
    with pytest.raises(ValueError, match="empty ReplayBuffer"):
        buf.prefetcher(4)
    buf.add(**make_rows(3))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            buf.sample(bad)


def test_sample_into_fills_caller_memory_without_reallocating():
    buf = filled(50, seed=1)
    twin = filled(50, seed=1)
    out = {f: torch.empty(t.shape) for f, t in ((f, torch.from_numpy(a)) for f, a in buf.empty_batch(32).items())}
    pointers = {f: t.data_ptr() for f, t in out.items()}
    buf.sample_into(out)
    assert {f: t.data_ptr() for f, t in out.items()} == pointers
    np.testing.assert_array_equal(row_ids({f: t.numpy() for f, t in out.items()}), row_ids(twin.sample(32)))
    with pytest.raises(ValueError, match="actions: expected shape"):
        buf.sample_into({**out, "actions": torch.empty(32, 3)})
    with pytest.raises(TypeError, match="rewards: expected a float32 array"):
        buf.sample_into({**out, "rewards": torch.empty(32, dtype=torch.float64)})


def test_storage_is_zero_copy():
    buf = filled(20)
    view = buf.storage()["rewards"]
    assert np.shares_memory(view, buf.storage()["rewards"])
    tensor = torch.from_numpy(buf.storage()["observations"])  # torch wraps it without a copy
    tensor[3] = 1000.0
    assert buf.gather([3])["observations"][0, 0] == 1000.0
    assert view.base is not None  # a view, kept alive by the buffer


def test_gather_returns_requested_rows_and_checks_range():
    buf = filled(30)
    np.testing.assert_array_equal(row_ids(buf.gather([5, 0, 29, 5])), [5, 0, 29, 5])
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 30\)"):
        buf.gather([30])


def test_prefetcher_yields_the_same_batches_as_direct_sampling():
    buf, twin = filled(500, seed=9), filled(500, seed=9)
    with buf.prefetcher(32, depth=3) as batches:
        for _ in range(10):
            batch = next(batches)
            assert isinstance(batch["observations"], torch.Tensor)
            np.testing.assert_array_equal(row_ids({f: t.numpy() for f, t in batch.items()}), row_ids(twin.sample(32)))
    assert batches.closed


def test_prefetcher_close_is_idempotent_and_stops_iteration():
    pf = filled(50).prefetcher(8)
    next(pf)
    pf.close()
    pf.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(pf)


def test_unclosed_prefetcher_does_not_hang_interpreter_exit():
    code = (
        "import numpy as np\n"
        "from misa_fast import ReplayBuffer\n"
        "b = ReplayBuffer(100, 3, 1)\n"
        "b.add(np.zeros((100, 3)), np.zeros((100, 1)), np.zeros(100), np.zeros((100, 3)), np.zeros(100))\n"
        "p = b.prefetcher(16, depth=2)\n"
        "next(p)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_concurrent_add_while_prefetching_keeps_rows_whole():
    buf = ReplayBuffer(256, OBS, ACT, seed=2)
    buf.add(**make_rows(64))

    def writer():
        for k in range(300):
            buf.add(**make_rows(8, start=1000 + 8 * k))

    thread = threading.Thread(target=writer)
    depth = 4
    with buf.prefetcher(16, depth=depth) as batches:
        thread.start()
        consumed = 0
        while thread.is_alive() or consumed < 50:  # every batch drawn during the adds is whole
            row_ids({f: t.numpy() for f, t in next(batches).items()})
            consumed += 1
        thread.join()
        # The writer's 2,400 rows have replaced all 64 originals: once the batches drawn ahead are
        # used up, every batch holds only new rows.
        for _ in range(depth + 1):
            ids = row_ids({f: t.numpy() for f, t in next(batches).items()})
    assert len(buf) == 256
    assert ids.min() >= 1000 + 8 * 300 - 256


def test_state_dict_round_trip_with_data_continues_the_same_sequence():
    buf = ReplayBuffer(50, OBS, ACT, seed=4)
    buf.add(**make_rows(70))  # wrapped: position != size
    buf.sample(10)
    state = buf.state_dict()
    expected = [row_ids(buf.sample(16)) for _ in range(3)]

    restored = ReplayBuffer(50, OBS, ACT, seed=999)
    restored.load_state_dict(state)
    assert (len(restored), restored.position) == (50, 20)
    np.testing.assert_array_equal(row_ids(restored.storage()), row_ids(buf.storage()))
    for exp in expected:
        np.testing.assert_array_equal(row_ids(restored.sample(16)), exp)


def test_state_dict_without_data_requires_same_contents():
    buf = filled(40, seed=8)
    state = buf.state_dict(include_data=False)
    assert "data" not in state
    expected = row_ids(buf.sample(16))
    fresh = ReplayBuffer(40, OBS, ACT)
    with pytest.raises(ValueError, match="add the same transitions"):
        fresh.load_state_dict(state)
    fresh.add(**make_rows(40))
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(row_ids(fresh.sample(16)), expected)
    with pytest.raises(ValueError, match="obs_dim: checkpoint has 4"):
        ReplayBuffer(40, 5, ACT).load_state_dict(state)


def test_prefetcher_state_dict_resumes_at_the_consumed_batch():
    """Batches drawn ahead but not consumed are drawn again after a resume."""
    uninterrupted = filled(300, seed=21)
    with uninterrupted.prefetcher(8, depth=4) as batches:
        reference = [row_ids({f: t.numpy() for f, t in next(batches).items()}) for _ in range(10)]

    first = filled(300, seed=21)
    with first.prefetcher(8, depth=4) as batches:
        for _ in range(4):
            next(batches)
        state = batches.state_dict()
    resumed = filled(300, seed=0)
    resumed.load_state_dict(state)
    with resumed.prefetcher(8, depth=4) as batches:
        for exp in reference[4:]:
            np.testing.assert_array_equal(row_ids({f: t.numpy() for f, t in next(batches).items()}), exp)


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 20), adds=st.lists(st.integers(0, 25), min_size=1, max_size=8),
       seed=st.integers(0, 2**32))
def test_property_storage_matches_a_python_ring_model(capacity, adds, seed):
    buf = ReplayBuffer(capacity, OBS, ACT, seed=seed)
    model, next_id = [], 0
    for n in adds:
        buf.add(**make_rows(n, start=next_id))
        model.extend(range(next_id, next_id + n))
        next_id += n
    live = model[-capacity:]
    assert len(buf) == len(live)
    if live:
        # Ring order: position points at the oldest row once full.
        stored = row_ids(buf.storage())
        np.testing.assert_array_equal(np.roll(stored, -buf.position if len(buf) == capacity else 0), live)
        assert set(row_ids(buf.sample(64))) <= set(live)
