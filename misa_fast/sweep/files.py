"""The files of a sweep directory, shared by the sweep's command line and its Ray side."""
from __future__ import annotations

import json
from pathlib import Path

from misa_fast.training.checkpoint import write_atomic

SWEEP_FILE = "sweep.json"  # the sweep's plan, in its directory
TRIAL_FILE = "trial.json"  # in each run directory (misa_fast.sweep.ray_tune writes it)
STATUS_FILE = "sweep-status.json"  # in the sweep directory, after each driver run


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON, written atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(value, indent=2, default=str).encode()))


def experiment_path(sweep: dict) -> str:
    """Where Ray Tune keeps the sweep's experiment state."""
    return sweep["storage"].rstrip("/") + "/" + sweep["name"]
