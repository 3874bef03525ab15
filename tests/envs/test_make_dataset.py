"""make-dataset: the random kind end to end through the CLI (replayed against the environment to
prove the rows are real), checkpoint selection, and a tiny SAC run for the behaviour kinds."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from misa_fast.cli import main
from misa_fast.data import load_dataset, qlearning_dataset
from misa_fast.envs.make_dataset import (
    Checkpoint,
    cut_at_last_episode,
    episode_returns,
    make_dataset,
    pick_checkpoints,
)


def test_random_pendulum_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "pendulum-random.hdf5"
    assert main(["make-dataset", "--env", "Pendulum-v1", "--kind", "random", "--size", "450",
                 "--out", str(out), "--seed", "3"]) == 0
    assert "450 transitions, 2 complete episodes" in capsys.readouterr().out
    raw = load_dataset(out)
    assert raw["observations"].shape == (450, 3) and raw["actions"].shape == (450, 1)
    assert np.flatnonzero(raw["timeouts"]).tolist() == [199, 399, 449]  # 449: the data ends there
    assert not raw["terminals"].any()
    assert np.abs(raw["actions"]).max() <= 1.0 and np.abs(raw["actions"]).max() > 0.9
    assert raw["metadata/env_id"] == "Pendulum-v1" and raw["metadata/kind"] == "random"
    assert raw["metadata/size"] == 450 and raw["metadata/seed"] == 3
    assert raw["metadata/command"].startswith("misa-fast make-dataset --env Pendulum-v1 --kind random")

    # Replaying the stored actions (rescaled to [-2, 2]) reproduces every stored row.
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=3)
    for i in range(450):
        np.testing.assert_allclose(raw["observations"][i], obs, rtol=1e-5, atol=1e-6)
        theta, theta_dot = env.unwrapped.state
        assert (raw["infos/qpos"][i, 0], raw["infos/qvel"][i, 0]) == pytest.approx((theta, theta_dot), abs=1e-5)
        obs, reward, terminated, truncated, _ = env.step(2.0 * raw["actions"][i])
        assert raw["rewards"][i] == pytest.approx(reward, rel=1e-5)
        np.testing.assert_allclose(raw["next_observations"][i], obs, rtol=1e-5, atol=1e-6)
        if terminated or truncated:
            obs, _ = env.reset()
    assert raw["metadata/episodes"] == 2
    assert raw["metadata/mean_episode_return"] == pytest.approx(raw["rewards"][:400].sum() / 2, rel=1e-5)
    assert len(qlearning_dataset(raw)["rewards"]) == 447  # minus 2 timeouts and the last row


def test_random_hopper_records_physics_state_and_terminals(tmp_path):
    meta = make_dataset("Hopper-v4", "random", 300, tmp_path / "h.hdf5", seed=0)
    raw = load_dataset(tmp_path / "h.hdf5")
    assert raw["infos/qpos"].shape == (300, 6) and raw["infos/qvel"].shape == (300, 6)
    np.testing.assert_allclose(raw["observations"][:, :5], raw["infos/qpos"][:, 1:], rtol=1e-5, atol=1e-6)
    ends = np.flatnonzero(raw["terminals"])
    assert len(ends) >= 2 and meta["episodes"] == len(ends)  # random hoppers fall within ~100 steps
    # After a terminal the next row is a fresh reset, not a continuation.
    first = ends[0] + 1
    assert np.abs(raw["infos/qpos"][first] - [0, 1.25, 0, 0, 0, 0]).max() < 0.01


def test_same_seed_same_random_dataset(tmp_path):
    make_dataset("Pendulum-v1", "random", 50, tmp_path / "a.hdf5", seed=5)
    make_dataset("Pendulum-v1", "random", 50, tmp_path / "b.hdf5", seed=5)
    make_dataset("Pendulum-v1", "random", 50, tmp_path / "c.hdf5", seed=6)
    a, b, c = (load_dataset(tmp_path / f"{x}.hdf5") for x in "abc")
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_array_equal(a["observations"], b["observations"])
    assert not np.array_equal(a["actions"], c["actions"])


def test_existing_output_needs_force_and_bad_kind_is_refused(tmp_path, capsys):
    out = tmp_path / "x.hdf5"
    out.write_bytes(b"keep me")
    assert main(["make-dataset", "--env", "Pendulum-v1", "--kind", "random", "--size", "10", "--out", str(out)]) == 1
    assert out.read_bytes() == b"keep me" and "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-dataset", "--env", "Pendulum-v1", "--kind", "good", "--size", "10", "--out", str(out)])


def test_pick_checkpoints_like_d4rl():
    scores = [0.0, 10.0, 28.0, 60.0, 100.0, 33.0]
    checkpoints = [Checkpoint(step=1000 * i, mean_return=s, score=s, params=None) for i, s in enumerate(scores)]
    medium, expert = pick_checkpoints(checkpoints, 1 / 3)
    assert expert.step == 4000  # the best
    assert medium.step == 2000  # 28 is closest to 33.3 before the expert; the later 33 is not a candidate
    assert pick_checkpoints(checkpoints, 0.6)[0].step == 3000


def test_cut_at_last_episode_and_episode_returns():
    data = {"rewards": np.arange(7, dtype=np.float32), "terminals": np.array([0, 0, 1, 0, 0, 0, 0], bool),
            "timeouts": np.array([0, 0, 0, 0, 1, 0, 0], bool)}
    cut = cut_at_last_episode(data)
    assert cut["rewards"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(episode_returns(cut), [0 + 1 + 2, 3 + 4])


def test_behaviour_kinds_with_a_tiny_sac_run(tmp_path, monkeypatch):
    pytest.importorskip("stable_baselines3")
    from misa_fast.envs import make_dataset as module

    # 200 SAC steps learn nothing on Pendulum, so fix the choice: medium = step 100, expert = 200.
    monkeypatch.setattr(module, "pick_checkpoints", lambda cks, fraction: (cks[1], cks[2]))
    meta = make_dataset("Pendulum-v1", "medium-replay", 10_000, tmp_path / "mr.hdf5", train_steps=200,
                        eval_every=100, eval_episodes=1)
    raw = load_dataset(tmp_path / "mr.hdf5")
    assert raw["metadata/checkpoint_steps"].tolist() == [0, 100, 200]
    assert np.isfinite(raw["metadata/checkpoint_scores"]).all()
    assert meta["medium_checkpoint_step"] == 100 and meta["expert_checkpoint_step"] == 200
    assert len(raw["rewards"]) == 100  # every transition SAC saw up to the medium checkpoint
    assert np.flatnonzero(raw["timeouts"]).tolist() == [99] and "SAC" in raw["metadata/algorithm"]
    assert np.abs(raw["actions"]).max() <= 1.0

    make_dataset("Pendulum-v1", "medium-expert", 500, tmp_path / "me.hdf5", train_steps=200, eval_every=100,
                 eval_episodes=1)
    raw = load_dataset(tmp_path / "me.hdf5")
    # medium part: 250 steps cut at its last complete episode (200 rows); expert part: the other 300.
    assert len(raw["rewards"]) == 500
    assert np.flatnonzero(raw["timeouts"]).tolist() == [199, 399, 499]

    meta = make_dataset("Pendulum-v1", "full-replay", 150, tmp_path / "fr.hdf5", train_steps=200,
                        eval_every=100, eval_episodes=1)
    raw = load_dataset(tmp_path / "fr.hdf5")
    assert len(raw["rewards"]) == 150 and meta["episodes"] == 0  # capped by size, mid-episode
    assert np.flatnonzero(raw["timeouts"]).tolist() == [149]
