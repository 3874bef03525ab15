"""``misa-fast train``: the training loop — batches, updates, evaluation, logs, checkpoints, resume.

    misa-fast train                                   # embedded Pendulum dataset, a few CPU minutes
    misa-fast train --dataset hopper-medium-v2 --steps 1000000 --device cuda
    misa-fast train --dataset mujoco/hopper/medium-v0  # a Minari id: Minari's cache, its env spec and scores
    misa-fast train --dataset data/hopper-medium.hdf5 --set hmc_mode=parallel   # any D4RL-format file
    misa-fast train --out runs/x --resume             # continue after a kill, bit-identical on CPU
    misa-fast train --seeds 0-4                       # five seeds in one process: runs/<...>-seed0 ... seed4

A run directory holds ``config.json``, ``progress.csv`` (every metric; TensorBoard events under
``tb/`` when tensorboard is installed), ``checkpoint.pt`` (written atomically every
``--checkpoint-every`` steps), and at the end ``learning_curve.png`` and ``policy.pt2`` (a
torch.export program usable without misa-fast).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from misa_fast.errors import UserError
from misa_fast.options import add_options, from_args, option
from misa_fast.replay.sources import SOURCES, make_member_streams, make_source
from misa_fast.training import checkpoint as ckpt
from misa_fast.training import checks, rundir
from misa_fast.training.evaluation import evaluate_policies, evaluate_policy  # noqa: F401 (also imported from here)
from misa_fast.training.interrupts import Interrupted, InterruptGuard
from misa_fast.training.progress import ProgressLog, metrics_to_floats
from misa_fast.training.runtime import (
    MATMUL_PRECISIONS,
    apply_threads,
    choose_threads,
    matmul_precision,
    resolve_device,
)


def _algorithm_names():
    from misa_fast.agents.algorithms import ALGORITHMS

    return list(ALGORITHMS)


def _algorithm_help() -> str:
    from misa_fast.agents.algorithms import ALGORITHMS

    return "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values())


PRESET_NAMES = ("locomotion", "antmaze", "adroit", "kitchen", "pendulum")
# --backend auto compiles a single MISA-family run on a CPU from this length on: on the embedded
# dataset's run the compile took 20-40 s and saved 24-31 ms a step (docs: Training), paid back
# after 900-1,300 steps.
COMPILED_FROM_STEPS = 2_000


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
    seeds: Optional[str] = option(
        None, metavar="SEEDS",
        help="train several seeds in one process, one update for all of them: 0-4 or 0,3,7. Each seed writes "
             "the run directory a run with --seed would (runs/<dataset>-<algo>-seed<N>, or --out DIR gives "
             "DIR/seed<N>); overrides --seed")
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
    backend: str = option("auto", choices=("auto", "eager", "compiled", "graph"),
                          help="training step: eager PyTorch, torch.compile of the losses, or the whole update "
                               "captured in a CUDA graph (CUDA only). auto (the default): compiled for a single "
                               f"MISA-family run of at least {COMPILED_FROM_STEPS:,} steps on a CPU (its compile, "
                               "10-60 s, is paid back within about 1,300 steps), eager otherwise")
    threads: Optional[int] = option(None, metavar="N",
                                    help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else the rule of "
                                         "misa_fast.training.runtime, printed at start)")
    matmul_precision: str = option("auto", choices=MATMUL_PRECISIONS,
                                   help="fp32 matrix products (torch.set_float32_matmul_precision): highest keeps "
                                        "them in fp32; medium lets a CPU compute them in bfloat16 with fp32 "
                                        "accumulation (faster on CPUs with AVX-512 BF16 or AMX). auto (the default): "
                                        "medium on a CPU with native bfloat16 products, where it learns as fp32 "
                                        "does (docs: Training), highest elsewhere")
    obs_norm: Optional[str] = option(None, choices=("none", "scalar", "per-dim"),
                                     help="observation normalisation (default: per-dim for td3bc/spot, none otherwise)")
    rescale_actions: bool = option(False, help="divide each action dimension of a dataset whose actions lie outside "
                                               "[-1, 1] by its largest magnitude (without it such data is refused)")
    overrides: tuple = option((), flag="--set", metavar="KEY=VALUE", repeatable=True,
                              help="override an agent config value, e.g. --set num_samples=20 (repeatable)")
    progress: bool = option(True, help="no progress bar")
    tensorboard: bool = option(True, help="no TensorBoard events")
    resume: bool = option(False, help="continue the checkpoint in --out")
    overwrite: bool = option(False, help="replace the run files already in --out (without it, a directory that "
                                         "holds a run is refused)")


class NonFiniteTraining(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- setup
def build_agent_config(run: RunConfig, dataset_name: str, obs_dim: int, act_dim: int, device: torch.device):
    """Domain preset, then the algorithm's settings (misa_fast.agents.algorithms), then ``--set`` overrides."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.agents.config_base import apply_overrides

    name = preset_for(run, dataset_name)
    for item in run.overrides:
        key = item.partition("=")[0].strip()
        if key in RUN_SET_KEYS:
            raise UserError(f"--set {item}: {key} is {RUN_SET_KEYS[key]}, not a --set key")
    cfg = algos.build_config(run.algo, name, dataset_name, seed=run.seed, device=str(device), obs_dim=obs_dim,
                             act_dim=act_dim)
    try:
        return apply_overrides(cfg, run.overrides)
    except ValueError as err:
        raise UserError(f"--set: {err}") from None


def resolve_automatic_options(run: RunConfig, grouped: bool) -> RunConfig:
    """The run with ``--matmul-precision auto`` and ``--backend auto`` decided (what config.json
    records): see their --help."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.training.runtime import resolve_device, resolve_matmul_precision

    device = resolve_device(run.device)
    backend = run.backend
    if backend == "auto":
        pays = (device.type == "cpu" and not grouped and algos.get(run.algo).family == "misa"
                and run.steps >= COMPILED_FROM_STEPS and _has_cpp_compiler())
        backend = "compiled" if pays else "eager"
    return dataclasses.replace(run, backend=backend,
                               matmul_precision=resolve_matmul_precision(run.matmul_precision, device))


def _has_cpp_compiler() -> bool:
    """Whether inductor can build the compiled step here (it compiles C++ on a CPU)."""
    import shutil

    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def preset_for(run: RunConfig, dataset_name: str) -> str:
    """--preset, else the dataset's domain (locomotion for a name no domain claims)."""
    from misa_fast.agents.config_base import preset_name_for_env

    if run.preset is not None:
        return run.preset
    try:
        return preset_name_for_env(dataset_name)
    except ValueError:
        return "locomotion"


def data_options(run: RunConfig, dataset: str, device: torch.device) -> dict:
    """What the algorithm asks of the data (misa_fast.data.prepare's options): its reward transform
    for the domain, the share of the best episodes it learns from (10%BC) and whether it reads next
    actions (ReBRAC), from its config with the run's --set values (the data's widths do not matter
    for these, so placeholders stand in for them)."""
    from misa_fast.agents import algorithms as algos

    algo = algos.get(run.algo)
    # A file's domain is in its name, as for the preset the agent gets ("data/pen-human.hdf5": adroit).
    name = Path(dataset).stem if Path(dataset).suffix.lower() in (".hdf5", ".h5", ".npz") else dataset
    cfg = build_agent_config(run, name, 1, 1, device)
    return {"reward_transform": algo.reward_transforms.get(preset_for(run, name), "auto"),
            "top_fraction": getattr(cfg, "top_fraction", 1.0),
            "next_actions": bool(getattr(cfg, "reads_next_actions", False))}


# Agent config keys the run itself sets: a --set of one would contradict the data or the run.
RUN_SET_KEYS = {"seed": "set by --seed / --seeds", "device": "set by --device",
                "obs_dim": "the data's observation width", "act_dim": "the data's action width"}


def default_out_dir(run: RunConfig, dataset: str) -> Path:
    from misa_fast.data.minari import is_minari_id

    path = Path(dataset)
    label = path.stem if path.suffix in (".hdf5", ".h5", ".npz") else path.name
    if is_minari_id(dataset) and not path.exists():  # mujoco/hopper/medium-v0 -> mujoco-hopper-medium-v0
        label = str(dataset).replace("/", "-")
    return Path("runs") / f"{label}-{run.algo}-seed{run.seed}"


def run_seeds(run: RunConfig) -> list:
    """The seeds a run trains: ``--seeds`` parsed, else ``[--seed]``."""
    if run.seeds is None:
        return [run.seed]
    from misa_fast.agents.members import parse_seeds

    return parse_seeds(run.seeds)


def member_out_dirs(run: RunConfig, dataset: str, seeds: list) -> list:
    """Each seed's run directory: ``--out`` (one seed without ``--seeds``), ``--out DIR/seed<N>``, or
    the default ``runs/<dataset>-<algo>-seed<N>``."""
    if run.seeds is None:
        return [Path(run.out) if run.out else default_out_dir(run, dataset)]
    if run.out:
        return [Path(run.out) / f"seed{seed}" for seed in seeds]
    return [default_out_dir(dataclasses.replace(run, seed=seed), dataset) for seed in seeds]


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


class Member:
    """One seed of a run: its directory, configuration, single-run agent, batch source, log and
    state. The agent holds the member's current parameters only when the trainer syncs them (a
    stacked update keeps them in the stacked agent)."""

    def __init__(self, seed: int, out: Path, run: "RunConfig", state: Optional[dict]):
        self.seed, self.out, self.run, self.state = seed, out, run, state
        self.cfg = self.agent = self.source = self.log = None
        self.last_eval: Optional[dict] = state.get("last_eval") if state else None
        self.stopped: Optional[dict] = None  # {"term", "step", "message"} once a non-finite loss stopped it


@dataclass
class Training:
    """What the stages of one ``train`` call share: the run as it will be trained (after a
    resume, the checkpoint's), its members, the data and where the loop starts."""

    run: RunConfig
    seeds: list
    device: torch.device
    members: list
    first_state: Optional[dict] = None  # the checkpoint a resume starts from
    saved: Optional[RunConfig] = None  # its run settings
    dataset_given: bool = False  # a resume given a new location of its data
    data: Optional[dict] = None
    info: object = None
    fingerprint: str = ""
    streams: object = None  # the members' index streams over one copy of the data (several seeds)
    threads: object = None

    @property
    def grouped(self) -> bool:
        return self.run.seeds is not None

    @property
    def start_step(self) -> int:
        return int(self.first_state["step"]) if self.first_state is not None else 0


# Keys a training checkpoint must hold to be resumed.
CHECKPOINT_KEYS = ("step", "run", "agent_config", "data_info", "agent", "sampler", "rng")


def _load_member_state(out: Path, run: RunConfig, grouped: bool) -> Optional[dict]:
    """The member's checkpoint when its directory holds one to resume (see rundir.prepare)."""
    if not rundir.prepare(out, run.resume, run.overwrite):
        if run.resume:
            print(f"misa-fast train: no checkpoint in {out}; starting a new " + ("member" if grouped else "run"),
                  file=sys.stderr)
        return None
    return ckpt.load_checked(out / ckpt.CHECKPOINT_NAME, CHECKPOINT_KEYS, "a checkpoint of misa-fast train")


def _stopped_record(out: Path) -> Optional[dict]:
    """The record of a member that a non-finite loss stopped in an earlier session, else None."""
    try:
        return json.loads((out / "summary.json").read_text()).get("stopped")
    except (OSError, ValueError, AttributeError):
        return None


def train(run: RunConfig, on_evaluation=None) -> dict:
    """Runs (or resumes) a training run; returns a summary dict. Raises NonFiniteTraining if a loss
    goes non-finite (the last good checkpoint is left untouched).

    The stages, in order: the options are checked (misa_fast.training.checks) and each run
    directory is locked for the life of the call (misa_fast.training.rundir); the members are
    loaded, fresh or from their checkpoints (:func:`load_members`); the data is prepared and
    checked against the evaluation environment and the memory one update needs
    (:func:`load_data`); the agents and batch sources are built (:func:`build_members`); SPOT
    pretrains its VAE; the loop steps, logs, checkpoints and evaluates (:func:`step_loop`); the
    policies are exported and the summaries written (:func:`finish`). Ctrl-C or SIGTERM during the
    loop writes a checkpoint at the current step and raises
    :class:`~misa_fast.training.interrupts.Interrupted`.

    With ``run.seeds`` (``--seeds 0-4``) it trains those seeds in one process, every update one
    computation for all of them (misa_fast.agents.members), each seed writing the run directory a
    single run would; a seed whose loss goes non-finite stops alone (its summary.json records the
    term and step, its last good checkpoint stays) and the others go on. The summary then has one
    entry per seed under ``"members"``.

    ``on_evaluation(step, row, checkpoint_path)``, when given, is called after each evaluation once
    its progress.csv row is written and, if one is due at that step, its checkpoint saved
    (``checkpoint_path`` is None otherwise): ``misa-fast sweep`` reports to Ray Tune from it. With
    several seeds it is called once per evaluation with ``row`` the members' mean and
    ``checkpoint_path`` the first member's checkpoint."""
    from misa_fast.agents import NonFiniteLossError
    from misa_fast.agents import algorithms as algos
    from misa_fast.data import DEFAULT_DATASET
    from misa_fast.training.runtime import tune_host_allocator

    tune_host_allocator()  # here, not only in the CLI: Python callers and sweep trials need it as much
    checks.check_run_options(run)
    algos.get(run.algo)  # a clear error for an unknown name before any data is read
    seeds = run_seeds(run)
    run = resolve_automatic_options(run, grouped=len(seeds) > 1 or run.seeds is not None)
    outs = member_out_dirs(run, run.dataset or DEFAULT_DATASET, seeds)
    with contextlib.ExitStack() as held, InterruptGuard("train") as guard:
        held.enter_context(matmul_precision(run.matmul_precision))
        for out in outs:
            held.enter_context(rundir.claim(out, "train"))
        training = load_members(run, seeds, outs)
        load_data(training)
        build_members(training)
        pretrain(training)
        try:
            step = step_loop(training, guard, on_evaluation)
        except NonFiniteLossError as err:
            applied = ("the captured graph step was applied (the in-memory agent is not rolled back)"
                       if getattr(err, "applied", False) else "no parameter was updated")
            raise NonFiniteTraining(f"stopped at step {err.step}: non-finite {err.term}; {applied}. "
                                    f"{rundir.kept_checkpoint(training.members[0].out, sentence=True)}") from err
        return finish(training, step)


# --------------------------------------------------------------------------------- stage: members
def load_members(run: RunConfig, seeds: list, outs: list) -> Training:
    """The members of the run, each fresh or from its checkpoint; for a resume, the run its
    checkpoints record (see :func:`_resumed_run`). Seeds a non-finite loss stopped in an earlier
    session are left out."""
    grouped = run.seeds is not None
    members = []
    for seed, out in zip(seeds, outs):
        record = _stopped_record(out) if run.resume and grouped else None
        member = Member(seed, out, run, None if record is not None and not (out / ckpt.CHECKPOINT_NAME).exists()
                        else _load_member_state(out, run, grouped))
        member.stopped = record
        members.append(member)
    for m in members:
        if m.stopped:
            print(f"misa-fast train: seed {m.seed} stopped at step {m.stopped['step']} (non-finite "
                  f"{m.stopped['term']}) and is not resumed", file=sys.stderr)
    members = [m for m in members if not m.stopped]
    if not members:
        raise NonFiniteTraining("every seed of the group was stopped by a non-finite loss; nothing to resume")
    training = Training(run=run, seeds=seeds, device=resolve_device(run.device), members=members)
    training.first_state = next((m.state for m in members if m.state is not None), None)
    if training.first_state is not None:
        training.run, training.saved, training.dataset_given = _resumed_run(run, members, training.first_state)
    if not grouped:
        training.run = dataclasses.replace(training.run, out=str(members[0].out))
    return training


def _resumed_run(run: RunConfig, members: list, first_state: dict):
    """The run a resume continues: the checkpoint's settings, with the options documented as
    changeable (length, reporting, device, backend) taken from ``run``; refuses options that
    contradict the checkpoint. Returns (run, saved run, whether a new --dataset was given)."""
    fresh = [str(m.out) for m in members if m.state is None]
    if fresh:
        raise UserError(f"--resume: {', '.join(fresh)} holds no checkpoint while the other seeds' directories "
                        "do; resume the seeds that have checkpoints, or start the others as a new run")
    steps = sorted({int(m.state["step"]) for m in members})
    if len(steps) > 1:
        behind = [f"seed {m.seed} ({int(m.state['step'])})" for m in members if int(m.state["step"]) < steps[-1]]
        raise UserError(f"--resume: the seeds' checkpoints are at different steps ({', '.join(behind)} behind "
                        f"step {steps[-1]}); resume those seeds on their own to step {steps[-1]} with "
                        "--seed N --out <its directory> --resume --steps " + str(steps[-1]))
    try:
        saved = RunConfig(**{"seeds": None, **first_state["run"], "overrides": tuple(first_state["run"]["overrides"])})
    except (TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{members[0].out / ckpt.CHECKPOINT_NAME}: its run settings are not misa-fast train's "
                        f"({err})") from None
    checks.check_resume_options(run, saved, members[0].out)
    if run.steps < steps[-1]:
        raise UserError(f"--steps {run.steps}: the checkpoint in {members[0].out} is already at step {steps[-1]}")
    # The data may have moved (another node, another cache path): a new --dataset is taken when
    # its transitions are the ones the checkpoint was trained on (checked once they are loaded).
    dataset_given = run.dataset is not None and run.dataset != saved.dataset
    resumed = dataclasses.replace(saved, steps=run.steps, eval_every=run.eval_every,
                                  eval_episodes=run.eval_episodes, checkpoint_every=run.checkpoint_every,
                                  log_every=run.log_every, progress=run.progress, tensorboard=run.tensorboard,
                                  device=run.device, backend=run.backend, threads=run.threads, out=run.out,
                                  matmul_precision=run.matmul_precision,
                                  resume=True, dataset=run.dataset if dataset_given else saved.dataset,
                                  seeds=run.seeds, seed=members[0].seed, overwrite=False)
    return resumed, saved, dataset_given


# ------------------------------------------------------------------------------------ stage: data
def load_data(training: Training) -> None:
    """Prepares the data, gives each member its configuration (a resumed member's from its
    checkpoint, whose data must be the same transitions) and checks the evaluation environment
    against the data's widths and the memory one update needs, all before any agent is built."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.data import DEFAULT_DATASET, DataInfo, prepare
    from misa_fast.data.prepare import fingerprint

    run, device = training.run, training.device
    if run.obs_norm is None:
        run = training.run = dataclasses.replace(run, obs_norm=algos.get(run.algo).default_obs_norm)
    dataset = run.dataset or DEFAULT_DATASET
    try:
        data, info = prepare(dataset, obs_norm=run.obs_norm, env_id=run.env, rescale_actions=run.rescale_actions,
                             **data_options(run, str(dataset), device))
    except FileNotFoundError as err:
        if training.first_state is None or training.dataset_given:
            raise
        raise FileNotFoundError(f"{err}; if the data moved, pass its new location with --dataset") from err
    training.data, training.fingerprint = data, fingerprint(data)
    for member in training.members:
        # Each member's record of its run is the single run it equals: its seed, its directory.
        member.run = dataclasses.replace(run, seed=member.seed, seeds=None, out=str(member.out))
        if member.state is not None:
            check_same_data(member.state, info, training.fingerprint, training.saved.dataset, run.dataset,
                            member.out)
            info = DataInfo.from_dict(member.state["data_info"])
            config_cls = algos.config_class(algos.get(run.algo).family)
            member.cfg = config_cls.from_dict({**member.state["agent_config"], "device": str(device)})
        else:
            member.cfg = build_agent_config(member.run, info.name, info.obs_dim, info.act_dim, device)
    training.info = info
    where = (f"--env {run.env}" if run.env else f"the evaluation environment {info.env_id} that {dataset} names")
    checks.check_environment(info.env_id, info.env_kwargs, info.obs_dim, info.act_dim, where)
    checks.check_memory(training.members[0].cfg, info.obs_dim, info.act_dim, device, len(training.members))


# ------------------------------------------------------------------------------- stage: the agents
def build_members(training: Training) -> None:
    """Each member's agent (its checkpoint loaded), batch source, config.json and progress log."""
    from misa_fast.agents import algorithms as algos

    run, info, device, members = training.run, training.info, training.device, training.members
    note = info.no_reference_scores_note()
    if note:
        print(f"misa-fast train: {note}", file=sys.stderr)
    cfg = members[0].cfg
    training.threads = apply_threads(choose_threads(run.threads, cfg, device))
    print(f"misa-fast train: {training.threads.describe()}", file=sys.stderr)
    if len(members) > 1:  # one copy of the data, every member's own index stream
        training.streams = make_member_streams(run.data_source, training.data, cfg.batch_size,
                                               [m.seed for m in members], device,
                                               [None if m.state is None else m.state["sampler"] for m in members])
    for i, member in enumerate(members):
        member.agent = algos.make_agent(member.cfg)
        if member.state is not None:
            algos.load_agent_state(member.agent, member.state["agent"], str(member.out / ckpt.CHECKPOINT_NAME))
        member.source = training.streams.member(i) if training.streams is not None else make_source(
            run.data_source, training.data, member.cfg.batch_size, member.seed, device,
            state=None if member.state is None else member.state["sampler"])
        (member.out / "config.json").write_text(json.dumps(
            {"run": dataclasses.asdict(member.run), "agent": member.cfg.to_dict(), "data": info.to_dict(),
             "data_source": member.source.kind, "device": str(device), "threads": training.threads.threads,
             **({"seeds": training.seeds} if training.grouped else {})}, indent=2, default=str))
        member.log = ProgressLog(member.out, training.start_step if member.state is not None else None,
                                 run.tensorboard)
    if training.first_state is not None:
        ckpt.set_rng_state(training.first_state["rng"])


def save_checkpoint(training: Training, member: Member, step: int, agent_state: dict) -> None:
    ckpt.save_atomic({"step": step, "run": dataclasses.asdict(member.run), "agent_config": member.cfg.to_dict(),
                      "data_info": training.info.to_dict(), "data_fingerprint": training.fingerprint,
                      "agent": agent_state, "sampler": member.source.state_dict(), "rng": ckpt.rng_state(),
                      "last_eval": member.last_eval},
                     member.out / ckpt.CHECKPOINT_NAME)


def pretrain(training: Training) -> None:
    """SPOT's VAE: once per run, checkpointed when done (other learners have nothing to pretrain)."""
    members = training.members
    if not getattr(members[0].agent, "needs_pretraining", False):
        return
    print(f"misa-fast train: phase 1 of 2: SPOT pretrains its VAE for {members[0].agent.pretrain_steps:,} steps "
          f"before the {training.run.steps:,} training steps of --steps (done once per run; `--set vae_steps=N` "
          "shortens it)" + (f"; one seed after another ({len(members)})" if len(members) > 1 else ""),
          file=sys.stderr)
    for member in members:
        member.agent.pretrain_vae(member.source, member.agent.pretrain_steps, progress=training.run.progress)
        save_checkpoint(training, member, training.start_step, member.agent.state_dict())


# ------------------------------------------------------------------------------- stage: the loop
def step_loop(training: Training, guard: InterruptGuard, on_evaluation) -> int:
    """Steps from the start step to ``run.steps``; at a checkpoint step the checkpoint is written
    before the evaluation. Returns the last step done. A signal received while stepping ends the
    step, checkpoints it and raises Interrupted."""
    from tqdm.auto import tqdm

    run = training.run
    group = _MemberGroup(training.members, run.backend, training.streams)
    if run.backend == "compiled" and run.progress:
        print("misa-fast train: --backend compiled: the first step compiles (10-60 s on a 2-core CPU"
              + (", minutes for several seeds: their whole HMC chain is one graph" if training.grouped else "")
              + "; inductor caches it for later runs)", file=sys.stderr)
    label = f"{run.algo} {training.info.name}" + (f" seeds {run.seeds}" if training.grouped else "")
    bar = tqdm(total=run.steps, initial=training.start_step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not run.progress, desc=label)
    checkpoint_every = run.checkpoint_every or run.eval_every
    window = [time.perf_counter(), 0]  # start, steps: evaluation and checkpoint time is not training time
    step, snis_warned = training.start_step, False
    try:
        with guard.deferring():
            for step in range(training.start_step + 1, run.steps + 1):
                # A signal before the step makes it a checkpoint step (the graph backend's deferred
                # finite check included); one that arrives during it is acted on after the step.
                stopping = guard.pending is not None and step < run.steps
                saved_now = step % checkpoint_every == 0 or step == run.steps or stopping
                started = time.perf_counter()
                metrics = _one_step(training, group, step, saved_now, bar)
                if metrics is None:  # every member stopped
                    break
                if step == training.start_step + 1 and run.backend == "compiled":
                    bar.write(f"misa-fast train: --backend compiled: compiled the step in "
                              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
                    window[0] = time.perf_counter()  # steps/s counts the steps, not the compile
                    window[1] -= 1
                window[1] += 1
                bar.update(1)
                evaluate_now = (step % run.eval_every == 0 or step == run.steps) and not stopping
                rows = _training_rows(group, metrics, window, evaluate_now or step % run.log_every == 0)
                agent_states = group.member_states() if saved_now or evaluate_now else None
                if saved_now:  # before the evaluation: an evaluation that fails costs no training
                    _save_all(training, group, step, agent_states)
                if guard.pending is not None and saved_now and step < run.steps:
                    _log_rows(group.members, rows, step, bar)
                    raise Interrupted(guard.pending, _interrupted_message(run, group.members, step))
                if evaluate_now:
                    _evaluate(group, agent_states, rows, training.info, run, step, bar)
                    if saved_now:  # again: the checkpoint records this evaluation (a resume reports it)
                        _save_all(training, group, step, agent_states)
                snis_warned = _log_rows(group.members, rows, step, bar, snis_warned)
                if evaluate_now and on_evaluation is not None:
                    on_evaluation(step, _mean_row(rows),
                                  group.members[0].out / ckpt.CHECKPOINT_NAME if saved_now else None)
                if any(rows):
                    window[:] = [time.perf_counter(), 0]
    finally:
        bar.close()
        for member in training.members:
            member.source.close()
            member.log.close()
        if training.streams is not None:
            training.streams.close()
    return step


def _one_step(training: Training, group: "_MemberGroup", step: int, checked: bool, bar):
    """One update of every member still training; a member a non-finite loss stops is recorded
    (its summary.json) and dropped, the others go on. None once every member has stopped."""
    from misa_fast.agents import NonFiniteLossError

    try:
        metrics = group.step(checked=checked)
    except NonFiniteLossError as err:
        err.step = step
        raise
    for member, term in group.take_stopped():
        member.stopped = {"term": term, "step": step,
                          "message": f"stopped at step {step}: non-finite {term}; "
                                     f"{rundir.kept_checkpoint(member.out)}"}
        _write_summary(member, step - 1, training.device, stopped=member.stopped)
        bar.write(f"misa-fast train: seed {member.seed}: {member.stopped['message']}; the other seeds go on",
                  file=sys.stderr)
    return metrics


def _training_rows(group: "_MemberGroup", metrics: dict, window: list, due: bool) -> list:
    """Each member's progress.csv row of this step: the training metrics when a row is due (every
    row carries them, so the CSV header fixed by the first row has them), else empty."""
    rows = [{} for _ in group.members]
    if due:
        elapsed = time.perf_counter() - window[0]
        for row, values in zip(rows, group.member_metrics(metrics)):
            row.update(values, steps_per_s=window[1] / max(elapsed, 1e-9))
    return rows


def _save_all(training: Training, group: "_MemberGroup", step: int, agent_states: list) -> None:
    for member, agent_state in zip(group.members, agent_states):
        save_checkpoint(training, member, step, agent_state)


def _evaluate(group: "_MemberGroup", agent_states: list, rows: list, info, run: RunConfig, step: int, bar) -> None:
    if group.stacked:
        for member, agent_state in zip(group.members, agent_states):
            member.agent.policy.load_state_dict(agent_state["policy"])
    results = evaluate_policies([m.agent for m in group.members], info, run.eval_episodes,
                                [m.seed + checks.EVAL_SEED_OFFSET for m in group.members])
    for member, row, result in zip(group.members, rows, results):
        member.last_eval = {"step": step, "mean_return": result["mean_return"], "std_return": result["std_return"],
                            "mean_normalized": result["mean_normalized"]}
        row.update(eval_return=result["mean_return"], eval_return_std=result["std_return"],
                   eval_normalized=result["mean_normalized"])
    bar.set_postfix_str(_scores_postfix(group.members, run.seeds is not None))


def _log_rows(members: list, rows: list, step: int, bar, snis_warned: bool = True) -> bool:
    """Writes the members' rows; warns once per run of collapsed SNIS weights (the column keeps the
    record). Returns whether the warning has been given."""
    for member, row in zip(members, rows):
        if row:
            member.log.write(step, row)
            warning = snis_collapse_warning(row, step)
            if warning is not None and not snis_warned:
                snis_warned = True
                bar.write(f"misa-fast train: {warning}", file=sys.stderr)
    return snis_warned


def _interrupted_message(run: RunConfig, members: list, step: int) -> str:
    grouped = run.seeds is not None
    if not grouped or run.out:
        where = Path(run.out) if grouped else members[0].out
        command = rundir.resume_command("train", where, steps=run.steps, seeds=run.seeds if grouped else None)
    else:  # the seeds' default directories: the command that named them
        where = ", ".join(str(m.out) for m in members)
        command = " ".join(["misa-fast train", *([f"--dataset {run.dataset}"] if run.dataset else []),
                            f"--algo {run.algo} --seeds {run.seeds} --steps {run.steps} --resume"])
    return f"interrupted at step {step}: checkpoint written in {where}; continue with: {command}"


# ----------------------------------------------------------------------------- stage: the finish
def finish(training: Training, step: int) -> dict:
    """Exports each member's policy, plots its curve and writes its summary."""
    from misa_fast.training.plots import plot_progress

    run, info = training.run, training.info
    summaries = []
    for member in training.members:
        if member.stopped:
            summaries.append({"out": str(member.out), "seed": member.seed, "stopped": member.stopped,
                              "last_eval": member.last_eval})
            continue
        ckpt.export_policy(member.agent.policy, info.obs_dim, member.out / ckpt.POLICY_NAME, info.obs_mean,
                           info.obs_std)
        plot_progress(member.out / "progress.csv", member.out / "learning_curve.png",
                      title=f"{run.algo} on {info.name}" + (f", seed {member.seed}" if training.grouped else ""))
        summaries.append(_write_summary(member, step, training.device))
    if not training.grouped:
        return summaries[0]
    return {"out": run.out, "seeds": training.seeds, "steps": step, "members": summaries}


def _write_summary(member: Member, step: int, device, stopped: Optional[dict] = None) -> dict:
    summary = {"out": str(member.out), "steps": step, "last_eval": member.last_eval, "device": str(device),
               "data_source": member.source.kind}
    if stopped is not None:
        summary["stopped"] = stopped
    (member.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _scores_postfix(members, grouped: bool) -> str:
    parts = []
    for member in members:
        last = member.last_eval or {}
        score = last.get("mean_normalized")
        if not grouped:
            return (f"score={score:.1f}" if score is not None else "score=n/a") + \
                f", ret={last.get('mean_return', float('nan')):.1f}"
        parts.append(f"{member.seed}:{score:.1f}" if score is not None else
                     f"{member.seed}:{last.get('mean_return', float('nan')):.0f}")
    return "scores " + " ".join(parts)


def _mean_row(rows: list) -> dict:
    """The members' rows as one: the mean of each value they all have."""
    if len(rows) == 1:
        return dict(rows[0])
    keys = [k for k in rows[0] if all(k in r and r[k] is not None for r in rows)]
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}


class _MemberGroup:
    """The members still training and the one learner that updates them: a lone member's own agent,
    else the members' agents as one group learner (misa_fast.agents.members: their tensors stacked,
    the loss function vmapped over the members), stepped by the run's backend
    (misa_fast.training.backends.make_step). A grouped member whose loss goes non-finite is dropped
    before any parameter moved, and the update is redone for the others with the same batches and
    noise (the group is rebuilt from the members' states)."""

    def __init__(self, members: list, backend: str, streams=None):
        self.members, self.backend, self.streams = list(members), backend, streams
        self._stopped: list = []
        self._build()

    def _build(self) -> None:
        from misa_fast.agents.members import stack_agents
        from misa_fast.training.backends import make_step

        self.stacked = self.streams is not None  # a group stays stacked, down to its last member
        if self.stacked:
            self.agent = stack_agents([m.agent for m in self.members])
            self.source = self.streams
        else:
            self.agent, self.source = self.members[0].agent, self.members[0].source
        self.train_step = make_step(self.agent, self.source, self.backend)

    def step(self, checked: bool):
        if not self.stacked:
            metrics = self.train_step()
            if checked:
                self.train_step.check()  # graph backend: a deferred finite check before a checkpoint
            return metrics
        from misa_fast.agents import NonFiniteLossError

        generators = [g.get_state() for g in self.agent.member_generators]
        try:
            metrics = self.train_step()
            if checked:
                self.train_step.check()
            return metrics
        except NonFiniteLossError as err:
            if not err.members or getattr(err, "applied", False):
                raise
            for generator, state in zip(self.agent.member_generators, generators):
                generator.set_state(state)  # the same noise again for the members that go on
            return self._drop(err.members, checked)

    def _drop(self, bad: dict, checked: bool):
        states = self.member_states()
        keep = [i for i in range(len(self.members)) if i not in bad]
        self._stopped += [(self.members[i], term) for i, term in sorted(bad.items())]
        self.train_step.close()
        for i in keep:
            self.members[i].agent.load_state_dict(states[i])
        self.members = [self.members[i] for i in keep]
        if not self.members:
            return None
        self.streams = self.streams.keep(keep)  # the step is redone on the batches it had
        self._build()
        return self.step(checked)

    def take_stopped(self) -> list:
        stopped, self._stopped = self._stopped, []
        return stopped

    def member_states(self) -> list:
        """Each member's single-run agent state (references for a lone agent, copies when stacked)."""
        if not self.stacked:
            return [self.agent.state_dict()]
        from misa_fast.agents.members import member_state_dicts

        return member_state_dicts(self.agent)

    def member_metrics(self, metrics: dict) -> list:
        """The metrics as one dict of floats per member (one host transfer)."""
        if not self.stacked:
            return [metrics_to_floats(metrics)]
        names = list(metrics)
        table = torch.stack([metrics[n].detach().float().reshape(-1) for n in names]).cpu().tolist()
        return [{n: table[j][i] for j, n in enumerate(names)} for i in range(len(self.members))]


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
    for member in summary.get("members", [summary]):
        last = member.get("last_eval") or {}
        score = last.get("mean_normalized")
        if member.get("stopped"):
            print(f"seed {member['seed']}: {member['stopped']['message']}")
            continue
        print(f"done: {member['steps']} steps in {member['out']}; last evaluation: return "
              f"{last.get('mean_return', float('nan')):.1f}"
              + (f", normalized score {score:.1f}" if score is not None else ""))
    if all(member.get("stopped") for member in summary.get("members", [])) and summary.get("members"):
        return 3
    return 0
