"""Resolving a dataset name to a local file, downloading it when needed.

Downloads go to ``<file>.part`` first: an interrupted download resumes from there with an HTTP
Range request, the result must match the size the server announced, and only then is it renamed
into place (``os.replace`` is atomic), so the cache never holds a half-written dataset.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from misa_fast.data import minari as minari_ids
from misa_fast.data import registry

CHUNK_BYTES = 1 << 20


def default_dataset_path() -> Path:
    """The embedded dataset inside the installed package (misa_fast/assets/)."""
    return Path(str(resources.files("misa_fast") / "assets" / registry.DEFAULT_DATASET_FILE))


def resolve_dataset(name_or_path: str | os.PathLike, download: bool = True) -> Path:
    """A local path for a file/directory path, the default dataset's name, a D4RL name or a Minari
    id (``mujoco/hopper/medium-v0``).

    Named D4RL datasets are looked up in the misa-fast cache, then in D4RL's own cache, and are
    downloaded into the misa-fast cache when missing; Minari ids are looked up in Minari's cache
    and downloaded there by the minari package (``download=False`` forbids downloads)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name == registry.DEFAULT_DATASET:
        if not default_dataset_path().is_file():
            raise FileNotFoundError(f"the embedded dataset {default_dataset_path()} is missing from this "
                                    f"installation; regenerate it with scripts/make_default_dataset.py")
        return default_dataset_path()
    if minari_ids.is_minari_id(name):
        return minari_ids.resolve_minari_id(name, download=download)
    if name not in registry.D4RL_URLS:
        raise FileNotFoundError(
            f"{name!r} is neither an existing file or directory nor a known dataset name; known names "
            f"are {registry.DEFAULT_DATASET!r}, D4RL's, e.g. 'hopper-medium-v2' "
            f"(see misa_fast.data.registry.D4RL_URLS), and Minari ids of the form "
            f"'namespace/name/dataset-vN', e.g. 'mujoco/hopper/medium-v0'"
        )
    filename = registry.d4rl_filename(name)
    target = registry.data_dir() / filename
    for candidate in (target, registry.d4rl_cache_dir() / filename):
        if candidate.is_file():
            return candidate
    url = registry.D4RL_URLS[name]
    if not download:
        raise FileNotFoundError(_place_it_yourself(name, url, target, "downloads are disabled"))
    try:
        return download_file(url, target, desc=name)
    except (urllib.error.URLError, OSError) as err:  # offline, DNS failure, refused, reset...
        if isinstance(err, IncompleteDownloadError):
            raise
        raise FileNotFoundError(_place_it_yourself(name, url, target, f"download failed: {err}")) from err


def _place_it_yourself(name: str, url: str, target: Path, why: str) -> str:
    part = target.with_name(target.name + ".part")
    resume = f"\n(a partial download is kept at {part}: running again resumes it)" if part.exists() else ""
    return (
        f"dataset {name!r} is not cached and could not be fetched ({why}). Download\n  {url}\n"
        f"and place it at\n  {target}\n(set MISA_FAST_DATA_DIR to use another cache directory)" + resume
    )


class IncompleteDownloadError(OSError):
    """The connection ended before the announced number of bytes arrived (resumable)."""


def download_file(url: str, target: str | os.PathLike, desc: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` with a progress bar, resuming ``target.part`` if present."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        # 416: the range starts at the end of the file, i.e. the .part file is already complete.
        total = _total_from_content_range(err.headers.get("Content-Range"))
        if err.code == 416 and total == have:
            os.replace(part, target)
            return target
        raise
    with response:
        length = response.headers.get("Content-Length")
        if have and response.status == 206:
            total = _total_from_content_range(response.headers.get("Content-Range"))
            if total is None and length is not None:
                total = have + int(length)
            mode = "ab"
        else:  # the server ignored the range (or there was none): start over
            have, total, mode = 0, (int(length) if length is not None else None), "wb"
        with open(part, mode) as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc or target.name,
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))

    size = part.stat().st_size
    if total is not None and size != total:
        raise IncompleteDownloadError(
            f"download of {url} stopped at {size} of {total} bytes; run again to resume from {part}"
        )
    os.replace(part, target)
    return target


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None
