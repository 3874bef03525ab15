"""What an algorithm may ask of the data: IQL's reward transforms, 10%BC's best episodes, ReBRAC's
next actions, each checked against a computation by hand on a small dataset with known episodes."""
import numpy as np
import pytest
import torch

from misa_fast.data import transforms
from misa_fast.data.raw import qlearning_dataset
from misa_fast.replay.sources import make_member_streams, make_source


def raw_episodes(lengths, seed=0, ends_in_terminal=()):
    """A raw D4RL-style dataset: episodes of the given lengths (the last row of each flagged as a
    timeout, or as a terminal for the indices in ``ends_in_terminal``)."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    end = np.cumsum(lengths) - 1
    for i, row in enumerate(end):
        (terminals if i in ends_in_terminal else timeouts)[row] = True
    return {"observations": rng.normal(size=(n, 3)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32), "terminals": terminals, "timeouts": timeouts}


def test_episode_numbers_and_next_actions_follow_the_rows():
    raw = raw_episodes([4, 3, 5], ends_in_terminal=(1,))
    data = qlearning_dataset(raw, with_episodes=True, with_next_actions=True)
    # D4RL layout: timeout rows dropped (rows 3 and 11), the terminal row 6 kept, the last row dropped.
    rows = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(data["observations"], raw["observations"][rows])
    np.testing.assert_array_equal(data["episodes"], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    expected_next = [raw["actions"][r + 1] if r != 6 else raw["actions"][6] for r in rows]
    np.testing.assert_array_equal(data["next_actions"], np.stack(expected_next))
    plain = qlearning_dataset(raw)
    assert set(plain) == {"observations", "actions", "next_observations", "rewards", "terminals"}


def test_iql_locomotion_rewards_spread_returns_over_an_episode_length():
    rewards = np.array([1.0, 2.0, 3.0, -1.0, 0.5, 4.0], np.float32)
    episodes = np.array([0, 0, 1, 1, 2, 2])
    returns = [3.0, 2.0, 4.5]
    scaled, params = transforms.transform_rewards(rewards, "iql-locomotion", episodes)
    scale = 1000.0 / (max(returns) - min(returns))
    assert params["scale"] == pytest.approx(scale)
    np.testing.assert_allclose(scaled, rewards * scale, rtol=1e-6)
    # One online reward goes through the same transform with the recorded parameters.
    online = transforms.transform_reward(np.float32(2.0), "iql-locomotion", params)
    assert online == pytest.approx(2.0 * scale, rel=1e-6)
    with pytest.raises(ValueError, match="episode"):
        transforms.transform_rewards(rewards, "iql-locomotion")


def test_iql_antmaze_rewards_are_zero_at_the_goal_and_minus_one_elsewhere():
    shifted, params = transforms.transform_rewards(np.array([0.0, 1.0, 0.0], np.float32), "iql-antmaze")
    np.testing.assert_array_equal(shifted, [-1.0, 0.0, -1.0])
    assert params == {}


@pytest.mark.parametrize("fraction, kept", [(0.1, [2]), (0.5, [2]), (0.67, [2, 0]), (1.0, [0, 1, 2])])
def test_best_episodes_are_kept_by_return(fraction, kept):
    rewards = np.array([1.0, 1.0, -5.0, 0.0, 3.0, 2.0], np.float32)  # returns 2, -5, 5
    episodes = np.array([0, 0, 1, 1, 2, 2])
    data = {"rewards": rewards, "observations": np.arange(6, dtype=np.float32)[:, None]}
    best = transforms.keep_best_episodes(data, episodes, fraction, discount=1.0)
    rows = np.isin(episodes, kept)
    np.testing.assert_array_equal(best["rewards"], rewards[rows])
    np.testing.assert_array_equal(best["observations"], data["observations"][rows])


def test_best_episodes_rank_by_discounted_return():
    # undiscounted both episodes return 10; at 0.5 the early reward is worth more: 10 against 2.5 + ...
    rewards = np.array([10.0, 0.0, 0.0, 0.0, 0.0, 10.0], np.float32)
    episodes = np.array([0, 0, 0, 1, 1, 1])
    best = transforms.keep_best_episodes({"rewards": rewards}, episodes, 0.5, discount=0.5)
    np.testing.assert_array_equal(best["rewards"], rewards[:3])
    best = transforms.keep_best_episodes({"rewards": rewards[::-1].copy()}, episodes, 0.5, discount=0.5)
    np.testing.assert_array_equal(best["rewards"], [10.0, 0.0, 0.0])


def test_prepare_applies_an_algorithms_data_options():
    from misa_fast.data import prepare

    full, _ = prepare()
    best, info = prepare(top_fraction=0.1, next_actions=True)
    assert info.top_fraction == 0.1 and "next_actions" in best and "next_actions" not in full
    assert 0 < len(best["rewards"]) <= 0.2 * len(full["rewards"])
    assert best["rewards"].mean() > full["rewards"].mean()  # the best episodes earn more per step
    from misa_fast.data.errors import DataError
    with pytest.raises(DataError, match="top_fraction"):
        prepare(top_fraction=0.0)


def _data(n=50):
    rng = np.random.default_rng(1)
    return {"observations": rng.normal(size=(n, 3)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
            "terminals": np.zeros(n, np.float32),
            "next_actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32)}


def test_sources_carry_next_actions_with_their_rows():
    data = _data()
    source = make_source("auto", data, 8, seed=0, device="cpu")
    assert source.kind == "device"  # the C++ buffer holds only the transition's fields
    batch = next(source)
    assert batch["next_actions"].shape == (8, 2)
    rows = [int(np.flatnonzero((data["observations"] == o.numpy()).all(1))[0]) for o in batch["observations"]]
    np.testing.assert_array_equal(batch["next_actions"].numpy(), data["next_actions"][rows])
    group = make_member_streams("auto", data, 8, [0, 1], "cpu")
    batches = next(group)
    assert batches["next_actions"].shape == (2, 8, 2)
    torch.testing.assert_close(batches["next_actions"][0], batch["next_actions"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="next_actions"):
        make_source("prefetch", data, 8, seed=0, device="cpu")


def test_rebrac_antmaze_rewards_are_the_goal_reward_times_100():
    scaled, params = transforms.transform_rewards(np.array([0.0, 1.0], np.float32), "rebrac-antmaze")
    np.testing.assert_array_equal(scaled, [0.0, 100.0])
    assert params == {}


@pytest.mark.parametrize("algo, domain, expected", [
    ("iql", "locomotion", "iql-locomotion"), ("iql", "antmaze", "iql-antmaze"), ("rebrac", "antmaze", "rebrac-antmaze"),
    ("iql", "kitchen", "auto"), ("misa", "antmaze", "auto")])
def test_each_algorithm_names_its_reward_transform(algo, domain, expected):
    from misa_fast.agents import algorithms

    assert algorithms.get(algo).reward_transforms.get(domain, "auto") == expected
