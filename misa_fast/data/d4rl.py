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
from collections.abc import MutableMapping
from pathlib import Path

import h5py
import numpy as np

from misa_fast.data import minari as minari_ids
from misa_fast.data import registry, transforms
from misa_fast.data.download import resolve_dataset
from misa_fast.data.errors import DataError, UnsafeDataError
from misa_fast.errors import UserError

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


def _hdf5_datasets(path, group: h5py.Group, prefix: str = "") -> dict:
    """Every dataset under ``group`` as {"infos/qpos": dataset path}, refusing what would make
    reading it read other files: external links, soft links (a link may point anywhere, also
    into another file or around a loop), datasets stored in external files and virtual datasets."""
    found = {}
    for name in group:
        key = f"{prefix}{name}"
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise UnsafeDataError(f"{path}: refused: '{key}' is a link into another file ({link.filename}); a dataset "
                                  "holds its own data")
        if isinstance(link, h5py.SoftLink):
            raise UnsafeDataError(f"{path}: refused: '{key}' is a link to '{link.path}'; a dataset holds its arrays "
                                  "under their own names")
        item = group[name]
        if isinstance(item, h5py.Group):
            found.update(_hdf5_datasets(path, item, f"{key}/"))
        elif isinstance(item, h5py.Dataset):
            if item.external:
                raise UnsafeDataError(f"{path}: refused: '{key}' is stored in another file ({item.external[0][0]}); "
                                      "a dataset holds its own data")
            if item.is_virtual:
                raise UnsafeDataError(f"{path}: refused: '{key}' is a virtual dataset mapping other files; a "
                                      "dataset holds its own data")
            found[key] = item.shape
    return found


def _hdf5_error(path, err: Exception) -> DataError:
    return DataError(f"{path}: cannot read this HDF5 file ({err}). It is probably truncated or corrupted "
                     f"(an interrupted download or write); delete it and download or generate it again.")


def read_hdf5(path: str | os.PathLike) -> LazyArrays:
    """The datasets of a D4RL HDF5 file, keyed by their path ("infos/qpos") and read when first
    looked up; root attributes (some writers keep the env id there) become ``metadata/<attr>``
    entries. Links and datasets whose data lives in other files are refused (UnsafeDataError)."""

    def loader(key):
        def load():
            try:
                with h5py.File(path, "r") as f:
                    _hdf5_datasets(path, f)  # the file may have been replaced since it was checked
                    return _plain(f[key][()])
            except (OSError, RuntimeError, KeyError) as err:
                raise _hdf5_error(path, err) from err
        return load

    try:
        with h5py.File(path, "r") as f:
            shapes = _hdf5_datasets(path, f)
            attributes = {f"metadata/{key}": _plain(value) for key, value in f.attrs.items()
                          if f"metadata/{key}" not in shapes}
    except (OSError, RuntimeError, KeyError) as err:  # h5py's wording for truncated/corrupt files
        raise _hdf5_error(path, err) from err
    return LazyArrays({key: loader(key) for key in shapes}, shapes, attributes)


def read_npz(path: str | os.PathLike) -> LazyArrays:
    """An ``.npz`` holding the D4RL keys (``np.savez(path, **raw)``), each array read when first
    looked up (a compressed file may declare arrays far bigger than itself). Arrays of pickled
    Python objects are refused (UnsafeDataError) before anything is read."""

    def corrupted(err: Exception) -> DataError:
        return DataError(f"{path}: cannot read this .npz file ({err}); it is probably truncated or corrupted")

    def loader(key):
        def load():
            try:
                with np.load(path, allow_pickle=False) as f:
                    return _plain(f[key])
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise corrupted(err) from err
        return load

    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                key = member[:-4] if member.endswith(".npy") else member
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                if dtype.hasobject:
                    raise UnsafeDataError(f"{path}: refused: '{key}' holds pickled Python objects, which a dataset "
                                          "never needs (numbers only); nothing in it was read")
                shapes[key] = shape
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, UserError):
            raise
        raise corrupted(err) from err
    return LazyArrays({key: loader(key) for key in shapes}, shapes)


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

    where = Path(path) / "data" / "metadata.json"
    try:  # every field is checked before any episode is read
        dataset_id = str(metadata.get("dataset_id") or Path(path).name)
        minari_ids.check_storage_format(metadata, dataset_id)
        action_space = minari_ids.check_action_space(metadata, dataset_id)
        keys = minari_ids.observation_keys(metadata, dataset_id, registry.DICT_OBSERVATION_KEYS)
        bounds = minari_ids.action_bounds(action_space, dataset_id)
        env_id, env_kwargs = minari_ids.evaluation_env(metadata)
        scores = minari_ids.reference_scores(metadata)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    raw = read_minari(path, observation_keys=keys)
    spaces = {"actions": action_space, "observations": None if keys else minari_ids.space_of(metadata,
                                                                                            "observation_space")}
    for key, space in spaces.items():  # a space the episodes contradict describes other data
        declared = (space or {}).get("shape")
        if declared and np.ndim(raw[key]) == 2 and int(np.prod(declared)) != np.shape(raw[key])[1]:
            raise DataError(f"{where}: the {key[:-1].replace('_', ' ')} space has shape {tuple(declared)}, but the "
                            f"episodes' {key} have width {np.shape(raw[key])[1]}")
    width = np.shape(raw["actions"])[-1]
    if bounds is not None:  # stored in the environment's units; policies act in [-1, 1]
        if bounds[0].size not in (1, width):
            raise DataError(f"{where}: the action space's bounds have {bounds[0].size} entries for actions of "
                            f"width {width}")
        raw["actions"] = transforms.unscale_actions(raw["actions"], *bounds)
    raw["metadata/dataset_name"] = dataset_id
    raw["metadata/scores_from_dataset"] = True
    if env_id:
        raw["metadata/env_id"] = env_id
        raw["metadata/env_kwargs"] = env_kwargs
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
            _hdf5_datasets(main, f)  # refuses links and data stored in other files before reading any
            episodes = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
            if not episodes:
                raise DataError(f"{main}: no 'episode_<id>' groups found")
            for key in episodes:
                for column, values in _minari_episode(f[key], f"{main}:{key}", observation_keys).items():
                    columns.setdefault(column, []).append(values)
            metadata = {f"metadata/{k}": _plain(v) for k, v in f.attrs.items()}
    except (OSError, RuntimeError) as err:
        raise DataError(f"{main}: cannot read this HDF5 file ({err}); it is probably truncated or corrupted") from err
    raw = {column: np.concatenate(parts) for column, parts in columns.items() if len(parts) == len(episodes)}
    # Every row holds its own true s', so the q-learning view takes s' from next_observations.
    return {**raw, **metadata, "metadata/format": "minari"}


def _minari_episode(group: h5py.Group, where: str, observation_keys: tuple | None = None) -> dict:
    for key in ("observations", "actions", "rewards", "terminations", "truncations"):
        if key not in group:
            raise DataError(f"{where}: missing key '{key}' (Minari episodes hold observations, actions, "
                             f"rewards, terminations and truncations)")
    obs = _flat_observations(group["observations"], observation_keys)
    actions = group["actions"][()]
    steps = len(actions)
    if len(obs) != steps + 1:
        raise DataError(f"{where}: 'observations' has {len(obs)} rows, expected {steps + 1} "
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
            raise DataError("use_next_observations=True, but the dataset has no 'next_observations' key")
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
