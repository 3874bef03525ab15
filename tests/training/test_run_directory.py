"""A run directory belongs to one run, every option is checked before the first step, and no
mistake, interrupt or full disk costs training that was done: each case as a user meets it on the
command line (exit status, one line on stderr, no traceback) and what is left on disk."""
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from misa_fast import cli
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.loop import RunConfig, train

TINY = ("policy_hidden=16,16", "critic_hidden=16,16", "num_samples=4", "batch_size=32", "hmc_burn_in=1")
TINY_FLAGS = [arg for item in TINY for arg in ("--set", item)]
QUIET = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--eval-episodes", "1"]


def tiny_run(out, steps, **kw):
    base = dict(steps=steps, out=str(out), eval_every=steps, eval_episodes=1, log_every=10, checkpoint_every=10,
                overrides=TINY, progress=False, tensorboard=False, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def run_cli(capsys, *argv):
    """(exit status, stderr lines other than the start-up notes) of ``misa-fast ARGV`` in this process."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "intra-op thread" not in line]
    return code, lines


def assert_one_line(code, lines, *words, status=2):
    assert code == status, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def checkpoint_step(out):
    return ckpt.load(Path(out) / ckpt.CHECKPOINT_NAME)["step"]


# ------------------------------------------------------------------------- options checked up front
@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-5"], ["--steps"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--log-every", "0"], ["--log-every"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every"]),
    (["--eval-episodes", "0"], ["--eval-episodes"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--seeds", "0-100000000000"], ["--seeds"]),
    (["--device", "cuda"], ["--device"]),
    (["--env", "NoSuchEnv-v0"], ["--env NoSuchEnv-v0"]),
    (["--env", "Hopper-v4"], ["--env Hopper-v4", "(3,)"]),
    (["--set", "batch_size=1e12"], ["batch_size", "GiB"]),
    (["--set", "num_samples=1e8"], ["num_samples", "GiB"]),
    (["--set", "policy_hidden=1e8"], ["policy_hidden", "GiB"]),
    (["--set", "obs_dim=5"], ["obs_dim"]),
    (["--set", "device=cuda"], ["device"]),
    (["--set", "min_q_weight=-1e30"], ["min_q_weight"]),
    (["--set", "hmc_step_size=1e308"], ["hmc_step_size"]),
    (["--set", "critic_lr=nan"], ["critic_lr"]),
])
def test_a_bad_option_is_one_line_before_anything_is_written(tmp_path, capsys, argv, words):
    if argv == ["--device", "cuda"] and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "run"
    code, lines = run_cli(capsys, "train", "--out", out, *QUIET, *argv)
    assert_one_line(code, lines, *words)
    assert not (out / "config.json").exists() and not (out / ckpt.CHECKPOINT_NAME).exists()


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, lines = run_cli(capsys, "train", "--out", blocker / "run", "--steps", 5, *QUIET)
    assert_one_line(code, lines, "--out")


def test_the_debug_switch_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="--steps"):
        cli.main(["train", "--out", str(tmp_path / "run"), "--steps", "0", "--debug"])


# -------------------------------------------------------------------------------- the directory
def test_a_finished_run_without_its_checkpoint_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    (out / ckpt.CHECKPOINT_NAME).unlink()  # deleted to save space
    def files():
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".misa-fast.lock"}

    before = files()
    for extra in ([], ["--resume"]):
        code, lines = run_cli(capsys, "train", "--out", out, "--steps", 10, *QUIET, *TINY_FLAGS, *extra)
        assert_one_line(code, lines, "--overwrite")
    assert files() == before
    code, lines = run_cli(capsys, "train", "--out", out, "--steps", 10, "--eval-every", 10, *QUIET, *TINY_FLAGS,
                          "--overwrite")
    assert code == 0 and checkpoint_step(out) == 10


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".{ckpt.CHECKPOINT_NAME}.tmp-99999", out / ".tmp-99999-policy.pt2", out / "progress.csv.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    train(tiny_run(out, 10))
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("option, value", [("--algo", "cql"), ("--set", "num_samples=3"), ("--obs-norm", "scalar"),
                                           ("--env", "Hopper-v4")])
def test_resume_refuses_options_that_contradict_the_checkpoint(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    before = (out / ckpt.CHECKPOINT_NAME).read_bytes()
    code, lines = run_cli(capsys, "train", "--out", out, "--resume", "--steps", 20, *QUIET, option, value)
    assert_one_line(code, lines, option)
    assert (out / ckpt.CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("state", [{}, {"step": 3, "run": {}}])
def test_a_checkpoint_without_its_keys_is_one_line(tmp_path, capsys, state):
    out = tmp_path / "run"
    out.mkdir()
    ckpt.save_atomic(state, out / ckpt.CHECKPOINT_NAME)
    code, lines = run_cli(capsys, "train", "--out", out, "--resume", "--steps", 5, *QUIET)
    assert_one_line(code, lines, str(out / ckpt.CHECKPOINT_NAME))
    code, lines = run_cli(capsys, "eval", "--checkpoint", out, "--episodes", 1)
    assert_one_line(code, lines, "checkpoint")


def test_an_empty_progress_file_does_not_stop_a_resume(tmp_path):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    (out / "progress.csv").write_text("")
    train(tiny_run(out, 20, resume=True))
    assert [int(r["step"]) for r in csv.DictReader(open(out / "progress.csv"))] == [20]


def test_the_checkpoint_is_written_before_an_evaluation_that_fails(tmp_path, monkeypatch):
    from misa_fast.training import loop

    def broken(*args, **kwargs):
        raise RuntimeError("the simulator went unstable")

    monkeypatch.setattr(loop, "evaluate_policies", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="unstable"):
        train(tiny_run(out, 20, eval_every=20))
    assert checkpoint_step(out) == 20


# ------------------------------------------------------------------ other commands, other files
def test_eval_options_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    for argv, words in ((["--seed", "-1"], ["--seed"]), (["--episodes", "0"], ["--episodes"]),
                        (["--env", "Hopper-v4"], ["--env Hopper-v4"])):
        code, lines = run_cli(capsys, "eval", "--checkpoint", out, *argv)
        assert_one_line(code, lines, *words)


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "{not json", '{"run": {"seed": "zero"}}'])
def test_report_on_a_malformed_config_is_one_line(tmp_path, capsys, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    code, lines = run_cli(capsys, "report", tmp_path)
    assert_one_line(code, lines, "config.json")


def test_make_dataset_refuses_discrete_actions(tmp_path, capsys):
    code, lines = run_cli(capsys, "make-dataset", "--env", "CartPole-v1", "--kind", "random", "--size", 10,
                          "--out", tmp_path / "x.hdf5")
    assert_one_line(code, lines, "CartPole-v1", "Box")
    assert not (tmp_path / "x.hdf5").exists()


def test_finetune_checks_its_options_and_directory(tmp_path, capsys):
    offline = tmp_path / "offline"
    train(tiny_run(offline, 10))
    code, lines = run_cli(capsys, "finetune", "--checkpoint", offline, "--steps", 0, "--no-progress")
    assert_one_line(code, lines, "--steps")
    code, lines = run_cli(capsys, "finetune", "--checkpoint", offline, "--env", "Hopper-v4", "--steps", 5,
                          "--no-progress", "--out", tmp_path / "online")
    assert_one_line(code, lines, "--env Hopper-v4")
    code, lines = run_cli(capsys, "finetune", "--checkpoint", offline, "--out", offline, "--steps", 5,
                          "--no-progress")
    assert_one_line(code, lines, "--resume")


# ----------------------------------------------------------------- real processes and signals
def _train_process(out, steps, *extra, limit_file_size=None):
    def limits():
        if limit_file_size is not None:  # a disk that fills up: writes past this size fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # eager: a long run would otherwise compile its step first (--backend auto), which is not what these test
    argv = [sys.executable, "-m", "misa_fast.cli", "train", "--out", str(out), "--steps", str(steps),
            "--eval-every", str(steps), "--checkpoint-every", "100000", "--backend", "eager", *QUIET, *TINY_FLAGS,
            *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=limits)


def _wait_until_stepping(process, out, timeout=120.0):
    """Waits for the run's config.json (written just before the first step), then a little more."""
    deadline = time.monotonic() + timeout
    while not (out / "config.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    time.sleep(1.5)


def _error_lines(text):
    return [line for line in text.splitlines() if line.strip() and "intra-op thread" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_the_current_step_then_resume_finishes(tmp_path, signum, status):
    out = tmp_path / "run"
    first = _train_process(out, 100_000)
    _wait_until_stepping(first, out)
    second = _train_process(out, 10)  # the same directory while the first one runs
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert_one_line(2, _error_lines(err), "in use by misa-fast train", f"pid {first.pid}")
    first.send_signal(signum)
    _, err = first.communicate(timeout=120)
    assert first.returncode == status, err
    lines = [line for line in _error_lines(err) if "saving a checkpoint after this step" not in line]
    assert_one_line(2, lines, "--resume")
    assert "Traceback" not in err
    step = checkpoint_step(out)
    assert step > 0 and f"at step {step}" in lines[0]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    resumed = _train_process(out, step + 5, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert checkpoint_step(out) == step + 5
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 5


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    before = (out / ckpt.CHECKPOINT_NAME).read_bytes()
    size = len(before) // 2  # the next checkpoint cannot be written whole
    process = _train_process(out, 20, "--resume", "--checkpoint-every", "5", limit_file_size=size)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert_one_line(2, _error_lines(err), "File too large")
    assert (out / ckpt.CHECKPOINT_NAME).read_bytes() == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_stop_before_the_first_checkpoint_names_no_checkpoint(tmp_path, capsys, non_finite_at_update):
    non_finite_at_update(5)
    out = tmp_path / "run"
    code, lines = run_cli(capsys, "train", "--out", out, "--steps", 40, "--checkpoint-every", 10, *QUIET, *TINY_FLAGS)
    assert_one_line(code, lines, "step 5", "No checkpoint had been written yet", status=3)
    assert not (out / ckpt.CHECKPOINT_NAME).exists()


@pytest.mark.slow
def test_finetune_checkpoints_the_current_step_on_sigterm(tmp_path):
    offline, online = tmp_path / "offline", tmp_path / "online"
    train(tiny_run(offline, 10))
    argv = [sys.executable, "-m", "misa_fast.cli", "finetune", "--checkpoint", str(offline), "--out", str(online),
            "--steps", "100000", "--eval-every", "100000", "--no-progress", "--no-tensorboard", "--device", "cpu"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_until_stepping(process, online)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    lines = [line for line in _error_lines(err) if "saving a checkpoint after this step" not in line]
    assert_one_line(2, lines, "misa-fast finetune --checkpoint", "--resume")
    env_steps = ckpt.load(online / ckpt.CHECKPOINT_NAME)["env_steps"]
    assert env_steps > 0 and f"step {env_steps}:" in lines[0]


@pytest.mark.parametrize("damage", ["algo", "weights", "config"])
def test_a_checkpoint_that_does_not_describe_its_agent_is_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    train(tiny_run(out, 10))
    state = ckpt.load(out / ckpt.CHECKPOINT_NAME)
    if damage == "algo":
        state["run"]["algo"] = "no-such-algo"
    elif damage == "weights":
        name = next(k for k, v in state["agent"]["policy"].items() if v.ndim == 2)
        state["agent"]["policy"][name] = state["agent"]["policy"][name][:, :1]
    else:
        state["agent_config"]["num_critics"] = "two"
    ckpt.save_atomic(state, out / ckpt.CHECKPOINT_NAME)
    code, lines = run_cli(capsys, "eval", "--checkpoint", out, "--episodes", 1)
    assert_one_line(code, lines, str(out))
    if damage == "weights":
        code, lines = run_cli(capsys, "train", "--out", out, "--resume", "--steps", 20, *QUIET)
        assert_one_line(code, lines, str(out / ckpt.CHECKPOINT_NAME), "do not fit")


def test_the_matmul_precision_holds_for_the_run_only_and_is_recorded(tmp_path, monkeypatch):
    import torch

    from misa_fast.training import loop

    seen, real_step_loop = [], loop.step_loop

    def watching_step_loop(*args):
        seen.append(torch.get_float32_matmul_precision())
        return real_step_loop(*args)

    monkeypatch.setattr(loop, "step_loop", watching_step_loop)
    before = torch.get_float32_matmul_precision()
    out = tmp_path / "run"
    train(tiny_run(out, 10, matmul_precision="medium"))
    assert seen == ["medium"] and torch.get_float32_matmul_precision() == before
    assert json.loads((out / "config.json").read_text())["run"]["matmul_precision"] == "medium"
    train(tiny_run(out, 20, resume=True, matmul_precision="highest"))  # a resume may change it: how, not what
    assert seen == ["medium", "highest"]
