"""``misa-fast train``: the training loop — batches, updates, evaluation, logs, checkpoints, resume.

    misa-fast train                                   # embedded Pendulum dataset, a few CPU minutes
    misa-fast train --dataset hopper-medium-v2 --steps 1000000 --device cuda
    misa-fast train --dataset mujoco/hopper/medium-v0  # a Minari id: Minari's cache, its env spec and scores
    misa-fast train --dataset data/hopper-medium.hdf5 --set hmc_mode=parallel   # any D4RL-format file
    misa-fast train --out runs/x --resume             # continue after a kill, bit-identical on CPU

A run directory holds ``config.json``, ``progress.csv`` (every metric; TensorBoard events under
``tb/`` when tensorboard is installed), ``checkpoint.pt`` (written atomically every
``--checkpoint-every`` steps), and at the end ``learning_curve.png`` and ``policy.pt2`` (a
torch.export program usable without misa-fast).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from misa_fast.options import add_options, from_args, option
from misa_fast.replay.sources import SOURCES, make_source
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.evaluation import evaluate_policy
from misa_fast.training.progress import ProgressLog, metrics_to_floats
from misa_fast.training.runtime import apply_threads, choose_threads, resolve_device


def _algorithm_names():
    from misa_fast.agents.algorithms import ALGORITHMS

    return list(ALGORITHMS)


def _algorithm_help() -> str:
    from misa_fast.agents.algorithms import ALGORITHMS

    return "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values())


PRESET_NAMES = ("locomotion", "antmaze", "adroit", "kitchen", "pendulum")


@dataclass
class RunConfig:
    """Run-level settings (the learner's hyperparameters live in the agent's config). Each field is
    also an option of ``misa-fast train`` (and, for a trial's settings, of ``misa-fast sweep``)."""

    dataset: Optional[str] = option(
        None, help="D4RL name (e.g. hopper-medium-v2), Minari id (e.g. mujoco/hopper/medium-v0), a .hdf5/.npz file "
                   "or a Minari directory; default: the embedded Pendulum dataset")
    env: Optional[str] = option(
        None, help="gymnasium id to evaluate in (default: the environment the dataset records, e.g. a Minari "
                   "dataset's env spec, else the one of its domain)")
    algo: str = option("misa", metavar="NAME", choices=_algorithm_names, help="algorithm (default: misa)")
    preset: Optional[str] = option(None, choices=PRESET_NAMES,
                                   help="hyperparameter preset (default: from the dataset name)")
    steps: int = option(1_000_000, cli_default=None,
                        help="total training steps (default: 1000000; 3000 for the embedded dataset)")
    seed: int = option(0, help="the run's seed (networks, batches, noise, evaluation episodes)")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    out: Optional[str] = option(None, help="run directory (default: runs/<dataset>-<algo>-seed<seed>)")
    eval_every: int = option(10_000, cli_default=None,
                             help="steps between evaluations (default: 10000; 500 for the embedded dataset)")
    eval_episodes: int = option(10, help="episodes per evaluation")
    checkpoint_every: Optional[int] = option(None, help="steps between checkpoints (default: every evaluation)")
    log_every: int = option(1_000, help="steps between progress.csv rows")
    data_source: str = option("auto", choices=SOURCES,
                              help="batches from the C++ prefetcher or a device-resident dataset (auto: device on "
                                   "CUDA)")
    backend: str = option("eager", choices=("eager", "compiled", "graph"),
                          help="training step: eager PyTorch, torch.compile of the losses, or the whole update "
                               "captured in a CUDA graph (CUDA only)")
    threads: Optional[int] = option(None, metavar="N",
                                    help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else the rule of "
                                         "misa_fast.training.runtime, printed at start)")
    obs_norm: Optional[str] = option(None, choices=("none", "scalar", "per-dim"),
                                     help="observation normalisation (default: per-dim for td3bc/spot, none otherwise)")
    overrides: tuple = option((), flag="--set", metavar="KEY=VALUE", repeatable=True,
                              help="override an agent config value, e.g. --set num_samples=20 (repeatable)")
    progress: bool = option(True, help="no progress bar")
    tensorboard: bool = option(True, help="no TensorBoard events")
    resume: bool = option(False, help="continue the checkpoint in --out")


class NonFiniteTraining(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- setup
def build_agent_config(run: RunConfig, dataset_name: str, obs_dim: int, act_dim: int, device: torch.device):
    """Domain preset, then the algorithm's settings (misa_fast.agents.algorithms), then ``--set`` overrides."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.agents.config_base import apply_overrides, preset_name_for_env

    if run.preset is not None:
        name = run.preset
    else:
        try:
            name = preset_name_for_env(dataset_name)
        except ValueError:
            name = "locomotion"
    cfg = algos.build_config(run.algo, name, dataset_name, seed=run.seed, device=str(device), obs_dim=obs_dim,
                             act_dim=act_dim)
    return apply_overrides(cfg, run.overrides)


def default_out_dir(run: RunConfig, dataset: str) -> Path:
    from misa_fast.data.minari import is_minari_id

    path = Path(dataset)
    label = path.stem if path.suffix in (".hdf5", ".h5", ".npz") else path.name
    if is_minari_id(dataset) and not path.exists():  # mujoco/hopper/medium-v0 -> mujoco-hopper-medium-v0
        label = str(dataset).replace("/", "-")
    return Path("runs") / f"{label}-{run.algo}-seed{run.seed}"


# ------------------------------------------------------------------------------------------- logging
def snis_collapse_warning(row: dict, step: int) -> Optional[str]:
    """The warning for a logged row whose SNIS weights have collapsed (mean Kish ESS per state below
    losses.SNIS_ESS_WARN), else None."""
    from misa_fast.agents.losses import SNIS_ESS_WARN

    ess = row.get("snis_ess")
    if ess is None or not ess < SNIS_ESS_WARN:
        return None
    return (f"warning: step {step}: the SNIS weights of the actor's correction term have collapsed (Kish ESS "
            f"per state: mean {ess:.2f}, 5th percentile {row.get('snis_ess_p05', float('nan')):.2f}, of "
            f"num_samples): the tilt exp(Q) is too sharp for the K policy samples; raise num_samples or use "
            f"unbiased_estimator=hmc with hmc_space=pre_tanh")


# -------------------------------------------------------------------------------------------- train
def check_same_data(state: dict, info, data_fingerprint: str, saved_dataset, dataset, out: Path) -> None:
    """Refuses to resume on transitions other than the checkpoint's, naming both datasets.

    Checkpoints record a fingerprint of their transitions; older ones, which do not, are held to
    the same number of transitions and the same widths."""
    from misa_fast.data import DEFAULT_DATASET

    recorded = state.get("data_fingerprint")
    saved_info = state["data_info"]
    same = (recorded == data_fingerprint if recorded is not None else
            (saved_info["n_transitions"], saved_info["obs_dim"], saved_info["act_dim"])
            == (info.n_transitions, info.obs_dim, info.act_dim))
    if not same:
        raise ValueError(f"--dataset {dataset or DEFAULT_DATASET}: not the transitions the checkpoint in {out} was "
                         f"trained on ({saved_dataset or DEFAULT_DATASET}); resume with those data, or start a new run")


def train(run: RunConfig, on_evaluation=None) -> dict:
    """Runs (or resumes) a training run; returns a summary dict. Raises NonFiniteTraining if a loss
    goes non-finite (the last good checkpoint is left untouched).

    ``on_evaluation(step, row, checkpoint_path)``, when given, is called after each evaluation once
    its progress.csv row is written and, if one is due at that step, its checkpoint saved
    (``checkpoint_path`` is None otherwise): ``misa-fast sweep`` reports to Ray Tune from it."""
    from misa_fast.agents import NonFiniteLossError
    from misa_fast.agents import algorithms as algos
    from misa_fast.data import DEFAULT_DATASET, DataInfo, prepare
    from misa_fast.data.prepare import fingerprint
    from misa_fast.training.runtime import tune_host_allocator

    tune_host_allocator()  # here, not only in the CLI: Python callers and sweep trials need it as much
    algos.get(run.algo)  # a clear error for an unknown name before any data is read
    device = resolve_device(run.device)
    dataset = run.dataset or DEFAULT_DATASET
    out = Path(run.out) if run.out else default_out_dir(run, dataset)
    state = None
    if (out / ckpt.CHECKPOINT_NAME).exists():
        if not run.resume:
            raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                                  "or choose another --out")
        state = ckpt.load(out / ckpt.CHECKPOINT_NAME)
    elif run.resume:
        print(f"misa-fast train: no checkpoint in {out}; starting a new run", file=sys.stderr)

    if state is not None:
        saved = RunConfig(**{**state["run"], "overrides": tuple(state["run"]["overrides"])})
        # What the run computes comes from the checkpoint; only its length and reporting may change.
        # The data may have moved (another node, another cache path): a new --dataset is taken when
        # its transitions are the ones the checkpoint was trained on (checked once they are loaded).
        dataset_given = run.dataset is not None and run.dataset != saved.dataset
        run = dataclasses.replace(saved, steps=run.steps, eval_every=run.eval_every,
                                  eval_episodes=run.eval_episodes, checkpoint_every=run.checkpoint_every,
                                  log_every=run.log_every, progress=run.progress, tensorboard=run.tensorboard,
                                  device=run.device, backend=run.backend, threads=run.threads, out=str(out),
                                  resume=True, dataset=run.dataset if dataset_given else saved.dataset)
        dataset = run.dataset or DEFAULT_DATASET

    if run.obs_norm is None:
        run = dataclasses.replace(run, obs_norm=algos.get(run.algo).default_obs_norm)
    try:
        data, info = prepare(dataset, obs_norm=run.obs_norm, env_id=run.env)
    except FileNotFoundError as err:
        if state is None or dataset_given:
            raise
        raise FileNotFoundError(f"{err}; if the data moved, pass its new location with --dataset") from err
    data_fingerprint = fingerprint(data)
    if state is not None:
        check_same_data(state, info, data_fingerprint, saved.dataset, run.dataset, out)
        info = DataInfo.from_dict(state["data_info"])
        config_cls = algos.config_class(algos.get(run.algo).family)
        cfg = config_cls.from_dict({**state["agent_config"], "device": str(device)})
    else:
        cfg = build_agent_config(run, info.name, info.obs_dim, info.act_dim, device)
    note = info.no_reference_scores_note()
    if note:
        print(f"misa-fast train: {note}", file=sys.stderr)
    threads = apply_threads(choose_threads(run.threads, cfg, device))
    print(f"misa-fast train: {threads.describe()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)

    agent = algos.make_agent(cfg)
    start_step = 0
    if state is not None:
        agent.load_state_dict(state["agent"])
        ckpt.set_rng_state(state["rng"])
        start_step = int(state["step"])
    source = make_source(run.data_source, data, cfg.batch_size, run.seed, device,
                         state=None if state is None else state["sampler"])
    (out / "config.json").write_text(json.dumps(
        {"run": dataclasses.asdict(run), "agent": cfg.to_dict(), "data": info.to_dict(),
         "data_source": source.kind, "device": str(device), "threads": threads.threads}, indent=2, default=str))

    log = ProgressLog(out, start_step if state is not None else None, run.tensorboard)
    checkpoint_every = run.checkpoint_every or run.eval_every
    last_eval: Optional[dict] = state.get("last_eval") if state else None

    def save(step: int) -> None:
        ckpt.save_atomic({"step": step, "run": dataclasses.asdict(run), "agent_config": cfg.to_dict(),
                          "data_info": info.to_dict(), "data_fingerprint": data_fingerprint,
                          "agent": agent.state_dict(), "sampler": source.state_dict(), "rng": ckpt.rng_state(),
                          "last_eval": last_eval},
                         out / ckpt.CHECKPOINT_NAME)

    if getattr(agent, "needs_pretraining", False):  # SPOT's VAE: once per run, checkpointed when done
        print(f"misa-fast train: phase 1 of 2: SPOT pretrains its VAE for {agent.pretrain_steps:,} steps before "
              f"the {run.steps:,} training steps of --steps (done once per run; `--set vae_steps=N` shortens it)",
              file=sys.stderr)
        agent.pretrain_vae(source, agent.pretrain_steps, progress=run.progress)
        save(start_step)

    from tqdm.auto import tqdm

    from misa_fast.training.backends import make_step

    train_step = make_step(agent, source, run.backend)
    if run.backend == "compiled" and run.progress:
        print("misa-fast train: --backend compiled: the first step compiles (10-60 s on a 2-core CPU; "
              "inductor caches it for later runs)", file=sys.stderr)
    bar = tqdm(total=run.steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not run.progress, desc=f"{run.algo} {info.name}")
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    snis_warned = False
    try:
        for step in range(start_step + 1, run.steps + 1):
            try:
                metrics = train_step()
                if step % checkpoint_every == 0 or step == run.steps:
                    train_step.check()  # graph backend: a deferred finite check before a checkpoint
            except NonFiniteLossError as err:
                applied = ("the captured graph step was applied (the in-memory agent is not rolled back)"
                           if getattr(err, "applied", False) else "no parameter was updated")
                raise NonFiniteTraining(
                    f"stopped at step {step}: non-finite {err.term}; {applied}. The last good checkpoint "
                    f"({out / ckpt.CHECKPOINT_NAME}) was left untouched.") from err
            window_steps += 1
            bar.update(1)
            row = {}
            evaluate_now = step % run.eval_every == 0 or step == run.steps
            # Every row carries the training metrics, so the CSV header (fixed by the first row) has them.
            if evaluate_now or step % run.log_every == 0:
                elapsed = time.perf_counter() - window_start
                row.update(metrics_to_floats(metrics), steps_per_s=window_steps / max(elapsed, 1e-9))
            if evaluate_now:
                result = evaluate_policy(agent, info, run.eval_episodes, seed=run.seed + 1_000_000)
                last_eval = {"step": step, "mean_return": result["mean_return"], "std_return": result["std_return"],
                             "mean_normalized": result["mean_normalized"]}
                row.update(eval_return=result["mean_return"], eval_return_std=result["std_return"],
                           eval_normalized=result["mean_normalized"])
                score = result["mean_normalized"]
                bar.set_postfix(score=f"{score:.1f}" if score is not None else "n/a",
                                ret=f"{result['mean_return']:.1f}")
            if row:
                log.write(step, row)
                warning = snis_collapse_warning(row, step)
                if warning is not None and not snis_warned:  # once per run: the column keeps the record
                    snis_warned = True
                    bar.write(f"misa-fast train: {warning}", file=sys.stderr)
            saved = step % checkpoint_every == 0 or step == run.steps
            if saved:
                save(step)
            if evaluate_now and on_evaluation is not None:
                on_evaluation(step, dict(row), out / ckpt.CHECKPOINT_NAME if saved else None)
            if row:  # evaluation and checkpoint time is not training time
                window_start, window_steps = time.perf_counter(), 0
    finally:
        bar.close()
        source.close()
        log.close()

    ckpt.export_policy(agent.policy, info.obs_dim, out / ckpt.POLICY_NAME, info.obs_mean, info.obs_std)
    from misa_fast.training.plots import plot_progress

    plot_progress(out / "progress.csv", out / "learning_curve.png", title=f"{run.algo} on {info.name}")
    summary = {"out": str(out), "steps": step, "last_eval": last_eval, "device": str(device),
               "data_source": source.kind}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def add_shortcut_options(p) -> None:
    """Flags that stand for ``--set`` assignments of the agent config."""
    p.add_argument("--num-samples", type=int, metavar="K",
                   help="K, the samples per state of the log-partition and of HMC (CQL: per proposal); "
                        "same as --set num_samples=K")
    p.add_argument("--burn-in", type=int, metavar="N", help="HMC burn-in transitions; same as --set hmc_burn_in=N")


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_options(p, RunConfig)
    add_shortcut_options(p)
    p.epilog = "algorithms: " + _algorithm_help()


def _flag_overrides(args: argparse.Namespace) -> tuple:
    """--num-samples / --burn-in as the --set assignments they stand for (explicit --set wins)."""
    flags = {"num_samples": getattr(args, "num_samples", None), "hmc_burn_in": getattr(args, "burn_in", None)}
    return tuple(f"{key}={value}" for key, value in flags.items() if value is not None)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    embedded = args.dataset is None
    return from_args(RunConfig, args,
                     steps=args.steps if args.steps is not None else (3_000 if embedded else 1_000_000),
                     eval_every=args.eval_every if args.eval_every is not None else (500 if embedded else 10_000),
                     overrides=_flag_overrides(args) + tuple(args.overrides))


def run(args: argparse.Namespace) -> int:
    try:
        summary = train(run_config_from_args(args))
    except NonFiniteTraining as err:
        print(f"misa-fast train: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"misa-fast train: {err}", file=sys.stderr)
        return 2
    last = summary["last_eval"] or {}
    score = last.get("mean_normalized")
    print(f"done: {summary['steps']} steps in {summary['out']}; last evaluation: return "
          f"{last.get('mean_return', float('nan')):.1f}"
          + (f", normalized score {score:.1f}" if score is not None else ""))
    return 0
