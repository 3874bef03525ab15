"""``misa-fast sweep``: a grid of ``misa-fast train`` runs on Ray Tune, on one machine or a cluster.

    misa-fast sweep --datasets hopper-medium-v2 walker2d-medium-v2 --algos misa cql td3bc \\
        --seeds 0-4 --steps 1000000 --gpus-per-trial 0.25 --out sweeps/loco   # a local Ray instance
    misa-fast sweep --resume sweeps/loco        # the driver died or was stopped: finish what is left
    misa-fast sweep ... --address auto --storage /shared/sweeps   # join a running Ray cluster
    misa-fast report sweeps/loco                # the tables and the learning curves

The grid is datasets x algorithms x seeds x every ``--grid KEY=V1,V2`` axis. One trial is one
``misa_fast.training.loop.train`` call (the code path of ``misa-fast train``) whose run directory is
``<out>/runs/<dataset>/<algo>[-KEY=V...]/seed<N>``, an ordinary run directory, plus ``trial.json``
(the trial's attempts: process, node, the step it resumed from, its error if it failed).

A trial reports to Tune at every evaluation, with its checkpoint. A trial whose worker dies is
retried (``--max-failures``) from its last checkpoint: the run directory's, or Tune's copy when that
one is newer (a retry on a node that cannot see the run directory). ``--resume DIR`` restores the
sweep saved in DIR (``sweep.json`` holds its arguments): finished trials are not rerun, interrupted
and failed ones continue from their checkpoints.

Ray is an optional extra (``pip install "misa-fast[sweep]"``); this module, the argument checks
and ``--help`` work without it (the Ray side lives in ``misa_fast.sweep.ray_tune``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from misa_fast.options import add_options, option
from misa_fast.sweep.files import STATUS_FILE, SWEEP_FILE, TRIAL_FILE, experiment_path, write_json  # noqa: F401

RAY_MISSING = ('misa-fast sweep needs Ray Tune, an optional extra: pip install "misa-fast[sweep]" '
               '(or pip install "ray[tune]")')
RUNS_DIR = "runs"
TUNE_NAME = "tune"  # Tune's experiment directory under the storage path (default: the sweep directory)


class SweepError(ValueError):
    """Bad sweep input, found before any trial starts."""


# --------------------------------------------------------------------------------------- parsing
def parse_seeds(items) -> list:
    """``0-4``, ``0,1,2``, ``0 1 2`` or any mix: sorted, without repeats."""
    seeds = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise SweepError(f"--seeds: empty range {part!r} (write LOW-HIGH, e.g. 0-4)")
                seeds.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                seeds.append(int(part))
            else:
                raise SweepError(f"--seeds: {part!r} is not a seed: write a list (0,1,2) or a range (0-4)")
    if not seeds:
        raise SweepError("--seeds: no seed given")
    return sorted(set(seeds))


def parse_grid(items) -> dict:
    """``KEY=V1,V2`` (repeatable) -> {key: [values]}, in the order given. Tuple values use ``-``
    (``hidden_sizes=64-64,256-256``), as ``--set`` accepts them."""
    grid: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not key or not values:
            raise SweepError(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise SweepError(f"--grid: {key!r} is given twice (list all its values in one --grid {key}=...)")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid {key}: a value is repeated in {text!r}")
        grid[key] = values
    return grid


def parse_set(items) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = text.strip()
    return out


# ------------------------------------------------------------------------------------ validation
def _close(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_algo(name: str):
    from misa_fast.agents import algorithms as algos

    if name not in algos.ALGORITHMS:
        raise SweepError(f"--algos: unknown algorithm {name!r}{_close(name, algos.ALGORITHMS)} "
                         f"(known: {', '.join(algos.ALGORITHMS)})")
    return algos.get(name)


def check_dataset(name: str) -> str:
    """The dataset as trials will name it (an existing path made absolute: trials run elsewhere).
    Nothing is downloaded here; see ``fetch_datasets``."""
    from misa_fast.data import minari as minari_ids
    from misa_fast.data import registry

    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name == registry.DEFAULT_DATASET or name in registry.D4RL_URLS or minari_ids.is_minari_id(name):
        return name
    known = [registry.DEFAULT_DATASET, *registry.D4RL_URLS]
    raise SweepError(f"--datasets: {name!r} is neither an existing file or directory nor a known dataset "
                     f"name{_close(name, known)} (D4RL names such as 'hopper-medium-v2', "
                     f"{registry.DEFAULT_DATASET!r}, Minari ids such as 'mujoco/hopper/medium-v0', or a path)")


def dataset_label(dataset: str) -> str:
    """The run directory component of a dataset, as ``misa-fast train`` names its default --out."""
    from misa_fast.data.minari import is_minari_id

    path = Path(dataset)
    label = path.stem if path.suffix in (".hdf5", ".h5", ".npz") else path.name
    if is_minari_id(dataset) and not path.exists():
        label = str(dataset).replace("/", "-")
    return label


def _preset_for(dataset: str, preset: Optional[str]) -> str:
    from misa_fast.agents.config_base import preset_name_for_env

    if preset is not None:
        return preset
    try:
        return preset_name_for_env(dataset_label(dataset) if Path(dataset).exists() else dataset)
    except ValueError:
        return "locomotion"


def _combinations(grid: dict) -> list:
    combos = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def _fmt_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", value)


@dataclasses.dataclass
class Plan:
    trials: list  # one dict per trial: label, dataset, algo, seed, grid, out, run (RunConfig fields)
    notes: list  # keys applied to some algorithms only


def plan_trials(datasets, algos, seeds, grid: dict, sets: dict, run_options: dict, out: Path,
                cpus_per_trial: float, seeds_per_trial: int = 1) -> Plan:
    """Checks every entry (datasets, algorithms, config keys and values of every grid point) and
    returns the trials. A config key applies to the algorithms whose config has it; a key no
    algorithm of the sweep knows is an error naming it and the closest keys.

    ``seeds_per_trial`` > 1 packs the seeds of one (dataset, algorithm, grid point) into trials of
    that many seeds, trained together (``misa-fast train --seeds``); such a trial has ``seeds`` and
    ``members`` (its seeds' run directories, the ones single-seed trials would have)."""
    if seeds_per_trial < 1:
        raise SweepError(f"--seeds-per-trial: expected a positive number of seeds, got {seeds_per_trial}")
    from misa_fast.agents import algorithms as algos_lib
    from misa_fast.agents.config_base import apply_overrides, unknown_key_message

    if not datasets or not algos:
        raise SweepError("give at least one --datasets entry and one --algos entry")
    datasets = [check_dataset(d) for d in datasets]
    algo_specs = [check_algo(a) for a in algos]
    labels = {}
    for d in datasets:
        if dataset_label(d) in labels and labels[dataset_label(d)] != d:
            raise SweepError(f"--datasets: {labels[dataset_label(d)]!r} and {d!r} would share the run "
                             f"directory name {dataset_label(d)!r}: rename one")
        labels[dataset_label(d)] = d
    if len(set(datasets)) != len(datasets) or len(set(algos)) != len(algos):
        raise SweepError("--datasets / --algos: an entry is repeated")

    fields_by_algo = {a.name: algos_lib.config_class(a.family).field_types() for a in algo_specs}
    all_fields = set().union(*fields_by_algo.values())
    notes = []
    for where, keys in (("--set", list(sets)), ("--grid", list(grid))):
        for key in keys:
            if key not in all_fields:
                raise SweepError(f"{where} {key}: {unknown_key_message(dict.fromkeys(all_fields), key)} "
                                 f"(for algorithms {', '.join(algos)})")
            skipped = [a for a in algos if key not in fields_by_algo[a]]
            if skipped:
                notes.append(f"{where} {key} applies to {', '.join(a for a in algos if a not in skipped)} "
                             f"only ({', '.join(skipped)} have no such config key)")
    threads = max(1, math.floor(cpus_per_trial))
    trials = []
    for dataset in datasets:
        for algo in algo_specs:
            known = fields_by_algo[algo.name]
            algo_grid = {k: v for k, v in grid.items() if k in known}
            algo_sets = {k: v for k, v in sets.items() if k in known}
            preset = _preset_for(dataset, run_options.get("preset"))
            for combo in _combinations(algo_grid):
                overrides = tuple(f"{k}={v}" for k, v in {**algo_sets, **combo}.items())
                try:  # every value of every grid point, with the domain preset the trial will use
                    base = algos_lib.build_config(algo.name, preset, dataset_label(dataset), seed=0,
                                                  device="cpu", obs_dim=3, act_dim=1)
                    apply_overrides(base, overrides)
                except ValueError as err:
                    point = ", ".join(overrides) or "no overrides"
                    raise SweepError(f"{algo.name} on {dataset_label(dataset)} with {point}: {err}") from None
                name = algo.name + "".join(f"-{k}={_fmt_value(v)}" for k, v in combo.items())
                point = out / RUNS_DIR / dataset_label(dataset) / name
                for first in range(0, len(seeds), seeds_per_trial):
                    pack = [int(s) for s in seeds[first:first + seeds_per_trial]]
                    run = {**run_options, "dataset": dataset, "algo": algo.name, "seed": pack[0],
                           "overrides": list(overrides), "threads": threads, "progress": False}
                    if len(pack) == 1:
                        label = f"{dataset_label(dataset)}/{name}/seed{pack[0]}"
                        trials.append({"label": label, "dataset": dataset, "algo": algo.name, "seed": pack[0],
                                       "grid": combo, "out": str(out / RUNS_DIR / label), "run": run})
                        continue
                    seeds_text = ",".join(map(str, pack))
                    run["seeds"] = seeds_text
                    trials.append({"label": f"{dataset_label(dataset)}/{name}/seeds{seeds_text}", "dataset": dataset,
                                   "algo": algo.name, "seed": pack[0], "seeds": pack, "grid": combo,
                                   "out": str(point), "members": [str(point / f"seed{s}") for s in pack],
                                   "run": run})
    return Plan(trials, notes)


def fetch_datasets(datasets) -> None:
    """Resolves (downloads when missing and online) every named dataset once, in the driver, so
    concurrent trials never download the same file. On a cluster the cache must be shared (see the
    docs' Sweeps page), or each node fetches its own copy when its first trial starts."""
    from misa_fast.data import DEFAULT_DATASET
    from misa_fast.data.download import resolve_dataset

    for name in datasets:
        if name == DEFAULT_DATASET or Path(name).exists():
            continue
        try:
            resolve_dataset(name)
        except FileNotFoundError as err:
            raise SweepError(f"--datasets {name}: {err}") from None


# ---------------------------------------------------------------------------------------------- CLI
@dataclass
class SweepConfig:
    """The sweep's own options (a trial's settings are ``RunConfig``'s, see ``TRIAL_OPTIONS``)."""

    # the grid
    datasets: tuple = option((), cli_default=None, nargs="+", metavar="DATASET",
                             help="D4RL names, Minari ids or files (default: the embedded Pendulum dataset)")
    algos: tuple = option((), cli_default=None, nargs="+", metavar="NAME", help="algorithms (default: misa)")
    seeds: tuple = option(("0",), cli_default=["0"], nargs="+", metavar="SEEDS",
                          help="seeds: a list (0,1,2 or 0 1 2) or a range (0-4); default: 0")
    seeds_per_trial: int = option(1, metavar="N",
                                  help="seeds trained together in one trial (one process, one update for all of "
                                       "them, as misa-fast train --seeds); each still writes its own seed<N> run "
                                       "directory (default 1)")
    grid: tuple = option((), repeatable=True, metavar="KEY=V1,V2",
                         help="a config key's values, one trial each (repeatable; tuples as 64-64)")
    overrides: tuple = option((), flag="--set", repeatable=True, metavar="KEY=VALUE",
                              help="a config value for every trial (repeatable)")
    # resources and faults
    cpus_per_trial: float = option(1.0, help="CPU share of a trial (default 1); its intra-op threads are "
                                             "max(1, floor(share))")
    gpus_per_trial: float = option(0.0, help="GPU share of a trial, e.g. 0.25 = four trials per GPU (default 0)")
    max_concurrent: Optional[int] = option(None, help="at most this many trials at a time (default: as resources "
                                                      "allow)")
    max_failures: int = option(2, help="retries of a trial whose process fails or dies, each from its last "
                                       "checkpoint (default 2)")
    num_cpus: Optional[float] = option(None, help="CPUs of the local Ray instance (default: all); not with "
                                                  "--address")
    num_gpus: Optional[float] = option(None, help="GPUs of the local Ray instance (default: detected); not with "
                                                  "--address")
    # where
    out: Optional[str] = option(None, help="the sweep directory: sweep.json, runs/, Tune's state (default: "
                                           "sweeps/<date-time>); on a cluster a path every node sees")
    resume: Optional[str] = option(None, metavar="DIR",
                                   help="finish the sweep in DIR (its sweep.json holds the arguments)")
    address: Optional[str] = option(None, help="join a running Ray cluster (e.g. auto, or HEAD_IP:6379)")
    storage: Optional[str] = option(None, help="Tune's storage path or URI for trial results and checkpoints (a "
                                               "shared filesystem or s3://..., default: the sweep directory)")
    progress: bool = option(True, help="no live table (only the final summary)")
    progress_every: float = option(10.0, metavar="S", help="seconds between progress tables (default 10)")


GRID_OPTIONS = ("datasets", "algos", "seeds", "seeds_per_trial", "grid", "overrides")
RESOURCE_OPTIONS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures", "num_cpus", "num_gpus")
WHERE_OPTIONS = ("out", "resume", "address", "storage", "progress", "progress_every")
# A trial's settings, as misa-fast train takes them (the run directory, seed and algorithm come from the grid).
TRIAL_OPTIONS = ("steps", "eval_every", "eval_episodes", "checkpoint_every", "log_every", "preset", "env", "device",
                 "backend", "data_source", "obs_norm", "tensorboard", "matmul_precision")


def configure_parser(p: argparse.ArgumentParser) -> None:
    from misa_fast.training.loop import RunConfig, add_shortcut_options

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    add_options(p.add_argument_group("grid"), SweepConfig, include=GRID_OPTIONS)
    trial = p.add_argument_group("each trial (as misa-fast train)")
    add_options(trial, RunConfig, include=TRIAL_OPTIONS)
    add_shortcut_options(trial)
    add_options(p.add_argument_group("resources and faults"), SweepConfig, include=RESOURCE_OPTIONS)
    add_options(p.add_argument_group("where"), SweepConfig, include=WHERE_OPTIONS)


def _run_options(args) -> dict:
    embedded = not args.datasets
    flags = {"num_samples": args.num_samples, "hmc_burn_in": args.burn_in}
    return {
        "env": args.env, "preset": args.preset,
        "steps": args.steps if args.steps is not None else (3_000 if embedded else 1_000_000),
        "device": args.device,
        "eval_every": args.eval_every if args.eval_every is not None else (500 if embedded else 10_000),
        "eval_episodes": args.eval_episodes, "checkpoint_every": args.checkpoint_every, "log_every": args.log_every,
        "data_source": args.data_source, "backend": args.backend, "obs_norm": args.obs_norm,
        "tensorboard": args.tensorboard,
    }, {k: str(v) for k, v in flags.items() if v is not None}


def build_sweep(args) -> dict:
    """The sweep's saved description (sweep.json): arguments, resources and every trial."""
    from misa_fast.data import DEFAULT_DATASET

    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.gpus_per_trial > 1 and not float(args.gpus_per_trial).is_integer():
        raise SweepError("--gpus-per-trial: a share above 1 must be a whole number of GPUs")
    if args.address and (args.num_cpus is not None or args.num_gpus is not None):
        raise SweepError("--num-cpus / --num-gpus size a local Ray instance; a cluster (--address) has its own")
    if args.device == "cuda" and args.gpus_per_trial <= 0:
        raise SweepError("--device cuda: give each trial a GPU share with --gpus-per-trial (e.g. 0.25)")
    out = Path(args.out or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    run_options, flag_sets = _run_options(args)
    if args.device == "auto":  # a trial without a GPU share must not pick up a GPU Ray did not give it
        run_options["device"] = "auto" if args.gpus_per_trial > 0 else "cpu"
    sets = {**flag_sets, **parse_set(args.overrides)}
    datasets = args.datasets or [DEFAULT_DATASET]
    plan = plan_trials(datasets, args.algos or ["misa"], parse_seeds(args.seeds), parse_grid(args.grid), sets,
                       run_options, out, args.cpus_per_trial, args.seeds_per_trial)
    storage = args.storage or str(out)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return {
        "version": 1, "out": str(out), "argv": list(getattr(args, "argv", []) or []),
        "storage": storage, "name": TUNE_NAME if not args.storage else f"{out.name}-{TUNE_NAME}",
        "address": args.address, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
        "resources": {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
        "max_concurrent": args.max_concurrent, "max_failures": args.max_failures,
        "notes": plan.notes, "trials": plan.trials,
    }



def load_sweep(directory) -> dict:
    path = Path(directory).expanduser() / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"--resume {directory}: no {SWEEP_FILE} there (not a sweep directory of misa-fast sweep)")
    return json.loads(path.read_text())



def run(args: argparse.Namespace) -> int:
    args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "sweep" else []
    try:
        if args.resume:
            sweep = load_sweep(args.resume)
            given = [flag for flag, value in (("--datasets", args.datasets), ("--algos", args.algos),
                                              ("--grid", args.grid), ("--set", args.overrides),
                                              ("--steps", args.steps), ("--out", args.out)) if value]
            if given:
                print(f"misa-fast sweep: --resume: {', '.join(given)} ignored: the sweep runs as saved in "
                      f"{Path(args.resume) / SWEEP_FILE}", file=sys.stderr)
            if args.address:
                sweep["address"] = args.address
        else:
            sweep = build_sweep(args)
            out = Path(sweep["out"])
            if (out / SWEEP_FILE).exists():
                raise SweepError(f"{out} already holds a sweep: finish it with --resume {out}, or choose "
                                 "another --out")
    except SweepError as err:
        print(f"misa-fast sweep: {err}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        print(f"misa-fast sweep: {RAY_MISSING}", file=sys.stderr)
        return 2
    for note in sweep["notes"]:
        print(f"misa-fast sweep: note: {note}", file=sys.stderr)
    out = Path(sweep["out"])
    if not args.resume:
        try:
            fetch_datasets(sorted({t["dataset"] for t in sweep["trials"]}))
        except SweepError as err:
            print(f"misa-fast sweep: {err}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SWEEP_FILE, sweep)
    from misa_fast.sweep import ray_tune as sweep_tune

    return sweep_tune.run_sweep(sweep, resume=bool(args.resume), progress=args.progress,
                                progress_every=args.progress_every)
