"""The D4RL dataset format: reading (D4RL HDF5, Minari directories, .npz), validation, writing, and
D4RL's ``qlearning_dataset``.

A raw dataset is a flat dict, exactly as D4RL's ``env.get_dataset()`` returns it: one row per
environment step, keys ``observations (N, obs_dim)``, ``actions (N, act_dim)``, ``rewards (N,)``,
``terminals (N,)``, ``timeouts (N,)``, optionally ``next_observations (N, obs_dim)``, and nested
HDF5 groups flattened with "/" (``infos/qpos``, ``metadata/algorithm``...).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import numpy as np

from misa_fast.data import minari as minari_ids
from misa_fast.data import registry, transforms
from misa_fast.data.download import resolve_dataset
from misa_fast.errors import UserError


class DataError(UserError):
    """A dataset that cannot be used as given: the message names the file and the key or field."""


class UnsafeDataError(DataError):
    """A dataset whose reading would run code or read other files: refused unread."""

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


def load_dataset(name_or_path: str | os.PathLike, download: bool = True) -> dict:
    """Read a dataset into a raw D4RL dict (validated; see the module docstring).

    ``name_or_path``: a D4RL name (``hopper-medium-v2``, downloaded to the cache when missing),
    ``misa_fast.data.DEFAULT_DATASET``, a D4RL-layout ``.hdf5``, an ``.npz`` with the same keys, or
    a Minari dataset directory. Arrays keep their stored dtype (D4RL's replay files hold float64);
    terminals/timeouts become bool; metadata strings become ``str``."""
    path = resolve_dataset(name_or_path, download=download)
    if path.is_dir():
        raw = read_minari_dataset(path)
    elif path.suffix == ".npz":
        raw = read_npz(path)
    else:
        raw = read_hdf5(path)
    obs_dim = act_dim = None
    name = str(name_or_path)
    if name in registry.D4RL_URLS or name == registry.DEFAULT_DATASET:
        domain = registry.domain_of(name)  # a registered name promises D4RL's widths
        obs_dim, act_dim = domain.obs_dim, domain.act_dim
    return validate_dataset(raw, source=str(path), obs_dim=obs_dim, act_dim=act_dim)


def read_hdf5(path: str | os.PathLike) -> dict:
    """Every dataset of a D4RL HDF5 file, keyed by its path ("infos/qpos"); root attributes (some
    writers keep the env id there) become ``metadata/<attr>`` entries."""
    raw: dict = {}

    def visit(key, obj):
        if isinstance(obj, h5py.Dataset):
            raw[key] = _plain(obj[()])

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
            for key, value in f.attrs.items():
                raw.setdefault(f"metadata/{key}", _plain(value))
    except (OSError, RuntimeError, KeyError) as err:  # h5py's wording for truncated/corrupt files
        raise ValueError(
            f"{path}: cannot read this HDF5 file ({err}). It is probably truncated or corrupted "
            f"(an interrupted download or write); delete it and download or generate it again."
        ) from err
    return raw


def read_npz(path: str | os.PathLike) -> dict:
    """An ``.npz`` holding the D4RL keys (``np.savez(path, **raw)``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {}
            for key in f.files:
                try:
                    raw[key] = _plain(f[key])
                except ValueError as err:
                    if "allow_pickle" not in str(err):
                        raise
                    # numpy's own words advise the unsafe switch: they are not passed on.
                    raise UnsafeDataError(f"{path}: refused: '{key}' holds pickled Python objects, which a dataset "
                                          "never needs (numbers only); nothing in it was run") from None
            return raw
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, UserError):
            raise
        raise DataError(f"{path}: cannot read this .npz file ({err}); it is probably truncated or corrupted") from err


def read_minari_dataset(path: str | os.PathLike) -> dict:
    """``read_minari`` plus what a Minari directory's ``data/metadata.json`` says, when it has one:
    its spaces are checked (flat Box observations and actions; Dict observations only where the
    domain's evaluation keys are known), actions are converted to the [-1, 1] units policies act
    in, and ``metadata/`` entries record the dataset id, the evaluation environment
    (``env_id``, ``env_kwargs``) and the reference returns (``ref_min_score``, ``ref_max_score``,
    absent when the dataset has none; ``scores_from_dataset`` says not to use the domain's)."""
    metadata = minari_ids.read_metadata(path)
    if metadata is None:  # an h5py-only directory: episodes and nothing else
        return read_minari(path)

    dataset_id = str(metadata.get("dataset_id") or Path(path).name)
    minari_ids.check_storage_format(metadata, dataset_id)
    action_space = minari_ids.check_action_space(metadata, dataset_id)
    keys = minari_ids.observation_keys(metadata, dataset_id, registry.DICT_OBSERVATION_KEYS)
    raw = read_minari(path, observation_keys=keys)
    bounds = minari_ids.action_bounds(action_space)
    if bounds is not None:  # stored in the environment's units; policies act in [-1, 1]
        raw["actions"] = transforms.unscale_actions(raw["actions"], *bounds)
    raw["metadata/dataset_name"] = dataset_id
    raw["metadata/scores_from_dataset"] = True
    env_id, env_kwargs = minari_ids.evaluation_env(metadata)
    if env_id:
        raw["metadata/env_id"] = env_id
        raw["metadata/env_kwargs"] = env_kwargs
    scores = minari_ids.reference_scores(metadata)
    if scores is not None:
        raw["metadata/ref_min_score"], raw["metadata/ref_max_score"] = scores
    return raw


def read_minari(path: str | os.PathLike, observation_keys: tuple | None = None) -> dict:
    """A local Minari dataset directory (``data/main_data.hdf5`` with ``episode_<id>`` groups),
    flattened to D4RL rows. Minari stores T+1 observations per episode of T steps: rows get
    obs[:-1] as observations and obs[1:] as next_observations; terminations/truncations become
    terminals/timeouts. Dict observations are concatenated in sorted key order (only
    ``observation_keys``, in that order, when given). Per-step infos are kept when aligned with
    the rows (Minari's infos include the reset info: T+1 entries).
    Reading needs only h5py, not the minari package."""
    main = Path(path) / "data" / "main_data.hdf5"
    if not main.is_file():
        raise FileNotFoundError(f"{path}: not a Minari dataset directory (expected {main})")
    columns: dict[str, list] = {}
    try:
        with h5py.File(main, "r") as f:
            episodes = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
            if not episodes:
                raise ValueError(f"{main}: no 'episode_<id>' groups found")
            for key in episodes:
                for column, values in _minari_episode(f[key], f"{main}:{key}", observation_keys).items():
                    columns.setdefault(column, []).append(values)
            metadata = {f"metadata/{k}": _plain(v) for k, v in f.attrs.items()}
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{main}: cannot read this HDF5 file ({err}); it is probably truncated or corrupted") from err
    raw = {column: np.concatenate(parts) for column, parts in columns.items() if len(parts) == len(episodes)}
    # Every row holds its own true s', so the q-learning view takes s' from next_observations.
    return {**raw, **metadata, "metadata/format": "minari"}


def _minari_episode(group: h5py.Group, where: str, observation_keys: tuple | None = None) -> dict:
    for key in ("observations", "actions", "rewards", "terminations", "truncations"):
        if key not in group:
            raise ValueError(f"{where}: missing key '{key}' (Minari episodes hold observations, actions, "
                             f"rewards, terminations and truncations)")
    obs = _flat_observations(group["observations"], observation_keys)
    actions = group["actions"][()]
    steps = len(actions)
    if len(obs) != steps + 1:
        raise ValueError(f"{where}: 'observations' has {len(obs)} rows, expected {steps + 1} "
                         f"(one more than the {steps} actions)")
    episode = {
        "observations": obs[:-1], "next_observations": obs[1:], "actions": actions,
        "rewards": group["rewards"][()], "terminals": group["terminations"][()],
        "timeouts": group["truncations"][()],
    }
    if "infos" in group:
        for key, item in group["infos"].items():
            if isinstance(item, h5py.Dataset) and len(item) in (steps, steps + 1):
                episode[f"infos/{key}"] = item[()][:steps]
    return episode


def _flat_observations(item, keys: tuple | None = None) -> np.ndarray:
    if isinstance(item, h5py.Dataset):
        obs = item[()]
        return obs.reshape(len(obs), -1)
    return np.concatenate([_flat_observations(item[k]) for k in (keys or sorted(item))], axis=1)


def _plain(value):
    """Numpy for arrays, str for (byte) strings, Python scalars for 0-d values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _plain(value[()])
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_dataset(raw: dict, source: str = "dataset", obs_dim: int | None = None,
                     act_dim: int | None = None) -> dict:
    """Check a raw dict and return it normalised (rewards/terminals/timeouts of shape (N,),
    terminals/timeouts bool). Raises ValueError naming the key, what was expected and what was
    found: missing keys, wrong ranks or widths, inconsistent lengths, non-finite values."""
    for key, expected in REQUIRED_KEYS.items():
        if key not in raw:
            raise ValueError(f"{source}: missing key '{key}': expected {expected}")
    out = dict(raw)
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
                raise ValueError(f"{source}: '{key}' must hold only 0/1 or True/False, got values "
                                 f"{np.unique(values)[:5]}")
            out[key] = values.astype(bool)
    if "next_observations" in raw:
        _check_float(np.asarray(raw["next_observations"]), "next_observations", source, ndim=2)
        if np.shape(raw["next_observations"]) != obs.shape:
            raise ValueError(f"{source}: 'next_observations' has shape {np.shape(raw['next_observations'])}, "
                             f"expected {obs.shape} (the shape of 'observations')")
    for key, value in raw.items():  # every per-step array must have N rows (other keys are free-form)
        per_step = key in REQUIRED_KEYS or key == "next_observations" or key.startswith("infos/")
        if per_step and key != "observations" and np.ndim(value) >= 1 and len(value) != n:
            raise ValueError(f"{source}: '{key}' has {len(value)} rows, expected {n} (the number of observations)")
    if obs_dim is not None and obs.shape[1] != obs_dim:
        raise ValueError(f"{source}: 'observations' has width {obs.shape[1]}, expected {obs_dim}")
    if act_dim is not None and np.shape(raw["actions"])[1] != act_dim:
        raise ValueError(f"{source}: 'actions' has width {np.shape(raw['actions'])[1]}, expected {act_dim}")
    for key in FINITE_KEYS:
        if key in out and not np.isfinite(out[key]).all():
            bad = np.flatnonzero(~np.isfinite(out[key]).reshape(len(out[key]), -1).all(axis=1))
            raise ValueError(f"{source}: '{key}' holds non-finite values (NaN or inf) in {len(bad)} rows, "
                             f"first at row {bad[0]}; expected finite numbers")
    return out


def _check_float(values: np.ndarray, key: str, source: str, ndim: int) -> None:
    if values.ndim != ndim:
        shape = "(N, width)" if ndim == 2 else "(N,)"
        raise ValueError(f"{source}: '{key}' must have shape {shape}, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{source}: '{key}' must be a float array, got dtype {values.dtype}")


def _column(values, key: str, n: int, source: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:  # some D4RL files store (N, 1) columns
        values = values[:, 0]
    if values.shape != (n,):
        raise ValueError(f"{source}: '{key}' has shape {values.shape}, expected ({n},) "
                         f"(one entry per observation row)")
    return values


def write_hdf5(path: str | os.PathLike, data: dict, metadata: dict | None = None,
               compression: str | None = "gzip") -> Path:
    """Write a raw dict in D4RL's HDF5 layout ("infos/qpos" becomes group infos, dataset qpos;
    ``metadata`` entries become ``metadata/<key>`` datasets). Written to a temporary file first
    and renamed, so a crash never leaves a half-written dataset under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in data.items():
            value = np.asarray(value)
            if value.ndim == 0:
                f.create_dataset(key, data=value)
            else:  # shuffle + gzip shrinks float columns; the checksum turns corruption into an error
                f.create_dataset(key, data=value, compression=compression,
                                 shuffle=compression is not None, fletcher32=True, chunks=True)
        for key, value in (metadata or {}).items():
            f.create_dataset(f"metadata/{key}", data=value)
    os.replace(tmp, path)
    return path


def qlearning_dataset(raw: dict, terminate_on_end: bool = False, use_next_observations: bool = False) -> dict:
    """Transitions (s, a, r, s', done) with D4RL's ``qlearning_dataset`` semantics: s' is the
    next row's observation, rows flagged as timeouts are skipped (their next row starts another
    episode) unless ``terminate_on_end``, the last row is dropped (it has no next row), and done =
    terminals (a timeout is not a terminal state).

    ``use_next_observations=True`` takes s' from the stored ``next_observations`` instead: then
    every row is a valid transition and none is dropped (timeout rows bootstrap, as they should).
    Returns float32 arrays: observations, actions, next_observations, rewards (N,), terminals (N,).
    """
    obs = raw["observations"]
    n = len(obs)
    timeouts = np.asarray(raw["timeouts"]).reshape(n).astype(bool)
    if use_next_observations:
        if "next_observations" not in raw:
            raise ValueError("use_next_observations=True, but the dataset has no 'next_observations' key")
        rows = np.arange(n)
        next_obs = raw["next_observations"][rows]
    else:
        rows = np.arange(n - 1)
        if not terminate_on_end:
            rows = rows[~timeouts[:-1]]
        next_obs = obs[rows + 1]
    return {
        "observations": np.asarray(obs[rows], dtype=np.float32),
        "actions": np.asarray(raw["actions"][rows], dtype=np.float32),
        "next_observations": np.asarray(next_obs, dtype=np.float32),
        "rewards": np.asarray(raw["rewards"], dtype=np.float32).reshape(n)[rows],
        "terminals": np.asarray(raw["terminals"]).reshape(n)[rows].astype(np.float32),
    }
