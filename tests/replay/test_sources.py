"""Batch sources of several seeds trained together: one copy of the data, each seed's own index
stream (the batches and saved states of that seed's single run)."""
import numpy as np
import pytest
import torch


def _arrays(rows=500, obs_dim=3, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(rows, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=rows).astype(np.float32),
            "next_observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
            "terminals": (rng.random(rows) < 0.1).astype(np.float32)}


@pytest.mark.parametrize("kind", ["prefetch", "device"])
def test_member_streams_hand_each_seed_its_single_run_batches(kind):
    from misa_fast.replay.sources import make_member_streams, make_source

    data, seeds = _arrays(), [0, 3, 7]
    streams = make_member_streams(kind, data, 16, seeds, "cpu")
    singles = [make_source(kind, data, 16, s, "cpu") for s in seeds]
    try:
        for _ in range(4):
            together = {f: t.clone() for f, t in next(streams).items()}
            for m, single in enumerate(singles):
                alone = next(single)
                for f in together:
                    assert torch.equal(together[f][m], alone[f]), (kind, m, f)
        # Each member's saved sampler state is its single run's: a single run resumes from it.
        for m, (seed, single) in enumerate(zip(seeds, singles)):
            state = streams.member(m).state_dict()
            resumed = make_source(kind, data, 16, seed, "cpu", state=state)
            expected = next(single)
            got = next(resumed)
            for f in got:
                assert torch.equal(got[f], expected[f])
            resumed.close()
    finally:
        for single in singles:
            single.close()


def test_member_streams_draw_every_stream_in_one_call():
    from misa_fast.replay.buffer import ReplayBuffer

    data = _arrays()
    buffer = ReplayBuffer.from_arrays(data, seed=5)
    states = np.stack([ReplayBuffer.seed_state(s) for s in (1, 2)])
    out = {f: np.empty((2, 8) + ((data[f].shape[1],) if data[f].ndim == 2 else ()), np.float32) for f in data}
    own = buffer.state_dict(include_data=False)["rng_state"].copy()
    buffer.sample_streams_into(states, out)
    for m, seed in enumerate((1, 2)):
        alone = ReplayBuffer.from_arrays(data, seed=seed).sample(8)
        np.testing.assert_array_equal(out["observations"][m], alone["observations"])
        np.testing.assert_array_equal(out["rewards"][m], alone["rewards"])
    np.testing.assert_array_equal(buffer.state_dict(include_data=False)["rng_state"], own)
    with pytest.raises(ValueError, match=r"states: expected an \(M, 4\) uint64 array"):
        buffer.sample_streams_into(states.astype(np.int64), out)


def test_member_streams_keep_replays_the_last_batch_for_the_members_left():
    from misa_fast.replay.sources import make_member_streams

    streams = make_member_streams("prefetch", _arrays(), 8, [0, 3, 7], "cpu")
    last = {f: t.clone() for f, t in next(streams).items()}
    kept = streams.keep([0, 2])
    again = next(kept)
    assert torch.equal(again["observations"], last["observations"][[0, 2]])
    after = next(kept)  # then the streams go on
    assert not torch.equal(after["observations"], again["observations"])
