"""The training loop: resume equality, kill -9 then resume, non-finite guard, logs, eval and export."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from misa_fast.agents.algorithms import ALGORITHMS
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.loop import NonFiniteTraining, RunConfig, train

# A small learner so a few hundred steps take seconds on two cores.
TINY = ("policy_hidden=32,32", "critic_hidden=32,32", "num_samples=4", "batch_size=32", "hmc_burn_in=1")


def tiny_run(out, steps, **kw):
    base = dict(steps=steps, out=str(out), eval_every=steps, eval_episodes=1, log_every=10,
                checkpoint_every=10, overrides=TINY, progress=False, tensorboard=False, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def final_parameters(out):
    state = ckpt.load(Path(out) / ckpt.CHECKPOINT_NAME)
    return state["step"], state["agent"]


def assert_same_tensors(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_resumed_run_ends_with_identical_parameters(tmp_path):
    train(tiny_run(tmp_path / "full", 40))
    train(tiny_run(tmp_path / "split", 20))
    summary = train(tiny_run(tmp_path / "split", 40, resume=True))
    assert summary["steps"] == 40
    step_a, agent_a = final_parameters(tmp_path / "full")
    step_b, agent_b = final_parameters(tmp_path / "split")
    assert step_a == step_b == 40
    assert_same_tensors(agent_a, agent_b)
    rows = list(csv.DictReader(open(tmp_path / "split" / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    train(tiny_run(out, 20, eval_every=10))
    for name in ("config.json", "progress.csv", "checkpoint.pt", "policy.pt2", "learning_curve.png", "summary.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["agent"]["num_samples"] == 4 and config["data"]["env_id"]
    rows = list(csv.DictReader(open(out / "progress.csv")))
    assert rows[0]["steps_per_s"] and float(rows[0]["steps_per_s"]) > 0
    assert rows[0]["eval_return"] and rows[1]["eval_return"]  # evaluated at 10 and 20
    assert all(np.isfinite(float(v)) for k, v in rows[-1].items() if v not in ("",))


def test_first_row_at_an_evaluation_still_has_the_metric_columns(tmp_path):
    out = tmp_path / "run"
    train(tiny_run(out, 10, eval_every=5, log_every=100))
    rows = list(csv.DictReader(open(out / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert rows[0]["critic_loss"] and rows[0]["actor_loss"] and rows[0]["eval_return"]


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    train(tiny_run(tmp_path / "run", 10))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_run(tmp_path / "run", 10))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, non_finite_at_update):
    non_finite_at_update(25)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTraining, match=r"step 25: .*critic_loss.*last good checkpoint"):
        train(tiny_run(out, 40))
    step, _ = final_parameters(out)
    assert step == 20


def test_kill_9_then_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "misa_fast.cli", "train", "--out", str(out), "--steps", "400",
            "--eval-every", "400", "--eval-episodes", "1", "--checkpoint-every", "10", "--log-every", "10",
            "--device", "cpu", "--no-progress", "--no-tensorboard"] + [x for kv in TINY for x in ("--set", kv)]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / ckpt.CHECKPOINT_NAME).exists() and ckpt.load(out)["step"] >= 30:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.load(out)["step"]
    assert 30 <= killed_at < 400
    result = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ckpt.load(out)["step"] == 400
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "progress.csv"))]
    assert steps == list(range(10, 401, 10))  # rows after the checkpoint were replayed, not duplicated


def test_eval_cli_and_exported_policy(tmp_path):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    cli = [sys.executable, "-m", "misa_fast.cli", "eval", "--episodes", "2"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run(cli + ["--checkpoint", str(out), "--json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    from_checkpoint = json.loads(result.stdout)
    assert len(from_checkpoint["returns"]) == 2
    env_id = json.loads((out / "config.json").read_text())["data"]["env_id"]
    result = subprocess.run(cli + ["--checkpoint", str(out / "policy.pt2"), "--env", env_id, "--json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["returns"] == pytest.approx(from_checkpoint["returns"], rel=1e-4)
    # The export runs with plain torch, without importing misa_fast.
    code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); "
            "a = m(torch.zeros(1, int(sys.argv[2]))); "
            "assert 'misa_fast' not in sys.modules and a.abs().max() <= 1; print(a.shape[1])")
    obs_dim = json.loads((out / "config.json").read_text())["data"]["obs_dim"]
    result = subprocess.run([sys.executable, "-c", code, str(out / "policy.pt2"), str(obs_dim)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_bad_override_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'num_sample'"):
        train(tiny_run(tmp_path / "run", 10, overrides=TINY + ("num_sample=3",)))


TINY_BY_FAMILY = {
    "misa": TINY,
    "td3": ("actor_hidden=16,16", "critic_hidden=16,16", "batch_size=32", "vae_hidden=16,16", "vae_steps=20"),
    "weighted": ("actor_hidden=16,16", "critic_hidden=16,16", "value_hidden=16,16", "batch_size=32"),
}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_trains_end_to_end_on_the_embedded_dataset(tmp_path, capsys, algo):
    """train -> checkpoint -> evaluation -> exported policy, for every --algo, with tiny networks."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.training.evaluation import load_policy

    family = algos.get(algo).family
    summary = train(tiny_run(tmp_path / algo, 20, algo=algo, overrides=TINY_BY_FAMILY[family], checkpoint_every=20))
    pretraining_said = "phase 1 of 2: SPOT pretrains its VAE for 20 steps before the 20 training steps"
    assert (pretraining_said in capsys.readouterr().err) == (algo == "spot")
    assert summary["steps"] == 20 and np.isfinite(summary["last_eval"]["mean_return"])
    state = ckpt.load(tmp_path / algo / ckpt.CHECKPOINT_NAME)
    agent = algos.agent_from_checkpoint(state)
    assert type(agent).__name__ == {"misa": "MISA", "td3": "TD3", "weighted": "Weighted"}[family] and agent.step == 20
    rows = list(csv.DictReader(open(tmp_path / algo / "progress.csv")))
    trained = ("actor_loss",) if algo in ("bc", "10bc") else ("critic_loss", "q_target")
    assert all(np.isfinite(float(rows[-1][k])) for k in trained)
    policy = torch.export.load(str(tmp_path / algo / ckpt.POLICY_NAME)).module()
    obs = torch.randn(4, 3)
    act, _, _ = load_policy(tmp_path / algo / ckpt.CHECKPOINT_NAME)
    normalized = (obs.numpy() - np.asarray(state["data_info"]["obs_mean"] or 0.0)) / np.asarray(
        state["data_info"]["obs_std"] or 1.0)
    assert np.allclose(policy(obs).numpy(), act(normalized.astype(np.float32)), atol=1e-5)


def test_resume_accepts_the_same_data_at_a_new_location_and_refuses_other_data(tmp_path):
    import shutil

    import h5py

    from misa_fast.data import default_dataset_path

    first, moved = tmp_path / "first" / "pendulum.hdf5", tmp_path / "moved" / "pendulum.hdf5"
    other = tmp_path / "other.hdf5"
    for path in (first, moved):
        path.parent.mkdir()
        shutil.copy(default_dataset_path(), path)
    shutil.copy(default_dataset_path(), other)
    with h5py.File(other, "r+") as f:
        f["rewards"][0] += 1.0
    train(tiny_run(tmp_path / "full", 20, dataset=str(first)))
    train(tiny_run(tmp_path / "split", 10, dataset=str(first)))
    first.unlink()
    with pytest.raises(FileNotFoundError, match="pass its new location with --dataset"):
        train(tiny_run(tmp_path / "split", 20, resume=True))
    with pytest.raises(ValueError, match=f"--dataset {other}: not the transitions .* trained on \\({first}\\)"):
        train(tiny_run(tmp_path / "split", 20, resume=True, dataset=str(other)))
    train(tiny_run(tmp_path / "split", 20, resume=True, dataset=str(moved)))
    assert json.loads((tmp_path / "split" / "config.json").read_text())["run"]["dataset"] == str(moved)
    assert_same_tensors(final_parameters(tmp_path / "full"), final_parameters(tmp_path / "split"))


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("domain", ["locomotion", "antmaze", "pendulum"])
def test_every_algorithms_presets_get_a_memory_estimate_and_a_thread_count(algo, domain):
    """The memory check and the thread rule read each learner's network sizes, including the
    weighted learner's "the method's own" (None until resolved)."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.training.checks import step_memory
    from misa_fast.training.runtime import default_threads

    cfg = algos.build_config(algo, domain, "hopper-medium-v2", obs_dim=11, act_dim=3)
    estimate = step_memory(cfg, 11, 3)
    assert estimate["parameters"] > 0 and estimate["activations"] > 0
    assert default_threads(cfg, "cpu").threads >= 1  # the thread rule reads the same sizes


@pytest.mark.parametrize("algo, dataset, expected", [
    ("iql", "hopper-medium-v2", {"reward_transform": "iql-locomotion", "top_fraction": 1.0, "next_actions": False}),
    ("iql", "data/hopper-medium-local.hdf5", {"reward_transform": "iql-locomotion"}),
    ("iql", "data/pen-human.hdf5", {"reward_transform": "auto"}),  # adroit: the domain's own
    ("iql", "data/antmaze-umaze-v2.hdf5", {"reward_transform": "iql-antmaze"}),
    ("10bc", "hopper-medium-v2", {"top_fraction": 0.1}),
    ("rebrac", "hopper-medium-v2", {"next_actions": True}),
    ("onestep", "hopper-medium-v2", {"next_actions": True}),
    ("misa", "hopper-medium-v2", {"reward_transform": "auto", "top_fraction": 1.0, "next_actions": False}),
])
def test_what_an_algorithm_asks_of_the_data(algo, dataset, expected):
    from misa_fast.training.loop import data_options

    options = data_options(RunConfig(algo=algo, dataset=dataset), dataset, torch.device("cpu"))
    assert {k: options[k] for k in expected} == expected
