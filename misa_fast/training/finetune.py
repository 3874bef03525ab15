"""``misa-fast finetune``: online fine-tuning of an offline checkpoint (SPOT, MISA or any --algo).

    misa-fast finetune --checkpoint runs/hopper-medium-spot-seed0 --steps 100000
    misa-fast finetune --checkpoint runs/x/checkpoint.pt --env Hopper-v4 --out runs/x-online --resume

The agent acts in the gymnasium environment (exploration: Gaussian noise on the deterministic
action for TD3-family agents, a policy sample for MISA), every transition is appended to the C++
replay buffer that already holds the offline dataset, and one update per environment step is made
on batches the buffer's prefetcher thread draws *while* transitions are being added (the buffer's
reader-writer lock keeps every batch whole). Online transitions get the dataset's observation
normalisation, reward transform and action clipping, so offline and online rows mean the same.

The run directory gets ``progress.csv`` (training metrics, online episode returns and normalized
scores, evaluations), ``checkpoint.pt`` (atomic; holds the grown buffer, so ``--resume`` continues
after a kill with every online transition; the interrupted episode restarts), ``policy.pt2`` and
``learning_curve.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from misa_fast.errors import UserError
from misa_fast.options import add_options, from_args, option
from misa_fast.training import checkpoint as ckpt
from misa_fast.training import checks, rundir
from misa_fast.training.interrupts import Interrupted, InterruptGuard
from misa_fast.training.loop import NonFiniteTraining
from misa_fast.training.progress import metrics_to_floats
from misa_fast.training.runtime import MATMUL_PRECISIONS, matmul_precision


@dataclass
class FinetuneConfig:
    """Settings of an online fine-tuning run; each field is also an option of ``misa-fast finetune``."""

    checkpoint: str = option(required=True, help="an offline run directory (or its checkpoint.pt)")
    steps: int = option(100_000, help="environment steps, one update each")
    env: Optional[str] = option(None, help="gymnasium environment id (default: the dataset's)")
    out: Optional[str] = option(None, help="run directory (default: <run dir>-finetune)")
    seed: int = option(0, help="seed of the exploration noise and the episodes")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    threads: Optional[int] = option(None, metavar="N",
                                    help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else the rule of "
                                         "misa_fast.training.runtime)")
    matmul_precision: str = option("auto", choices=MATMUL_PRECISIONS,
                                   help="fp32 matrix products: highest (fp32) or medium (bfloat16 products with "
                                        "fp32 accumulation on a CPU); auto: as for misa-fast train")
    exploration_noise: float = option(0.1, help="TD3-family action noise std (TD3's default; MISA samples its "
                                                "own policy)")
    start_updates_after: int = option(0, help="environment steps collected before the first update")
    eval_every: int = option(10_000, help="environment steps between evaluations")
    eval_episodes: int = option(10, help="episodes per evaluation")
    log_every: int = option(1_000, help="environment steps between progress.csv rows")
    progress: bool = option(True, help="no progress bar")
    tensorboard: bool = option(True, help="no TensorBoard events")
    resume: bool = option(False, help="continue the fine-tuning checkpoint in --out")
    overwrite: bool = option(False, help="replace the run files already in --out (without it, a directory that "
                                         "holds a run is refused)")


# Keys of the offline checkpoint a fine-tuning starts from, and of a fine-tuning's own checkpoint.
SOURCE_KEYS = ("run", "agent_config", "data_info", "agent")
OWN_KEYS = SOURCE_KEYS + ("env_steps", "episodes", "offline_run", "buffer", "rng", "last_eval")


def check_options(cfg: FinetuneConfig) -> None:
    """The options that need no file, before anything is read."""
    for name in ("steps", "eval_every", "eval_episodes", "log_every", "threads"):
        checks.check_positive(getattr(cfg, name), "--" + name.replace("_", "-"))
    checks.check_seed(cfg.seed)
    if cfg.start_updates_after < 0:
        raise UserError(f"--start-updates-after must be >= 0, got {cfg.start_updates_after}")
    if not 0.0 <= cfg.exploration_noise < float("inf"):
        raise UserError(f"--exploration-noise must be a finite number >= 0, got {cfg.exploration_noise}")
    checks.check_device(cfg.device)




def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / ckpt.CHECKPOINT_NAME if p.is_dir() else p


def online_reward(reward: float, info) -> float:
    """The dataset's reward transform applied to one online reward."""
    from misa_fast.data import transforms

    return float(transforms.transform_reward(np.float32(reward), info.reward_transform, info.reward_params or {}))


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tunes (or resumes fine-tuning) online; returns a summary dict. Options are checked
    first, ``--out`` is locked for the call and never overwritten without ``resume`` or
    ``overwrite``, and Ctrl-C or SIGTERM checkpoints the current step before stopping."""
    from misa_fast.training.runtime import resolve_device, tune_host_allocator

    tune_host_allocator()
    check_options(cfg)
    device = resolve_device(cfg.device)
    source_path = _checkpoint_path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else Path(f"{source_path.parent}-finetune")
    with matmul_precision(cfg.matmul_precision, device), rundir.claim(out, "finetune"), \
            InterruptGuard("finetune") as guard:
        return _finetune_claimed(cfg, source_path, out, device, guard)


@dataclass
class Finetuning:
    """What the stages of one ``finetune`` call share: the agent, its data description, the buffer
    and its batches, the environment and the online counters that a checkpoint records."""

    cfg: FinetuneConfig
    out: Path
    state: dict
    resuming: bool
    offline_run: dict
    agent: object
    info: object
    env_id: str
    buffer: object = None
    batches: object = None
    env: object = None
    log: object = None
    env_steps: int = 0
    episodes: int = 0
    last_eval: Optional[dict] = None
    obs: object = None
    episode_return: float = 0.0
    episode_length: int = 0
    explore_generator: object = None
    metrics: dict = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.out / ckpt.CHECKPOINT_NAME


def _finetune_claimed(cfg: FinetuneConfig, source_path: Path, out: Path, device, guard: InterruptGuard) -> dict:
    run = load_agent(cfg, source_path, out, device)
    build_buffer(run, device)
    start_environment(run)
    try:
        with guard.deferring():
            online_loop(run, guard)
    finally:
        run.batches.close()
        run.env.close()
        run.log.close()
    return finish(run)


def load_agent(cfg: FinetuneConfig, source_path: Path, out: Path, device) -> Finetuning:
    """The agent to fine-tune (from the offline checkpoint, or the fine-tuning's own on --resume),
    with its environment made once and checked against the data's widths."""
    from misa_fast.agents import algorithms as algos
    from misa_fast.data import DataInfo
    from misa_fast.training.runtime import apply_threads, choose_threads

    own = out / ckpt.CHECKPOINT_NAME
    resuming = rundir.prepare(out, cfg.resume, cfg.overwrite)
    if not resuming and not source_path.exists():
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {source_path}")
    state = (ckpt.load_checked(own, OWN_KEYS, "a checkpoint of misa-fast finetune") if resuming else
             ckpt.load_checked(source_path, SOURCE_KEYS, "a checkpoint of misa-fast train"))
    offline_run = state["run"] if not resuming else state["offline_run"]
    info = DataInfo.from_dict(state["data_info"])
    env_id = cfg.env or state.get("env_id") or info.env_id
    info = info.in_env(env_id)  # recorded make() kwargs and reference returns only in the recorded env
    checks.check_environment(env_id, info.env_kwargs, info.obs_dim, info.act_dim,
                             f"--env {cfg.env}" if cfg.env else f"the checkpoint's environment {env_id}")
    agent = algos.agent_from_checkpoint(state, device, source=str(own if resuming else source_path))
    if getattr(agent.config, "reads_next_actions", False):
        raise UserError(f"misa-fast finetune: {offline_run['algo']} reads the data's next actions (ReBRAC's critic "
                        "penalty, OneStep's SARSA target), which the online replay buffer does not keep; fine-tune "
                        "it from a run trained with --set critic_bc_coef=0 (ReBRAC), or train longer offline")
    threads = apply_threads(choose_threads(cfg.threads, agent.config, device))
    print(f"misa-fast finetune: {threads.describe()}", file=sys.stderr)
    return Finetuning(cfg=cfg, out=out, state=state, resuming=resuming, offline_run=offline_run, agent=agent,
                      info=info, env_id=env_id)


def build_buffer(run: Finetuning, device) -> None:
    """The replay buffer: the offline data with room for every online row (or the saved buffer on
    --resume), its prefetcher, config.json and the progress log."""
    from misa_fast.data import DEFAULT_DATASET, prepare
    from misa_fast.replay.buffer import ReplayBuffer
    from misa_fast.training.progress import ProgressLog

    cfg, info, state = run.cfg, run.info, run.state
    if run.resuming:
        saved = state["buffer"]
        # Room for every online row of the (possibly longer) resumed run: nothing is ever evicted.
        capacity = max(saved["capacity"], info.n_transitions + cfg.steps)
        run.buffer = ReplayBuffer(capacity, info.obs_dim, info.act_dim)
        run.buffer.add(**saved["data"])
        # A full saved buffer reports write position 0; its rows were never overwritten (capacity is
        # offline + online rows), so in the larger buffer they simply end at ``size``.
        run.buffer.load_state_dict({**{k: v for k, v in saved.items() if k != "data"}, "capacity": capacity,
                                    "position": run.buffer.position})
        ckpt.set_rng_state(state["rng"])
        run.env_steps, run.episodes, run.last_eval = state["env_steps"], state["episodes"], state["last_eval"]
    else:
        offline_run = run.offline_run
        # The offline run's data as it trained on them (its reward transform and episode filter).
        data, _ = prepare(offline_run["dataset"] or DEFAULT_DATASET, obs_norm=offline_run["obs_norm"],
                          rescale_actions=bool(offline_run.get("rescale_actions", False)),
                          reward_transform=run.info.reward_transform, top_fraction=run.info.top_fraction)
        run.buffer = ReplayBuffer.from_arrays(data, capacity=len(data["rewards"]) + cfg.steps, seed=cfg.seed)
        del data
        torch.manual_seed(cfg.seed)
    (run.out / "config.json").write_text(json.dumps(
        {"finetune": dataclasses.asdict(cfg), "offline_run": run.offline_run, "agent": run.agent.config.to_dict(),
         "env_id": run.env_id}, indent=2, default=str))
    run.log = ProgressLog(run.out, run.env_steps if run.resuming else None, cfg.tensorboard,
                          extra_columns=("online_return", "online_length", "online_normalized"))
    run.batches = run.buffer.prefetcher(run.agent.config.batch_size, device=device)


def start_environment(run: Finetuning) -> None:
    from misa_fast.envs.rollout import make_env

    run.env = make_env(run.env_id, **run.info.env_kwargs)
    run.explore_generator = torch.Generator(device=run.agent.device).manual_seed(run.cfg.seed + run.env_steps)
    run.obs, _ = run.env.reset(seed=run.cfg.seed + run.episodes)


def save_checkpoint(run: Finetuning) -> None:
    ckpt.save_atomic({"env_steps": run.env_steps, "episodes": run.episodes, "offline_run": run.offline_run,
                      "finetune": dataclasses.asdict(run.cfg), "agent_config": run.agent.config.to_dict(),
                      "data_info": run.info.to_dict(), "env_id": run.env_id, "agent": run.agent.state_dict(),
                      "buffer": run.batches.state_dict(include_data=True), "rng": ckpt.rng_state(),
                      "last_eval": run.last_eval, "run": run.offline_run, "step": run.agent.step}, run.checkpoint)


def online_loop(run: Finetuning, guard: InterruptGuard) -> None:
    """One environment step and one update per iteration until ``--steps``; at an evaluation the
    checkpoint is written before the policy is evaluated. A signal received while stepping
    checkpoints the current step and raises Interrupted."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=cfg.steps, initial=run.env_steps, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not cfg.progress, desc=f"finetune {run.offline_run['algo']} {run.env_id}")
    window = [time.perf_counter(), 0]  # start, updates: evaluation time is not training time
    try:
        while run.env_steps < cfg.steps:
            row = _environment_step(run)
            if run.env_steps > cfg.start_updates_after:
                _update(run)
                window[1] += 1
            bar.update(1)
            evaluate_now = run.env_steps % cfg.eval_every == 0 or run.env_steps == cfg.steps
            if evaluate_now or run.env_steps % cfg.log_every == 0:
                elapsed = time.perf_counter() - window[0]
                row.update(metrics_to_floats(run.metrics), steps_per_s=window[1] / max(elapsed, 1e-9))
            if evaluate_now:
                save_checkpoint(run)  # before the evaluation: an evaluation that fails costs no training
                _evaluate(run, row, bar)
                window[:] = [time.perf_counter(), 0]
            if row:
                run.log.write(run.env_steps, row)
            if evaluate_now:
                save_checkpoint(run)  # again: the checkpoint records the evaluation (a resume reports it)
            if guard.pending is not None and run.env_steps < cfg.steps:
                if not evaluate_now:
                    save_checkpoint(run)
                raise Interrupted(guard.pending, f"interrupted at environment step {run.env_steps}: checkpoint "
                                                 f"written in {run.out}; continue with: misa-fast finetune "
                                                 f"--checkpoint {cfg.checkpoint} --out {run.out} --steps {cfg.steps} "
                                                 "--resume")
    finally:
        bar.close()


def _environment_step(run: Finetuning) -> dict:
    """Acts once (exploration noise), adds the transition to the buffer; returns the progress row
    so far (the episode's return and score when it ended)."""
    from misa_fast.envs.rollout import scale_actions

    info, space = run.info, run.env.action_space
    obs_in = info.normalize(np.asarray(run.obs, dtype=np.float32)[None])
    action = run.agent.act_explore(obs_in, run.cfg.exploration_noise, generator=run.explore_generator)[0]
    action = np.clip(action, -info.action_clip, info.action_clip)
    next_obs, reward, terminated, truncated, _ = run.env.step(scale_actions(action[None], space.low, space.high)[0])
    run.buffer.add(obs_in, action[None], [online_reward(reward, info)],
                   info.normalize(np.asarray(next_obs, dtype=np.float32)[None]), [float(terminated)])
    run.env_steps += 1
    run.episode_return += float(reward)
    run.episode_length += 1
    row = {}
    if terminated or truncated:
        run.episodes += 1
        row.update(online_return=run.episode_return, online_length=run.episode_length)
        score = _normalized(info, run.env_id, run.episode_return)
        if score is not None:
            row["online_normalized"] = score
        run.obs, _ = run.env.reset(seed=run.cfg.seed + run.episodes)
        run.episode_return, run.episode_length = 0.0, 0
    else:
        run.obs = next_obs
    return row


def _update(run: Finetuning) -> None:
    from misa_fast.agents import NonFiniteLossError

    try:
        run.metrics = run.agent.update(next(run.batches))
    except NonFiniteLossError as err:
        raise NonFiniteTraining(f"stopped at environment step {run.env_steps}: non-finite {err.term}; "
                                f"{rundir.kept_checkpoint(run.out)}") from err


def _evaluate(run: Finetuning, row: dict, bar) -> None:
    from misa_fast.training.evaluation import evaluate_policy

    result = evaluate_policy(run.agent, run.info, run.cfg.eval_episodes, seed=run.cfg.seed + checks.EVAL_SEED_OFFSET)
    run.last_eval = {"step": run.env_steps, "mean_return": result["mean_return"],
                     "std_return": result["std_return"], "mean_normalized": result["mean_normalized"]}
    row.update(eval_return=result["mean_return"], eval_return_std=result["std_return"],
               eval_normalized=result["mean_normalized"])
    bar.set_postfix(score=f"{result['mean_normalized']:.1f}" if result["mean_normalized"] is not None
                    else f"ret {result['mean_return']:.1f}")


def finish(run: Finetuning) -> dict:
    """Exports the policy, plots the curve and writes the summary."""
    from misa_fast.training.plots import plot_progress

    ckpt.export_policy(run.agent.policy, run.info.obs_dim, run.out / ckpt.POLICY_NAME, run.info.obs_mean,
                       run.info.obs_std)
    plot_progress(run.out / "progress.csv", run.out / "learning_curve.png",
                  title=f"{run.offline_run['algo']} fine-tuned in {run.env_id}")
    summary = {"out": str(run.out), "env_steps": run.env_steps, "episodes": run.episodes, "last_eval": run.last_eval}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _normalized(info, env_id: str, episode_return: float) -> Optional[float]:
    from misa_fast.data import normalized_score
    from misa_fast.data.scores import scale_to_reference

    reference = info.reference_returns()
    if reference is None:  # a dataset without reference scores: returns stay raw
        return None
    if reference != "by-name":
        return float(scale_to_reference(episode_return, *reference))
    for name in (info.name, env_id):
        try:
            return float(normalized_score(name, np.asarray([episode_return]))[0])
        except KeyError:
            continue
    return None


# ---------------------------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    add_options(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(FinetuneConfig, args)
    try:
        summary = finetune(cfg)
    except NonFiniteTraining as err:
        print(f"misa-fast finetune: {err}", file=sys.stderr)
        return 3
    last = summary["last_eval"] or {}
    score = last.get("mean_normalized")
    print(f"done: {summary['env_steps']} environment steps ({summary['episodes']} episodes) in {summary['out']}; "
          f"last evaluation: return {last.get('mean_return', float('nan')):.1f}"
          + (f", normalized score {score:.1f}" if score is not None else ""))
    return 0
