"""Checkpoints that survive a kill at any moment, and a policy export that runs without misa-fast.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the previous one, so the file on disk is always either the old or the new complete checkpoint.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

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


def save_atomic(state: dict, path: os.PathLike) -> Path:
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable misa-fast checkpoint ({err})") from err


def rng_state() -> dict:
    """Every global generator a training step might touch."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
