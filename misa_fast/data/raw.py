"""A raw dataset: the one shape every reader returns, checked the same way whatever its file format.

A raw dataset is a flat dict, exactly as D4RL's ``env.get_dataset()`` returns it: one row per
environment step, keys ``observations (N, obs_dim)``, ``actions (N, act_dim)``, ``rewards (N,)``,
``terminals (N,)``, ``timeouts (N,)``, optionally ``next_observations (N, obs_dim)``, and nested
HDF5 groups flattened with "/" (``infos/qpos``, ``metadata/algorithm``...). A reader may return a
:class:`LazyArrays`, which reads each array from its file when first looked up.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from misa_fast.data.errors import DataError

# What each required key must hold, as said in error messages.
REQUIRED_KEYS = {
    "observations": "a float array of shape (N, obs_dim)",
    "actions": "a float array of shape (N, act_dim)",
    "rewards": "a float array of shape (N,)",
    "terminals": "a boolean (or 0/1) array of shape (N,): True where the episode ended in a terminal state",
    "timeouts": "a boolean (or 0/1) array of shape (N,): True where the episode was cut by a time "
    "limit (all False if episodes never time out)",
}
FINITE_KEYS = ("observations", "actions", "rewards", "next_observations")


class LazyArrays(MutableMapping):
    """A raw dataset whose arrays are read from their file when first looked up: a file may declare
    datasets nobody uses (of any size) without costing memory. ``shape(key)`` answers from the
    file's declarations, without reading."""

    def __init__(self, loaders: dict, shapes: dict, values: dict | None = None):
        self._loaders = dict(loaders)
        self._shapes = dict(shapes)
        self._values = dict(values or {})

    def __getitem__(self, key):
        if key not in self._values:
            if key not in self._loaders:
                raise KeyError(key)
            self._values[key] = self._loaders[key]()
        return self._values[key]

    def __setitem__(self, key, value) -> None:
        self._values[key] = value
        self._shapes.pop(key, None)

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self._values.pop(key, None)
        self._loaders.pop(key, None)
        self._shapes.pop(key, None)

    def __iter__(self):
        return iter(dict.fromkeys([*self._loaders, *self._values]))

    def __len__(self) -> int:
        return len(set(self._loaders) | set(self._values))

    def __contains__(self, key) -> bool:
        return key in self._values or key in self._loaders

    def shape(self, key) -> tuple:
        if key in self._values:
            return np.shape(self._values[key])
        return self._shapes[key]

    def copy(self) -> "LazyArrays":
        return LazyArrays(self._loaders, self._shapes, self._values)


def shape_of(raw, key) -> tuple:
    """The shape of ``raw[key]``, without reading it when ``raw`` reads lazily."""
    return raw.shape(key) if isinstance(raw, LazyArrays) else np.shape(raw[key])


def plain_value(value):
    """Numpy for arrays, str for (byte) strings, Python scalars for 0-d values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return plain_value(value[()])
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_dataset(raw: dict, source: str = "dataset", obs_dim: int | None = None,
                     act_dim: int | None = None) -> dict:
    """Check a raw dict and return it normalised (rewards/terminals/timeouts of shape (N,),
    terminals/timeouts bool). Raises DataError (a ValueError) naming the key, what was expected and what was
    found: missing keys, wrong ranks or widths, inconsistent lengths, non-finite values."""
    for key, expected in REQUIRED_KEYS.items():
        if key not in raw:
            raise DataError(f"{source}: missing key '{key}': expected {expected}")
    out = raw.copy() if isinstance(raw, LazyArrays) else dict(raw)  # other keys stay unread
    obs = np.asarray(raw["observations"])
    _check_float(obs, "observations", source, ndim=2)
    n = len(obs)
    _check_float(np.asarray(raw["actions"]), "actions", source, ndim=2)
    for key in ("rewards", "terminals", "timeouts"):
        out[key] = _column(raw[key], key, n, source)
    _check_float(out["rewards"], "rewards", source, ndim=1)
    for key in ("terminals", "timeouts"):
        values = out[key]
        if values.dtype != np.bool_:
            if not np.isin(values, (0, 1)).all():
                raise DataError(f"{source}: '{key}' must hold only 0/1 or True/False, got values "
                                 f"{np.unique(values)[:5]}")
            out[key] = values.astype(bool)
    if "next_observations" in raw:
        _check_float(np.asarray(raw["next_observations"]), "next_observations", source, ndim=2)
        if np.shape(raw["next_observations"]) != obs.shape:
            raise DataError(f"{source}: 'next_observations' has shape {np.shape(raw['next_observations'])}, "
                             f"expected {obs.shape} (the shape of 'observations')")
    for key in raw:  # every per-step array must have N rows (other keys are free-form)
        per_step = key in REQUIRED_KEYS or key == "next_observations" or key.startswith("infos/")
        shape = shape_of(raw, key)
        if per_step and key != "observations" and len(shape) >= 1 and shape[0] != n:
            raise DataError(f"{source}: '{key}' has {shape[0]} rows, expected {n} (the number of observations)")
    if obs_dim is not None and obs.shape[1] != obs_dim:
        raise DataError(f"{source}: 'observations' has width {obs.shape[1]}, expected {obs_dim}")
    if act_dim is not None and np.shape(raw["actions"])[1] != act_dim:
        raise DataError(f"{source}: 'actions' has width {np.shape(raw['actions'])[1]}, expected {act_dim}")
    for key in FINITE_KEYS:
        if key in out and not np.isfinite(out[key]).all():
            bad = np.flatnonzero(~np.isfinite(out[key]).reshape(len(out[key]), -1).all(axis=1))
            raise DataError(f"{source}: '{key}' holds non-finite values (NaN or inf) in {len(bad)} rows, "
                             f"first at row {bad[0]}; expected finite numbers")
    return out


def _check_float(values: np.ndarray, key: str, source: str, ndim: int) -> None:
    if values.ndim != ndim:
        shape = "(N, width)" if ndim == 2 else "(N,)"
        raise DataError(f"{source}: '{key}' must have shape {shape}, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise DataError(f"{source}: '{key}' must be a float array, got dtype {values.dtype}")
    if ndim == 2 and values.shape[1] == 0:
        raise DataError(f"{source}: '{key}' has width 0 (shape {values.shape}): every row needs at least one number")


def _column(values, key: str, n: int, source: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:  # some D4RL files store (N, 1) columns
        values = values[:, 0]
    if values.shape != (n,):
        raise DataError(f"{source}: '{key}' has shape {values.shape}, expected ({n},) "
                         f"(one entry per observation row)")
    return values


def qlearning_dataset(raw: dict, terminate_on_end: bool = False, use_next_observations: bool = False,
                      with_episodes: bool = False, with_next_actions: bool = False) -> dict:
    """Transitions (s, a, r, s', done) with D4RL's ``qlearning_dataset`` semantics: s' is the
    next row's observation, rows flagged as timeouts are skipped (their next row starts another
    episode) unless ``terminate_on_end``, the last row is dropped (it has no next row), and done =
    terminals (a timeout is not a terminal state).

    ``use_next_observations=True`` takes s' from the stored ``next_observations`` instead: then
    every row is a valid transition and none is dropped (timeout rows bootstrap, as they should).
    Returns float32 arrays: observations, actions, next_observations, rewards (N,), terminals (N,).
    ``with_episodes`` adds ``episodes`` (N,), each transition's episode number (an episode ends at
    a terminal or a timeout row); ``with_next_actions`` adds ``next_actions``, the action taken at
    s' (the next row's). A row that ends its episode has no next row of its own there: it gets its
    own action (only the stored-s' layout keeps such rows; their target is cut by the terminal or,
    for a timeout, bootstraps from an action nobody took, a documented approximation).
    """
    obs = raw["observations"]
    n = len(obs)
    timeouts = np.asarray(raw["timeouts"]).reshape(n).astype(bool)
    if use_next_observations:
        if "next_observations" not in raw:
            raise DataError("use_next_observations=True, but the dataset has no 'next_observations' key")
        rows = np.arange(n)
        next_obs = raw["next_observations"][rows]
    else:
        rows = np.arange(n - 1)
        if not terminate_on_end:
            rows = rows[~timeouts[:-1]]
        next_obs = obs[rows + 1]
    ends = np.asarray(raw["terminals"]).reshape(n).astype(bool) | timeouts
    extra = {}
    if with_episodes:
        extra["episodes"] = np.concatenate([[0], np.cumsum(ends[:-1])])[rows].astype(np.int64)
    if with_next_actions:
        following = np.minimum(rows + 1, n - 1)
        own = ends[rows] | (rows + 1 >= n)
        extra["next_actions"] = np.asarray(raw["actions"], dtype=np.float32)[np.where(own, rows, following)]
    return {
        **extra,
        "observations": np.asarray(obs[rows], dtype=np.float32),
        "actions": np.asarray(raw["actions"][rows], dtype=np.float32),
        "next_observations": np.asarray(next_obs, dtype=np.float32),
        "rewards": np.asarray(raw["rewards"], dtype=np.float32).reshape(n)[rows],
        "terminals": np.asarray(raw["terminals"]).reshape(n)[rows].astype(np.float32),
    }
