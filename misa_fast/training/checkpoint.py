"""Checkpoints that survive a kill at any moment and never run code when loaded, and a policy
export that runs without misa-fast.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the previous one, so the file on disk is always either the old or the new complete checkpoint.

A checkpoint holds tensors and plain Python values only (numbers, strings, lists, tuples, dicts):
numpy arrays are stored as tensors under a ``{"__numpy__": tensor}`` tag and restored on load, and
the global RNG states are stored in that form too. Loading uses PyTorch's weights-only unpickler,
which rebuilds exactly those types and refuses every other global, so a file made to run code
when unpickled is rejected (:class:`UnsafeCheckpointError`) before anything in it runs.
Checkpoints written before that convention held plain numpy arrays; the four numpy globals that
rebuild an array of numbers (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``) are allowed
while loading so that they still load.

:func:`load_exported_policy` loads a ``policy.pt2`` with every pickled payload inside it held to
the same weights-only rule (``torch.export.load`` itself unpickles some payloads without it).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
POLICY_NAME = "policy.pt2"


def write_atomic(path: os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: a reader (or a kill) only ever sees the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


class UnsafeCheckpointError(ValueError):
    """A file that needs more than tensors and plain values to load: it was refused unread."""


NUMPY_TAG = "__numpy__"
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` made of tensors and plain Python values only, as the weights-only unpickler
    rebuilds them: numpy arrays become ``{"__numpy__": tensor}`` (see :func:`from_plain`), numpy
    scalars Python numbers. Anything else is a ``TypeError`` naming where it was, so a checkpoint
    that could not be loaded safely is never written."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise TypeError(f"{where}: a numpy array of dtype {value.dtype} cannot be stored in a checkpoint")
        return {NUMPY_TAG: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, dict):
        if NUMPY_TAG in value:
            raise TypeError(f"{where}: the key {NUMPY_TAG!r} is reserved")
        return {key: to_plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in a "
                    "checkpoint (tensors, numbers, strings, lists, tuples and dicts only)")


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain`: tagged tensors back to numpy arrays."""
    if isinstance(value, dict):
        if len(value) == 1 and NUMPY_TAG in value:
            return value[NUMPY_TAG].cpu().numpy()
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_plain(item) for item in value)
    return value


def save_atomic(state: dict, path: os.PathLike) -> Path:
    """Writes ``state`` (see :func:`to_plain` for what it may hold) atomically to ``path``."""
    plain = to_plain(state)
    return write_atomic(path, lambda f: torch.save(plain, f))


def _legacy_numpy_globals() -> list:
    """The numpy globals that rebuild an array or scalar of numbers, under both module spellings
    numpy has pickled them with (``numpy.core`` before 2.0, ``numpy._core`` since)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        function = getattr(multiarray, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    # numpy >= 1.25 may pickle a dtype through its class (numpy.dtypes.Float32DType, ...).
    allowed += [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                            np.uint32, np.uint64, np.float16, np.float32, np.float64,
                                            np.complex64, np.complex128)]
    return allowed


def _refusal(path: Path, err: Exception) -> ValueError:
    """The error for a file the weights-only unpickler stopped: a refusal naming what it would
    have had to build when the file asks for such objects, else a plain unreadable-file error."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in _legacy_numpy_globals()}
    try:  # reads the pickle's opcodes only
        found = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if name not in allowed]
    except Exception:
        found = []
    if not found:
        return ValueError(f"{path}: not a readable misa-fast checkpoint ({str(err).splitlines()[0]})")
    return UnsafeCheckpointError(
        f"{path}: refused: it contains objects a misa-fast checkpoint never holds ({', '.join(found)}); nothing in "
        "it was run. Load only checkpoints written by misa-fast.")


def load(path: os.PathLike, map_location="cpu") -> dict:
    """A checkpoint (or the one in a run directory), read with PyTorch's weights-only unpickler.

    Raises ``FileNotFoundError`` when there is none, :class:`UnsafeCheckpointError` (a
    ``ValueError``) for a file whose unpickling would need anything but tensors, plain values and
    numpy arrays of numbers (nothing in it is run), and ``ValueError`` for a truncated or foreign
    file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable misa-fast checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a misa-fast checkpoint (it holds a {type(state).__name__}, not a dict)")
    return from_plain(state)


@contextlib.contextmanager
def _weights_only_torch_load(path: Path) -> Iterator[None]:
    """Within the block every ``torch.load`` is weights-only: ``torch.export.load`` unpickles
    pickled weights, constants and example inputs with ``weights_only=False`` (and retries a
    refused payload that way), which would run code from the archive."""
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{path}: refused: a payload in it needs objects an exported misa-fast policy never holds; "
                f"nothing in it was run ({str(err).splitlines()[-1] if str(err) else err})") from None

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def load_exported_policy(path: os.PathLike) -> torch.nn.Module:
    """The module of an exported ``policy.pt2``, loaded without running code from the file.

    ``torch.export`` stores a graph of PyTorch operators (no Python code) and its tensors; every
    pickled payload in the archive is read weights-only here, and a graph that calls anything but
    PyTorch's own operators is refused, so loading and running it executes no code from the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported policy at {path}")
    try:
        with _weights_only_torch_load(path):
            program = torch.export.load(str(path))
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable exported policy ({type(err).__name__}: {err})") from err
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    for node in (node for graph in graphs for node in graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            continue
        if isinstance(target, torch._ops.HigherOrderOperator):  # torch's own (e.g. a no_grad region)
            continue
        if getattr(target, "__module__", None) == "_operator" and target.__name__ == "getitem":
            continue
        raise UnsafeCheckpointError(f"{path}: refused: its graph calls {target!r}, which an exported misa-fast "
                                    "policy never does (PyTorch's own operators only)")
    return program.module()


def rng_state() -> dict:
    """Every global generator a training step might touch, as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores :func:`rng_state` (also numpy's legacy tuple form of older checkpoints)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = {**numpy_state, "state": {**numpy_state["state"],
                                                "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DeterministicPolicy(nn.Module):
    """What gets exported: observation normalisation, then tanh of the policy mean."""

    def __init__(self, policy: nn.Module, obs_mean: Optional[Sequence[float]], obs_std: Optional[Sequence[float]],
                 obs_dim: int):
        super().__init__()
        self.policy = policy
        mean = torch.zeros(obs_dim) if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32)
        std = torch.ones(obs_dim) if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32)
        self.register_buffer("obs_mean", mean.expand(obs_dim).clone())
        self.register_buffer("obs_std", std.expand(obs_dim).clone())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy.act((observations - self.obs_mean) / self.obs_std)


def export_policy(policy: nn.Module, obs_dim: int, path: os.PathLike, obs_mean=None, obs_std=None) -> Path:
    """Writes a ``torch.export`` program: raw observations (batch, obs_dim) -> actions in [-1, 1].

    Load it anywhere with plain torch::

        policy = torch.export.load("policy.pt2").module()
        actions = policy(torch.as_tensor(observations, dtype=torch.float32))

    For an archive someone else wrote, use :func:`load_exported_policy` instead: it loads the same
    module without letting the archive run code.
    """
    import copy

    module = DeterministicPolicy(copy.deepcopy(policy).cpu().eval(), obs_mean, obs_std, obs_dim)
    example = torch.zeros(2, obs_dim)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # torch.export wants the .pt2 suffix
    torch.export.save(program, tmp)
    os.replace(tmp, path)
    return path
