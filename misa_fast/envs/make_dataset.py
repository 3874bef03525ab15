"""``misa-fast make-dataset``: write a D4RL-layout dataset collected in a gymnasium environment.

Kinds, following D4RL's recipe:
- random: uniform random actions (needs nothing beyond gymnasium).
- expert / medium: a SAC policy (stable-baselines3, the optional ``sb3`` extra) is trained and
  evaluated every ``eval_every`` steps; expert = the best checkpoint, medium = the checkpoint
  (before it) whose normalized score is closest to ``medium_fraction`` (1/3) of the expert's. The
  data are ``size`` steps of that policy's stochastic actions.
- medium-replay: every transition the SAC learner saw while training up to the medium checkpoint
  (``size`` caps it).
- full-replay: every transition of the whole training run (``size`` caps it), as D4RL's
  ``*-full-replay-v2``.
- medium-expert: medium data cut at its last complete episode (about ``size``/2 rows), followed by
  expert data filling the rest up to ``size`` rows.

Layout written: observations, next_observations, actions (float32), rewards (float32),
terminals, timeouts (bool), infos/qpos, infos/qvel (the physics state before each step; Pendulum:
qpos = [theta], qvel = [theta_dot]) and metadata/* describing how the file was made. Actions are
stored in [-1, 1] units: env_action = low + (a + 1) / 2 * (high - low). A final row that ends
mid-episode is flagged as a timeout (the data, not the environment, ended the episode).
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from misa_fast.data.hdf5 import write_hdf5
from misa_fast.envs.rollout import evaluate, make_env, unscale_actions

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert", "full-replay")
# SAC steps that reach expert level; D4RL trained its MuJoCo behaviour policies ~1M steps.
DEFAULT_TRAIN_STEPS = {"Pendulum-v1": 10_000}
DEFAULT_EVAL_EVERY = {"Pendulum-v1": 500}
ACTION_CONVENTION = "actions in [-1, 1]; env_action = low + (a + 1) / 2 * (high - low)"


class RecordTransitions(gym.Wrapper):
    """Records every step the environment takes, whoever drives it (our loops or SB3's learner)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals",
                                                     "timeouts", "next_observations", "qpos", "qvel")}
        self._obs = None

    def reset(self, **kwargs):
        self._obs, info = self.env.reset(**kwargs)
        return self._obs, info

    def step(self, action):
        qpos, qvel = physics_state(self.env.unwrapped)
        obs, reward, terminated, truncated, info = self.env.step(action)
        for key, value in (("observations", self._obs), ("actions", action), ("rewards", reward),
                           ("terminals", terminated), ("timeouts", truncated and not terminated),
                           ("next_observations", obs), ("qpos", qpos), ("qvel", qvel)):
            self.rows[key].append(np.array(value, copy=True))
        self._obs = obs
        return obs, reward, terminated, truncated, info

    def __len__(self) -> int:
        return len(self.rows["rewards"])

    def dataset(self, start: int = 0, stop: int | None = None) -> dict:
        """Rows [start, stop) in the D4RL layout (actions rescaled to [-1, 1])."""
        space = self.env.action_space
        cols = {k: np.stack(v[start:stop]) for k, v in self.rows.items()}
        data = {
            "observations": cols["observations"].astype(np.float32),
            "next_observations": cols["next_observations"].astype(np.float32),
            "actions": unscale_actions(cols["actions"], space.low, space.high),
            "rewards": cols["rewards"].astype(np.float32),
            "terminals": cols["terminals"].astype(bool),
            "timeouts": cols["timeouts"].astype(bool),
            "infos/qpos": cols["qpos"].astype(np.float64),
            "infos/qvel": cols["qvel"].astype(np.float64),
        }
        return data


def physics_state(env) -> tuple[np.ndarray, np.ndarray]:
    """(qpos, qvel) before a step. Classic control has no MuJoCo state: its ``state`` vector is
    split into positions and velocities (Pendulum: [theta], [theta_dot])."""
    if hasattr(env, "data") and hasattr(env.data, "qpos"):  # MuJoCo environments
        return env.data.qpos.copy(), env.data.qvel.copy()
    state = np.asarray(getattr(env, "state", ()), dtype=np.float64).ravel()  # classic control
    half = (len(state) + 1) // 2
    return state[:half], state[half:]


def end_with_episode_boundary(data: dict) -> dict:
    if len(data["rewards"]) and not (data["terminals"][-1] or data["timeouts"][-1]):
        data["timeouts"] = data["timeouts"].copy()
        data["timeouts"][-1] = True
    return data


def cut_at_last_episode(data: dict) -> dict:
    """Rows up to the end of the last complete episode (terminal or time limit); all rows, with
    the last flagged as a timeout (more data will follow), when no episode completed."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    stop = int(ends[-1]) + 1 if len(ends) else len(data["rewards"])
    return end_with_episode_boundary({k: v[:stop] for k, v in data.items()})


def concatenate(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def collect(env_id: str, act, size: int, seed: int, desc: str) -> dict:
    """``size`` steps of ``act(obs) -> env action`` from ``reset(seed=seed)`` on; episodes follow
    each other, later resets continue the environment's seeded random stream."""
    env = RecordTransitions(make_env(env_id))
    obs, _ = env.reset(seed=seed)
    for _ in tqdm(range(size), desc=desc, unit="step", mininterval=1.0):
        obs, _, terminated, truncated, _ = env.step(act(obs))
        if terminated or truncated:
            obs, _ = env.reset()
    data = env.dataset()
    env.close()
    return data


@dataclass
class Checkpoint:
    step: int
    mean_return: float
    score: float  # normalized score; see behaviour_scores
    params: dict | None  # policy state dict


def train_sac(env_id: str, train_steps: int, seed: int, eval_every: int, eval_episodes: int,
              device: str = "cpu"):
    """Train SB3's SAC, evaluating (deterministic actions) and keeping a checkpoint every
    ``eval_every`` steps. Returns (model, recorder of every training transition, checkpoints)."""
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as err:
        raise ModuleNotFoundError(
            "behaviour-policy datasets train a policy with stable-baselines3: "
            "pip install 'misa-fast[sb3]' (or pip install stable-baselines3)"
        ) from err

    recorder = RecordTransitions(make_env(env_id))
    model = SAC("MlpPolicy", recorder, seed=seed, device=device, verbose=0)
    space = recorder.action_space
    checkpoints: list[Checkpoint] = []

    def snapshot(step: int) -> None:
        def policy(obs):  # misa-fast's convention: deterministic actions in [-1, 1]
            return unscale_actions(model.predict(obs, deterministic=True)[0], space.low, space.high)

        result = evaluate(policy, env_id, episodes=eval_episodes, seed=10_000 + seed)
        checkpoints.append(Checkpoint(step, result["mean_return"], float("nan"),
                                      copy.deepcopy(model.policy.state_dict())))

    class EvalCallback(BaseCallback):
        def _init_callback(self) -> None:
            self.bar = tqdm(total=train_steps, desc=f"SAC on {env_id}", unit="step", mininterval=1.0)

        def _on_step(self) -> bool:
            self.bar.update(1)
            if self.num_timesteps % eval_every == 0:
                snapshot(self.num_timesteps)
                self.bar.set_postfix(eval_return=f"{checkpoints[-1].mean_return:.1f}")
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    snapshot(0)  # the untrained policy: the "random" end of the scale when no reference exists
    # 256x256 MLPs on batches of 256 gain nothing from intra-op threads, and on a busy machine
    # spinning OpenMP threads slow SAC down by an order of magnitude.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.learn(total_timesteps=train_steps, callback=EvalCallback())
    finally:
        torch.set_num_threads(threads)
    return model, recorder, checkpoints


def behaviour_scores(env_id: str, checkpoints: list[Checkpoint]) -> None:
    """Normalized score per checkpoint: D4RL's reference returns when the environment has them,
    else 0 = the untrained policy and 100 = the best checkpoint."""
    try:
        from misa_fast.data.scores import normalized_score

        for c in checkpoints:
            c.score = normalized_score(env_id, c.mean_return)
    except KeyError:
        low, high = checkpoints[0].mean_return, max(c.mean_return for c in checkpoints)
        for c in checkpoints:
            c.score = 100.0 * (c.mean_return - low) / (high - low) if high > low else 0.0


def pick_checkpoints(checkpoints: list[Checkpoint], medium_fraction: float) -> tuple[Checkpoint, Checkpoint]:
    """(medium, expert) as D4RL picks them: expert = best; medium = the earlier checkpoint whose
    score is closest to ``medium_fraction`` of the expert's."""
    expert = max(checkpoints, key=lambda c: c.score)
    target = medium_fraction * expert.score
    earlier = [c for c in checkpoints if c.step <= expert.step]
    medium = min(earlier, key=lambda c: (abs(c.score - target), c.step))
    return medium, expert


@dataclass
class Behaviour:
    """What training produced: the SB3 model and its checkpoints (for further use, e.g. measuring
    reference returns as scripts/make_default_dataset.py does)."""
    model: object
    checkpoints: list[Checkpoint]
    medium: Checkpoint
    expert: Checkpoint

    def policy(self, checkpoint: Checkpoint, deterministic: bool = True):
        """The checkpoint as a misa-fast policy: observations -> actions in [-1, 1]."""
        self.model.policy.load_state_dict(checkpoint.params)
        space = self.model.action_space
        return lambda obs: unscale_actions(self.model.predict(obs, deterministic=deterministic)[0],
                                           space.low, space.high)


def build_dataset(env_id: str, kind: str, size: int, seed: int = 0, train_steps: int | None = None,
                  eval_every: int | None = None, eval_episodes: int = 10, medium_fraction: float = 1 / 3,
                  device: str = "cpu") -> tuple[dict, dict, Behaviour | None]:
    """Collect a dataset in memory: (raw D4RL dict, metadata, Behaviour or None for random)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    if size < 2:
        raise ValueError(f"size must be at least 2 transitions, got {size}")
    meta: dict = {"env_id": env_id, "kind": kind, "seed": seed, "action_convention": ACTION_CONVENTION}
    if kind == "random":
        probe = make_env(env_id)
        space = probe.action_space
        space.seed(seed)
        probe.close()
        data = collect(env_id, lambda obs: space.sample(), size, seed, desc=f"random {env_id}")
        meta["algorithm"] = "uniform random actions"
        return finish(data, meta), meta, None

    import stable_baselines3

    train_steps = train_steps or DEFAULT_TRAIN_STEPS.get(env_id, 1_000_000)
    eval_every = eval_every or DEFAULT_EVAL_EVERY.get(env_id, max(1, train_steps // 100))
    model, recorder, checkpoints = train_sac(env_id, train_steps, seed, eval_every, eval_episodes, device)
    behaviour_scores(env_id, checkpoints)
    medium, expert = pick_checkpoints(checkpoints, medium_fraction)

    def sample_with(checkpoint: Checkpoint, n: int, offset: int) -> dict:
        model.policy.load_state_dict(checkpoint.params)
        act = lambda obs: model.predict(obs, deterministic=False)[0]  # noqa: E731 - stochastic, as D4RL
        return collect(env_id, act, n, seed + offset, f"{kind}: step-{checkpoint.step} policy")

    if kind == "expert":
        data = sample_with(expert, size, 1)
    elif kind == "medium":
        data = sample_with(medium, size, 1)
    elif kind == "medium-replay":
        if medium.step == 0:
            raise ValueError("the medium checkpoint is the untrained policy, so there is no replay to "
                             "write: evaluate more often (--eval-every) or train longer")
        data = recorder.dataset(0, min(medium.step, size))
    elif kind == "full-replay":
        data = recorder.dataset(0, min(len(recorder), size))
    else:  # medium-expert
        data = cut_at_last_episode(sample_with(medium, size // 2, 1))
        data = concatenate([data, sample_with(expert, size - len(data["rewards"]), 2)])
    meta.update({
        "algorithm": f"SAC (stable-baselines3 {stable_baselines3.__version__}, default hyper-parameters)",
        "train_steps": train_steps, "eval_every": eval_every, "eval_episodes": eval_episodes,
        "medium_fraction": medium_fraction,
        "medium_checkpoint_step": medium.step, "medium_checkpoint_score": medium.score,
        "expert_checkpoint_step": expert.step, "expert_checkpoint_score": expert.score,
        "checkpoint_steps": np.array([c.step for c in checkpoints]),
        "checkpoint_scores": np.array([c.score for c in checkpoints]),
        "checkpoint_returns": np.array([c.mean_return for c in checkpoints]),
    })
    return finish(data, meta), meta, Behaviour(model, checkpoints, medium, expert)


def finish(data: dict, meta: dict) -> dict:
    """Record the complete episodes' statistics, then flag a last row that ends mid-episode."""
    returns = episode_returns(data)
    meta.update({"size": len(data["rewards"]), "episodes": len(returns),
                 "mean_episode_return": float(np.mean(returns)) if len(returns) else float("nan")})
    try:
        from misa_fast.data.scores import normalized_score

        meta["mean_episode_normalized_score"] = normalized_score(meta["env_id"], meta["mean_episode_return"])
    except KeyError:
        pass
    return end_with_episode_boundary(data)


def describe(meta: dict, name: str, command: str | None = None) -> dict:
    """Provenance entries for the metadata."""
    return {**meta, "dataset_name": name, "made_by": "misa-fast make-dataset",
            "command": command or "misa_fast.envs.make_dataset", "gymnasium_version": gym.__version__}


def make_dataset(env_id: str, kind: str, size: int, out: str | Path, seed: int = 0,
                 train_steps: int | None = None, eval_every: int | None = None, eval_episodes: int = 10,
                 medium_fraction: float = 1 / 3, device: str = "cpu", name: str | None = None,
                 command: str | None = None) -> dict:
    """Collect and write a dataset; returns the metadata written (see the module docstring)."""
    started = time.time()
    data, meta, _ = build_dataset(env_id, kind, size, seed, train_steps, eval_every, eval_episodes,
                                  medium_fraction, device)
    meta = describe(meta, name or Path(out).name.rsplit(".", 1)[0], command)
    meta["seconds"] = round(time.time() - started, 1)
    write_hdf5(out, data, metadata=meta)
    return meta


def episode_returns(data: dict) -> np.ndarray:
    """Returns of the complete episodes (ending in a terminal or a time limit) in the data."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    sums = np.cumsum(np.asarray(data["rewards"], dtype=np.float64))[ends]
    return np.diff(np.concatenate([[0.0], sums]))


# --- command line --------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="gymnasium id, e.g. Hopper-v4 or Pendulum-v1")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--size", type=int, required=True,
                        help="transitions to write (medium-replay, full-replay: at most this many)")
    parser.add_argument("--out", required=True, help="output .hdf5 file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=None,
                        help="SAC training steps (default: 10,000 for Pendulum-v1, else 1,000,000)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between checkpoint evaluations (default: 500 for Pendulum-v1, "
                             "else train_steps / 100)")
    parser.add_argument("--eval-episodes", type=int, default=10,
                        help="episodes per checkpoint evaluation (deterministic actions)")
    parser.add_argument("--medium-fraction", type=float, default=1 / 3,
                        help="medium checkpoint's target score as a fraction of the expert's")
    parser.add_argument("--device", default="cpu", help="torch device for SAC training")
    parser.add_argument("--name", default=None, help="dataset name recorded in metadata (default: file stem)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def check_options(args: argparse.Namespace) -> None:
    """The options, and the environment's spaces, before any step is collected."""
    from misa_fast.errors import UserError

    for name in ("size", "train_steps", "eval_every", "eval_episodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not 0.0 < args.medium_fraction < 1.0:
        raise UserError(f"--medium-fraction must lie in (0, 1), got {args.medium_fraction}")
    try:
        env = make_env(args.env)
    except gym.error.Error as err:
        raise UserError(f"--env {args.env}: {' '.join(str(err).split())}") from None
    try:
        spaces = {"actions": env.action_space, "observations": env.observation_space}
    finally:
        env.close()
    for what, space in spaces.items():
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise UserError(f"--env {args.env}: its {what} are {space}; a D4RL-format dataset holds flat continuous "
                            f"(Box) {what}")


def run(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.force:
        print(f"make-dataset: {args.out} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    check_options(args)
    options = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
                       if v is not None and not isinstance(v, bool) and not k.startswith("_"))
    try:
        meta = make_dataset(args.env, args.kind, args.size, args.out, seed=args.seed,
                            train_steps=args.train_steps, eval_every=args.eval_every,
                            eval_episodes=args.eval_episodes, medium_fraction=args.medium_fraction,
                            device=args.device, name=args.name, command=f"misa-fast make-dataset {options}")
    except (ModuleNotFoundError, ValueError, gym.error.Error) as err:
        print(f"make-dataset: {err}", file=sys.stderr)
        return 1
    score = meta.get("mean_episode_normalized_score")
    print(f"wrote {args.out}: {meta['size']} transitions, {meta['episodes']} complete episodes, "
          f"mean episode return {meta['mean_episode_return']:.1f}"
          + (f" (normalized {score:.1f})" if score is not None else ""))
    return 0
