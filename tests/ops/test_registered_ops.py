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


def hmc_operands(M=None, B=2, S=3, A=2, H=8, E=2, T=3, seed_noise=False):
    """Operands of torch.ops.misa_fast.hmc_chains: B chains over T transitions (one leapfrog step),
    two hidden layers; a leading member dimension M when given."""
    g = torch.Generator().manual_seed(5)
    lead = () if M is None else (M,)

    def rand(*shape, scale=1.0):
        return (torch.randn(*lead, *shape, generator=g) * scale).to(DEV)

    weights = [rand(E, H, S + A, scale=0.5), rand(E, H, H, scale=0.3), rand(E, 1, H, scale=0.3)]
    biases = [rand(E, H, scale=0.1), rand(E, H, scale=0.1), rand(E, 1, scale=0.1)]
    mean, std = rand(B, A, scale=0.3), rand(B, A).abs().add(0.2)
    init = rand(B, A, scale=0.3).clamp(-0.9, 0.9)
    state_half = rand(E, B, H, scale=0.5)
    step = torch.full((*lead, B), 0.2, device=DEV)
    if seed_noise:
        noise = (None, None, torch.tensor([7], dtype=torch.int64, device=DEV))
    else:
        noise = (rand(T, B, A), torch.rand(*lead, T, B, generator=g).to(DEV), None)
    tensors = (mean, std, init, state_half, step, *noise, weights, biases)
    options = (T, 1, 1, 1, 1, 0.65, 0.5, 0.999, "ieee", False, 2.0, "elu", 1.0)
    return tensors, options


@needs_kernels
@pytest.mark.parametrize("members,seed_noise", [(None, False), (2, True)])
def test_opcheck_hmc_chains(members, seed_noise):
    tensors, options = hmc_operands(M=members, seed_noise=seed_noise)
    torch.library.opcheck(OPS.hmc_chains.default, (*tensors, *options))


@needs_kernels
def test_hmc_chains_vmap_rule_is_one_launch_equal_to_each_member(monkeypatch):
    from misa_fast.kernels import hmc_kernels as hk

    tensors, options = hmc_operands(M=3)
    launches = []
    real = hk.hmc_chains
    monkeypatch.setattr(hk, "hmc_chains", lambda *a, **k: launches.append(a[0].shape) or real(*a, **k))
    without_seed = tensors[:7] + tensors[8:]
    mapped = torch.func.vmap(lambda *t: OPS.hmc_chains(*t[:7], None, list(t[7]), list(t[8]), *options))(*without_seed)
    assert len(launches) == 1
    for m in range(3):
        single = OPS.hmc_chains(*[t[m] for t in tensors[:5]], *[t[m] for t in tensors[5:7]], None,
                                [w[m] for w in tensors[8]], [b[m] for b in tensors[9]], *options)
        for got, want in zip(mapped, single):
            assert torch.equal(got[m], want)


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
    with pytest.raises(RuntimeError, match="second-order|no autograd formula"):
        torch.autograd.grad(g.sum(), weights[0])


# ----------------------------------------------------------------------------------------------
# torch.compile and torch.export of a CQL critic loss
# ----------------------------------------------------------------------------------------------
S, A, B, K = 3, 2, 3, 4


class CQLCriticLoss(nn.Module):
    """TD error plus CQL(H)'s importance-sampled log-sum-exp minus the data actions' Q, on an
    nn.Sequential critic."""

    def __init__(self, backend):
        super().__init__()
        self.q1 = critic(S, A, activation=nn.ReLU)
        self.backend = backend

    def forward(self, obs, act, sampled, log_w, target):
        lse = sampled_q_log_mean_exp(obs, sampled, [self.q1], log_w, normalizer="none", temperature=0.5,
                                     backend=self.backend)
        q_data = self.q1(torch.cat([obs, act], -1)).squeeze(-1)
        return ((q_data - target) ** 2).mean() + (lse[0] - q_data).mean()


def loss_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, S, generator=g), torch.rand(B, A, generator=g) * 2 - 1,
            torch.rand(B, K, A, generator=g) * 2 - 1, torch.randn(B, K, generator=g), torch.randn(B, generator=g))


def backends():
    return [pytest.param("triton", marks=needs_kernels), "torch"]


def operator_calls(graph):
    return [n.target for n in graph.nodes if "misa_fast" in str(n.target)]


@pytest.mark.parametrize("backend", backends())
def test_compiled_cql_loss_has_no_graph_break_and_the_eager_numbers(backend):
    """fullgraph=True: one graph, the registered operator in it where the kernel runs (plain torch
    on the torch path); aot_eager runs the operator's fake implementation and its autograd."""
    loss = CQLCriticLoss(backend).to(DEV if backend == "triton" else "cpu")
    inputs = [t.to(next(loss.parameters()).device) for t in loss_inputs()]
    eager = loss(*inputs)  # the critic reader checks a module once, eagerly, against its own forward
    eager_grads = torch.autograd.grad(eager, list(loss.parameters()))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=capture)
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, list(loss.parameters()))
    torch._dynamo.reset()
    assert len(graphs) == 1
    expected = [OPS.sampled_q_log_mean_exp.default] if backend == "triton" else []
    assert operator_calls(graphs[0].graph) == expected
    torch.testing.assert_close(value, eager, rtol=0, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_inductor_compiled_cql_loss_gives_the_eager_numbers(backend):
    loss = CQLCriticLoss(backend).to(DEV if backend == "triton" else "cpu")
    inputs = [t.to(next(loss.parameters()).device) for t in loss_inputs()]
    eager = loss(*inputs)
    eager_grads = torch.autograd.grad(eager, list(loss.parameters()))
    torch._dynamo.reset()
    value = torch.compile(loss, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(value, list(loss.parameters()))
    torch._dynamo.reset()
    torch.testing.assert_close(value, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_exported_cql_loss_gives_the_eager_numbers(backend, strict):
    loss = CQLCriticLoss(backend).to(DEV if backend == "triton" else "cpu")
    inputs = tuple(t.to(next(loss.parameters()).device) for t in loss_inputs())
    eager = loss(*inputs)  # the critic reader's one eager check, before tracing
    program = torch.export.export(loss, inputs, strict=strict)
    expected = [OPS.sampled_q_log_mean_exp.default] if backend == "triton" else []
    assert operator_calls(program.graph) == expected
    torch.testing.assert_close(program.module()(*inputs), eager, rtol=0, atol=0)


@needs_kernels
def test_compiled_log_mean_exp_is_the_operator():
    x = torch.randn(4, 6, device=DEV, requires_grad=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    with use_backend("triton"):
        value = torch.compile(lambda t: log_mean_exp(t, -1).sum(), fullgraph=True, backend=capture)(x)
        eager = log_mean_exp(x, -1).sum()
    torch._dynamo.reset()
    assert operator_calls(graphs[0].graph) == [OPS.log_mean_exp.default]
    torch.testing.assert_close(value, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(eager, x)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the sampled-Q operator under the several-seeds vmap
# ----------------------------------------------------------------------------------------------
def member_critics(M, E=2, S=3, A=2, hidden=(8, 8)):
    g = torch.Generator().manual_seed(11)
    dims = [S + A, *hidden, 1]
    weights = [(torch.randn(M, E, o, i, generator=g) / math.sqrt(i)).to(DEV).requires_grad_()
               for i, o in zip(dims[:-1], dims[1:])]
    biases = [(0.1 * torch.randn(M, E, o, generator=g)).to(DEV).requires_grad_() for o in dims[1:]]
    return weights, biases


@needs_kernels
@pytest.mark.parametrize("shared_log_weights", [False, True])
def test_sampled_q_under_member_vmap_is_one_call_equal_to_each_members_run(monkeypatch, shared_log_weights):
    """Inside misa_fast.agents.members' vmap the log-partition is one operator call for all members
    (the kernel, not the torch reference: a launch per critic, as one run makes), and each member's
    value and gradients are those of its own single run, bitwise."""
    from misa_fast.ops import sampled_q as sq
    from misa_fast.ops.dispatch import member_map

    M, B, K, S, A = 3, 3, 4, 3, 2
    weights, biases = member_critics(M)
    g = torch.Generator().manual_seed(12)
    obs = torch.randn(M, B, S, generator=g).to(DEV)
    sampled = (torch.rand(M, B, K, A, generator=g) * 2 - 1).to(DEV)
    log_w = torch.randn(B, K, generator=g).to(DEV) if shared_log_weights else torch.randn(M, B, K, generator=g).to(DEV)

    def one_member(w0, b0, w1, b1, w2, b2, o, a, lw):
        layers = StackedLayers([(w0, b0), (w1, b1), (w2, b2)], "elu")
        return sampled_q_log_mean_exp(o, a, layers, lw, normalizer="none", temperature=0.7, precision="ieee")

    from misa_fast.kernels import sampled_q_kernels as k

    calls, launches = [], []
    real_forward, real_launch = sq._kernel_forward, k.sampled_q_fwd
    monkeypatch.setattr(sq, "_kernel_forward", lambda *a: calls.append(a[3][0].shape[0]) or real_forward(*a))
    monkeypatch.setattr(k, "sampled_q_fwd", lambda *a, **kw: launches.append(a[0].shape[0]) or real_launch(*a, **kw))
    layer_args = [t for wb in zip(weights, biases) for t in wb]
    with use_backend("triton"), member_map():
        mapped = torch.func.vmap(one_member, in_dims=(0,) * 8 + (None if shared_log_weights else 0,))(
            *layer_args, obs, sampled, log_w)
    assert calls == [M]  # one call, every member
    assert launches == [M, M]  # one launch per critic (E = 2), every member in it
    mapped_grads = torch.autograd.grad(mapped.sum(), layer_args)
    for m in range(M):
        member = [t[m].detach().requires_grad_() for t in layer_args]
        with use_backend("triton"):
            single = one_member(*member, obs[m], sampled[m], log_w if shared_log_weights else log_w[m])
        assert torch.equal(mapped[m], single)
        for got, want in zip(mapped_grads, torch.autograd.grad(single.sum(), member)):
            assert torch.equal(got[m], want)
