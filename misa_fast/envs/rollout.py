"""Evaluation in gymnasium's maintained environments (no mujoco-py, no old gym).

Dataset names map to gymnasium ids (hopper -> Hopper-v4, ...; antmaze/kitchen/adroit -> the
gymnasium-robotics ids, when that package is installed). ``evaluate`` runs a deterministic policy
for exactly ``episodes`` complete episodes on a vector of environments; episode ``j`` always
starts from ``reset(seed=seed + j)``, so results do not depend on how many environments run
side by side.

Action convention: policies act in [-1, 1]^act_dim; actions are rescaled to the environment's
bounds (Pendulum's torque is [-2, 2]), and datasets written by make-dataset store actions in the
same normalised units.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from misa_fast.data import registry
from misa_fast.data.registry import DICT_OBSERVATION_KEYS, env_id_for
from misa_fast.data.scores import normalized_score, scale_to_reference
from misa_fast.data.transforms import scale_actions, unscale_actions

__all__ = ["env_id_for", "evaluate", "make_env", "scale_actions", "unscale_actions"]

Policy = Callable[[np.ndarray], np.ndarray]

# Dict observations (goal-conditioned gymnasium-robotics envs) -> the keys D4RL's flat vectors
# hold, in D4RL's order after flattening (sorted keys): antmaze = [x, y] + the ant's own state.
# Not checked against D4RL here (gymnasium-robotics is optional); FrankaKitchen-v1's "observation"
# is known to differ from D4RL kitchen's 60-dim vector, so kitchen policies need --env care.



def _domain_for_env(env_id: str):
    try:
        return registry.domain_of(env_id)
    except KeyError:
        return None


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gym.make`` with the keyword arguments our datasets need (e.g. Ant's contact forces, which
    D4RL's 111-dim ant observations include) and flat observations. Explicit kwargs win.

    An id of gymnasium's ``module:Name-v0`` form is made only when ``module`` is already imported:
    ids also come from checkpoints and dataset metadata, and making one must not import code."""
    module, has_module, _ = env_id.partition(":")
    if has_module and module not in sys.modules:
        raise ValueError(f"environment {env_id!r} would import the module {module!r}; misa-fast imports no module "
                         "named by an id: import it yourself (so that it registers its environments) and pass the "
                         "id without the module prefix")
    _route_mujoco_warnings()
    domain = _domain_for_env(env_id)
    if env_id not in gym.registry and domain is not None and domain.needs:
        try:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
        except ImportError as err:
            raise ModuleNotFoundError(
                f"environment {env_id!r} ({domain.name} datasets) is provided by the optional package "
                f"{domain.needs!r}: pip install {domain.needs}"
            ) from err
    if domain is not None and _uses_domain_env(env_id, domain):
        kwargs = {**domain.env_kwargs, **kwargs}
    with warnings.catch_warnings():
        # v4 is chosen on purpose: its observations match D4RL's (gym v3) data; v5 changed defaults.
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(env_id, **kwargs)
    if isinstance(env.observation_space, gym.spaces.Dict):
        keys = DICT_OBSERVATION_KEYS.get(domain.name if domain else "", tuple(env.observation_space.spaces))
        env = gym.wrappers.FlattenObservation(gym.wrappers.FilterObservation(env, list(keys)))
    return env


def _warn_from_mujoco(message: str) -> None:
    # The simulation time at the end would make every message new to the warnings filter.
    warnings.warn(f"MuJoCo: {message.split(' Time =')[0].strip()}", RuntimeWarning, stacklevel=2)


def _route_mujoco_warnings() -> None:
    """MuJoCo's warnings (an unstable simulation, ...) become Python warnings instead of lines
    appended to ``MUJOCO_LOG.TXT`` in the working directory, which MuJoCo does when no handler is
    installed. A handler the user installed is left alone."""
    mujoco = sys.modules.get("mujoco")
    if mujoco is None:
        try:
            import mujoco
        except ImportError:  # no MuJoCo environments without it
            return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_warn_from_mujoco)


def _uses_domain_env(env_id: str, domain) -> bool:
    return env_id == domain.env_id or (domain.name == "antmaze" and env_id in registry.ANTMAZE_ENV_IDS.values())


def evaluate(
    policy: Policy,
    env_id: str,
    episodes: int = 10,
    seed: int = 0,
    obs_mean=None,
    obs_std=None,
    n_envs: int | None = None,
    dataset_name: str | None = None,
    vectorization: str = "sync",
    env_kwargs: dict | None = None,
    reference_returns="by-name",
) -> dict:
    """Run ``policy`` (float32 observations (n_envs, obs_dim) -> actions (n_envs, act_dim) in
    [-1, 1], deterministic) for exactly ``episodes`` episodes.

    Observations are normalised with ``(obs - obs_mean) / obs_std`` when given (the statistics the
    policy was trained with). ``n_envs`` environments step together (default min(episodes, 10));
    ``vectorization`` is "sync" (one process) or "async" (one process per environment); on a 2-core
    machine sync is faster (10 HalfCheetah episodes of 1000 steps with a 256x256 MLP policy:
    0.6-0.7 s sync, 1.5 s async), async pays off only with expensive environments and many cores.
    Returns raw ``returns`` and ``lengths`` per episode (in
    episode order), ``mean_return``, ``std_return`` and, where reference returns exist for
    ``dataset_name`` (default: the env id's domain), ``normalized`` and ``mean_normalized``.
    ``reference_returns``: "by-name" (the domain's, found from ``dataset_name`` or ``env_id``), a
    (ref_min, ref_max) pair (a Minari dataset's own), or None (no normalized score)."""
    return evaluate_many([policy], env_id, episodes, [seed], obs_mean, obs_std, n_envs, dataset_name, vectorization,
                         env_kwargs, reference_returns)[0]


def evaluate_many(
    policies: list,
    env_id: str,
    episodes: int = 10,
    seeds: list | None = None,
    obs_mean=None,
    obs_std=None,
    n_envs: int | None = None,
    dataset_name: str | None = None,
    vectorization: str = "sync",
    env_kwargs: dict | None = None,
    reference_returns="by-name",
) -> list:
    """:func:`evaluate` of several policies side by side (the seeds of ``misa-fast train --seeds``):
    one vector environment, ``n_envs`` environments per policy, steps them all together, and each
    policy's episodes use its own ``seeds[i] + episode`` resets, so each result equals
    ``evaluate(policies[i], ..., seed=seeds[i])``. Returns one result dict per policy."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    groups = len(policies)
    seeds = [0] * groups if seeds is None else [int(s) for s in seeds]
    if len(seeds) != groups:
        raise ValueError(f"evaluate_many: {groups} policies but {len(seeds)} seeds")
    n_envs = max(1, min(episodes, n_envs or 10))
    slots = groups * n_envs
    env_fns = [lambda: make_env(env_id, **(env_kwargs or {}))] * slots
    if vectorization not in ("sync", "async"):
        raise ValueError(f"vectorization must be 'sync' or 'async', got {vectorization!r}")
    vector_cls = SyncVectorEnv if vectorization == "sync" else AsyncVectorEnv
    # Resets are done here (seeded per episode), not by the vector env's autoreset.
    envs = vector_cls(env_fns, autoreset_mode=AutoresetMode.DISABLED)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    mean = None if obs_mean is None else np.asarray(obs_mean, dtype=np.float32)
    std = None if obs_std is None else np.asarray(obs_std, dtype=np.float32)

    # Slot j plays for policy j // n_envs; which of its episodes: episode_of_slot (-1 = idle).
    group_of_slot = np.repeat(np.arange(groups), n_envs)
    returns = np.zeros((groups, episodes))
    lengths = np.zeros((groups, episodes), dtype=np.int64)
    episode_of_slot = np.tile(np.arange(n_envs), groups)
    next_episode = np.full(groups, n_envs)
    ep_return = np.zeros(slots)
    ep_length = np.zeros(slots, dtype=np.int64)
    try:
        obs, _ = envs.reset(seed=[seeds[g] + int(i) for g, i in zip(group_of_slot, episode_of_slot)])
        while (episode_of_slot >= 0).any():
            inputs = obs.astype(np.float32) if mean is None else ((obs - mean) / std).astype(np.float32)
            actions = np.concatenate([
                np.asarray(policy(inputs[g * n_envs:(g + 1) * n_envs]), dtype=np.float32).reshape(n_envs, -1)
                for g, policy in enumerate(policies)])
            obs, reward, terminated, truncated, _ = envs.step(scale_actions(actions, low, high))
            ep_return += reward
            ep_length += 1
            done = terminated | truncated
            if not done.any():
                continue
            reset_seeds: list[int | None] = [None] * slots
            for i in np.flatnonzero(done):
                g = group_of_slot[i]
                if episode_of_slot[i] >= 0:
                    returns[g, episode_of_slot[i]] = ep_return[i]
                    lengths[g, episode_of_slot[i]] = ep_length[i]
                ep_return[i], ep_length[i] = 0.0, 0
                if next_episode[g] < episodes:
                    episode_of_slot[i], reset_seeds[i] = next_episode[g], int(seeds[g] + next_episode[g])
                    next_episode[g] += 1
                else:  # nothing left to play: keep it stepping (vector envs step all) but ignore it
                    episode_of_slot[i], reset_seeds[i] = -1, int(seeds[g] + episodes + i % n_envs)
            if (episode_of_slot >= 0).any():
                obs, _ = envs.reset(seed=reset_seeds, options={"reset_mask": done})
    finally:
        envs.close()
    return [_episode_result(env_id, episodes, seed, returns[g], lengths[g], dataset_name, reference_returns)
            for g, seed in enumerate(seeds)]


def _episode_result(env_id, episodes, seed, returns, lengths, dataset_name, reference_returns) -> dict:
    result = {
        "env_id": env_id,
        "episodes": episodes,
        "seed": seed,
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "normalized": None,
        "mean_normalized": None,
    }
    if reference_returns is None:
        return result
    if reference_returns != "by-name":
        scores = scale_to_reference(returns, *reference_returns)
        result["normalized"] = scores.tolist()
        result["mean_normalized"] = float(scores.mean())
        return result
    scores = None
    for name in (dataset_name, env_id):  # a custom dataset name may not tell the domain
        try:
            scores = normalized_score(name, returns) if name else None
        except KeyError:
            continue
        if scores is not None:
            break
    if scores is None:  # no reference returns for this environment
        return result
    result["normalized"] = scores.tolist()
    result["mean_normalized"] = float(scores.mean())
    return result
