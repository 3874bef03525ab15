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

:func:`load_exported_policy` loads a ``policy.pt2`` only when the archive holds what an export of
this project holds: before ``torch.export.load`` sees it, every entry it would unpickle with plain
``pickle`` (``use_pickle`` payloads, ``opaque_obj_*`` / ``custom_obj_*`` constants, legacy pickled
weights), every Python source it would run (guards) and every shape expression it would evaluate
(sympy) is refused, and after loading the graph may call only the operators such an export calls
(no file, storage or in-place operator). Pickled payloads it still reads (the example inputs) are
held to the weights-only rule as a second line.
"""
from __future__ import annotations

import contextlib
import io
import json
import operator
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from misa_fast.errors import UserError

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


class UnsafeCheckpointError(UserError):
    """A file that could run code or touch other files when loaded: it was refused unread."""


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
    return write_atomic(path, lambda f: f.write(_serialized(lambda buffer: torch.save(plain, buffer))))


def _serialized(save: Callable[[io.BytesIO], object]) -> memoryview:
    """What ``save`` writes, in memory. torch's zip writer aborts the process when a write to a
    file fails (a full disk, a file size limit); writing its bytes from Python turns that into an
    OSError, and write_atomic then removes its temporary file."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getbuffer()


def load_checked(path: os.PathLike, keys: Sequence[str], what: str, map_location="cpu") -> dict:
    """:func:`load`, then refuses (one line naming the file) a state that lacks any of ``keys``:
    a checkpoint of another command, or a file that is not one. ``what`` says what was expected."""
    state = load(path, map_location=map_location)
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not {what} (missing {', '.join(missing)})")
    return state


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


_UNSAFE_ADVICE = re.compile(r"weights_only|allow_pickle|unsafe|trust", re.IGNORECASE)


def _first_safe_sentence(err: Exception) -> str:
    """The first line of ``err`` that gives no advice to load the file some less safe way."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and not _UNSAFE_ADVICE.search(line):
            return line
    return type(err).__name__


def _plain_pickle_globals(path: Path) -> list:
    """The globals a bare pickle file names, read from its opcodes (nothing is unpickled)."""
    import pickletools

    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, argument, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
    except Exception:  # not a pickle, or a truncated one: what was found so far
        pass
    return list(dict.fromkeys(found))


def _refusal(path: Path, err: Exception) -> ValueError:
    """The error for a file the weights-only unpickler stopped: a refusal naming what it would
    have had to build when the file asks for such objects, else a plain unreadable-file error."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in _legacy_numpy_globals()}
    try:  # reads the pickle's opcodes only
        found = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if name not in allowed]
    except Exception:  # an old-style (not zip) file or a bare pickle
        found = [name for name in _plain_pickle_globals(path) if name not in allowed]
    found = found or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]
    if not found:
        # torch's own text goes on to advise loading with the unsafe switch: only its first sentence
        # that does not is kept.
        return UserError(f"{path}: not a readable misa-fast checkpoint ({_first_safe_sentence(err)})")
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
        with torch.serialization.safe_globals(_legacy_numpy_globals()), warnings.catch_warnings():
            # torch warns about a pickle protocol it may not read; the refusal below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable misa-fast checkpoint ({_first_safe_sentence(err)})") from err
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a misa-fast checkpoint (it holds a {type(state).__name__}, not a dict)")
    return from_plain(state)


@contextlib.contextmanager
def _weights_only_torch_load(path: Path) -> Iterator[None]:
    """Within the block every ``torch.load`` is weights-only: ``torch.export.load`` unpickles
    pickled weights, constants and example inputs with ``weights_only=False`` (and retries a
    refused payload that way), which would run code from the archive. The archive check refuses
    every such payload first; this is the second line."""
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{path}: refused: a payload in it needs objects an exported misa-fast policy never holds; "
                f"nothing in it was run ({_first_safe_sentence(err)})") from None

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


# The operators an export of this project's policies calls (MISA's tanh-Gaussian policy and TD3's
# deterministic actor, with and without observation normalisation), plus a few arithmetic ones an
# equivalent policy might be written with. None of them reads or writes anything but its tensors:
# file and storage operators (from_file, _load...) and in-place ones (add_, copy_, set_...) are out.
EXPORTED_POLICY_OPERATORS = frozenset({
    "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.chunk.default",
    "aten.clamp.default", "aten.exp.default", "aten.linear.default", "aten.relu.default", "aten.tanh.default",
    # arithmetic an equivalent policy may use
    "aten.add.Scalar", "aten.sub.Scalar", "aten.mul.Scalar", "aten.div.Scalar", "aten.neg.default",
    "aten.sigmoid.default", "aten.log.default", "aten.sqrt.default", "aten.rsqrt.default", "aten.abs.default",
    "aten.minimum.default", "aten.maximum.default", "aten.addmm.default", "aten.mm.default", "aten.t.default",
    "aten.view.default", "aten.reshape.default", "aten.split.Tensor", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.elu.default", "aten.leaky_relu.default", "aten.gelu.default",
    # a layer-normalised actor (ReBRAC's actor_layer_norm); native_layer_norm is what a decomposed
    # trace calls instead
    "aten.layer_norm.default", "aten.native_layer_norm.default",
    # what other torch versions may trace the same modules into (a linear layer as addmm of a
    # permuted weight, a dynamic batch size read from the input)
    "aten.permute.default", "aten.expand.default", "aten.clone.default", "aten.sym_size.int",
})
# torch's own region markers an export wraps a no_grad method in; the regions' graphs are checked too.
EXPORTED_POLICY_HIGHER_ORDER = frozenset({"wrap_with_set_grad_enabled"})
_SERIALIZED_OPERATORS = frozenset({f"torch.ops.{name}" for name in EXPORTED_POLICY_OPERATORS}
                                  | {f"torch.ops.higher_order.{name}" for name in EXPORTED_POLICY_HIGHER_ORDER}
                                  | {"_operator.getitem"})

# Every entry of an exported policy, relative to the archive's top folder. Others (AOTInductor
# libraries, legacy pickled weights, opaque_obj_* / custom_obj_* constants, extra files, other
# models) are refused: torch would load or unpickle them.
_ARCHIVE_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
_PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
                    "data/constants/model_constants_config.json": re.compile(r"tensor_\d+")}
# The only shape expressions an export of a policy holds: its batch-size symbol. torch parses
# these strings with sympy, which evaluates them as Python.
_SHAPE_EXPRESSION = re.compile(r"-?\d+|Symbol\('[a-z]+\d+'(, (positive|integer|nonnegative)=(True|False))*\)")
_MAX_GRAPH_BYTES = 64 << 20  # a policy's graph is tens of kB; a bigger one is not ours


def _check_archive(path: Path, contents: bytes) -> None:
    """Refuses an exported-policy archive (``contents``, read from ``path``) that holds anything
    ``torch.export.load`` would unpickle with plain pickle, run as Python or evaluate as an
    expression; reads the zip's directory, its JSON entries and its example inputs (weights-only)."""
    def refuse(what: str):
        return UnsafeCheckpointError(f"{path}: refused: it holds {what}, which an exported misa-fast policy never "
                                     "does; nothing in it was loaded")

    try:
        archive = zipfile.ZipFile(io.BytesIO(contents))
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: not a readable exported policy (not a .pt2 archive: {err})") from None
    with archive:
        names = archive.namelist()
        tops = {name.split("/", 1)[0] for name in names}
        if len(tops) != 1 or any("/" not in name for name in names):
            raise refuse("entries outside one top folder")
        if len(set(names)) != len(names):  # zip readers disagree on which duplicate they read
            raise refuse("duplicate entries")
        entries = {name.split("/", 1)[1]: name for name in names}
        for entry in entries:
            if not _ARCHIVE_ENTRY.fullmatch(entry):
                raise refuse(f"the entry {entry!r}")
        for needed in ("models/model.json", *_PAYLOAD_CONFIGS):
            if needed not in entries:
                raise UserError(f"{path}: not a readable exported policy (no {needed!r} in it)")

        def read_json(entry: str):
            if archive.getinfo(entries[entry]).file_size > _MAX_GRAPH_BYTES:
                raise refuse(f"an oversized {entry!r}")
            try:
                return json.loads(archive.read(entries[entry]))
            except (ValueError, RecursionError) as err:
                raise UserError(f"{path}: not a readable exported policy ({entry} is not JSON: {err})") from None

        for entry, payload_name in _PAYLOAD_CONFIGS.items():
            config = read_json(entry)
            payloads = config.get("config") if isinstance(config, dict) else None
            if not isinstance(payloads, dict):
                raise UserError(f"{path}: not a readable exported policy ({entry} holds no payload table)")
            for name, payload in payloads.items():
                if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
                    raise refuse(f"a pickled payload {name!r} in {entry}")
                if not payload_name.fullmatch(str(payload.get("path_name"))):
                    raise refuse(f"the payload {payload.get('path_name')!r} ({name!r}) in {entry}")
        _check_serialized_program(read_json("models/model.json"), refuse)
        try:  # the example inputs are always a pickle; only tensors and plain values may be in it
            torch.load(io.BytesIO(archive.read(entries["data/sample_inputs/model.pt"])), weights_only=True)
        except KeyError:
            pass
        except Exception as err:
            raise refuse(f"example inputs that need more than tensors ({_first_safe_sentence(err)})") from None


def _check_serialized_program(program, refuse: Callable[[str], Exception]) -> None:
    """The serialized program (``models/model.json``): no guard code (torch compiles it into a
    Python function), no custom objects, operators of :data:`EXPORTED_POLICY_OPERATORS` only (in
    nested graphs too), shape expressions that are a symbol or a number."""
    if not isinstance(program, dict):
        raise refuse("a program that is not a JSON object")
    if program.get("guards_code"):
        raise refuse("guard code")
    stack = [program]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        target = value.get("target")
        if "inputs" in value and isinstance(target, str) and target not in _SERIALIZED_OPERATORS:
            raise refuse(f"a call to {target}")
        # An operator passed as an argument (a higher-order operator would call it).
        operator_argument = value.get("as_operator")
        if operator_argument is not None and operator_argument not in _SERIALIZED_OPERATORS:
            raise refuse(f"the operator argument {str(operator_argument)[:80]}")
        if value.get("custom_obj_values") or "as_custom_obj" in value:
            raise refuse("a custom object")
        expression = value.get("expr_str")
        if expression is not None and not (isinstance(expression, str) and _SHAPE_EXPRESSION.fullmatch(expression)):
            raise refuse(f"the shape expression {str(expression)[:60]!r}")
        stack.extend(value.values())


def _check_graph_operators(path: Path, module: torch.nn.Module) -> None:
    """Every operator the loaded graphs call is one of :data:`EXPORTED_POLICY_OPERATORS`."""
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            if node.op == "call_module" and node.target == "_guards_fn":
                continue  # what module() makes of the guard code, which the archive check found empty
            target = node.target
            if isinstance(target, torch._ops.HigherOrderOperator) and not (
                    len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr"
                    and isinstance(getattr(graph_module, node.args[1].target, None), torch.fx.GraphModule)):
                # the region it runs must be one of the graphs checked here, not some callable
                raise UnsafeCheckpointError(f"{path}: refused: its graph runs {target} on something other than a "
                                            "graph of its own; nothing in it was run")
            allowed = node.op == "call_function" and (
                (isinstance(target, torch._ops.OpOverload) and str(target) in EXPORTED_POLICY_OPERATORS)
                or (isinstance(target, torch._ops.HigherOrderOperator)
                    and target.name() in EXPORTED_POLICY_HIGHER_ORDER)
                or target is operator.getitem)
            if not allowed:
                raise UnsafeCheckpointError(
                    f"{path}: refused: its graph calls {target} ({node.op}), which an exported misa-fast policy "
                    "never does; nothing in it was run")


def load_exported_policy(path: os.PathLike) -> torch.nn.Module:
    """The module of an exported ``policy.pt2``, loaded without running code or touching other
    files from the archive.

    The archive is checked before torch reads it (:func:`_check_archive`: no pickled payload, guard
    code or shape expression that torch would run), read with every ``torch.load`` weights-only,
    and its graphs may call only the operators of :data:`EXPORTED_POLICY_OPERATORS`, inputs never
    mutated. Raises :class:`UnsafeCheckpointError` for a refused archive, ``UserError`` for one
    that is not an exported policy, ``FileNotFoundError`` when there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported policy at {path}")
    contents = path.read_bytes()  # torch reads the very bytes that were checked, not the file again
    _check_archive(path, contents)
    try:
        with _weights_only_torch_load(path):
            program = torch.export.load(io.BytesIO(contents))
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise UserError(f"{path}: not a readable exported policy ({type(err).__name__}: "
                        f"{_first_safe_sentence(err)})") from err
    _check_graph_operators(path, program.graph_module)
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        raise UnsafeCheckpointError(f"{path}: refused: its graph writes into its buffers or inputs, which an "
                                    "exported misa-fast policy never does; nothing in it was run")
    module = program.module()
    _check_graph_operators(path, module)
    return module


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
    return write_atomic(path, lambda f: f.write(_serialized(lambda buffer: torch.export.save(program, buffer))))
