"""One entry point for every dataset: a name, a Minari id or a path resolved to a local file or
directory, read by the reader of its format (:mod:`~misa_fast.data.hdf5`,
:mod:`~misa_fast.data.npz`, :mod:`~misa_fast.data.minari`) and validated
(:func:`~misa_fast.data.raw.validate_dataset`)."""
from __future__ import annotations

import os

from misa_fast.data import registry
from misa_fast.data.download import resolve_dataset
from misa_fast.data.hdf5 import read_hdf5
from misa_fast.data.minari import read_minari_dataset
from misa_fast.data.npz import read_npz
from misa_fast.data.raw import validate_dataset


def load_dataset(name_or_path: str | os.PathLike, download: bool = True) -> dict:
    """Read a dataset into a raw D4RL dict (validated; see :mod:`misa_fast.data.raw`).

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
