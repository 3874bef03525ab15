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
from dataclasses import dataclass
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

    if info.reward_transform == "minmax":
        return float(transforms.minmax_rewards(np.float32(reward), info.reward_params["min"],
                                               info.reward_params["max"]))
    return float(transforms.transform_rewards(np.asarray([reward], np.float32), info.reward_transform)[0][0])


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
    with rundir.claim(out, "finetune"), InterruptGuard("finetune") as guard:
        return _finetune_claimed(cfg, source_path, out, device, guard)


def _finetune_claimed(cfg: FinetuneConfig, source_path: Path, out: Path, device, guard: InterruptGuard) -> dict:
    from tqdm.auto import tqdm

    from misa_fast.agents import NonFiniteLossError
    from misa_fast.agents import algorithms as algos
    from misa_fast.data import DEFAULT_DATASET, DataInfo, prepare
    from misa_fast.envs.rollout import make_env, scale_actions
    from misa_fast.replay.buffer import ReplayBuffer
    from misa_fast.training.evaluation import evaluate_policy
    from misa_fast.training.plots import plot_progress
    from misa_fast.training.progress import ProgressLog, metrics_to_floats
    from misa_fast.training.runtime import apply_threads, choose_threads

    own = out / ckpt.CHECKPOINT_NAME
    resuming = rundir.prepare(out, cfg.resume, cfg.overwrite)
    if not resuming and not source_path.exists():
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {source_path}")
    state = (ckpt.load_checked(own, OWN_KEYS, "a checkpoint of misa-fast finetune") if resuming else
             ckpt.load_checked(source_path, SOURCE_KEYS, "a checkpoint of misa-fast train"))
    offline_run = state["run"] if not resuming else state["offline_run"]
    algo = algos.get(offline_run["algo"])
    info = DataInfo.from_dict(state["data_info"])
    env_id = cfg.env or state.get("env_id") or info.env_id
    info = info.in_env(env_id)  # recorded make() kwargs and reference returns only in the recorded env
    checks.check_environment(env_id, info.env_kwargs, info.obs_dim, info.act_dim,
                             f"--env {cfg.env}" if cfg.env else f"the checkpoint's environment {env_id}")
    agent = algos.agent_from_checkpoint(state, device, source=str(own if resuming else source_path))
    agent_cfg = agent.config
    threads = apply_threads(choose_threads(cfg.threads, agent_cfg, device))
    print(f"misa-fast finetune: {threads.describe()}", file=sys.stderr)

    if resuming:
        saved = state["buffer"]
        # Room for every online row of the (possibly longer) resumed run: nothing is ever evicted.
        capacity = max(saved["capacity"], info.n_transitions + cfg.steps)
        buffer = ReplayBuffer(capacity, info.obs_dim, info.act_dim)
        buffer.add(**saved["data"])
        # A full saved buffer reports write position 0; its rows were never overwritten (capacity is
        # offline + online rows), so in the larger buffer they simply end at ``size``.
        buffer.load_state_dict({**{k: v for k, v in saved.items() if k != "data"}, "capacity": capacity,
                                "position": buffer.position})
        ckpt.set_rng_state(state["rng"])
        env_steps, episodes, last_eval = state["env_steps"], state["episodes"], state["last_eval"]
    else:
        data, _ = prepare(offline_run["dataset"] or DEFAULT_DATASET, obs_norm=offline_run["obs_norm"],
                          rescale_actions=bool(offline_run.get("rescale_actions", False)))
        buffer = ReplayBuffer.from_arrays(data, capacity=len(data["rewards"]) + cfg.steps, seed=cfg.seed)
        del data
        torch.manual_seed(cfg.seed)
        env_steps, episodes, last_eval = 0, 0, None
    (out / "config.json").write_text(json.dumps({"finetune": dataclasses.asdict(cfg), "offline_run": offline_run,
                                                 "agent": agent_cfg.to_dict(), "env_id": env_id},
                                                indent=2, default=str))

    env = make_env(env_id, **info.env_kwargs)
    low, high = env.action_space.low, env.action_space.high
    explore_generator = torch.Generator(device=agent.device).manual_seed(cfg.seed + env_steps)
    obs, _ = env.reset(seed=cfg.seed + episodes)
    episode_return, episode_length = 0.0, 0
    log = ProgressLog(out, env_steps if resuming else None, cfg.tensorboard,
                      extra_columns=("online_return", "online_length", "online_normalized"))
    batches = buffer.prefetcher(agent_cfg.batch_size, device=device)

    def save() -> None:
        ckpt.save_atomic({"env_steps": env_steps, "episodes": episodes, "offline_run": offline_run,
                          "finetune": dataclasses.asdict(cfg), "agent_config": agent_cfg.to_dict(),
                          "data_info": info.to_dict(), "env_id": env_id, "agent": agent.state_dict(),
                          "buffer": batches.state_dict(include_data=True), "rng": ckpt.rng_state(),
                          "last_eval": last_eval, "run": offline_run, "step": agent.step}, own)

    bar = tqdm(total=cfg.steps, initial=env_steps, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not cfg.progress, desc=f"finetune {algo.name} {env_id}")
    window_start, window_steps = time.perf_counter(), 0
    metrics: dict = {}
    try:
        with guard.deferring():
            while env_steps < cfg.steps:
                obs_in = info.normalize(np.asarray(obs, dtype=np.float32)[None])
                action = agent.act_explore(obs_in, cfg.exploration_noise, generator=explore_generator)[0]
                action = np.clip(action, -info.action_clip, info.action_clip)
                next_obs, reward, terminated, truncated, _ = env.step(scale_actions(action[None], low, high)[0])
                buffer.add(obs_in, action[None], [online_reward(reward, info)],
                           info.normalize(np.asarray(next_obs, dtype=np.float32)[None]), [float(terminated)])
                env_steps += 1
                episode_return += float(reward)
                episode_length += 1
                row = {}
                if terminated or truncated:
                    episodes += 1
                    row.update(online_return=episode_return, online_length=episode_length)
                    score = _normalized(info, env_id, episode_return)
                    if score is not None:
                        row["online_normalized"] = score
                    obs, _ = env.reset(seed=cfg.seed + episodes)
                    episode_return, episode_length = 0.0, 0
                else:
                    obs = next_obs
                if env_steps > cfg.start_updates_after:
                    try:
                        metrics = agent.update(next(batches))
                    except NonFiniteLossError as err:
                        kept = (f"the last good checkpoint ({own}) was left untouched" if own.exists() else
                                f"no checkpoint had been written yet in {out}")
                        raise NonFiniteTraining(f"stopped at environment step {env_steps}: non-finite {err.term}; "
                                                f"{kept}") from err
                    window_steps += 1
                bar.update(1)
                evaluate_now = env_steps % cfg.eval_every == 0 or env_steps == cfg.steps
                if evaluate_now or env_steps % cfg.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    row.update(metrics_to_floats(metrics), steps_per_s=window_steps / max(elapsed, 1e-9))
                if evaluate_now:
                    save()  # before the evaluation: an evaluation that fails costs no training
                    result = evaluate_policy(agent, info, cfg.eval_episodes,
                                             seed=cfg.seed + checks.EVAL_SEED_OFFSET)
                    last_eval = {"step": env_steps, "mean_return": result["mean_return"],
                                 "std_return": result["std_return"], "mean_normalized": result["mean_normalized"]}
                    row.update(eval_return=result["mean_return"], eval_return_std=result["std_return"],
                               eval_normalized=result["mean_normalized"])
                    bar.set_postfix(score=f"{result['mean_normalized']:.1f}" if result["mean_normalized"] is not None
                                    else f"ret {result['mean_return']:.1f}")
                if row:
                    log.write(env_steps, row)
                if evaluate_now:
                    save()  # again: the checkpoint records the evaluation (a resume reports it)
                    window_start, window_steps = time.perf_counter(), 0
                if guard.pending is not None and env_steps < cfg.steps:
                    if not evaluate_now:
                        save()
                    if row:
                        log.write(env_steps, row)
                    raise Interrupted(guard.pending, f"interrupted at environment step {env_steps}: checkpoint written "
                                                     f"in {out}; continue with: misa-fast finetune --checkpoint "
                                                     f"{cfg.checkpoint} --out {out} --steps {cfg.steps} --resume")
    finally:
        bar.close()
        batches.close()
        env.close()
        log.close()

    ckpt.export_policy(agent.policy, info.obs_dim, out / ckpt.POLICY_NAME, info.obs_mean, info.obs_std)
    plot_progress(out / "progress.csv", out / "learning_curve.png", title=f"{algo.name} fine-tuned in {env_id}")
    summary = {"out": str(out), "env_steps": env_steps, "episodes": episodes, "last_eval": last_eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
