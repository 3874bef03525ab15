"""misa-fast: Mutual Information Regularized Offline RL (MISA) in PyTorch, Triton and C++."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ReplayBuffer", "Prefetcher", "__version__"]


def __getattr__(name: str):
    # Lazy so that pure-Python submodules (data, nets, ops) import without touching the extension.
    if name in ("ReplayBuffer", "Prefetcher"):
        from misa_fast.replay import buffer

        return getattr(buffer, name)
    raise AttributeError(f"module 'misa_fast' has no attribute {name!r}")
