"""D4RL's normalized score: 100 * (R - ref_min) / (ref_max - ref_min), 0 = random, 100 = expert."""
from __future__ import annotations

import numpy as np

from misa_fast.data import registry


def reference_returns(name: str) -> tuple[float, float]:
    """(ref_min, ref_max) for a dataset name or gymnasium id; KeyError when there is none."""
    domain = registry.domain_of(name)
    if domain.ref_min is None or domain.ref_max is None:
        raise KeyError(f"no reference returns for {name!r} (domain {domain.name!r})")
    return domain.ref_min, domain.ref_max


def normalized_score(name: str, returns):
    """Normalized score(s) of raw episode return(s) ``returns`` (a number or an array-like;
    the result has the same shape) on the domain of ``name`` (``hopper-medium-v2``, ``Hopper-v4``)."""
    return scale_to_reference(returns, *reference_returns(name))


def scale_to_reference(returns, ref_min: float, ref_max: float):
    """100 * (R - ref_min) / (ref_max - ref_min), for given reference returns (e.g. a Minari
    dataset's ``ref_min_score`` / ``ref_max_score``: Minari's get_normalized_score times 100)."""
    scores = 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(scores) if scores.ndim == 0 else scores
