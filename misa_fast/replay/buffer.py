"""Replay buffer and batch prefetcher backed by the C++ core (``misa_fast._C``).

Storage is contiguous float32, one array per field, with D4RL's field names. Sampling is uniform
with replacement from a seeded xoshiro256++ generator, so a given seed and contents give the same
batches on every machine; the GIL is released while rows are gathered.

Locking: ``add`` takes the buffer's lock exclusively, sampling takes it shared, so a prefetcher
thread may sample while another thread adds (online fine-tuning) and no batch is ever torn. With a
single sampler the batch sequence is a pure function of seed and contents; with several (e.g. a
prefetcher plus direct ``sample`` calls) they interleave draws from the one generator.
"""
from __future__ import annotations

import weakref
from typing import Dict, Mapping, Optional

import numpy as np

from misa_fast.replay._native import load_extension

_C = load_extension()

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")
Batch = Dict[str, np.ndarray]


def field_width(field: str, obs_dim: int, act_dim: int) -> Optional[int]:
    """Row width of a field; None for the per-transition scalars (rewards, terminals)."""
    return {"observations": obs_dim, "next_observations": obs_dim, "actions": act_dim}.get(field)


def _validated_rows(field: str, value, width: Optional[int], n: Optional[int]) -> np.ndarray:
    """Returns ``value`` as a C-contiguous float32 array of shape (n, width) or (n,), or raises a
    ValueError naming the field, the expected shape/dtype and what was received."""
    arr = np.asarray(value)
    if not np.can_cast(arr.dtype, np.float32, casting="same_kind"):
        raise ValueError(f"{field}: expected a real numeric array convertible to float32, got dtype {arr.dtype}")
    if width is None:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"{field}: expected shape ({n if n is not None else 'N'},) or (N, 1), got {arr.shape}")
    elif arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"{field}: expected shape ({n if n is not None else 'N'}, {width}), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{field}: expected {n} rows to match observations, got {arr.shape[0]}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise ValueError(f"{field}: expected finite values, got {arr[row].tolist()} at row {row}")
    return arr


class ReplayBuffer:
    """Ring buffer of transitions: ``ReplayBuffer(capacity, obs_dim, act_dim, seed=0)``.

    >>> buf = ReplayBuffer(1_000_000, obs_dim=11, act_dim=3, seed=0)
    >>> buf.add(**dataset)                      # numpy arrays with D4RL's field names
    >>> batch = buf.sample(256)                 # dict of float32 arrays
    >>> with buf.prefetcher(256) as batches:    # torch tensors, drawn ahead by a C++ thread
    ...     batch = next(batches)

    Once full, ``add`` overwrites the oldest transitions (FIFO), so online fine-tuning can keep
    appending.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int = 0):
        for name, value in (("capacity", capacity), ("obs_dim", obs_dim), ("act_dim", act_dim)):
            if int(value) != value or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self._core = _C.ReplayBuffer(int(capacity), int(obs_dim), int(act_dim), int(seed))
        self._storage = dict(zip(FIELDS, self._core.storage()))

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], capacity: Optional[int] = None,
                    seed: int = 0) -> "ReplayBuffer":
        """A buffer holding ``data`` (D4RL field names); capacity defaults to its length."""
        missing = [f for f in FIELDS if f not in data]
        if missing:
            raise ValueError(f"data: missing field(s) {missing}; expected {list(FIELDS)}")
        obs, act = np.asarray(data["observations"]), np.asarray(data["actions"])
        if obs.ndim != 2 or act.ndim != 2:
            raise ValueError(f"observations/actions: expected 2-D arrays, got {obs.shape} and {act.shape}")
        buf = cls(capacity or len(obs), obs.shape[1], act.shape[1], seed)
        buf.add(**{f: data[f] for f in FIELDS})
        return buf

    # ---------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        return self._core.capacity

    @property
    def obs_dim(self) -> int:
        return self._core.obs_dim

    @property
    def act_dim(self) -> int:
        return self._core.act_dim

    @property
    def position(self) -> int:
        """Index of the next row ``add`` writes."""
        return self._core.position

    def __len__(self) -> int:
        return self._core.size

    def __repr__(self) -> str:
        return (f"ReplayBuffer(size={len(self)}, capacity={self.capacity}, obs_dim={self.obs_dim}, "
                f"act_dim={self.act_dim})")

    # ---------------------------------------------------------------- writing
    def add(self, observations, actions, rewards, next_observations, terminals) -> None:
        """Appends a batch of transitions (arrays with a leading batch dimension).

        Raises ValueError naming the field for a wrong rank or width, mismatched lengths, a dtype
        that does not convert safely to float32, non-finite values, or terminals not in {0, 1}.
        """
        obs = _validated_rows("observations", observations, self.obs_dim, None)
        n = obs.shape[0]
        act = _validated_rows("actions", actions, self.act_dim, n)
        rew = _validated_rows("rewards", rewards, None, n)
        next_obs = _validated_rows("next_observations", next_observations, self.obs_dim, n)
        term = _validated_rows("terminals", terminals, None, n)
        bad = (term != 0) & (term != 1)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"terminals: expected values in {{0, 1}}, got {term[row].item()} at row {row}")
        self._core.add(obs, act, rew, next_obs, term)

    # ---------------------------------------------------------------- reading
    def _check_sampleable(self, batch_size: int) -> None:
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if len(self) == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer: add() transitions first")

    def empty_batch(self, batch_size: int) -> Batch:
        """Freshly allocated float32 arrays shaped for a batch (e.g. for ``sample_into``)."""
        return {f: np.empty((batch_size, w) if (w := field_width(f, self.obs_dim, self.act_dim)) else (batch_size,),
                            dtype=np.float32) for f in FIELDS}

    def sample(self, batch_size: int) -> Batch:
        """Draws ``batch_size`` transitions uniformly with replacement."""
        self._check_sampleable(batch_size)
        out = self.empty_batch(batch_size)
        self._core.sample_into(batch_size, *(out[f] for f in FIELDS))
        return out

    def sample_into(self, out: Mapping[str, object]) -> None:
        """Fills caller-provided arrays in place, allocating nothing.

        ``out`` maps each field to a C-contiguous float32 numpy array or CPU torch tensor (e.g. a
        pinned tensor); the batch size is taken from ``out["observations"]``.
        """
        arrays = [out[f] if isinstance(out[f], np.ndarray) else out[f].numpy() for f in FIELDS]
        batch_size = arrays[0].shape[0]
        self._check_sampleable(batch_size)
        self._core.sample_into(batch_size, *arrays)

    @staticmethod
    def seed_state(seed: int) -> np.ndarray:
        """The index RNG state (4 uint64 words) of a buffer created with ``seed``: the start of the
        stream that seed's runs sample from (see :meth:`sample_streams_into`)."""
        return np.asarray(_C.seed_state(int(seed)), dtype=np.uint64)

    def sample_streams_into(self, states: np.ndarray, out: Mapping[str, object]) -> None:
        """One batch per index stream in one call: ``states`` (M, 4) uint64, one RNG state per
        stream, advanced in place; stream m draws the indices a buffer whose RNG held ``states[m]``
        would draw. ``out`` maps each field to a C-contiguous float32 array or CPU tensor of M * B
        rows (stream 0's B rows first, e.g. an (M, B, width) array). The buffer's own RNG is not
        used. This is how the seeds of ``misa-fast train --seeds`` share one copy of the data."""
        if not isinstance(states, np.ndarray) or states.dtype != np.uint64 or states.ndim != 2 or states.shape[1] != 4:
            raise ValueError(f"states: expected an (M, 4) uint64 array, got {getattr(states, 'shape', type(states))}")
        arrays = [out[f] if isinstance(out[f], np.ndarray) else out[f].numpy() for f in FIELDS]
        rows = arrays[0].size // self.obs_dim
        if rows % len(states):
            raise ValueError(f"out: {rows} rows do not split into {len(states)} streams")
        batch_size = rows // len(states)
        self._check_sampleable(batch_size)
        # Views of the caller's memory (reshape of a C-contiguous array copies nothing).
        flat = [a.reshape(rows) if field_width(f, self.obs_dim, self.act_dim) is None else a.reshape(rows, -1)
                for f, a in zip(FIELDS, arrays)]
        self._core.sample_streams_into(batch_size, states, *flat)

    def gather(self, indices) -> Batch:
        """The transitions at the given row indices (each < len(self))."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices: expected a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices: expected values in [0, {len(self)}), got range [{idx.min()}, {idx.max()}]")
        out = self.empty_batch(len(idx))
        self._core.gather(idx.astype(np.uint64), *(out[f] for f in FIELDS))
        return out

    def storage(self) -> Batch:
        """Zero-copy views of the stored rows [0, len(self)) (e.g. to copy the dataset to a GPU)."""
        size = len(self)
        return {f: a[:size] for f, a in self._storage.items()}

    def prefetcher(self, batch_size: int, depth: int = 3, device=None) -> "Prefetcher":
        """A :class:`Prefetcher` drawing from this buffer."""
        return Prefetcher(self, batch_size, depth=depth, device=device)

    # ---------------------------------------------------------------- persistence
    def state_dict(self, include_data: bool = True) -> dict:
        """Everything needed to continue sampling exactly: shape, write position, RNG state and,
        with ``include_data``, a copy of the contents. Without it the caller must re-add the same
        transitions before ``load_state_dict`` (as a trainer does when it reloads its dataset)."""
        state = {"capacity": self.capacity, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                 "size": len(self), "position": self.position, "rng_state": self._core.rng_state()}
        if include_data:
            state["data"] = {f: a.copy() for f, a in self.storage().items()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("capacity", "obs_dim", "act_dim"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{key}: checkpoint has {state[key]}, this buffer has {getattr(self, key)}")
        size, position = int(state["size"]), int(state["position"])
        if "data" in state:
            for field in FIELDS:
                rows = np.asarray(state["data"][field], dtype=np.float32)
                if rows.shape[0] != size:
                    raise ValueError(f"data.{field}: expected {size} rows, got {rows.shape[0]}")
                self._storage[field][:size] = rows
            self._core.restore(size, position)
        elif (len(self), self.position) != (size, position):
            raise ValueError(f"buffer holds {len(self)} rows at position {self.position} but the checkpoint "
                             f"(saved without data) expects {size} rows at position {position}: add the same "
                             "transitions before loading")
        self._core.set_rng_state(np.asarray(state["rng_state"], dtype=np.uint64))


class Prefetcher:
    """Batches drawn ahead of the consumer by a C++ thread, handed out as torch tensors.

    The worker fills a ring of ``depth`` slots. On CUDA the slots are pinned host memory and each
    batch is copied to the device with ``non_blocking=True``; on CPU the returned tensors are views
    of the slot itself (no copy) and stay valid until the next call to ``next`` — ``clone()`` them
    to keep a batch longer. Use as a context manager or call ``close()``; an unclosed prefetcher is
    closed when collected or at interpreter exit.

    ``state_dict()`` returns the buffer's state as of the last batch handed out (not the batches
    drawn ahead), so a run resumed from it sees exactly the batches the uninterrupted run would.
    """

    def __init__(self, buffer: ReplayBuffer, batch_size: int, depth: int = 3, device=None):
        import torch

        buffer._check_sampleable(batch_size)
        if int(depth) != depth or depth <= 0:
            raise ValueError(f"depth: expected a positive integer, got {depth!r}")
        self.buffer, self.batch_size = buffer, int(batch_size)
        self.device = torch.device(device if device is not None else "cpu")
        on_cuda = self.device.type == "cuda"
        widths = [field_width(f, buffer.obs_dim, buffer.act_dim) for f in FIELDS]
        row = sum(w or 1 for w in widths)

        def split(flat):
            views, offset = {}, 0
            for field, width in zip(FIELDS, widths):
                n = self.batch_size * (width or 1)
                views[field] = (flat[offset:offset + n].view(self.batch_size, width) if width
                                else flat[offset:offset + n])
                offset += n
            return views

        # One flat allocation per slot keeps the host->device transfer a single copy.
        self._host_flat = [torch.empty(self.batch_size * row, dtype=torch.float32, pin_memory=on_cuda)
                           for _ in range(depth)]
        self._host = [split(flat) for flat in self._host_flat]
        if on_cuda:
            self._device_flat = [torch.empty_like(flat, device=self.device) for flat in self._host_flat]
            self._device = [split(flat) for flat in self._device_flat]
            self._copied = [torch.cuda.Event() for _ in range(depth)]
        self._consumed_rng = buffer._core.rng_state()
        self._held: Optional[int] = None
        self._core = _C.Prefetcher(buffer._core, self.batch_size,
                                   [tuple(slot[f].numpy() for f in FIELDS) for slot in self._host])
        self._finalizer = weakref.finalize(self, self._core.close)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, "object"]:
        if self._held is not None:
            if self.device.type == "cuda":
                self._copied[self._held].synchronize()  # the async copy has read the slot
            self._core.release(self._held)
            self._held = None
        try:
            slot = self._core.acquire()
        except RuntimeError as err:
            raise RuntimeError(f"Prefetcher: {err}") from None
        self._held = slot
        self._consumed_rng = self._core.rng_state_after(slot)
        if self.device.type != "cuda":
            return self._host[slot]
        self._device_flat[slot].copy_(self._host_flat[slot], non_blocking=True)
        self._copied[slot].record()
        return self._device[slot]

    next = __next__

    def state_dict(self, include_data: bool = False) -> dict:
        state = self.buffer.state_dict(include_data=include_data)
        state["rng_state"] = np.array(self._consumed_rng, dtype=np.uint64)
        return state

    def close(self) -> None:
        """Stops and joins the worker thread. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
