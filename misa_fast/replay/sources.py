"""Where training batches come from: the C++ prefetcher (host memory, any device) or a copy of the
dataset resident on the GPU with on-device index sampling. Both hand out dicts of tensors with
D4RL's field names and can save and restore their position in the batch sequence (resume)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import torch

from misa_fast.replay.buffer import FIELDS, ReplayBuffer, field_width

Batch = Dict[str, torch.Tensor]
SOURCES = ("auto", "prefetch", "device")
# Fields beyond the transition a learner may ask the data for (ReBRAC's next actions). Only the
# device source carries them: the C++ buffer stores the five transition fields.
EXTRA_FIELDS = ("next_actions",)
_WIDE = ("observations", "next_observations", "actions", "next_actions")


def fields_of(data: Mapping[str, np.ndarray]) -> tuple:
    """The fields a source hands out for ``data``: the transition's, and any extra field it holds."""
    return FIELDS + tuple(f for f in EXTRA_FIELDS if f in data)


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
        self._fields = fields_of(data)
        columns = [np.asarray(data[f], dtype=np.float32).reshape(len(data["observations"]), -1) for f in self._fields]
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
        return {f: (p if f in _WIDE else p.squeeze(1)) for f, p in zip(self._fields, parts)}

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


class _Stream:
    """One seed's index stream: an RNG state of the C++ sampler (prefetch) or a torch generator
    (device)."""

    def __init__(self, seed: int, rng=None, generator: Optional[torch.Generator] = None):
        self.seed, self.rng, self.generator = seed, rng, generator


class MemberStreams:
    """Batches for several seeds trained together (``misa-fast train --seeds``) from one copy of
    the data: each ``next`` is one (M, B, ...) batch whose m-th block is the batch member m's single
    run would get (its own index stream: the C++ sampler's RNG seeded as that run's buffer, or the
    device generator seeded as that run's :class:`DeviceSource`). The C++ sampler draws all M
    streams in one call; the device source gathers all M x B rows in one ``index_select``.

    ``member(m)`` is member m's view: its ``state_dict()`` is the one its single run would save
    (so each seed's checkpoint resumes as a single run), and its ``next`` draws from its stream
    alone (SPOT's VAE pretraining)."""

    def __init__(self, kind: str, data: Mapping[str, np.ndarray], batch_size: int, seeds, device,
                 states: Optional[list] = None, _shared=None, _streams=None):
        self.kind, self.batch_size, self.device = kind, int(batch_size), torch.device(device)
        if _shared is not None:
            self._shared, self._streams = _shared, list(_streams)
        elif kind == "prefetch":
            buffer = ReplayBuffer.from_arrays(data, seed=int(seeds[0]))
            self._shared = buffer
            self._streams = []
            for i, seed in enumerate(seeds):
                state = None if states is None else states[i]
                if state is not None:
                    _check_same_rows(buffer, state)
                rng = (np.asarray(state["rng_state"], dtype=np.uint64).copy() if state is not None
                       else ReplayBuffer.seed_state(seed))
                self._streams.append(_Stream(int(seed), rng=rng))
        elif kind == "device":
            fields = fields_of(data)
            columns = [np.asarray(data[f], dtype=np.float32).reshape(len(data["observations"]), -1) for f in fields]
            widths = [c.shape[1] for c in columns]
            self._shared = (torch.from_numpy(np.concatenate(columns, axis=1)).to(self.device), widths, fields)
            self._streams = []
            for i, seed in enumerate(seeds):
                generator = torch.Generator(device=self.device).manual_seed(int(seed))
                state = None if states is None else states[i]
                if state is not None:
                    if state.get("kind") != "device":
                        raise ValueError(f"sampler state is for {state.get('kind')!r}, not 'device'")
                    generator.set_state(state["generator"].cpu())
                self._streams.append(_Stream(int(seed), generator=generator))
        else:
            raise ValueError(f"data source: expected 'prefetch' or 'device', got {kind!r}")
        self._repeat: Optional[Batch] = None
        self.last: Optional[Batch] = None
        self._out = None

    def _empty(self) -> Batch:
        buffer, m, b = self._shared, len(self._streams), self.batch_size
        pin = self.device.type == "cuda"
        return {f: torch.empty((m, b) + ((w,) if (w := field_width(f, buffer.obs_dim, buffer.act_dim)) else ()),
                               pin_memory=pin) for f in FIELDS}

    def __next__(self) -> Batch:
        if self._repeat is not None:
            batch, self._repeat = self._repeat, None
        elif self.kind == "prefetch":
            if self._out is None:
                self._out = self._empty()
            states = np.stack([s.rng for s in self._streams])
            self._shared.sample_streams_into(states, self._out)
            for stream, state in zip(self._streams, states):
                stream.rng = state
            batch = ({f: t.to(self.device, non_blocking=True) for f, t in self._out.items()}
                     if self.device.type == "cuda" else self._out)
        else:
            rows, widths, fields = self._shared
            idx = torch.stack([torch.randint(rows.shape[0], (self.batch_size,), device=self.device,
                                             generator=s.generator) for s in self._streams])
            gathered = rows.index_select(0, idx.reshape(-1)).view(len(self._streams), self.batch_size, -1)
            parts = torch.split(gathered, widths, dim=2)
            batch = {f: (p if f in _WIDE else p.squeeze(2)) for f, p in zip(fields, parts)}
        self.last = batch
        return batch

    def keep(self, indices) -> "MemberStreams":
        """The streams of the members at ``indices`` (the others stopped); their next batch is the
        one the last ``next`` handed out, so a step redone without the stopped members sees the
        batches it saw."""
        kept = MemberStreams(self.kind, None, self.batch_size, None, self.device, _shared=self._shared,
                             _streams=[self._streams[i] for i in indices])
        if self.last is not None:
            index = torch.as_tensor(list(indices), device=self.last["observations"].device)
            kept._repeat = {f: t.index_select(0, index).clone() for f, t in self.last.items()}
        return kept

    def member(self, index: int) -> "_MemberView":
        return _MemberView(self, self._streams[index])

    def state_dict(self) -> dict:
        return {"kind": "members", "members": [self.member(i).state_dict() for i in range(len(self._streams))]}

    def close(self) -> None:
        pass


class _MemberView:
    """One member of :class:`MemberStreams`, with a single run's source interface."""

    def __init__(self, streams: MemberStreams, stream: _Stream):
        self._streams, self._stream = streams, stream
        self._alone: Optional[MemberStreams] = None

    @property
    def kind(self) -> str:
        return self._streams.kind

    def __next__(self) -> Batch:
        if self._alone is None:
            self._alone = MemberStreams(self.kind, None, self._streams.batch_size, None, self._streams.device,
                                        _shared=self._streams._shared, _streams=[self._stream])
        return {f: t[0] for f, t in next(self._alone).items()}

    def state_dict(self) -> dict:
        if self.kind == "device":
            return {"kind": "device", "generator": self._stream.generator.get_state()}
        state = self._streams._shared.state_dict(include_data=False)
        state["rng_state"] = self._stream.rng.copy()
        return {"kind": "prefetch", **state}

    def close(self) -> None:
        pass


def _check_same_rows(buffer: ReplayBuffer, state: Mapping) -> None:
    if state.get("kind", "prefetch") != "prefetch":
        raise ValueError(f"sampler state is for {state.get('kind')!r}, not 'prefetch'")
    current = {"capacity": buffer.capacity, "obs_dim": buffer.obs_dim, "act_dim": buffer.act_dim, "size": len(buffer),
               "position": buffer.position}
    for key, value in current.items():
        if key in state and int(state[key]) != value:
            raise ValueError(f"sampler state: {key} is {state[key]}, the data give {value}")


def make_member_streams(kind: str, data: Mapping[str, np.ndarray], batch_size: int, seeds, device,
                        states: Optional[list] = None) -> MemberStreams:
    """:class:`MemberStreams` for ``seeds``; ``kind`` as :func:`make_source` (states, when given,
    are the members' single-run sampler states and decide the kind)."""
    device = torch.device(device)
    if kind not in SOURCES:
        raise ValueError(f"data source: expected one of {SOURCES}, got {kind!r}")
    if states is not None and states[0] is not None:
        kind = states[0].get("kind", "prefetch")
    kind = _resolve_kind(kind, data, device)
    return MemberStreams(kind, data, batch_size, seeds, device, states)


def make_source(kind: str, data: Mapping[str, np.ndarray], batch_size: int, seed: int, device,
                state: Optional[dict] = None):
    """``kind``: "prefetch", "device", or "auto" (device-resident on CUDA, prefetcher on CPU; on a
    CPU the dataset is already in host memory and the prefetcher overlaps the gather with the step)."""
    device = torch.device(device)
    if kind not in SOURCES:
        raise ValueError(f"data source: expected one of {SOURCES}, got {kind!r}")
    if state is not None:
        kind = state.get("kind", kind)
    kind = _resolve_kind(kind, data, device)
    if kind == "device":
        return DeviceSource(data, batch_size, seed, device, state)
    state = None if state is None else {k: v for k, v in state.items() if k != "kind"}
    return PrefetchSource(data, batch_size, seed, device, state)


def _resolve_kind(kind: str, data: Mapping[str, np.ndarray], device: torch.device) -> str:
    """"auto" -> device-resident on CUDA or when the data holds an extra field, else the prefetcher;
    the prefetcher asked for data with an extra field is refused (it would drop that field)."""
    extra = [f for f in EXTRA_FIELDS if f in data]
    if kind == "auto":
        return "device" if device.type == "cuda" or extra else "prefetch"
    if kind == "prefetch" and extra:
        raise ValueError(f"--data-source prefetch: the C++ buffer holds the five transition fields, and this "
                         f"algorithm also reads {', '.join(extra)}; use --data-source device (or auto)")
    return kind
