"""One call from a dataset name to training arrays: load, q-learning transitions, domain transforms.

The returned ``DataInfo`` is everything evaluation needs to know about the data: store
``info.to_dict()`` in checkpoints (plain JSON types) and rebuild it with ``DataInfo.from_dict``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from misa_fast.data import registry, transforms
from misa_fast.data.errors import DataError
from misa_fast.data.load import load_dataset
from misa_fast.data.raw import qlearning_dataset

# How far past [-1, 1] a stored action may be and still count as rounding (it is clipped like the
# rest); beyond it the data is in other units, and training on clipped values would be nonsense.
ACTION_ROUNDING = 1e-3


@dataclass
class DataInfo:
    name: str  # dataset name (registry name, or the file's stem / recorded name)
    env_id: str  # gymnasium id to evaluate in
    n_transitions: int
    obs_dim: int
    act_dim: int
    obs_norm: str = "none"  # "none" | "scalar" | "per-dim"
    obs_mean: list[float] | None = None  # width obs_dim; None when obs_norm == "none"
    obs_std: list[float] | None = None
    reward_transform: str = "none"  # "none" | "antmaze" | "minmax"
    reward_params: dict = field(default_factory=dict)  # e.g. {"min": .., "max": ..} for minmax
    top_fraction: float = 1.0  # the share of the best episodes kept (10%BC: 0.1)
    action_clip: float = transforms.ACTION_CLIP
    env_kwargs: dict = field(default_factory=dict)  # gym.make kwargs the dataset records (Minari env spec)
    # Where the normalized score's reference returns come from: "domain" (D4RL's, by name) or
    # "dataset" (the dataset's own ref_min/ref_max; None when it records none: no normalized score).
    scores_from: str = "domain"
    ref_min: float | None = None
    ref_max: float | None = None
    # Per action dimension, what the dataset's actions were divided by (prepare(rescale_actions=True));
    # None when they were already in [-1, 1].
    action_scale: list[float] | None = None

    def reference_returns(self):
        """What ``misa_fast.envs.rollout.evaluate`` takes as ``reference_returns``: "by-name" (the domain's
        reference returns), the dataset's own (ref_min, ref_max), or None (no normalized score)."""
        if self.scores_from != "dataset":
            return "by-name"
        return None if self.ref_min is None or self.ref_max is None else (self.ref_min, self.ref_max)

    def in_env(self, env_id: str) -> "DataInfo":
        """This info evaluated in ``env_id``: the recorded make() kwargs and the dataset's own reference
        returns hold for the recorded environment only, another one is scored by its domain."""
        if env_id == self.env_id:
            return self
        return dataclasses.replace(self, env_id=env_id, env_kwargs={}, scores_from="domain")

    def no_reference_scores_note(self) -> str | None:
        """The log line that stands in for a normalized score the dataset gives no reference for."""
        if self.reference_returns() is not None:
            return None
        return (f"{self.name}: no reference scores in this dataset (its metadata has no ref_min_score / "
                f"ref_max_score): returns are reported raw, without a normalized score")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DataInfo":
        return cls(**values)

    def normalize(self, observations: np.ndarray) -> np.ndarray:
        """Observations as the policy saw them in training (what evaluation must feed it)."""
        return transforms.normalize_observations(observations, self.obs_mean, self.obs_std)


def prepare(
    name_or_path: str | os.PathLike = registry.DEFAULT_DATASET,
    obs_norm: str = "none",
    reward_transform: str = "auto",
    action_clip: float = transforms.ACTION_CLIP,
    terminate_on_end: bool = False,
    use_next_observations: bool = False,
    env_id: str | None = None,
    download: bool = True,
    rescale_actions: bool = False,
    top_fraction: float = 1.0,
    next_actions: bool = False,
) -> tuple[dict, DataInfo]:
    """Training transitions (float32: observations, actions, next_observations, rewards,
    terminals) and their DataInfo.

    ``reward_transform="auto"`` picks the dataset domain's (antmaze, minmax for kitchen/adroit,
    none otherwise); ``obs_norm`` is off by default; actions are always clipped to
    ±``action_clip``. ``env_id`` overrides the evaluation environment (default: the one recorded
    in the file by make-dataset or in a Minari dataset's env spec, else the domain's).

    Data that contradicts itself is refused (DataError), never guessed at: a name (the file's own
    name field, else its file name) whose domain's action or observation width, or environment,
    does not fit the data, and actions outside [-1, 1] beyond rounding (:data:`ACTION_ROUNDING`).
    ``rescale_actions=True`` divides each action dimension by its largest magnitude instead (for
    data stored in the environment's own units), says so on stderr and records the divisors in
    ``DataInfo.action_scale``.

    ``top_fraction < 1`` keeps the transitions of that share of the episodes with the highest
    returns (10%BC); ``next_actions=True`` adds the action taken at s' (ReBRAC's critic penalty)."""
    raw = load_dataset(name_or_path, download=download)
    name = dataset_name(name_or_path, raw)
    domain = _domain_or_none(name)  # the preset, reward transform and reference scores the name picks
    check_name_fits(name_or_path, name, domain, raw)
    if raw.get("metadata/format") == "minari":
        # Minari rows carry their true s': the last step of a truncated episode stays a (bootstrapped)
        # transition, and no s' is ever taken from the next episode.
        use_next_observations = True
    data, episodes = _transitions(raw, name, terminate_on_end, use_next_observations, top_fraction, next_actions)
    data["actions"], action_scale = check_action_range(data["actions"], str(name_or_path), rescale_actions)
    data["actions"] = transforms.clip_actions(data["actions"], action_clip)
    if reward_transform == "auto":
        reward_transform = domain.reward_transform if domain else "none"
    data["rewards"], reward_params = transforms.transform_rewards(data["rewards"], reward_transform, episodes)
    mean, std = transforms.observation_stats(data["observations"], obs_norm)
    for key in ("observations", "next_observations"):
        data[key] = transforms.normalize_observations(data[key], mean, std)
    if next_actions:
        divisors = np.float32(1.0) if action_scale is None else np.asarray(action_scale, np.float32)
        data["next_actions"] = transforms.clip_actions(data["next_actions"] / divisors, action_clip)

    env_id, env_kwargs = _evaluation_env(raw, name, domain, env_id)
    info = DataInfo(
        name=name,
        env_id=env_id,
        n_transitions=len(data["rewards"]),
        obs_dim=data["observations"].shape[1],
        act_dim=data["actions"].shape[1],
        obs_norm=obs_norm,
        obs_mean=None if mean is None else mean.tolist(),
        obs_std=None if std is None else std.tolist(),
        reward_transform=reward_transform,
        reward_params=reward_params,
        action_clip=float(action_clip),
        env_kwargs=env_kwargs,
        scores_from="dataset" if raw.get("metadata/scores_from_dataset") else "domain",
        ref_min=_float_or_none(raw.get("metadata/ref_min_score")),
        ref_max=_float_or_none(raw.get("metadata/ref_max_score")),
        action_scale=action_scale,
        top_fraction=float(top_fraction),
    )
    return data, info


def _evaluation_env(raw: dict, name: str, domain, env_id: str | None) -> tuple[str, dict]:
    """The environment to evaluate in and its make() kwargs: ``env_id`` if given, else the one the
    file records, else the domain's."""
    recorded_env = raw.get("metadata/env_id") or raw.get("metadata/env")
    recorded_env = str(recorded_env) if recorded_env else None
    # The recorded make() kwargs belong to the recorded environment, not to an override.
    env_kwargs = dict(raw.get("metadata/env_kwargs") or {}) if env_id in (None, recorded_env) else {}
    env_id = env_id or recorded_env
    if env_id is None:
        if domain is None:
            raise DataError(f"{name}: cannot tell which environment this dataset comes from (no "
                             f"'metadata/env_id' in the file and no env spec, unknown name); pass env_id=... "
                             f"(misa-fast train --env ID)")
        env_id = registry.env_id_for(name)
    return env_id, env_kwargs


def _transitions(raw: dict, name: str, terminate_on_end: bool, use_next_observations: bool, top_fraction: float,
                 next_actions: bool) -> tuple[dict, np.ndarray]:
    """The q-learning transitions (of the best ``top_fraction`` of episodes) and each one's episode."""
    data = qlearning_dataset(raw, terminate_on_end=terminate_on_end, use_next_observations=use_next_observations,
                             with_episodes=True, with_next_actions=next_actions)
    if len(data["rewards"]) == 0:
        raise DataError(f"{name}: no transitions left after qlearning_dataset (every row is a timeout?)")
    if not 0.0 < top_fraction <= 1.0:
        raise DataError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    episodes = data.pop("episodes")
    if top_fraction < 1.0:
        data = transforms.keep_best_episodes({**data, "episodes": episodes}, episodes, top_fraction)
        episodes = data.pop("episodes")
    return data, episodes


def check_action_range(actions: np.ndarray, source: str, rescale: bool) -> tuple[np.ndarray, list | None]:
    """``actions`` when every one lies in [-1, 1] up to :data:`ACTION_ROUNDING`. Otherwise a
    DataError that counts them, or with ``rescale`` each dimension divided by its largest
    magnitude (a loud note on stderr) and the divisors."""
    magnitude = np.abs(actions)
    outside = (magnitude > 1.0 + ACTION_ROUNDING).any(axis=1)
    if not outside.any():
        return actions, None
    count, total, largest = int(outside.sum()), len(actions), float(magnitude.max())
    if not rescale:
        raise DataError(f"{source}: 'actions': {count} of {total} actions are outside [-1, 1] (largest |a| = "
                        f"{largest:.4g}); policies act in [-1, 1] (the environment's bounds), so these would be "
                        "clipped. Store the actions in [-1, 1], or rescale them explicitly (rescale_actions, "
                        "misa-fast train --rescale-actions)")
    scale = np.maximum(magnitude.max(axis=0), 1.0)
    print(f"misa-fast: note: {source}: 'actions': {count} of {total} actions were outside [-1, 1]; rescaled as "
          f"asked: each action dimension divided by {[round(float(x), 6) for x in scale]}", file=sys.stderr)
    return (actions / scale).astype(actions.dtype), [float(x) for x in scale]


def check_name_fits(name_or_path, name: str, domain, raw: dict) -> None:
    """Refuses a dataset whose own name field (``metadata/dataset_name``, a Minari dataset's id)
    picks a domain the data does not fit: that name chooses the reward transform, the score's
    reference returns and, unless the file records one, the evaluation environment. (A registered
    name is checked against its widths when loaded; a file's name is the user's own choice.)"""
    recorded_name = raw.get("metadata/dataset_name")
    if domain is None or not recorded_name or str(recorded_name) != name:
        return
    source = f"{name_or_path}: its name field {name!r} picks the {domain.name} preset"
    recorded_env = raw.get("metadata/env_id") or raw.get("metadata/env")
    if recorded_env:
        env_domain = _domain_or_none(str(recorded_env))
        if env_domain is not None and env_domain.name != domain.name:
            raise DataError(f"{source}, but the data records the environment {recorded_env} ({env_domain.name}); "
                            "correct the name or the environment")
    act_dim = np.shape(raw["actions"])[1]
    if act_dim != domain.act_dim:
        raise DataError(f"{source}, but its actions have width {act_dim} where {domain.name}'s have "
                        f"{domain.act_dim}; correct the name")
    # Minari datasets may come from newer environment versions whose observations differ from
    # D4RL's widths (Ant-v5, FrankaKitchen's Dict): their recorded spaces were checked instead.
    obs_dim = np.shape(raw["observations"])[1]
    if raw.get("metadata/format") != "minari" and obs_dim != domain.obs_dim:
        raise DataError(f"{source}, but its observations have width {obs_dim} where {domain.name}'s have "
                        f"{domain.obs_dim}; correct the name")


TRANSITION_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


def fingerprint(data: dict) -> str:
    """A SHA-256 of the training transitions (every field's dtype, shape and bytes), so a run can
    tell the same data at a new location from different data."""
    import hashlib

    digest = hashlib.sha256()
    for key in TRANSITION_FIELDS:
        values = np.ascontiguousarray(data[key])
        digest.update(f"{key}:{values.dtype.str}:{values.shape}".encode())
        digest.update(memoryview(values).cast("B"))
    return digest.hexdigest()


def _float_or_none(value):
    return None if value is None else float(value)


def dataset_name(name_or_path, raw: dict) -> str:
    """A registered name as given; for files, the name make-dataset recorded, else the stem."""
    text = str(name_or_path)
    if text in registry.D4RL_URLS or text == registry.DEFAULT_DATASET:
        return text
    recorded = raw.get("metadata/dataset_name")
    return str(recorded) if recorded else Path(text).name.rsplit(".", 1)[0]


def _domain_or_none(name: str):
    try:
        return registry.domain_of(name)
    except KeyError:
        return None
