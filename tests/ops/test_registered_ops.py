"""The fused ops as registered operators (``torch.ops.misa_fast``): ``torch.library.opcheck`` of
each (the kernels in the interpreter on CPU, the torch reference where no kernel runs), and a CQL
critic loss through ``torch.compile(fullgraph=True)`` and ``torch.export`` giving the eager numbers.

Sizes are tiny: under the interpreter every call runs a handful of program instances.
"""
import math

import pytest
import torch
from torch import nn

import misa_fast.ops.dispatch as dispatch
from misa_fast.nets import StackedLayers
from misa_fast.ops import log_mean_exp, sampled_q_log_mean_exp, sampled_q_log_mean_exp_reference, use_backend
from misa_fast.ops.testing import kernel_device

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"
OPS = torch.ops.misa_fast


@pytest.fixture(params=["kernel", "reference"])
def where(request, monkeypatch):
    """Each operator twice: its Triton kernel (interpreter or CUDA), and its torch reference (what
    it computes where no kernel runs, e.g. on a CPU without the interpreter)."""
    if request.param == "kernel":
        if kernel_device() is None:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        return DEV
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    return "cpu"


def critic(S, A, hidden=(8, 8), activation=nn.ELU, seed=0):
    torch.manual_seed(seed)
    dims = [S + A, *hidden]
    layers = []
    for i, o in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(i, o), activation()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], 1))


def flat_inputs(device, M=1, E=2, B=3, K=4, S=3, A=2, hidden=(8, 8), log_weights=True, bias=True):
    """Member-stacked operands of torch.ops.misa_fast.sampled_q_log_mean_exp."""
    g = torch.Generator().manual_seed(M * 100 + E)
    dims = [S + A, *hidden, 1]
    weights = [(torch.randn(M, E, o, i, generator=g) / math.sqrt(i)).to(device).requires_grad_()
               for i, o in zip(dims[:-1], dims[1:])]
    biases = [(0.1 * torch.randn(M, E, o, generator=g)).to(device).requires_grad_() if bias else None
              for o in dims[1:]]
    obs = torch.randn(M, B, S, generator=g).to(device).requires_grad_()
    actions = torch.rand(M, B, K, A, generator=g).mul(2).sub(1).to(device).requires_grad_()
    lw = torch.randn(M, B, K, generator=g).to(device).requires_grad_() if log_weights else None
    return obs, actions, lw, weights, biases


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,keepdim", [(1, False), (-1, True)])
def test_opcheck_log_mean_exp(where, dim, keepdim):
    x = torch.randn(3, 5, 4, device=where, requires_grad=True)
    torch.library.opcheck(OPS.log_mean_exp.default, (x, dim, keepdim))


@pytest.mark.parametrize("log_weights,bias", [(True, True), (False, False)])
def test_opcheck_sampled_q(where, log_weights, bias):
    obs, actions, lw, weights, biases = flat_inputs(where, log_weights=log_weights, bias=bias)
    args = (obs, actions, lw, weights, biases, math.log(4), 0.7, "elu", 1.0, "ieee", None)
    torch.library.opcheck(OPS.sampled_q_log_mean_exp.default, args)


def test_opcheck_sampled_q_two_members_leaky_relu(where):
    obs, actions, lw, weights, biases = flat_inputs(where, M=2, E=1, hidden=(8,))
    args = (obs, actions, lw, weights, biases, 0.0, 1.0, "leaky_relu", 0.2, "ieee", None)
    torch.library.opcheck(OPS.sampled_q_log_mean_exp.default, args)


def test_reference_operator_matches_the_public_reference(monkeypatch):
    """Where no kernel runs, the operator computes what sampled_q_log_mean_exp_reference computes."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    obs, actions, lw, weights, biases = flat_inputs("cpu", M=1, E=2)
    out, q, _ = OPS.sampled_q_log_mean_exp(obs, actions, lw, weights, biases, 0.0, 1.0, "elu", 1.0, "ieee", None)
    layers = StackedLayers([(w[0], b[0]) for w, b in zip(weights, biases)], "elu")
    ref, ref_q = sampled_q_log_mean_exp_reference(obs[0], actions[0], layers, lw[0], normalizer="none",
                                                  return_q=True)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(q[0], ref_q)
    grads = torch.autograd.grad(out.sum(), [obs, lw, *weights])
    ref_grads = torch.autograd.grad(ref.sum(), [obs, lw, *weights])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_double_backward_raises_clearly(where):
    obs, actions, lw, weights, biases = flat_inputs(where, E=1)
    out = OPS.sampled_q_log_mean_exp(obs, actions, lw, weights, biases, 0.0, 1.0, "elu", 1.0, "ieee", None)[0]
    g = torch.autograd.grad(out.sum(), weights[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.sum(), weights[0])
