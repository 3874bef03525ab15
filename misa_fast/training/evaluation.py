"""``misa-fast eval``: evaluate a checkpoint (or an exported policy.pt2) in its environment.

    misa-fast eval --checkpoint runs/pendulum-default-misa-seed0 --episodes 10
    misa-fast eval --checkpoint runs/x/policy.pt2 --env Hopper-v4 --dataset-name hopper-medium-v2

A checkpoint trained on a Minari dataset is evaluated in the environment its env spec records
(with its kwargs) and scored with the dataset's own reference returns, when it has them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from misa_fast.data.prepare import DataInfo
from misa_fast.errors import UserError
from misa_fast.options import add_options, option
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.runtime import MATMUL_PRECISIONS


def evaluate_policy(agent, info, episodes: int, seed: int) -> dict:
    """``episodes`` deterministic episodes of the agent's policy in the dataset's environment, the
    i-th reset with ``seed + i``."""
    return evaluate_policies([agent], info, episodes, [seed])[0]


def evaluate_policies(agents: list, info, episodes: int, seeds: list) -> list:
    """:func:`evaluate_policy` of several agents (the seeds of one group) side by side: their
    environments step together in one vector environment, each agent's episodes keep their own
    seeds, so each result is the one its own call would give."""
    from misa_fast.envs.rollout import evaluate_many

    def actor(agent):
        device = next(agent.policy.parameters()).device

        @torch.no_grad()
        def act(obs: np.ndarray) -> np.ndarray:
            return agent.policy.act(torch.as_tensor(obs, device=device)).cpu().numpy()

        return act

    return evaluate_many([actor(a) for a in agents], info.env_id, episodes=episodes, seeds=seeds,
                         obs_mean=info.obs_mean, obs_std=info.obs_std, dataset_name=info.name,
                         env_kwargs=info.env_kwargs, reference_returns=info.reference_returns())


def load_policy(path: Path):
    """(act function on numpy observations, data info dict or None) from a checkpoint, a run
    directory or an exported policy.pt2."""
    if path.suffix == ".pt2":
        module = ckpt.load_exported_policy(path)

        def act_exported(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.as_tensor(obs, dtype=torch.float32)).numpy()

        return act_exported, None, True  # normalisation is inside the exported program
    from misa_fast.agents.algorithms import agent_from_checkpoint

    state = ckpt.load(path)
    missing = [key for key in ("run", "agent_config", "data_info", "agent")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not a checkpoint of misa-fast train or finetune (missing {', '.join(missing)})")
    policy = agent_from_checkpoint(state, source=str(path)).policy.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy.act(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act, state["data_info"], False


@dataclass
class EvalConfig:
    """The options of ``misa-fast eval``."""

    checkpoint: str = option(required=True, help="checkpoint.pt, its run directory, or policy.pt2")
    episodes: int = option(10, help="episodes to run")
    seed: int = option(0, help="seed of the first episode (episode i uses seed + i)")
    env: Optional[str] = option(None, help="gymnasium id (default: the one the training data came from)")
    dataset_name: Optional[str] = option(None, help="name for the normalized score (default: the training dataset)")
    json: bool = option(False, help="print the full result as JSON")
    matmul_precision: str = option("auto", choices=MATMUL_PRECISIONS,
                                   help="fp32 matrix products of the policy: highest (fp32) or medium (bfloat16 "
                                        "products with fp32 accumulation on a CPU); auto: as for misa-fast train")
    threads: Optional[int] = option(None, metavar="N",
                                    help="intra-op threads for the policy's forward passes (default: "
                                         "OMP_NUM_THREADS, else 1: one small forward per environment step gains "
                                         "nothing from more)")


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_options(p, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from misa_fast.training import checks
    from misa_fast.training.runtime import apply_threads, choose_threads, matmul_precision

    checks.check_positive(args.episodes, "--episodes")
    checks.check_seed(args.seed)
    # No config: the rule's default for networks it knows nothing of is one thread.
    apply_threads(choose_threads(args.threads, None, "cpu"))
    with matmul_precision(args.matmul_precision):
        return _evaluate_checkpoint(args)


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    from misa_fast.envs.rollout import evaluate
    from misa_fast.training import checks

    act, info, normalised_inside = load_policy(Path(args.checkpoint))
    env_id = args.env or (info or {}).get("env_id")
    if env_id is None:
        print("misa-fast eval: an exported policy does not record its environment: pass --env", file=sys.stderr)
        return 2
    data_info = DataInfo.from_dict(info).in_env(env_id) if info else None
    if data_info is not None:
        checks.check_environment(env_id, data_info.env_kwargs, data_info.obs_dim, data_info.act_dim,
                                 f"--env {args.env}" if args.env else f"the checkpoint's environment {env_id}")
    # --dataset-name asks for that name's reference returns instead of the dataset's own.
    own_scores = data_info is not None and not args.dataset_name
    reference = data_info.reference_returns() if own_scores else "by-name"
    if own_scores and reference is None:
        print(f"misa-fast eval: {data_info.no_reference_scores_note()}", file=sys.stderr)
    try:
        result = evaluate(
            act, env_id, episodes=args.episodes, seed=args.seed,
            obs_mean=None if normalised_inside else info.get("obs_mean"),
            obs_std=None if normalised_inside else info.get("obs_std"),
            dataset_name=args.dataset_name or (info or {}).get("name"),
            env_kwargs=data_info.env_kwargs if data_info else None,
            reference_returns=reference,
        )
    except ValueError as err:
        print(f"misa-fast eval: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        line = (f"{env_id}: return {result['mean_return']:.1f} ± {result['std_return']:.1f} "
                f"over {args.episodes} episodes")
        if result["mean_normalized"] is not None:
            line += f"; normalized score {result['mean_normalized']:.1f}"
        print(line)
    return 0
