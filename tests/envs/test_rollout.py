"""misa_fast.envs.rollout: dataset name -> gymnasium id, and evaluation (seeding, exact episode count,
action scaling, observation normalisation, normalized scores) checked against plain loops."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from misa_fast.data.registry import PENDULUM_REF_MAX, PENDULUM_REF_MIN
from misa_fast.envs.rollout import env_id_for, evaluate, make_env, scale_actions, unscale_actions

# The plain reference loops call gym.make("Hopper-v4") directly; v4 is deliberate (D4RL's layout).
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")


@pytest.mark.parametrize(
    "name, env_id",
    [
        ("hopper-medium-v2", "Hopper-v4"), ("halfcheetah-medium-replay-v2", "HalfCheetah-v4"),
        ("walker2d-expert-v2", "Walker2d-v4"), ("ant-random-v2", "Ant-v4"),
        ("pendulum-default", "Pendulum-v1"), ("hopper-medium-local.hdf5", "Hopper-v4"),
        ("antmaze-umaze-diverse-v2", "AntMaze_UMaze-v4"), ("antmaze-medium-play-v2", "AntMaze_Medium_Diverse_GR-v4"),
        ("antmaze-large-diverse-v0", "AntMaze_Large_Diverse_GR-v4"), ("kitchen-mixed-v0", "FrankaKitchen-v1"),
        ("pen-human-v1", "AdroitHandPen-v1"), ("relocate-expert-v1", "AdroitHandRelocate-v1"),
    ],
)
def test_env_id_for_dataset_names(name, env_id):
    assert env_id_for(name) == env_id


def test_env_id_override_and_unknown_name():
    assert env_id_for("hopper-medium-v2", override="Hopper-v5") == "Hopper-v5"
    with pytest.raises(KeyError, match="unknown dataset domain"):
        env_id_for("cartpole-random-v0")


def test_ant_observations_match_d4rl_width():
    env = make_env("Ant-v4")  # D4RL's ant data include contact forces: 111 dims
    assert env.observation_space.shape == (111,)
    env.close()


def test_robotics_env_without_the_package_explains_what_to_install():
    try:
        import gymnasium_robotics  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install gymnasium-robotics"):
            make_env(env_id_for("door-human-v1"))
    else:
        pytest.skip("gymnasium-robotics is installed")


def test_action_scaling_round_trip():
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    np.testing.assert_allclose(scale_actions(np.array([[-1.0, 1.0], [0.5, 0.0], [3.0, -3.0]]), low, high),
                               [[-2.0, 1.0], [1.0, 0.5], [2.0, 0.0]])
    np.testing.assert_allclose(unscale_actions(np.array([[-2.0, 1.0], [1.0, 0.5]]), low, high), [[-1, 1], [0.5, 0]])


def plain_returns(env_id: str, env_action, seeds, max_steps=10_000) -> tuple[list, list]:
    """Reference: one env, one episode per seed, a fixed env-unit action."""
    returns, lengths = [], []
    for seed in seeds:
        env = gym.make(env_id)
        env.reset(seed=seed)
        total, steps, done = 0.0, 0, False
        while not done and steps < max_steps:
            _, r, terminated, truncated, _ = env.step(np.asarray(env_action, dtype=np.float32))
            total, steps, done = total + r, steps + 1, terminated or truncated
        returns.append(total)
        lengths.append(steps)
        env.close()
    return returns, lengths


def test_pendulum_evaluation_matches_plain_loop_and_scales_actions():
    # The policy's +1 must reach Pendulum as its maximal torque +2.
    result = evaluate(lambda obs: np.ones((len(obs), 1), np.float32), "Pendulum-v1", episodes=3, seed=7)
    returns, lengths = plain_returns("Pendulum-v1", [2.0], seeds=[7, 8, 9])
    np.testing.assert_allclose(result["returns"], returns, rtol=1e-6)
    assert result["lengths"] == lengths == [200, 200, 200]
    assert result["mean_return"] == pytest.approx(np.mean(returns))
    expected = 100 * (np.array(returns) - PENDULUM_REF_MIN) / (PENDULUM_REF_MAX - PENDULUM_REF_MIN)
    np.testing.assert_allclose(result["normalized"], expected, rtol=1e-6)
    assert result["mean_normalized"] == pytest.approx(expected.mean())


def test_episode_seeds_do_not_depend_on_the_number_of_environments():
    zero = lambda obs: np.zeros((len(obs), 1), np.float32)  # noqa: E731
    five = evaluate(zero, "Pendulum-v1", episodes=5, seed=0)["returns"]
    two = evaluate(zero, "Pendulum-v1", episodes=5, seed=0, n_envs=2)["returns"]
    np.testing.assert_allclose(two, five, rtol=1e-9)
    np.testing.assert_allclose(five, plain_returns("Pendulum-v1", [0.0], seeds=range(5))[0], rtol=1e-6)


def test_hopper_episodes_that_terminate_early_are_counted_exactly():
    zero = lambda obs: np.zeros((len(obs), 3), np.float32)  # noqa: E731 - falls over quickly
    result = evaluate(zero, "Hopper-v4", episodes=3, seed=0, n_envs=2)
    returns, lengths = plain_returns("Hopper-v4", np.zeros(3), seeds=[0, 1, 2])
    assert result["lengths"] == lengths and all(length < 1000 for length in lengths)
    np.testing.assert_allclose(result["returns"], returns, rtol=1e-6)
    np.testing.assert_allclose(result["normalized"], 100 * (np.array(returns) + 20.272305) / (3234.3 + 20.272305),
                               rtol=1e-6)


def test_observations_are_normalised_before_the_policy_sees_them():
    seen = []

    def policy(obs):
        seen.append(obs.copy())
        return np.zeros((len(obs), 1), np.float32)

    mean, std = np.array([1.0, 0.0, 0.5]), np.array([2.0, 1.0, 4.0])
    evaluate(policy, "Pendulum-v1", episodes=1, seed=3, obs_mean=mean, obs_std=std)
    first, _ = gym.make("Pendulum-v1").reset(seed=3)
    np.testing.assert_allclose(seen[0][0], (first - mean) / std, rtol=1e-6)
    assert seen[0].dtype == np.float32 and len(seen) == 200


def test_unknown_reference_gives_raw_returns_only():
    result = evaluate(lambda obs: np.zeros((len(obs), 1), np.float32), "MountainCarContinuous-v0",
                      episodes=1, seed=0)
    assert result["normalized"] is None and result["mean_normalized"] is None
    assert result["lengths"] == [999] and result["mean_return"] == pytest.approx(0.0)


def test_custom_dataset_name_falls_back_to_the_env_reference():
    result = evaluate(lambda obs: np.zeros((len(obs), 1), np.float32), "Pendulum-v1", episodes=1, seed=0,
                      dataset_name="my-own-data")
    assert result["mean_normalized"] is not None


def test_async_vectorization_gives_the_same_episodes():
    zero = lambda obs: np.zeros((len(obs), 1), np.float32)  # noqa: E731
    sync = evaluate(zero, "Pendulum-v1", episodes=2, seed=4)["returns"]
    np.testing.assert_allclose(evaluate(zero, "Pendulum-v1", episodes=2, seed=4, vectorization="async")["returns"],
                               sync)
    with pytest.raises(ValueError, match="vectorization"):
        evaluate(zero, "Pendulum-v1", episodes=1, vectorization="threads")


def test_mujoco_warnings_are_python_warnings_not_a_log_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = make_env("Hopper-v4")
    env.reset(seed=0)
    env.unwrapped.data.qvel[:] = 1e30  # an unstable simulation: MuJoCo warns on the next step
    with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value"):
        env.step(np.zeros(3))
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_policies_evaluated_side_by_side_match_their_own_evaluations():
    from misa_fast.envs.rollout import evaluate_many

    def linear(seed):
        weights = np.random.default_rng(seed).normal(size=(3, 1)).astype(np.float32)
        return lambda obs: np.tanh(obs @ weights)

    policies, seeds = [linear(0), linear(1), linear(2)], [5, 100, 7]
    together = evaluate_many(policies, "Pendulum-v1", episodes=3, seeds=seeds, n_envs=2)
    for policy, seed, result in zip(policies, seeds, together):
        alone = evaluate(policy, "Pendulum-v1", episodes=3, seed=seed, n_envs=2)
        assert result == alone
    assert together[0]["returns"] != together[1]["returns"]
