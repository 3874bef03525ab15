"""Process settings: the intra-op thread choice (``--threads``, OMP_NUM_THREADS, the default rule)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from misa_fast.config import preset
from misa_fast.runtime import apply_threads, available_cpus, choose_threads, default_threads

SMALL = ("policy_hidden=16,16", "critic_hidden=16,16", "num_samples=2", "batch_size=16", "hmc_burn_in=1")


def test_the_flag_wins_then_the_environment_then_the_rule(monkeypatch):
    cfg = preset("locomotion")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (choose_threads(2, cfg, "cpu").threads, choose_threads(2, cfg, "cpu").source) == (2, "--threads")
    assert (choose_threads(None, cfg, "cpu").threads, choose_threads(None, cfg, "cpu").source) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    choice = choose_threads(None, cfg, "cpu")
    assert choice == default_threads(cfg, "cpu") and choice.source == "default"
    assert choice.threads == 1 and "256-wide networks, K=50 on CPU" in choice.describe()
    assert choose_threads(None, preset("pendulum"), torch.device("cuda")).threads == 1


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

    result = subprocess.run(args[:5] + [str(tmp_path / "bad")] + args[6:] + ["--threads", "0"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "--threads: expected a positive integer, got 0" in result.stderr
