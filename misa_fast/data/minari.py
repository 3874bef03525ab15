"""Minari datasets, whole: ids (``mujoco/hopper/medium-v0``, ``D4RL/antmaze/umaze-v1``) resolved to
directories, their metadata, spaces and reference scores, and their episodes read as a raw dataset.

An id names a directory of Minari's local cache (``$MINARI_DATASETS_PATH``, default
``~/.minari/datasets``); a missing one is downloaded with the ``minari`` package's own API when the
machine is online. A Minari directory holds ``data/main_data.hdf5`` (the episodes, read here with
h5py under the checks of :mod:`misa_fast.data.hdf5`: the minari package is not needed to read) and
``data/metadata.json``, from which this module takes what the episodes do not say: the observation
and action spaces (only flat Boxes can be learned from), the environment to evaluate in (its env
spec) and the reference returns of the normalized score.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from misa_fast.data import registry, transforms
from misa_fast.data.errors import DataError
from misa_fast.data.hdf5 import checked_datasets
from misa_fast.data.raw import plain_value
from misa_fast.data.registry import LOCOMOTION_NAMESPACES, environment_part, is_minari_id, namespace_part  # noqa: F401


def minari_root() -> Path:
    """Minari's local cache, computed as the minari package does (without importing it)."""
    root = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    return Path(root).expanduser()


def resolve_minari_id(dataset_id: str, download: bool = True) -> Path:
    """The local directory of a Minari id, downloaded into Minari's cache when missing (and
    ``download`` allows it). Raises FileNotFoundError naming the id, the directory looked in and
    the command that downloads it."""
    directory = minari_root() / dataset_id
    if _is_local(directory):
        return directory
    if not download:
        raise FileNotFoundError(_not_local(dataset_id, directory, "downloads are disabled"))
    try:
        download_from_minari(dataset_id)
    except ImportError as err:  # minari itself, or the client of its remote (huggingface_hub)
        raise FileNotFoundError(_not_local(
            dataset_id, directory, f"a package the download needs is missing: {err}; "
            f"pip install 'misa-fast[minari]' installs minari with its download client")) from err
    except Exception as err:  # noqa: BLE001 - offline shows as requests/hub/OS errors alike
        raise FileNotFoundError(_not_local(dataset_id, directory, f"download failed: {err}")) from err
    if not _is_local(directory):
        raise FileNotFoundError(_not_local(dataset_id, directory, "the download left no data/metadata.json"))
    return directory


def _is_local(directory: Path) -> bool:
    return (directory / "data" / "metadata.json").is_file() or (directory / "data" / "main_data.hdf5").is_file()


def download_from_minari(dataset_id: str) -> None:
    """Minari's own download (its remote storage, its checks); tests replace this to stay offline."""
    import minari

    minari.download_dataset(dataset_id)


def _not_local(dataset_id: str, directory: Path, why: str) -> str:
    return (
        f"Minari dataset {dataset_id!r} is not in the local Minari cache (looked in {directory}) and was not "
        f"downloaded ({why}). Download it on a machine that is online with\n  minari download {dataset_id}\n"
        f"(pip install 'minari[hf]') and copy that directory here; set MINARI_DATASETS_PATH to use another cache "
        f"directory"
    )


def read_metadata(directory: str | os.PathLike) -> dict | None:
    """``data/metadata.json`` of a Minari directory; None when the directory has none. Anything
    but a JSON object of fields is a DataError naming the file."""
    path = Path(directory) / "data" / "metadata.json"
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
    except RecursionError:
        raise DataError(f"{path}: cannot read this Minari metadata file (nested too deeply)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read this Minari metadata file ({err})") from err
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: a Minari metadata file holds a JSON object of fields, not a "
                        f"{type(metadata).__name__}")
    return metadata


def check_storage_format(metadata: dict, dataset_id: str) -> None:
    """Episodes are read from Minari's hdf5 layout (with h5py); other layouts are named in the error."""
    data_format = metadata.get("data_format", "hdf5")
    if data_format != "hdf5":
        raise DataError(f"{dataset_id}: stored in Minari's {data_format!r} format; misa-fast reads Minari "
                         f"datasets stored as 'hdf5' (data/main_data.hdf5)")


def space_of(metadata: dict, key: str) -> dict | None:
    """A space recorded in the metadata (Minari stores each as a JSON string) as a dict."""
    value = metadata.get(key)
    if value is None:
        return None
    return _json_object(value, key)


def _json_object(value, field: str) -> dict:
    """A metadata field that holds a JSON object (Minari stores them as JSON strings), as a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise DataError(f"metadata field '{field}' is nested too deeply") from None
        except ValueError as err:
            raise DataError(f"metadata field '{field}' is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise DataError(f"metadata field '{field}' holds a {type(value).__name__}, not a JSON object")
    return value


def observation_keys(metadata: dict, dataset_id: str, dict_keys_by_domain: dict) -> tuple | None:
    """None for a flat Box observation space; for a Dict space, the keys evaluation feeds the
    policy in this dataset's domain (antmaze: position + the ant's state). Anything else is an
    error that says which space and why."""
    space = space_of(metadata, "observation_space")
    if space is None or space.get("type") == "Box":
        _check_flat_box(space, "observation", dataset_id)
        return None
    if space.get("type") == "Dict":
        try:
            domain = registry.domain_of(dataset_id).name
        except KeyError:
            domain = None
        keys = dict_keys_by_domain.get(domain)
        subspaces = space.get("subspaces", {})
        if keys is not None and all(subspaces.get(k, {}).get("type") == "Box" for k in keys):
            return tuple(keys)
        raise DataError(
            f"{dataset_id}: the observation space is a Dict (keys {sorted(subspaces)}), not a flat Box: the "
            f"networks take one vector per state, and misa-fast knows which keys make that vector only for "
            f"{sorted(dict_keys_by_domain)} datasets. Flatten the observations into a Box dataset first."
        )
    raise DataError(f"{dataset_id}: the observation space is {_describe(space)}, not a flat Box: the networks "
                     f"take one float vector per state")


def check_action_space(metadata: dict, dataset_id: str) -> dict | None:
    """The action space (a flat Box), or an error saying which space it is and why it cannot be used."""
    space = space_of(metadata, "action_space")
    _check_flat_box(space, "action", dataset_id)
    return space


def _check_flat_box(space: dict | None, which: str, dataset_id: str) -> None:
    if space is None:
        return
    if space.get("type") != "Box":
        why = ("misa-fast learns continuous (Gaussian) policies, which need a Box of float actions"
               if which == "action" else "the networks take one float vector per state")
        raise DataError(f"{dataset_id}: the {which} space is {_describe(space)}, not a flat Box: {why}")
    shape = space.get("shape") or []
    if len(shape) != 1:
        raise DataError(f"{dataset_id}: the {which} space is a Box of shape {tuple(shape)}, not a flat Box "
                         f"(expected shape (width,))")


def _describe(space: dict) -> str:
    kind = space.get("type", "unknown")
    if kind == "Discrete":
        return f"Discrete({space.get('n')})"
    return kind


def action_bounds(space: dict | None, dataset_id: str = "dataset") -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) of a Box action space whose bounds are not already [-1, 1]: the dataset's
    actions are converted to the [-1, 1] units policies act in (misa_fast.envs.rollout). Bounds
    that are not finite numbers with low < high in every dimension are a DataError: the
    conversion would flip or blow up the actions."""
    if not space or "low" not in space or "high" not in space:
        return None
    try:
        low = np.asarray(space["low"], dtype=np.float64)
        high = np.asarray(space["high"], dtype=np.float64)
        low, high = np.broadcast_arrays(low, high)
    except (TypeError, ValueError) as err:
        raise DataError(f"{dataset_id}: the action space's bounds are not arrays of numbers ({err})") from None
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise DataError(f"{dataset_id}: the action space's bounds are not finite (low {low.tolist()}, high "
                        f"{high.tolist()}): actions cannot be mapped to [-1, 1]")
    if not (low < high).all():
        bad = int(np.flatnonzero(~(low < high).reshape(-1))[0])
        raise DataError(f"{dataset_id}: the action space's bounds are not ordered (low {low.reshape(-1)[bad]} >= "
                        f"high {high.reshape(-1)[bad]} in dimension {bad}): expected low < high")
    if np.allclose(low, -1) and np.allclose(high, 1):
        return None
    return low, high


def evaluation_env(metadata: dict) -> tuple[str | None, dict]:
    """(gymnasium id, make kwargs) of the environment the dataset records for evaluation: its
    ``eval_env_spec``, else the ``env_spec`` it was collected in; (None, {}) when it records none."""
    field = "eval_env_spec" if metadata.get("eval_env_spec") else "env_spec"
    spec = metadata.get(field)
    if not spec:
        return None, {}
    spec = _json_object(spec, field)
    kwargs = spec.get("kwargs") or {}
    env_id = spec.get("id")
    if not isinstance(kwargs, dict) or not (env_id is None or isinstance(env_id, str)):
        raise DataError(f"metadata field '{field}': 'id' must be a string and 'kwargs' an object")
    kwargs = dict(kwargs)
    if spec.get("max_episode_steps") is not None:
        try:
            kwargs["max_episode_steps"] = int(spec["max_episode_steps"])
        except (TypeError, ValueError):
            raise DataError(f"metadata field '{field}': 'max_episode_steps' is not a whole number") from None
    return env_id, kwargs


def reference_scores(metadata: dict) -> tuple[float, float] | None:
    """(ref_min_score, ref_max_score) when the dataset records both, else None. References that
    are not finite numbers with ref_min_score < ref_max_score are a DataError: every normalized
    score would be inf, NaN or upside down."""
    low, high = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if low is None or high is None:
        return None
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise DataError(f"metadata fields 'ref_min_score' / 'ref_max_score' are not numbers ({low!r}, "
                        f"{high!r})") from None
    if not (np.isfinite(low) and np.isfinite(high)) or low >= high:
        raise DataError(f"metadata fields 'ref_min_score' ({low}) and 'ref_max_score' ({high}) must be finite "
                        f"with ref_min_score < ref_max_score: no normalized score can be computed from them")
    return low, high


def read_minari_dataset(path: str | os.PathLike) -> dict:
    """``read_minari`` plus what a Minari directory's ``data/metadata.json`` says, when it has one:
    its spaces are checked (flat Box observations and actions; Dict observations only where the
    domain's evaluation keys are known), actions are converted to the [-1, 1] units policies act
    in, and ``metadata/`` entries record the dataset id, the evaluation environment
    (``env_id``, ``env_kwargs``) and the reference returns (``ref_min_score``, ``ref_max_score``,
    absent when the dataset has none; ``scores_from_dataset`` says not to use the domain's)."""
    metadata = read_metadata(path)
    if metadata is None:  # an h5py-only directory: episodes and nothing else
        return read_minari(path)

    where = Path(path) / "data" / "metadata.json"
    try:  # every field is checked before any episode is read
        dataset_id = str(metadata.get("dataset_id") or Path(path).name)
        check_storage_format(metadata, dataset_id)
        action_space = check_action_space(metadata, dataset_id)
        keys = observation_keys(metadata, dataset_id, registry.DICT_OBSERVATION_KEYS)
        bounds = action_bounds(action_space, dataset_id)
        env_id, env_kwargs = evaluation_env(metadata)
        scores = reference_scores(metadata)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    raw = read_minari(path, observation_keys=keys)
    spaces = {"actions": action_space,
              "observations": None if keys else space_of(metadata, "observation_space")}
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
            checked_datasets(main, f)  # refuses links and data stored in other files before reading any
            episodes = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
            if not episodes:
                raise DataError(f"{main}: no 'episode_<id>' groups found")
            for key in episodes:
                for column, values in _minari_episode(f[key], f"{main}:{key}", observation_keys).items():
                    columns.setdefault(column, []).append(values)
            metadata = {f"metadata/{k}": plain_value(v) for k, v in f.attrs.items()}
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
