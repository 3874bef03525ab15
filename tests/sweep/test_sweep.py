"""misa-fast sweep: grid checks and the Ray-missing message without Ray; with Ray (a local instance of
2 CPUs and one logical GPU, started by the command itself): fractional GPUs run trials side by side,
a killed worker resumes from its checkpoint, a killed driver is finished by --resume, a failing trial
is reported. Trials are TD3+BC with 16-wide networks on the embedded Pendulum dataset."""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from misa_fast import cli
from misa_fast.sweep import grid as sweep
from misa_fast.sweep import report

TINY = ["--algos", "td3bc", "--set", "actor_hidden=16-16", "--set", "critic_hidden=16-16", "--set", "batch_size=32",
        "--eval-episodes", "1", "--no-tensorboard"]
RUN_DIR = Path("runs") / "pendulum-default" / "td3bc"


def _env() -> dict:
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


def _sweep_cmd(*args) -> list:
    return [sys.executable, "-m", "misa_fast.cli", "sweep", *map(str, args)]


def _run(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(_sweep_cmd(*args), capture_output=True, text=True, env=_env(), timeout=timeout)


def _steps(run_dir: Path) -> list:
    with open(run_dir / "progress.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def _eval_steps(run_dir: Path) -> list:
    with open(run_dir / "progress.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("eval_return")]


def _trial(run_dir: Path) -> dict:
    return json.loads((run_dir / "trial.json").read_text())


def _wait_for(predicate, timeout: float, proc=None, what: str = ""):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _kill_session(sid: int) -> None:
    """Processes the killed driver left in its session (its Ray instance's agents and workers)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            try:
                os.kill(int(p.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------- without Ray
def test_parse_seeds_and_grid():
    assert sweep.parse_seeds(["0-4"]) == [0, 1, 2, 3, 4]
    assert sweep.parse_seeds(["0,2", "1", "2"]) == [0, 1, 2]
    assert sweep.parse_grid(["hmc_mode=faithful,adaptive", "policy_hidden=64-64,256-256"]) == {
        "hmc_mode": ["faithful", "adaptive"], "policy_hidden": ["64-64", "256-256"]}
    for bad in (["4-1"], ["x"], [""]):
        with pytest.raises(sweep.SweepError, match="--seeds"):
            sweep.parse_seeds(bad)
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.parse_grid(["num_samples=1", "num_samples=2"])
    with pytest.raises(sweep.SweepError, match="KEY=V1,V2"):
        sweep.parse_grid(["num_samples"])


@pytest.mark.parametrize("args, message", [
    (["--algos", "misa", "tdbc"], "unknown algorithm 'tdbc'; did you mean td3bc"),
    (["--datasets", "hoper-medium-v2"], "'hoper-medium-v2' is neither an existing file"),
    (["--datasets", "hoper-medium-v2"], "did you mean hopper-medium-v2"),
    (["--grid", "num_sample=10,50"], "--grid num_sample: unknown config key 'num_sample'; did you mean num_samples"),
    (["--set", "hmc_mod=parallel"], "--set hmc_mod: unknown config key 'hmc_mod'; did you mean hmc_mode"),
    (["--grid", "hmc_mode=faithful,fast"], "misa on pendulum-default with hmc_mode=fast"),
    (["--algos", "misa", "--grid", "actor_hidden=16-16"], "unknown config key 'actor_hidden'"),
    (["--seeds", "0-x"], "--seeds"),
])
def test_bad_input_is_an_error_before_any_trial(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and not out.exists()


def test_grid_expansion_and_keys_of_one_family(tmp_path):
    p = argparse.ArgumentParser()
    sweep.configure_parser(p)
    ns = p.parse_args(["--algos", "misa", "td3bc", "--seeds", "0-1", "--grid", "num_samples=4,8",
                       "--set", "critic_hidden=16-16", "--cpus-per-trial", "2.5", "--out", str(tmp_path / "s")])
    spec = sweep.build_sweep(ns)
    labels = [t["label"] for t in spec["trials"]]
    # num_samples is a MISA key: the td3bc trials are not multiplied by it (and a note says so).
    assert labels == ["pendulum-default/misa-num_samples=4/seed0", "pendulum-default/misa-num_samples=4/seed1",
                      "pendulum-default/misa-num_samples=8/seed0", "pendulum-default/misa-num_samples=8/seed1",
                      "pendulum-default/td3bc/seed0", "pendulum-default/td3bc/seed1"]
    assert any("num_samples applies to misa only" in n for n in spec["notes"])
    first = spec["trials"][0]["run"]
    assert first["overrides"] == ["critic_hidden=16-16", "num_samples=4"] and first["threads"] == 2
    assert first["steps"] == 3000 and first["eval_every"] == 500  # the embedded dataset's defaults, as train
    assert spec["trials"][0]["out"] == str((tmp_path / "s" / "runs" / labels[0]).resolve())


def test_ray_missing_is_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    assert cli.main(["sweep", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "misa-fast[sweep]"' in err and "Traceback" not in err


def test_module_and_help_do_not_import_ray():
    code = ("import sys; import misa_fast.sweep.grid, misa_fast.sweep.report; from misa_fast import cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=60)
    code = ("import sys; sys.modules['ray'] = None; from misa_fast import cli; "
            "sys.argv = ['misa-fast', 'sweep', '--help']; cli.main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and "--gpus-per-trial" in out.stdout and "--resume" in out.stdout


def test_report_lists_a_failed_trial(tmp_path):
    run_dir = tmp_path / "runs" / "pendulum-default" / "misa" / "seed3"
    run_dir.mkdir(parents=True)
    (run_dir / "trial.json").write_text(json.dumps({
        "label": "pendulum-default/misa/seed3", "dataset": "pendulum-default", "algo": "misa", "seed": 3,
        "attempts": [{"pid": 1, "status": "error", "error": "OSError: unable to open file"}]}))
    text, rep = report.make_report([tmp_path], tmp_path / "out")
    assert len(rep.runs) == 1 and not rep.tabled
    assert "failed: OSError: unable to open file" in text
    assert "misa seed 3 on pendulum-default" in text


def test_train_calls_on_evaluation_after_each_checkpoint(tmp_path):
    from misa_fast.training.loop import RunConfig, train

    seen = []

    def on_evaluation(step, row, checkpoint_path):
        from misa_fast.training import checkpoint as ckpt

        seen.append((step, "eval_return" in row, ckpt.load(checkpoint_path)["step"] if checkpoint_path else None))

    run = RunConfig(algo="td3bc", steps=40, eval_every=20, eval_episodes=1, log_every=10, out=str(tmp_path / "r"),
                    overrides=("actor_hidden=16-16", "critic_hidden=16-16", "batch_size=32"), progress=False,
                    tensorboard=False, threads=1, checkpoint_every=40)
    train(run, on_evaluation=on_evaluation)
    assert seen == [(20, True, None), (40, True, 40)]  # a checkpoint only where one is due


# ---------------------------------------------------------------------------------------- with Ray
def test_a_newer_tune_checkpoint_restores_the_run_directory(tmp_path):
    pytest.importorskip("ray.tune")
    from ray import tune

    from misa_fast.sweep import ray_tune as sweep_tune

    stored = tmp_path / "tune-ckpt"
    stored.mkdir()
    for name in ("checkpoint.pt", "run-progress.csv", "run-config.json"):
        (stored / name).write_text(name)
    (stored / "step.json").write_text(json.dumps({"step": 40}))
    checkpoint = tune.Checkpoint.from_directory(str(stored))
    run_dir = tmp_path / "run"  # another node: the run directory is not there
    assert sweep_tune.restore_from_tune(checkpoint, run_dir, local_step=None) == 40
    assert {p.name: p.read_text() for p in run_dir.iterdir()} == {
        "checkpoint.pt": "checkpoint.pt", "progress.csv": "run-progress.csv", "config.json": "run-config.json"}
    (run_dir / "checkpoint.pt").write_text("local")
    assert sweep_tune.restore_from_tune(checkpoint, run_dir, local_step=60) is None  # the local one is newer
    assert (run_dir / "checkpoint.pt").read_text() == "local"
    assert sweep_tune.restore_from_tune(None, run_dir, local_step=None) is None


def test_four_trials_share_one_gpu_concurrently(tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    res = _run(*TINY, "--seeds", "0-3", "--steps", 100, "--eval-every", 50, "--log-every", 50,
               "--cpus-per-trial", 0.5, "--gpus-per-trial", 0.25, "--num-cpus", 2, "--num-gpus", 1,
               "--progress-every", 1, "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 of 4 trials finished, 0 failed" in res.stdout
    assert "Configuration for experiment" not in res.stdout and "View detailed results" not in res.stdout
    assert "== sweep: 4 trials" in res.stdout and "steps/s" in res.stdout  # the live table
    from misa_fast.training.runtime import tune_host_allocator

    report_allocator = tune_host_allocator()
    spans = []
    for seed in range(4):
        run_dir = out / RUN_DIR / f"seed{seed}"
        trial = _trial(run_dir)
        assert len(trial["attempts"]) == 1 and trial["attempts"][0]["status"] == "finished"
        assert trial["attempts"][0]["host_allocator_tuned"] == report_allocator  # as misa-fast train
        spans.append((trial["attempts"][0]["started"], trial["attempts"][0]["ended"]))
        assert _steps(run_dir) == [50, 100] and (run_dir / "summary.json").exists()
        assert json.loads((run_dir / "config.json").read_text())["threads"] == 1  # floor(0.5) -> 1
    # Four trials at 0.25 GPU on one (logical) GPU and 0.5 CPU each on two: all ran at once.
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    status = json.loads((out / "sweep-status.json").read_text())
    assert [t["state"] for t in status["trials"]] == ["TERMINATED"] * 4
    text, rep = report.make_report([out], out)
    assert len(rep.tabled) == 4 and rep.cell("pendulum-default", "td3bc", "last").n == 4
    assert (out / "curves-pendulum-default.png").exists()


def test_killed_worker_resumes_from_its_checkpoint(tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    run_dir = out / RUN_DIR / "seed0"
    proc = subprocess.Popen(_sweep_cmd(*TINY, "--steps", 2000, "--eval-every", 200, "--log-every", 100,
                                       "--cpus-per-trial", 1, "--num-cpus", 2, "--no-progress", "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        def checkpointed():
            if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "trial.json").exists():
                return None
            evals = _eval_steps(run_dir) if (run_dir / "progress.csv").exists() else []
            return evals[-1] if evals else None

        first = _wait_for(checkpointed, 180, proc, "the first checkpoint")
        os.kill(_trial(run_dir)["attempts"][-1]["pid"], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    attempts = _trial(run_dir)["attempts"]
    assert len(attempts) == 2 and attempts[0]["pid"] != attempts[1]["pid"], attempts
    assert "status" not in attempts[0]  # killed: it recorded nothing more
    resumed = attempts[1]["resumed_from"]
    assert resumed is not None and resumed >= first and resumed % 200 == 0, (first, attempts)
    assert _steps(run_dir) == list(range(100, 2001, 100))  # strictly increasing, no duplicate, no gap
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2000


def test_killed_driver_is_finished_by_resume(tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    runs = [out / RUN_DIR / f"seed{s}" for s in range(2)]
    proc = subprocess.Popen(_sweep_cmd(*TINY, "--seeds", "0-1", "--steps", 400, "--eval-every", 100,
                                       "--log-every", 100, "--cpus-per-trial", 1, "--max-concurrent", 1,
                                       "--num-cpus", 2, "--no-progress", "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        _wait_for(lambda: any((r / "summary.json").exists() for r in runs), 180, proc, "a finished trial")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        _kill_session(proc.pid)
    finished = [r for r in runs if (r / "summary.json").exists()]
    assert len(finished) == 1
    before = {p: p.stat().st_mtime_ns for r in finished for p in r.rglob("*") if p.is_file()}
    res = _run("--resume", out, "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 trials finished, 0 failed" in res.stdout and "== sweep" not in res.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished trials untouched
    for r in runs:
        assert (r / "summary.json").exists()
        assert _steps(r) == [100, 200, 300, 400]
        attempts = _trial(r)["attempts"]
        if r in finished:
            assert len(attempts) == 1
        elif len(attempts) > 1:  # interrupted after a checkpoint: continued from it
            assert attempts[-1]["resumed_from"] in (None, 100, 200, 300, 400)


def test_failed_trial_is_reported_with_its_error(tmp_path):
    pytest.importorskip("ray.tune")
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(b"not an hdf5 file")
    out = tmp_path / "sweep"
    res = _run(*TINY, "--datasets", broken, "--steps", 20, "--eval-every", 10, "--max-failures", 0,
               "--num-cpus", 2, "--no-progress", "--out", out)
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "broken/td3bc/seed0" in ln and "ERROR" in ln)
    assert "Error" in line  # the exception's one-line message, e.g. OSError: Unable to open file
    # Tune's own console output stays out of the sweep's: no configuration box, no traceback.
    assert "Traceback" not in res.stdout + res.stderr and "Configuration for experiment" not in res.stdout
    text, rep = report.make_report([out], out)
    listed = [ln for ln in text.splitlines() if "broken/td3bc/seed0: td3bc seed 0 on" in ln]
    assert "## Not in the tables" in text and len(listed) == 1 and "failed: " in listed[0], text


def test_seeds_per_trial_packs_one_grid_points_seeds(tmp_path):
    plan = sweep.plan_trials(["pendulum-default"], ["td3bc"], [0, 1, 2], {}, {}, {"steps": 10}, tmp_path, 1.0, 2)
    assert [t["label"] for t in plan.trials] == ["pendulum-default/td3bc/seeds0,1", "pendulum-default/td3bc/seed2"]
    packed = plan.trials[0]
    assert packed["run"]["seeds"] == "0,1" and packed["out"] == str(tmp_path / RUN_DIR)
    # The seeds' run directories are the ones single-seed trials get.
    assert packed["members"] == [str(tmp_path / RUN_DIR / "seed0"), str(tmp_path / RUN_DIR / "seed1")]
    with pytest.raises(sweep.SweepError, match="--seeds-per-trial"):
        sweep.plan_trials(["pendulum-default"], ["td3bc"], [0], {}, {}, {}, tmp_path, 1.0, 0)


def test_a_packed_trial_resumes_after_its_worker_is_killed_and_reports_per_seed(tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    runs = [out / RUN_DIR / f"seed{s}" for s in range(3)]
    proc = subprocess.Popen(_sweep_cmd(*TINY, "--seeds", "0-2", "--seeds-per-trial", 3, "--steps", 1200,
                                       "--eval-every", 200, "--log-every", 100, "--cpus-per-trial", 1,
                                       "--num-cpus", 2, "--no-progress", "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        def checkpointed():
            if not all((r / "checkpoint.pt").exists() and (r / "trial.json").exists() for r in runs):
                return None
            evals = _eval_steps(runs[0]) if (runs[0] / "progress.csv").exists() else []
            return evals[-1] if evals else None

        _wait_for(checkpointed, 180, proc, "the first checkpoint")
        os.kill(_trial(runs[0])["attempts"][-1]["pid"], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "1 of 1 trials finished" in stdout
    for seed, run_dir in enumerate(runs):
        attempts = _trial(run_dir)["attempts"]
        assert len(attempts) == 2 and attempts[1]["resumed_from"] is not None, attempts
        assert _trial(run_dir)["seed"] == seed
        assert _steps(run_dir) == list(range(100, 1201, 100))
        config = json.loads((run_dir / "config.json").read_text())
        assert config["run"]["seed"] == seed
    records = [report.read_run(p) for p in report.find_run_dirs([out])]
    assert sorted(r.seed for r in records) == [0, 1, 2] and all(r.finished for r in records)
