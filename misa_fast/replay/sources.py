"""Where training batches come from: the C++ prefetcher (host memory, any device) or a copy of the
dataset resident on the GPU with on-device index sampling. Both hand out dicts of tensors with
D4RL's field names and can save and restore their position in the batch sequence (resume)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import torch

from misa_fast.replay.buffer import FIELDS, ReplayBuffer

Batch = Dict[str, torch.Tensor]
SOURCES = ("auto", "prefetch", "device")


class PrefetchSource:
    """Batches from a :class:`ReplayBuffer` through its C++ prefetcher."""

    kind = "prefetch"

    def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, seed: int, device: torch.device,
                 state: Optional[dict] = None, depth: int = 3):
        self.buffer = ReplayBuffer.from_arrays(data, seed=seed)
        if state is not None:
            self.buffer.load_state_dict(state)
        self._batches = self.buffer.prefetcher(batch_size, depth=depth, device=device)

    def __next__(self) -> Batch:
        return next(self._batches)

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self._batches.state_dict(include_data=False)}

    def close(self) -> None:
        self._batches.close()


class StaticBatch(dict):
    """A batch (field -> tensor) whose fields are views of one (B, row) tensor ``rows``."""

    def __init__(self, fields: Batch, rows: torch.Tensor):
        super().__init__(fields)
        self.rows = rows


class DeviceSource:
    """The whole dataset on the device as one (N, row) tensor; each batch is one ``randint`` and
    one ``index_select`` (two kernels, no host round trip), split into per-field views."""

    kind = "device"

    def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, seed: int, device: torch.device,
                 state: Optional[dict] = None):
        columns = [np.asarray(data[f], dtype=np.float32).reshape(len(data["observations"]), -1) for f in FIELDS]
        self._widths = [c.shape[1] for c in columns]
        self._rows = torch.from_numpy(np.concatenate(columns, axis=1)).to(device)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))
        if state is not None:
            if state.get("kind") != self.kind:
                raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
            self._generator.set_state(state["generator"].cpu())

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    def _split(self, rows: torch.Tensor) -> Batch:
        parts = torch.split(rows, self._widths, dim=1)
        return {f: (p if f in ("observations", "next_observations", "actions") else p.squeeze(1))
                for f, p in zip(FIELDS, parts)}

    def __next__(self) -> Batch:
        idx = torch.randint(self._rows.shape[0], (self.batch_size,), device=self.device, generator=self._generator)
        return self._split(self._rows.index_select(0, idx))

    def static_batch(self) -> "StaticBatch":
        """A batch of per-field views of one preallocated (B, row) tensor, for :meth:`refill` (the
        CUDA-graph backend captures ``refill`` and reads the views)."""
        rows = torch.empty(self.batch_size, self._rows.shape[1], device=self.device)
        return StaticBatch(self._split(rows), rows)

    def refill(self, batch: "StaticBatch") -> None:
        """Draws the next batch into a :meth:`static_batch` in place: the same indices, from the same
        generator, as ``next`` would draw (so graph and eager runs see the same batches)."""
        if not isinstance(batch, StaticBatch):
            raise TypeError("refill: expected a batch made by static_batch()")
        idx = torch.randint(self._rows.shape[0], (self.batch_size,), device=self.device, generator=self._generator)
        torch.index_select(self._rows, 0, idx, out=batch.rows)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        self._generator.set_state(state["generator"].cpu())

    def close(self) -> None:
        pass


def make_source(kind: str, data: Mapping[str, np.ndarray], batch_size: int, seed: int, device,
                state: Optional[dict] = None):
    """``kind``: "prefetch", "device", or "auto" (device-resident on CUDA, prefetcher on CPU; on a
    CPU the dataset is already in host memory and the prefetcher overlaps the gather with the step)."""
    device = torch.device(device)
    if kind not in SOURCES:
        raise ValueError(f"data source: expected one of {SOURCES}, got {kind!r}")
    if state is not None:
        kind = state.get("kind", kind)
    elif kind == "auto":
        kind = "device" if device.type == "cuda" else "prefetch"
    if kind == "device":
        return DeviceSource(data, batch_size, seed, device, state)
    state = None if state is None else {k: v for k, v in state.items() if k != "kind"}
    return PrefetchSource(data, batch_size, seed, device, state)
