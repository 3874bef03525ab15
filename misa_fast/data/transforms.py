"""Per-domain transforms applied to q-learning transitions before training (docs: the design page, data conventions):
action clipping, reward transforms, observation normalisation.

Everything a transform learned from the data (normalisation statistics, reward min/max) is
returned so it can travel with the trained policy: evaluation must normalise observations the
same way (rewards are only a training signal: evaluation reports the environment's own returns).
"""
from __future__ import annotations

import numpy as np

ACTION_CLIP = 0.999  # keeps atanh(action) finite for the tanh-Gaussian log-likelihood
OBS_NORMS = ("none", "scalar", "per-dim")
OBS_STD_EPS = 1e-3  # as in CORL: constant dimensions stay finite after normalisation


def clip_actions(actions: np.ndarray, limit: float = ACTION_CLIP) -> np.ndarray:
    return np.clip(actions, -limit, limit)


def antmaze_rewards(rewards: np.ndarray) -> np.ndarray:
    # antmaze rewards are 0/1 (at the goal); centring them gives -2 everywhere but the goal,
    # which the official code found to stabilise the critic.
    return (rewards - 0.5) * 4.0


def minmax_rewards(rewards: np.ndarray, low: float, high: float) -> np.ndarray:
    # kitchen/adroit: rescale the dataset's reward range to [0, 1], then to [-1, 1].
    unit = (rewards - low) / (high - low) if high > low else np.zeros_like(rewards)
    return (unit - 0.5) * 2.0


# IQL's (Kostrikov et al. 2022) locomotion rewards: scaled so that the spread of the dataset's
# episode returns is 1000 (an episode's length): the scale of Q no longer depends on the task.
IQL_EPISODE_LENGTH = 1000.0


def episode_returns(rewards: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """The undiscounted return of every episode number in ``episodes`` (one per transition)."""
    _, index = np.unique(episodes, return_inverse=True)
    return np.bincount(index, weights=rewards.astype(np.float64))


REWARD_TRANSFORMS = ("none", "antmaze", "minmax", "iql-locomotion", "iql-antmaze", "rebrac-antmaze")


def transform_rewards(rewards: np.ndarray, name: str, episodes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Apply reward transform ``name``; returns the new rewards and the parameters used (what
    :func:`transform_reward` needs to transform an online reward the same way). ``episodes``
    (each transition's episode number) is needed by "iql-locomotion"."""
    if name == "minmax":
        params = {"min": float(rewards.min()), "max": float(rewards.max())}
    elif name == "iql-locomotion":
        if episodes is None:
            raise ValueError("the iql-locomotion reward transform needs each transition's episode")
        returns = episode_returns(rewards, episodes)
        spread = float(returns.max() - returns.min())
        params = {"scale": IQL_EPISODE_LENGTH / spread if spread > 0 else 1.0}
    elif name in REWARD_TRANSFORMS:
        params = {}
    else:
        raise ValueError(f"unknown reward transform {name!r}: expected one of {REWARD_TRANSFORMS}")
    return transform_reward(rewards, name, params), params


def transform_reward(rewards, name: str, params: dict):
    """Reward transform ``name`` with the parameters :func:`transform_rewards` found in the data."""
    if name == "antmaze":
        return antmaze_rewards(rewards)
    if name == "minmax":
        return minmax_rewards(rewards, params["min"], params["max"])
    if name == "iql-locomotion":
        return (rewards * np.float32(params["scale"])).astype(np.float32)
    if name == "iql-antmaze":  # IQL: 0 at the goal, -1 elsewhere
        return rewards - np.float32(1.0)
    if name == "rebrac-antmaze":  # ReBRAC: the 0/1 goal reward times 100
        return rewards * np.float32(100.0)
    return rewards


# 10%BC ranks episodes by their return discounted at 0.99 (CORL's any_percent_bc).
TOP_FRACTION_DISCOUNT = 0.99


def keep_best_episodes(data: dict, episodes: np.ndarray, fraction: float,
                       discount: float = TOP_FRACTION_DISCOUNT) -> dict:
    """The transitions of the best ``fraction`` of episodes by discounted return (at least one
    episode): the data of "10%BC" (``fraction=0.1``). ``episodes``: each transition's episode number,
    the transitions of an episode contiguous and in order."""
    numbers, first, index = np.unique(episodes, return_index=True, return_inverse=True)
    step_in_episode = np.arange(len(episodes)) - first[index]
    returns = episode_returns(data["rewards"] * np.power(discount, step_in_episode), episodes)
    keep = max(1, int(fraction * len(numbers)))
    best = numbers[np.argsort(-returns, kind="stable")[:keep]]
    rows = np.isin(episodes, best)
    return {key: value[rows] for key, value in data.items()}


def observation_stats(observations: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Mean and std to normalise observations with, as arrays of width obs_dim (or None, None).

    "scalar": one mean and one std over every entry (the official MISA code's choice);
    "per-dim": a mean and std per observation dimension."""
    if mode == "none":
        return None, None
    width = observations.shape[1]
    if mode == "scalar":
        mean = np.full(width, observations.mean(), dtype=np.float32)
        std = np.full(width, observations.std() + OBS_STD_EPS, dtype=np.float32)
    elif mode == "per-dim":
        mean = observations.mean(axis=0).astype(np.float32)
        std = (observations.std(axis=0) + OBS_STD_EPS).astype(np.float32)
    else:
        raise ValueError(f"unknown observation normalisation {mode!r}: expected one of {OBS_NORMS}")
    return mean, std


def normalize_observations(observations: np.ndarray, mean, std) -> np.ndarray:
    if mean is None:
        return np.asarray(observations, dtype=np.float32)
    return ((observations - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).astype(np.float32)


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[-1, 1] policy actions -> the environment's [low, high] (clipped)."""
    actions = np.clip(actions, -1.0, 1.0)
    return (low + (actions + 1.0) * 0.5 * (high - low)).astype(np.float32)


def unscale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Environment actions -> the [-1, 1] units datasets and policies use."""
    return (2.0 * (np.asarray(actions) - low) / (high - low) - 1.0).astype(np.float32)
