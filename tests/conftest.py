"""Fixtures shared by the tests. (The root conftest.py decides, before any kernel is imported,
whether Triton kernels run in the interpreter: only without a CUDA device.)"""
import pytest


@pytest.fixture
def kernel_device() -> str:
    """Where a test that forces the Triton backend must put its tensors: "cuda" on a CUDA host
    (compiled kernels; there the interpreter is off and CPU tensors would make the dispatcher
    raise), "cpu" under the interpreter. Skips when neither is available."""
    # Imported here, not at the top: conftests load before the root conftest can say that the
    # package is not installed.
    from misa_fast.ops.testing import kernel_device as where_kernels_run

    device = where_kernels_run()
    if device is None:
        pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    return device
