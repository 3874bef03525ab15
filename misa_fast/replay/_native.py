"""The compiled extension ``misa_fast._C`` (the C++ replay buffer), with an import error that says
what went wrong and what to do instead of a bare ``cannot import name '_C'``."""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
from pathlib import Path


def missing_extension_message(error: BaseException | None = None) -> str:
    """Why ``misa_fast._C`` cannot be imported here, and the command that fixes it."""
    here = Path(__file__).resolve().parents[1]  # the misa_fast package, where _C is installed
    built = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"_C{suffix}")]
    if built:
        return (f"misa_fast._C ({built[0]}) does not load: {error}. It was probably built for another "
                "Python or platform: reinstall with `pip install --force-reinstall --no-deps .`.")
    lines = [f"misa_fast._C, the compiled C++ replay buffer, is not in {here}."]
    try:
        dist = importlib.metadata.distribution("misa-fast")
        installed = Path(dist.locate_file("misa_fast")).resolve()
    except importlib.metadata.PackageNotFoundError:
        installed = None
    checkout = (here.parent / "pyproject.toml").is_file() and (here.parent / "csrc").is_dir()
    if checkout and installed is not None and installed != here:
        lines.append(
            f"Python imported the source checkout {here.parent} (the current directory or PYTHONPATH), "
            f"which shadows the installed package in {installed.parent}. Run from another directory, "
            "set PYTHONSAFEPATH=1 (Python >= 3.11) so that the current directory is not searched "
            "first, or install in place with `pip install -e .`.")
    elif installed is None:
        lines.append("misa-fast is not installed: `pip install .` (or `pip install -e .` for development) "
                     "builds it (it needs cmake >= 3.18 and a C++17 compiler).")
    else:
        lines.append("The installation is incomplete: reinstall with `pip install --force-reinstall --no-deps .`.")
    if os.environ.get("PYTHONPATH"):
        lines.append(f"PYTHONPATH={os.environ['PYTHONPATH']}")
    return " ".join(lines)


def load_extension():
    """``misa_fast._C``, or an ImportError that explains why it cannot be imported."""
    try:
        from misa_fast import _C
    except ImportError as err:
        raise ImportError(missing_extension_message(err)) from err
    return _C
