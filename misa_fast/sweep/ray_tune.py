"""The Ray Tune side of ``misa-fast sweep`` (imported only when Ray is installed): the trial
function, the progress table and the driver. See ``misa_fast.sweep.grid`` for the command."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from misa_fast.sweep.files import STATUS_FILE, TRIAL_FILE, experiment_path, write_json

# What a trial's Tune checkpoint holds: enough to continue the run where the run directory is not
# visible (a retry on another node of a cluster whose --out is not shared). Run directory name ->
# name in the checkpoint (not config.json there, so `misa-fast report` never takes it for a run).
CHECKPOINT_FILES = {"checkpoint.pt": "checkpoint.pt", "progress.csv": "run-progress.csv",
                    "config.json": "run-config.json"}
STEP_FILE = "step.json"


# ------------------------------------------------------------------------------------------ trial
def _local_step(run_dir: Path) -> Optional[int]:
    from misa_fast.training import checkpoint as ckpt

    path = run_dir / ckpt.CHECKPOINT_NAME
    if not path.exists():
        return None
    return int(ckpt.load(path)["step"])


def restore_from_tune(checkpoint, run_dir: Path, local_step: Optional[int]) -> Optional[int]:
    """Copies Tune's checkpoint of this trial into its run directory when it is newer than the run
    directory's own (or that has none); returns the step it restored, else None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / STEP_FILE).exists() or not (d / "checkpoint.pt").exists():
            return None
        step = int(json.loads((d / STEP_FILE).read_text())["step"])
        if local_step is not None and local_step >= step:
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, stored in CHECKPOINT_FILES.items():
            if (d / stored).exists():
                tmp = run_dir / (name + ".restore")
                shutil.copyfile(d / stored, tmp)
                tmp.replace(run_dir / name)
    return step


def member_dirs(spec: dict) -> list:
    """The run directories a trial writes: its seeds' (a trial of ``--seeds-per-trial`` > 1), else its own."""
    return [Path(p) for p in spec.get("members") or [spec["out"]]]


def _record_all(spec: dict, update) -> None:
    """``update`` of every run directory's trial.json (each seed's records its own seed)."""
    seeds = spec.get("seeds") or [spec.get("seed")]
    for run_dir, seed in zip(member_dirs(spec), seeds):
        def member_update(state, seed=seed):
            update(state)
            if state.get("seed") is not None:
                state["seed"] = seed

        run_dir.mkdir(parents=True, exist_ok=True)
        _record(run_dir, member_update)


def _record(run_dir: Path, update) -> None:
    path = run_dir / TRIAL_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"attempts": []}
    update(state)
    write_json(path, state)


def _metrics(step: int, row: dict) -> dict:
    def num(x):
        return float("nan") if x is None else float(x)

    return {"step": int(step), "steps_per_s": num(row.get("steps_per_s")),
            "score": num(row.get("eval_normalized")), "eval_return": num(row.get("eval_return"))}


def _finished_metrics(run_dir: Path, steps: int) -> Optional[dict]:
    """The last evaluation's metrics of a run that already reached ``steps`` (its summary.json),
    else None. Reads only: a finished trial's files are left as they are."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if int(summary.get("steps", -1)) < int(steps):
        return None
    import csv

    last = {}
    with open(run_dir / "progress.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("eval_return"):
                last = row
    return _metrics(int(summary["steps"]), {k: (float(v) if v not in ("", None, "None") else None)
                                            for k, v in last.items() if k != "step"})


def _mean_metrics(metrics: list) -> dict:
    """Several seeds' metrics as one: the mean of each."""
    if len(metrics) == 1:
        return metrics[0]
    out = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
    out["step"] = int(min(m["step"] for m in metrics))
    return out


def run_trial(config: dict) -> None:
    """One trial: ``misa_fast.training.loop.train`` on the trial's run directory, resumed from its last
    checkpoint when there is one (a retry, or a restored sweep). Reports to Tune at each evaluation."""
    started = time.time()  # before torch is imported: when Tune started the trial
    from misa_fast.training.runtime import prefer_passive_waiting, tune_host_allocator

    # What `misa-fast train` does before torch is imported (misa_fast.cli): without the allocator
    # setting, two MISA trials on this 2-core machine ran at 11 steps/s each instead of 27.
    prefer_passive_waiting()
    allocator_tuned = tune_host_allocator()
    from misa_fast.training.loop import RunConfig, train

    spec = config["trial"]
    run_dir = Path(spec["out"])
    runs = member_dirs(spec)
    done = [_finished_metrics(d, spec["run"]["steps"]) for d in runs]
    if all(d is not None for d in done):  # finished before the driver recorded it (a restored sweep): nothing to redo
        tune.report(_mean_metrics(done))
        return
    restored_steps, local_steps = [], []
    checkpoint = tune.get_checkpoint()
    for d in runs:
        d.mkdir(parents=True, exist_ok=True)
        local = _local_step(d)
        if "members" in spec and checkpoint is not None:
            with checkpoint.as_directory() as stored:
                restored = restore_from_tune(tune.Checkpoint.from_directory(Path(stored) / d.name), d, local) \
                    if (Path(stored) / d.name).is_dir() else None
        else:
            restored = restore_from_tune(checkpoint, d, local)
        restored_steps.append(restored)
        local_steps.append(restored if restored is not None else local)
    restored = next((r for r in restored_steps if r is not None), None)
    resumed_from = local_steps[0]
    context = tune.get_context()
    attempt = {"pid": os.getpid(), "node": socket.gethostname(), "started": started,
               "resumed_from": resumed_from, "restored_from_tune": restored is not None,
               "host_allocator_tuned": allocator_tuned}

    def start(state):
        state.update(label=spec["label"], dataset=spec["dataset"], algo=spec["algo"], seed=spec["seed"],
                     grid=spec.get("grid", {}), trial_id=context.get_trial_id(), trial_name=context.get_trial_name())
        state.pop("failed", None)  # a failure the driver recorded before this retry
        state.pop("tune_error", None)
        state["attempts"].append(attempt)

    _record_all(spec, start)

    def on_evaluation(step: int, row: dict, checkpoint_path) -> None:
        metrics = _metrics(step, row)
        if checkpoint_path is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="misa-fast-ckpt-") as tmp:
            for d in runs:  # a packed trial keeps each seed's files under its directory name
                target = Path(tmp) / d.name if "members" in spec else Path(tmp)
                target.mkdir(exist_ok=True)
                for name, stored in CHECKPOINT_FILES.items():
                    if (d / name).exists():
                        shutil.copyfile(d / name, target / stored)
                (target / STEP_FILE).write_text(json.dumps({"step": int(step)}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    fields = {k: (tuple(v) if k == "overrides" else v) for k, v in spec["run"].items()}
    try:
        summary = train(RunConfig(**fields, out=str(run_dir), resume=True), on_evaluation=on_evaluation)
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
        attempt.update(ended=time.time(), status="error", error=message,
                       traceback=traceback.format_exc(limit=20))
        _record_all(spec, lambda state: state["attempts"].__setitem__(-1, attempt))
        raise
    attempt.update(ended=time.time(), status="finished", steps=summary["steps"])
    _record_all(spec, lambda state: state["attempts"].__setitem__(-1, attempt))


# --------------------------------------------------------------------------------------- progress
def _label(trial) -> str:
    return trial.config.get("trial", {}).get("label", trial.trial_id)


def _fmt(x, spec: str) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if x != x else format(x, spec)


class SweepProgress(tune.Callback):
    """A table of the trials (state, step, steps/s, last normalized score) and a total, printed every
    ``every`` seconds while something changed, and a line at each trial's end or failure."""

    def __init__(self, every: float = 10.0, total: Optional[int] = None, stream=None):
        self.every = every
        self.total = total
        self.stream = stream
        self._last_print = 0.0
        self._dirty = True
        self._start = time.time()

    def _out(self):
        return self.stream or sys.stdout

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._dirty = True

    def on_trial_start(self, iteration, trials, trial, **info):
        self._dirty = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        print(f"[sweep] finished {_label(trial)}: step {r.get('step', '-')}, score {_fmt(r.get('score'), '.1f')}",
              file=self._out(), flush=True)
        self._dirty = True

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[sweep] FAILED {_label(trial)} (after {trial.num_failures} failure(s)): "
              f"{error_line(trial_error_text(trial))}", file=self._out(), flush=True)
        self._dirty = True

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[sweep] retrying {_label(trial)} from its last checkpoint (failure {trial.num_failures})",
              file=self._out(), flush=True)
        self._dirty = True

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if self._dirty and now - self._last_print >= self.every:
            self.print_table(trials)

    def on_experiment_end(self, trials, **info):
        self.print_table(trials)

    def print_table(self, trials) -> None:
        self._last_print, self._dirty = time.time(), False
        print(progress_table(trials, time.time() - self._start, self.total), file=self._out(), flush=True)


def progress_table(trials, elapsed: float, total_trials: Optional[int] = None) -> str:
    counts: dict = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    if total_trials and total_trials > len(trials):  # Tune creates trials as slots free up
        counts["NOT STARTED"] = total_trials - len(trials)
    total = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    width = max([len(_label(t)) for t in trials] + [5])
    lines = [f"== sweep: {max(len(trials), total_trials or 0)} trials ({total}), {elapsed:.0f} s",
             f"  {'trial':<{width}}  {'state':<10} {'step':>15} {'steps/s':>8} {'score':>7}"]
    for t in trials:
        r = t.last_result or {}
        steps = t.config.get("trial", {}).get("run", {}).get("steps", "?")
        step = r.get("step")
        lines.append(f"  {_label(t):<{width}}  {t.status:<10} "
                     f"{(str(step) if step is not None else '-') + '/' + str(steps):>15} "
                     f"{_fmt(r.get('steps_per_s'), '.1f'):>8} {_fmt(r.get('score'), '.1f'):>7}")
    return "\n".join(lines)


def trial_error_text(trial) -> Optional[str]:
    """The trial's own record of its error (trial.json), else Tune's error text."""
    spec = trial.config.get("trial", {})
    own = _last_attempt_error(member_dirs(spec)[0]) if spec.get("out") else None
    if own:
        return own
    try:
        return trial.get_error()
    except Exception:  # noqa: BLE001 - storage not readable: no text, the state still says ERROR
        return None


def _last_attempt_error(run_dir: Path) -> Optional[str]:
    try:
        attempts = json.loads((run_dir / TRIAL_FILE).read_text()).get("attempts", [])
    except (OSError, ValueError):
        return None
    if attempts and attempts[-1].get("status") == "error":
        return attempts[-1].get("error")
    return None


def error_line(text: Optional[str]) -> str:
    """One line of an error text: the last non-blank line of a traceback (the exception)."""
    if not text:
        return "(no error text)"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no error text)"


# ----------------------------------------------------------------------------------------- driver
def _dirname(trial) -> str:
    return _label(trial).replace("/", "_").replace("=", "-")[:120] + "_" + trial.trial_id


def run_sweep(sweep: dict, resume: bool = False, progress: bool = True, progress_every: float = 10.0) -> int:
    out = Path(sweep["out"])
    resources = {"cpu": sweep["resources"]["cpu"], "gpu": sweep["resources"]["gpu"]}
    # Tiny trials checkpoint every few seconds; Tune's warning about snapshot frequency is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own console output (its configuration box, result paths, and each failed attempt's
    # traceback) would bury the live table and the summary, which say the same per trial (the error
    # of a failed one included; its full traceback is in Tune's logs under the sweep directory).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    init = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    # Ray puts the driver's working directory on its workers' sys.path. From a checkout's root after a
    # non-editable install that would make trials import the checkout's misa_fast/, which has no
    # compiled extension; every path of the sweep is absolute, so the driver works from the sweep dir.
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    if sweep.get("address"):
        ray.init(address=sweep["address"], **init)
    else:
        ray.init(num_cpus=sweep.get("num_cpus"), num_gpus=sweep.get("num_gpus"), **init)
    cluster = ray.cluster_resources()
    gpu = f" and {resources['gpu']:g} GPU" if resources["gpu"] else ""
    print(f"misa-fast sweep: {len(sweep['trials'])} trials, each {resources['cpu']:g} CPU{gpu}; Ray has "
          f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; sweep directory {out}, "
          f"Tune state {experiment_path(sweep)}", file=sys.stderr, flush=True)
    if cluster.get("CPU", 0) < resources["cpu"] or cluster.get("GPU", 0) < resources["gpu"]:
        print("misa-fast sweep: no node can hold one trial: lower --cpus-per-trial / --gpus-per-trial",
              file=sys.stderr)
        ray.shutdown()
        return 2
    trainable = tune.with_resources(run_trial, resources)
    callbacks = [SweepProgress(progress_every, total=len(sweep["trials"]))] if progress else []
    path = experiment_path(sweep)
    if resume:
        if not tune.Tuner.can_restore(path):
            print(f"misa-fast sweep: --resume: no Tune state at {path} (the sweep never started?)",
                  file=sys.stderr)
            ray.shutdown()
            return 2
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        try:  # the progress choice of this invocation, not the saved one
            tuner._local_tuner.get_run_config().callbacks = callbacks
        except AttributeError:
            pass
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(sweep["trials"])},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.get("max_concurrent"),
                                        trial_dirname_creator=_dirname),
            run_config=tune.RunConfig(
                name=sweep["name"], storage_path=sweep["storage"], verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=sweep["max_failures"]),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    started = time.time()
    results = tuner.fit()
    status = summarize(results, sweep, time.time() - started)
    ray.shutdown()
    return 1 if status["failed"] else 0


def summarize(results, sweep: dict, wall_s: float) -> dict:
    """Prints one line per trial and writes sweep-status.json; a failed trial's error also goes into
    its run directory's trial.json (what ``misa-fast report`` lists)."""
    by_label = {}
    for result in results:
        spec = (result.config or {}).get("trial", {})
        metrics = result.metrics or {}
        entry = {"label": spec.get("label"), "out": spec.get("out"), "step": metrics.get("step"),
                 "score": metrics.get("score"), "state": "ERROR" if result.error else "TERMINATED"}
        if result.error is not None:
            run_dir = member_dirs(spec)[0] if spec.get("out") else None
            own = _last_attempt_error(run_dir) if run_dir else None
            text = own or str(result.error)
            entry["error"] = error_line(text)
            if run_dir is not None:
                _record_all(spec, lambda state: state.update(failed=entry["error"],
                                                             tune_error=str(result.error)[-4000:]))
        by_label[entry["label"]] = entry
    trials = [by_label.get(t["label"], {"label": t["label"], "out": t["out"], "state": "NOT RUN"})
              for t in sweep["trials"]]
    failed = [t for t in trials if t["state"] != "TERMINATED"]
    status = {"wall_s": wall_s, "finished": len(trials) - len(failed), "failed": len(failed), "trials": trials}
    write_json(Path(sweep["out"]) / STATUS_FILE, status)
    width = max(len(t["label"]) for t in trials)
    print(f"misa-fast sweep: {status['finished']} of {len(trials)} trials finished, {len(failed)} failed, "
          f"{wall_s:.0f} s", flush=True)
    for t in trials:
        tail = f"  {t.get('error')}" if t.get("error") else ""
        print(f"  {t['label']:<{width}}  {t['state']:<10} step {t.get('step', '-')!s:>8}  score "
              f"{_fmt(t.get('score'), '.1f'):>6}{tail}", flush=True)
    if failed:
        print(f"misa-fast sweep: failed trials keep their checkpoints: `misa-fast sweep --resume {sweep['out']}` "
              f"retries them", flush=True)
    print(f"misa-fast sweep: results: misa-fast report {sweep['out']}", flush=True)
    return status
