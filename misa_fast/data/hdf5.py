"""D4RL's HDF5 layout: reading (lazily, refusing files whose reading would read other files) and
writing.

Every dataset of the file is one key of the raw dict, named by its path ("infos/qpos"); root
attributes become ``metadata/<attr>`` entries. Links (external or soft) and datasets stored in
other files or mapped from them (external storage, virtual datasets) are refused before anything is
read, and again each time an array is read, in case the file was replaced in between.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from misa_fast.data.errors import DataError, UnsafeDataError
from misa_fast.data.raw import LazyArrays, plain_value


def checked_datasets(path, group: h5py.Group, prefix: str = "") -> dict:
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
            found.update(checked_datasets(path, item, f"{key}/"))
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
                    checked_datasets(path, f)  # the file may have been replaced since it was checked
                    return plain_value(f[key][()])
            except (OSError, RuntimeError, KeyError) as err:
                raise _hdf5_error(path, err) from err
        return load

    try:
        with h5py.File(path, "r") as f:
            shapes = checked_datasets(path, f)
            attributes = {f"metadata/{key}": plain_value(value) for key, value in f.attrs.items()
                          if f"metadata/{key}" not in shapes}
    except (OSError, RuntimeError, KeyError) as err:  # h5py's wording for truncated/corrupt files
        raise _hdf5_error(path, err) from err
    return LazyArrays({key: loader(key) for key in shapes}, shapes, attributes)


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
