"""Datasets saved with ``np.savez(path, **raw)``: the D4RL keys as arrays of an ``.npz`` archive,
read lazily, with arrays of pickled Python objects refused before anything is read."""
from __future__ import annotations

import os
import zipfile

import numpy as np

from misa_fast.data.errors import DataError, UnsafeDataError
from misa_fast.data.raw import LazyArrays, plain_value
from misa_fast.errors import UserError


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
                    return plain_value(f[key])
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
