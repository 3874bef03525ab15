"""Online fine-tuning: an offline checkpoint keeps learning in its environment, online rows go into
the C++ buffer next to the offline data (with the dataset's transforms), and a killed run resumes."""
import csv

import numpy as np
import pytest

from misa_fast.data import DataInfo
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.finetune import FinetuneConfig, finetune, online_reward
from misa_fast.training.loop import RunConfig, train

TINY = {
    "misa": ("policy_hidden=16,16", "critic_hidden=16,16", "num_samples=4", "batch_size=32", "hmc_burn_in=1"),
    "spot": ("actor_hidden=16,16", "critic_hidden=16,16", "batch_size=32", "vae_hidden=16", "vae_steps=20"),
    "iql": ("actor_hidden=16,16", "critic_hidden=16,16", "value_hidden=16,16", "batch_size=32"),
}


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    """Short offline runs on the embedded Pendulum dataset, one per learner family."""
    root = tmp_path_factory.mktemp("offline")
    for algo, overrides in TINY.items():
        train(RunConfig(algo=algo, steps=30, out=str(root / algo), eval_every=30, eval_episodes=1, log_every=10,
                        overrides=overrides, progress=False, tensorboard=False, device="cpu"))
    return root


def tiny_finetune(checkpoint, out, steps, **kw):
    base = dict(checkpoint=str(checkpoint), out=str(out), steps=steps, eval_every=100, eval_episodes=1,
                log_every=50, progress=False, tensorboard=False, device="cpu")
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("algo", list(TINY))
def test_finetune_appends_online_transitions_and_keeps_learning(offline_runs, tmp_path, algo):
    offline = ckpt.load(offline_runs / algo / ckpt.CHECKPOINT_NAME)
    summary = finetune(tiny_finetune(offline_runs / algo, tmp_path / "ft", 200))
    assert summary["env_steps"] == 200 and summary["episodes"] == 1  # Pendulum episodes are 200 steps
    state = ckpt.load(tmp_path / "ft" / ckpt.CHECKPOINT_NAME)
    n_offline = offline["data_info"]["n_transitions"]
    assert state["buffer"]["size"] == n_offline + 200
    assert state["agent"]["step"] == offline["agent"]["step"] + 200  # one update per environment step
    # The online rows are Pendulum transitions: observations (cos, sin, velocity), clipped actions.
    online = {k: v[n_offline:] for k, v in state["buffer"]["data"].items()}
    info = state["data_info"]  # SPOT and IQL normalise observations per dimension; online rows must match
    assert (info["obs_norm"] == "per-dim") == (algo in ("spot", "iql"))
    raw = online["observations"] * np.asarray(info["obs_std"] or 1.0) + np.asarray(info["obs_mean"] or 0.0)
    assert np.allclose(raw[:, 0] ** 2 + raw[:, 1] ** 2, 1.0, atol=1e-4)
    assert np.abs(online["actions"]).max() <= 0.999 + 1e-7
    assert np.array_equal(online["observations"][1:], online["next_observations"][:-1])
    assert (online["rewards"] <= 0).all() and (online["terminals"] == 0).all()
    rows = list(csv.DictReader(open(tmp_path / "ft" / "progress.csv")))
    assert [r["online_return"] != "" for r in rows] == [False, False, False, True]  # steps 50..200
    assert float(rows[-1]["online_normalized"]) == pytest.approx(
        100 * (float(rows[-1]["online_return"]) + 1212.33) / (-141.0 + 1212.33), rel=1e-4)
    assert rows[1]["eval_normalized"] and rows[-1]["eval_normalized"]
    assert (tmp_path / "ft" / ckpt.POLICY_NAME).exists()


def test_finetune_resumes_after_an_interruption(offline_runs, tmp_path):
    finetune(tiny_finetune(offline_runs / "misa", tmp_path / "ft", 100))
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(tiny_finetune(offline_runs / "misa", tmp_path / "ft", 200))
    summary = finetune(tiny_finetune(offline_runs / "misa", tmp_path / "ft", 200, resume=True))
    assert summary["env_steps"] == 200
    state = ckpt.load(tmp_path / "ft" / ckpt.CHECKPOINT_NAME)
    assert state["buffer"]["size"] == state["data_info"]["n_transitions"] + 200
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "ft" / "progress.csv"))]
    assert steps == [50, 100, 150, 200]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        finetune(tiny_finetune(tmp_path / "nothing", tmp_path / "ft", 10))


@pytest.mark.parametrize("transform, params, reward, expected", [
    ("none", {}, 0.3, 0.3),
    ("antmaze", {}, 1.0, 2.0),
    ("minmax", {"min": -1.0, "max": 3.0}, 1.0, 0.0),
    ("iql-locomotion", {"scale": 2.5}, 2.0, 5.0),
    ("iql-antmaze", {}, 1.0, 0.0),
])
def test_online_rewards_get_the_dataset_transform(transform, params, reward, expected):
    info = DataInfo(name="x", env_id="Pendulum-v1", n_transitions=1, obs_dim=3, act_dim=1,
                    reward_transform=transform, reward_params=params)
    assert online_reward(reward, info) == pytest.approx(expected)


def test_an_algorithm_that_reads_next_actions_is_refused_before_any_step(tmp_path):
    from misa_fast.errors import UserError

    offline = tmp_path / "onestep"
    train(RunConfig(algo="onestep", steps=10, out=str(offline), eval_every=10, eval_episodes=1, progress=False,
                    tensorboard=False, device="cpu", overrides=("actor_hidden=8,8", "critic_hidden=8,8",
                                                                "batch_size=16")))
    with pytest.raises(UserError, match="next actions"):
        finetune(tiny_finetune(offline, tmp_path / "ft", 10))
    assert not (tmp_path / "ft" / ckpt.CHECKPOINT_NAME).exists()
