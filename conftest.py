"""Test configuration. Without a CUDA device, Triton kernels run in the interpreter: the variable
must be set before any kernel module is imported (kernels are decorated at import time)."""
import os

# Tests use tiny networks, where intra-op threads only add barrier waits (and on a busy 2-core
# machine, OpenMP's spinning barriers can slow a step 100x). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    if importlib.util.find_spec("misa_fast") is None:
        pytest.exit("misa_fast is not installed: `bash scripts/test.sh` installs it and runs the tests",
                    returncode=4)
    from misa_fast.replay._native import load_extension

    try:
        load_extension()
    except ImportError as err:
        pytest.exit(f"{err} (`bash scripts/test.sh` installs the package and runs the tests from the "
                    "installed copy)", returncode=4)


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
