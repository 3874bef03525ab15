"""log_mean_exp: the Triton kernels (interpreter on CPU) against the torch reference.

Every test draws fresh random shapes/values from its own seed. The triton backend is selected per
call (``backend="triton"``); on a CPU-only machine the root conftest has set TRITON_INTERPRET=1.
"""
import math

import pytest
import torch

from misa_fast.ops import LogMeanExp, log_mean_exp, log_mean_exp_reference, use_backend
from misa_fast.ops.dispatch import ENV_VAR, interpreter_enabled, resolve_backend
from misa_fast.ops.testing import kernel_device

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

# Forced-Triton calls need tensors where the kernels run: CUDA on a GPU host (compiled kernels,
# no interpreter), the CPU under TRITON_INTERPRET=1 (see misa_fast.ops.testing).
needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"


def _expected(x, dim, keepdim=False):
    return torch.logsumexp(x.double(), dim, keepdim) - math.log(x.shape[dim])


def _check(x, dim=-1, keepdim=False, atol=1e-5, rtol=1e-5):
    """Forward and gradient of the triton path vs the reference (and torch.logsumexp)."""
    xt = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yt = log_mean_exp(xt, dim, keepdim, backend="triton")
    yr = log_mean_exp_reference(xr, dim, keepdim)
    assert yt.shape == yr.shape and yt.dtype == x.dtype
    torch.testing.assert_close(yt.float(), yr.float(), atol=atol, rtol=rtol)
    expected = _expected(x.detach(), dim, keepdim).to(x.dtype).double()
    torch.testing.assert_close(yt.double(), expected, atol=atol, rtol=rtol)
    g = torch.randn_like(yr)
    (yt * g).sum().backward()
    (yr * g).sum().backward()
    assert xt.grad.dtype == x.dtype
    torch.testing.assert_close(xt.grad.float(), xr.grad.float(), atol=atol, rtol=rtol)
    # the gradient is the softmax along dim times the upstream gradient (0 on all -inf rows)
    gk = g if keepdim else g.unsqueeze(dim)
    soft = torch.softmax(x.detach().double(), dim).nan_to_num(0.0)
    torch.testing.assert_close(xt.grad.double(), (soft * gk.double()).to(x.dtype).double(), atol=atol, rtol=rtol)
    return yt


@needs_kernels
@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_fp32(seed):
    g = torch.Generator().manual_seed(seed)
    nd = int(torch.randint(1, 4, (1,), generator=g))
    shape = [int(torch.randint(1, 9, (1,), generator=g)) for _ in range(nd)]
    dim = int(torch.randint(-nd, nd, (1,), generator=g))
    shape[dim] = int(torch.randint(1, 130, (1,), generator=g))  # non powers of two, K=1 possible
    keepdim = bool(seed % 2)
    torch.manual_seed(seed)
    x = (torch.randn(shape) * 3 + 2).to(DEV)
    _check(x, dim, keepdim)


@needs_kernels
@pytest.mark.parametrize("K", [1, 2, 50, 127, 1024, 1500])
def test_k_sizes(K):
    torch.manual_seed(K)
    x = (torch.randn(3, K) * 5).to(DEV)
    _check(x)


@needs_kernels
def test_k_loop_over_blocks():
    """K larger than the K tile: the online max/sum runs over several blocks."""
    from misa_fast.kernels import log_mean_exp_kernels as k

    torch.manual_seed(1)
    # increasing rows so that the max moves to later blocks; one row with its max in block 0
    x = torch.cat([torch.linspace(-20, 30, 100).expand(3, 100), torch.linspace(30, -20, 100)[None]]).to(DEV)
    x = x + torch.randn_like(x)
    out, lse = k.log_mean_exp_fwd(x, block_k=16)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double(), -1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.double(), torch.logsumexp(x.double(), -1) - math.log(100), atol=1e-5, rtol=1e-6)
    gr = torch.randn(4, device=DEV)
    dx = k.log_mean_exp_bwd(x, lse, gr, block_k=16)
    torch.testing.assert_close(dx, torch.softmax(x, -1) * gr[:, None], atol=1e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    torch.manual_seed(7)
    x = (torch.randn(6, 50) * 4).to(dtype).to(DEV)
    y = _check(x, atol=2e-2, rtol=1e-2)
    # fp32 accumulation: the fp32 result of the same (rounded) inputs, within one output ulp
    # (the interpreter's float->bf16 cast may truncate instead of rounding to nearest)
    ref32 = torch.logsumexp(x.float(), -1) - math.log(50)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((y.float() - ref32).abs() <= ulp * ref32.abs().clamp_min(1.0)).all()


@needs_kernels
def test_neg_inf_rows_and_entries():
    torch.manual_seed(3)
    x = torch.randn(5, 40).to(DEV)
    x[1] = -math.inf  # a whole row
    x[3, ::3] = -math.inf  # some entries
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        y = log_mean_exp(xx, backend=backend)
        assert y[1].item() == -math.inf and torch.isfinite(y[[0, 2, 3, 4]]).all()
        y.sum().backward()
        assert not torch.isnan(xx.grad).any(), backend
        assert (xx.grad[1] == 0).all() and (xx.grad[3, ::3] == 0).all()
        torch.testing.assert_close(xx.grad[3].sum(), torch.tensor(1.0, device=DEV))
    _check(x)  # and equal to the reference everywhere else


@needs_kernels
def test_all_neg_inf_bf16_and_k1():
    x = torch.full((2, 1), -math.inf, dtype=torch.bfloat16, device=DEV).requires_grad_()
    y = log_mean_exp(x, backend="triton")
    assert torch.isneginf(y).all()
    y.sum().backward()
    assert (x.grad == 0).all()


@needs_kernels
def test_pos_inf_and_nan():
    x = torch.tensor([[0.0, math.inf, 1.0], [0.0, math.nan, 1.0], [1.0, 2.0, 3.0]], device=DEV)
    yt = log_mean_exp(x, backend="triton")
    yr = log_mean_exp_reference(x)
    assert yt[0].item() == math.inf and yr[0].item() == math.inf
    assert math.isnan(yt[1].item()) and math.isnan(yr[1].item())
    torch.testing.assert_close(yt[2], yr[2])


@needs_kernels
def test_non_contiguous_and_middle_dim():
    torch.manual_seed(11)
    base = torch.randn(7, 33, 5).to(DEV)
    _check(base.transpose(0, 2), dim=1)  # non-contiguous, dim in the middle
    _check(base[:, ::2, :], dim=0, keepdim=True)
    _check(base, dim=1)


def test_dispatch_selection(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, x) == "torch"  # auto on CPU
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, x) == "torch"
    with use_backend("auto"):
        assert resolve_backend(None, x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        resolve_backend(None, x)
    if interpreter_enabled():
        monkeypatch.setenv(ENV_VAR, "triton")
        assert resolve_backend(None, x) == "triton"
        with use_backend("torch"):
            assert resolve_backend(None, x) == "torch"
            assert resolve_backend("triton", x) == "triton"  # the argument wins


@needs_kernels
def test_env_var_and_context_pick_the_kernel(monkeypatch):
    kernel = "misa_fast_log_mean_exp"  # the backward node of the registered operator

    x = torch.randn(4, 9, device=DEV, requires_grad=True)
    monkeypatch.setenv(ENV_VAR, "triton")
    assert kernel in type(log_mean_exp(x).grad_fn).__name__
    monkeypatch.setenv(ENV_VAR, "torch")
    assert kernel not in type(log_mean_exp(x).grad_fn).__name__
    with use_backend("triton"):
        assert kernel in type(log_mean_exp(x).grad_fn).__name__


def test_module_and_reference_on_cpu():
    torch.manual_seed(5)
    x = torch.randn(4, 6, 10)
    m = LogMeanExp(dim=1, keepdim=True, backend="torch")
    torch.testing.assert_close(m(x), torch.logsumexp(x, 1, True) - math.log(6))
    torch.testing.assert_close(log_mean_exp(x.double(), 2), torch.logsumexp(x.double(), 2) - math.log(10))
    with pytest.raises(ValueError):
        log_mean_exp(torch.randn(3, 0))
    with pytest.raises(ValueError):
        log_mean_exp(torch.tensor(1.0))


@pytest.mark.gpu
def test_cuda_large():
    torch.manual_seed(0)
    for M, K in ((256, 50), (4096, 1024), (1000, 5000)):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(M, K, device="cuda") * 4).to(dtype)
            tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
            _check(x, **tol)
