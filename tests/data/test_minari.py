"""Minari dataset ids as datasets: resolution in Minari's cache (never the network here), the
q-learning view of Minari episodes, scores and evaluation from the dataset's metadata, presets
from the id, and clear errors for spaces misa-fast cannot learn from.

Datasets are written with Minari's own writer (``create_dataset_from_buffers`` with
``EpisodeBuffer`` episodes, which needs no jax) into a temporary MINARI_DATASETS_PATH."""
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest

minari = pytest.importorskip("minari")
from minari.data_collector import EpisodeBuffer  # noqa: E402

from misa_fast.agents.config_base import preset_name_for_env  # noqa: E402
from misa_fast.cli import main as cli_main  # noqa: E402
from misa_fast.data import load_dataset, prepare  # noqa: E402
from misa_fast.data import minari as minari_ids  # noqa: E402
from misa_fast.data.registry import domain_of  # noqa: E402
from misa_fast.training.loop import RunConfig, train  # noqa: E402

TINY = ("policy_hidden=32,32", "critic_hidden=32,32", "num_samples=4", "batch_size=32", "hmc_burn_in=1")
PENDULUM_STEPS = 50  # episode length the recorded env spec asks for


@pytest.fixture(autouse=True)
def minari_cache(tmp_path, monkeypatch):
    """A private Minari cache; any download attempt fails as it would offline."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))

    def offline(dataset_id):
        raise ConnectionError("network is unreachable (tests never download)")

    monkeypatch.setattr(minari_ids, "download_from_minari", offline)
    return root


def write_dataset(dataset_id, episodes, env=None, observation_space=None, action_space=None, **metadata):
    with warnings.catch_warnings():  # Minari asks for authorship metadata these throwaway sets lack
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            dataset_id, episodes, env=env, observation_space=observation_space, action_space=action_space,
            algorithm_name="test", author="test", author_email="test", code_permalink="test",
            description="test", **metadata)


def pendulum_episodes(count: int) -> list:
    """Random-action Pendulum episodes of PENDULUM_STEPS steps (truncated by the time limit)."""
    env = gym.make("Pendulum-v1", max_episode_steps=PENDULUM_STEPS)
    env.action_space.seed(0)
    episodes = []
    for i in range(count):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            done = terminated or truncated
        episodes.append(EpisodeBuffer(id=i, observations=np.array(observations), actions=np.array(actions),
                                      rewards=rewards, terminations=terminations, truncations=truncations))
    env.close()
    return episodes


def hand_built_episode(i, steps, start, terminated, truncated):
    obs = start + np.arange(steps + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    last = np.arange(steps) == steps - 1
    return EpisodeBuffer(id=i, observations=obs, actions=np.full((steps, 1), 1.0, np.float32),
                         rewards=list(np.arange(steps, dtype=np.float64) + start),
                         terminations=list(last & terminated), truncations=list(last & truncated))


BOX3 = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
TORQUE = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)


def test_minari_episodes_become_the_q_learning_view():
    # Episode 0 terminates, 1 is truncated by a time limit, 2 ends with neither flag (cut by the collector).
    episodes = [hand_built_episode(0, 3, 0.0, True, False), hand_built_episode(1, 2, 100.0, False, True),
                hand_built_episode(2, 2, 200.0, False, False)]
    write_dataset("test/pendulum/handmade-v0", episodes, observation_space=BOX3, action_space=TORQUE)
    data, info = prepare("test/pendulum/handmade-v0")
    # T+1 observations per episode: every step is a transition, s' is that episode's next observation.
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 100, 101, 200, 201])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 101, 102, 201, 202])
    # terminals from terminations only: the truncated step bootstraps.
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 100, 101, 200, 201])
    # Torques of 1.0 in [-2, 2] are 0.5 in the [-1, 1] units policies act in.
    np.testing.assert_allclose(data["actions"], 0.5)
    assert info.name == "test/pendulum/handmade-v0" and info.n_transitions == 7
    assert info.env_id == "Pendulum-v1"  # no env spec recorded: the domain's environment
    raw = load_dataset("test/pendulum/handmade-v0")
    assert raw["timeouts"].tolist() == [False, False, False, False, True, False, False]


def test_train_and_evaluate_through_the_id_in_the_recorded_env(tmp_path, capsys):
    env = gym.make("Pendulum-v1", max_episode_steps=PENDULUM_STEPS)
    write_dataset("test/pendulum/random-v0", pendulum_episodes(4), env=env, ref_min_score=-1200.0,
                  ref_max_score=-150.0)
    out = tmp_path / "run"
    summary = train(RunConfig(dataset="test/pendulum/random-v0", steps=10, out=str(out), eval_every=10,
                              eval_episodes=1, log_every=10, overrides=TINY, progress=False,
                              tensorboard=False, device="cpu"))
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["env_id"] == "Pendulum-v1"
    assert config["data"]["env_kwargs"] == {"max_episode_steps": PENDULUM_STEPS}
    assert config["agent"]["policy_hidden"] == [32, 32]
    last = summary["last_eval"]
    assert last["mean_normalized"] == pytest.approx(100 * (last["mean_return"] + 1200.0) / 1050.0)

    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(out), "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["env_id"] == "Pendulum-v1"
    assert result["lengths"] == [PENDULUM_STEPS, PENDULUM_STEPS]  # the recorded time limit, not 200
    expected = [100 * (r + 1200.0) / 1050.0 for r in result["returns"]]
    np.testing.assert_allclose(result["normalized"], expected)


def test_a_dataset_without_reference_scores_says_so_instead_of_scoring(tmp_path, capsys):
    env = gym.make("Pendulum-v1", max_episode_steps=PENDULUM_STEPS)
    write_dataset("test/pendulum/unscored-v0", pendulum_episodes(4), env=env)
    summary = train(RunConfig(dataset="test/pendulum/unscored-v0", steps=10, out=str(tmp_path / "run"),
                              eval_every=10, eval_episodes=1, log_every=10, overrides=TINY, progress=False,
                              tensorboard=False, device="cpu"))
    # Pendulum has a domain reference, but a Minari dataset's score comes from its own metadata only.
    assert summary["last_eval"]["mean_normalized"] is None
    assert "no reference scores in this dataset" in capsys.readouterr().err


def test_missing_id_offline_names_the_id_the_directory_and_the_command(minari_cache):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mujoco/hopper/medium-v0")
    message = str(err.value)
    assert "'mujoco/hopper/medium-v0'" in message
    assert str(minari_cache / "mujoco" / "hopper" / "medium-v0") in message
    assert "minari download mujoco/hopper/medium-v0" in message
    assert "network is unreachable" in message
    with pytest.raises(FileNotFoundError, match="downloads are disabled"):
        load_dataset("mujoco/hopper/medium-v0", download=False)


def test_cli_reports_a_missing_id_without_a_stack_trace(tmp_path, capsys):
    assert cli_main(["train", "--dataset", "D4RL/antmaze/umaze-v1", "--steps", "1", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    assert "minari download D4RL/antmaze/umaze-v1" in capsys.readouterr().err


def test_a_name_that_is_neither_lists_both_kinds():
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("hopper-medium")
    assert "'hopper-medium-v2'" in str(err.value) and "'mujoco/hopper/medium-v0'" in str(err.value)


def test_discrete_actions_are_refused_with_the_space_and_the_reason():
    episodes = [EpisodeBuffer(id=0, observations=np.zeros((4, 3), np.float32), actions=np.array([0, 1, 2]),
                              rewards=[0.0] * 3, terminations=[False, False, True], truncations=[False] * 3)]
    write_dataset("test/pendulum/discrete-v0", episodes, observation_space=BOX3,
                  action_space=gym.spaces.Discrete(3))
    with pytest.raises(ValueError, match=r"action space is Discrete\(3\), not a flat Box: .*continuous"):
        prepare("test/pendulum/discrete-v0")


def dict_episode(keys_and_widths: dict, steps: int = 3) -> EpisodeBuffer:
    observations = {key: np.full((steps + 1, width), float(i), np.float32)
                    for i, (key, width) in enumerate(keys_and_widths.items())}
    return EpisodeBuffer(id=0, observations=observations, actions=np.zeros((steps, 8), np.float32),
                         rewards=[0.0, 0.0, 1.0], terminations=[False, False, True], truncations=[False] * 3)


def dict_space(keys_and_widths: dict) -> gym.spaces.Dict:
    return gym.spaces.Dict({key: gym.spaces.Box(-np.inf, np.inf, (width,), np.float32)
                            for key, width in keys_and_widths.items()})


def test_dict_observations_are_refused_where_no_flat_view_is_known():
    widths = {"position": 2, "velocity": 3}
    write_dataset("test/pendulum/dict-v0", [dict_episode(widths)], observation_space=dict_space(widths),
                  action_space=gym.spaces.Box(-1, 1, (8,), np.float32))
    with pytest.raises(ValueError, match=r"observation space is a Dict \(keys \['position', 'velocity'\]\), "
                                         r"not a flat Box"):
        prepare("test/pendulum/dict-v0")


def test_antmaze_dict_observations_keep_the_keys_evaluation_feeds_the_policy():
    widths = {"achieved_goal": 2, "desired_goal": 2, "observation": 27}
    write_dataset("test/antmaze/umaze-v0", [dict_episode(widths)], observation_space=dict_space(widths),
                  action_space=gym.spaces.Box(-1, 1, (8,), np.float32))
    data, info = prepare("test/antmaze/umaze-v0")
    assert info.obs_dim == 29  # achieved_goal + observation, as misa_fast.envs.rollout flattens AntMaze
    np.testing.assert_array_equal(data["observations"][0, :3], [0, 0, 2])
    assert info.reward_transform == "antmaze"
    np.testing.assert_array_equal(data["rewards"], [-2, -2, 2])  # (r - 0.5) * 4


@pytest.mark.parametrize("dataset_id, preset", [
    ("mujoco/hopper/medium-v0", "locomotion"), ("mujoco/humanoid/expert-v0", "locomotion"),
    ("D4RL/antmaze/umaze-v1", "antmaze"), ("D4RL/antmaze/large-diverse-v1", "antmaze"),
    ("D4RL/pen/human-v2", "adroit"), ("D4RL/door/expert-v2", "adroit"), ("D4RL/hammer/cloned-v2", "adroit"),
    ("D4RL/relocate/human-v2", "adroit"), ("D4RL/kitchen/mixed-v2", "kitchen"),
])
def test_presets_are_chosen_from_the_id(dataset_id, preset):
    assert preset_name_for_env(dataset_id) == preset


def test_domains_of_ids_follow_the_environment_part():
    assert domain_of("mujoco/halfcheetah/simple-v0").name == "halfcheetah"
    assert domain_of("D4RL/antmaze/medium-play-v1").name == "antmaze"
    assert domain_of("D4RL/door/human-v2").reward_transform == "minmax"


def test_without_an_env_spec_or_known_domain_the_env_comes_from_env():
    write_dataset("test/mystery/handmade-v0", [hand_built_episode(0, 3, 0.0, True, False)],
                  observation_space=BOX3, action_space=TORQUE)
    with pytest.raises(ValueError, match=r"cannot tell which environment.*--env"):
        prepare("test/mystery/handmade-v0")
    _, info = prepare("test/mystery/handmade-v0", env_id="Pendulum-v1")
    assert info.env_id == "Pendulum-v1" and info.env_kwargs == {}


def test_another_env_than_the_recorded_one_drops_its_kwargs_and_scores():
    env = gym.make("Pendulum-v1", max_episode_steps=PENDULUM_STEPS)
    write_dataset("test/pendulum/scored-v0", pendulum_episodes(1), env=env, ref_min_score=-1200.0,
                  ref_max_score=-150.0)
    _, info = prepare("test/pendulum/scored-v0")
    assert info.reference_returns() == (-1200.0, -150.0)
    assert info.in_env("Pendulum-v1") is info
    other = info.in_env("Hopper-v4")
    assert other.env_kwargs == {} and other.reference_returns() == "by-name"
