"""Offline RL data in D4RL's format, without D4RL: loading (D4RL HDF5, Minari directories and
Minari ids, .npz, named D4RL datasets downloaded to a cache), D4RL's q-learning view, per-domain
transforms, normalized scores, and the small dataset that ships inside the package.

    from misa_fast.data import prepare, normalized_score
    data, info = prepare("hopper-medium-v2")   # float32 transitions + DataInfo for checkpoints
    data, info = prepare()                     # the embedded default (Pendulum-v1) dataset
    data, info = prepare("mujoco/hopper/medium-v0")  # a Minari id (Minari's cache; needs minari to download)
"""
from misa_fast.data.download import default_dataset_path, download_file, resolve_dataset
from misa_fast.data.hdf5 import read_hdf5, write_hdf5
from misa_fast.data.load import load_dataset
from misa_fast.data.minari import is_minari_id, read_minari, read_minari_dataset, resolve_minari_id
from misa_fast.data.npz import read_npz
from misa_fast.data.prepare import DataInfo, prepare
from misa_fast.data.raw import qlearning_dataset, validate_dataset
from misa_fast.data.registry import D4RL_URLS, DEFAULT_DATASET, data_dir, domain_of, env_id_for
from misa_fast.data.scores import normalized_score, reference_returns
from misa_fast.data.transforms import (
    ACTION_CLIP,
    antmaze_rewards,
    clip_actions,
    minmax_rewards,
    normalize_observations,
    observation_stats,
    transform_rewards,
)

__all__ = [
    "ACTION_CLIP", "D4RL_URLS", "DEFAULT_DATASET", "DataInfo", "antmaze_rewards", "clip_actions",
    "data_dir", "default_dataset_path", "domain_of", "download_file", "env_id_for", "is_minari_id", "load_dataset",
    "minmax_rewards", "normalize_observations", "normalized_score", "observation_stats", "prepare",
    "qlearning_dataset", "read_hdf5", "read_minari", "read_minari_dataset", "read_npz", "reference_returns",
    "resolve_dataset", "resolve_minari_id", "transform_rewards", "validate_dataset", "write_hdf5",
]
