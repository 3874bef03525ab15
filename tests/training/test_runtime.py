"""Process settings: the intra-op thread choice (``--threads``, OMP_NUM_THREADS, the default rule)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from misa_fast.agents.misa_config import preset
from misa_fast.agents.td3_config import td3_preset
from misa_fast.training.runtime import apply_threads, available_cpus, choose_threads, default_threads

SMALL = ("policy_hidden=16,16", "critic_hidden=16,16", "num_samples=2", "batch_size=16", "hmc_burn_in=1")


def test_the_flag_wins_then_the_environment_then_the_rule(monkeypatch):
    cfg = preset("locomotion")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (choose_threads(2, cfg, "cpu").threads, choose_threads(2, cfg, "cpu").source) == (2, "--threads")
    assert (choose_threads(None, cfg, "cpu").threads, choose_threads(None, cfg, "cpu").source) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert choose_threads(None, cfg, "cpu") == default_threads(cfg, "cpu")


def test_the_default_rule(monkeypatch):
    """One thread for small networks, on CUDA, and wherever threads would spin; the usable cores
    (at most two, the most measured) for 256-wide networks with passive waiting."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    for cfg in (preset("locomotion"), preset("antmaze"), td3_preset("locomotion")):
        choice = default_threads(cfg, "cpu")
        assert (choice.threads, choice.source) == (min(available_cpus(), 2), "default")
    assert "256-wide networks, K=50 on" in default_threads(preset("locomotion"), "cpu").describe()
    small = default_threads(preset("pendulum", policy_hidden=(64, 64), critic_hidden=(64, 64)), "cpu")
    assert small.threads == 1 and "64-wide networks, K=10: a second thread measured no faster" in small.reason
    assert default_threads(preset("locomotion"), torch.device("cuda")).threads == 1
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    spinning = default_threads(preset("locomotion"), "cpu")
    assert spinning.threads == 1 and "OMP_WAIT_POLICY is not PASSIVE" in spinning.reason


def test_the_cli_asks_for_passive_waiting_before_torch_loads():
    probe = ("import os, sys; from misa_fast.training.runtime import prefer_passive_waiting; prefer_passive_waiting(); "
             "assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda env: subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.strip()
    assert run(env) == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"  # the user's choice stands


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_a_bad_thread_count_names_the_flag(bad):
    with pytest.raises(ValueError, match=r"--threads: expected a positive integer"):
        choose_threads(bad, preset("pendulum"), "cpu")


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS: expected a positive integer, got 'two'"):
        choose_threads(None, preset("pendulum"), "cpu")


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(choose_threads(2, preset("pendulum"), "cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_train_prints_and_records_its_thread_choice(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "misa_fast.cli", "train", "--out", str(out), "--steps", "4", "--eval-every", "4",
            "--eval-episodes", "1", "--device", "cpu", "--no-progress", "--no-tensorboard"]
    args += [x for kv in SMALL for x in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONSAFEPATH"] = "1"
    result = subprocess.run(args + ["--threads", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("intra-op thread") == 1
    assert "misa-fast train: 2 intra-op threads (--threads: as asked)" in result.stderr
    assert json.loads((out / "config.json").read_text())["threads"] == 2
    default_run = args[:5] + [str(tmp_path / "default")] + args[6:]
    result = subprocess.run(default_run, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr  # 16-wide networks: the rule's one thread
    assert "misa-fast train: 1 intra-op thread (default: 16-wide networks, K=2: a second thread measured " \
           "no faster)" in result.stderr

    result = subprocess.run(args[:5] + [str(tmp_path / "bad")] + args[6:] + ["--threads", "0"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "--threads: expected a positive integer, got 0" in result.stderr


def test_eval_takes_threads(capsys):
    from misa_fast.cli import main

    run = Path(__file__).parents[1] / "fixtures" / "release-0.1.0-run"
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--checkpoint", str(run), "--episodes", "1", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["eval", "--checkpoint", str(run), "--episodes", "1", "--threads", "0"]) == 2
    assert "--threads: expected a positive integer, got 0" in capsys.readouterr().err


def test_train_from_python_tunes_the_allocator_as_the_cli_does(tmp_path):
    code = ("import sys; from misa_fast.training.runtime import tune_host_allocator as t; "
            "from misa_fast.training.loop import RunConfig, train; assert t.cache_info().currsize == 0; "
            "train(RunConfig(steps=2, out=sys.argv[1], eval_every=2, eval_episodes=1, progress=False, "
            "tensorboard=False, device='cpu', overrides=('policy_hidden=8,8', 'critic_hidden=8,8', "
            "'num_samples=2', 'batch_size=8'))); assert t.cache_info().currsize == 1")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
