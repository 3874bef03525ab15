"""Fused sampled-Q log-mean-exp: the Triton kernels (interpreter on CPU) against the torch reference,
and the reference against a naive concat-MLP + torch.logsumexp formulation.

Shapes are small (B <= 5 states) so that the interpreter runs few program instances.
"""
import math

import pytest
import torch
from torch import nn

from misa_fast.nets import StackedLayers
from misa_fast.ops import (
    SampledQLogMeanExp,
    critic_layers,
    sampled_q_log_mean_exp,
    sampled_q_log_mean_exp_reference,
    use_backend,
)
from misa_fast.ops.testing import dot_tolerance, kernel_device

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

# Forced-Triton calls need tensors where the kernels run: CUDA on a GPU host (compiled kernels,
# no interpreter), the CPU under TRITON_INTERPRET=1 (see misa_fast.ops.testing).
needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_critic(S, A, hidden, bias=True, scale=1.0, device=DEV, activation="elu"):
    """(weight, bias) leaves, nn.Linear-like init (scaled so that Q varies by a few units), carrying
    their activation (``StackedLayers``: plain tensors alone are refused)."""
    dims = [S + A, *hidden, 1]
    layers = []
    for i, o in zip(dims[:-1], dims[1:]):
        bound = scale / math.sqrt(i)
        w = ((torch.rand(o, i) * 2 - 1) * bound * 1.7).to(device).requires_grad_()
        b = ((torch.rand(o) * 2 - 1) * 0.3).to(device).requires_grad_() if bias else None
        layers.append((w, b))
    return StackedLayers(layers, activation)


def naive_sampled_q_lse(obs, actions, critics, log_weights=None, norm=None):
    """concat(s, a) through each MLP, then torch.logsumexp - the textbook formulation."""
    B, K, _ = actions.shape
    x = torch.cat([obs.unsqueeze(1).expand(B, K, obs.shape[1]), actions], -1)
    outs = []
    for layers in critics:
        h = x
        for w, b in layers[:-1]:
            h = torch.nn.functional.elu(torch.nn.functional.linear(h, w, b))
        q = torch.nn.functional.linear(h, *layers[-1]).squeeze(-1)
        if log_weights is not None:
            q = q + log_weights
        outs.append(torch.logsumexp(q, -1) - (math.log(K) if norm is None else norm))
    return torch.stack(outs)


def params_of(critics):
    return [t for c in critics for wb in c for t in wb if t is not None]


# What the interpreter (fp32 dots in numpy, another summation order) has always been held to; on a
# GPU the tolerance grows with the precision's rounding (misa_fast.ops.testing.dot_tolerance).
INTERPRETER_TOL = 2e-4


def compare_tolerances(obs, actions, critics, precision):
    """(forward, gradient) tolerances for ``precision`` at this problem's sizes: the forward chains
    the critic's Linear layers, reducing over at most the widest layer input; a gradient recomputes
    the forward and runs the backward (twice the layers), and a weight gradient reduces over the
    B*K samples."""
    layers = critics[0]
    widest = max(w.shape[-1] for w, _ in layers)
    samples = actions.shape[0] * actions.shape[1]
    forward = dot_tolerance(precision, reduction=widest, depth=len(layers), floor=INTERPRETER_TOL)
    backward = dot_tolerance(precision, reduction=max(widest, samples), depth=2 * len(layers), floor=INTERPRETER_TOL)
    return forward, backward


def compare(obs, actions, critics, log_weights=None, normalizer="k", precision="ieee", groups=None):
    """Forward and all gradients, triton vs reference, with a random upstream gradient, within the
    tolerances the dot precision allows (``compare_tolerances``)."""
    forward_tol, grad_tol = compare_tolerances(obs, actions, critics, precision)
    out_t, q_t = sampled_q_log_mean_exp(obs, actions, critics, log_weights, normalizer, return_q=True,
                                        precision=precision, backend="triton", groups=groups)
    out_r, q_r = sampled_q_log_mean_exp_reference(obs, actions, critics, log_weights, normalizer, return_q=True)
    assert out_t.shape == out_r.shape == (len(critics), obs.shape[0]) and out_t.dtype == torch.float32
    assert q_t.shape == q_r.shape == (len(critics), *actions.shape[:2])
    torch.testing.assert_close(q_t, q_r, **forward_tol)
    torch.testing.assert_close(out_t, out_r, **forward_tol)
    wrt = params_of(critics)
    extra = [t for t in (obs, actions, log_weights) if t is not None and t.requires_grad]
    wrt = wrt + extra
    g = torch.randn_like(out_r)
    grads_t = torch.autograd.grad((out_t * g).sum(), wrt, allow_unused=True)
    grads_r = torch.autograd.grad((out_r * g).sum(), wrt, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads_t, grads_r)):
        assert a is not None and b is not None, i
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **grad_tol, msg=f"gradient {i} {tuple(b.shape)}")
    return out_t, grads_t


def inputs(B, K, S, A, grad=False):
    obs = (torch.randn(B, S) * 1.5).to(DEV)
    actions = (torch.rand(B, K, A) * 2 - 1).to(DEV)
    if grad:
        obs.requires_grad_()
        actions.requires_grad_()
    return obs, actions


# ----------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [(16,), (24, 20), (16, 16, 16)])
def test_reference_matches_naive_formulation(hidden):
    torch.manual_seed(len(hidden))
    obs, actions = inputs(3, 7, 5, 2, grad=True)
    critics = [make_critic(5, 2, hidden, device="cpu") for _ in range(2)]
    lw = torch.randn(3, 7, requires_grad=True)
    for normalizer, norm in (("k", None), ("none", 0.0), ("batch", math.log(3)), (1.25, 1.25)):
        ref = sampled_q_log_mean_exp_reference(obs.cpu(), actions.cpu(), critics, lw, normalizer)
        naive = naive_sampled_q_lse(obs.cpu(), actions.cpu(), critics, lw, norm)
        torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)
    wrt = params_of(critics) + [lw]
    ga = torch.autograd.grad(ref.sum(), wrt)
    gb = torch.autograd.grad(naive.sum(), wrt)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# triton vs reference
# ----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize(
    "B,K,S,A,hidden",
    [
        (3, 50, 11, 3, (64, 64)),  # MISA-like (hopper dims), small hidden
        (2, 50, 17, 6, (256, 256)),  # MISA default widths (halfcheetah dims)
        (2, 1, 4, 1, (64, 64)),  # K = 1, A = 1
        (3, 13, 9, 8, (96, 80)),  # non powers of two everywhere, A = 8
        (2, 70, 5, 2, (128, 64)),  # K over two blocks
        (2, 20, 6, 5, (64,)),  # one hidden layer
    ],
)
def test_forward_and_grads(B, K, S, A, hidden):
    torch.manual_seed(B * 1000 + K * 10 + A)
    obs, actions = inputs(B, K, S, A)
    critics = [make_critic(S, A, hidden) for _ in range(2)]
    compare(obs, actions, critics)


@needs_kernels
@pytest.mark.parametrize("A", [1, 2, 4, 7, 8])
def test_action_dims(A):
    torch.manual_seed(100 + A)
    obs, actions = inputs(2, 9, 3, A)
    compare(obs, actions, [make_critic(3, A, (32, 48))])


@needs_kernels
def test_wide_observation_and_adroit_actions():
    """S over several state chunks, A = 30 (the largest action dim in D4RL adroit)."""
    torch.manual_seed(7)
    obs, actions = inputs(2, 6, 45, 30)
    compare(obs, actions, [make_critic(45, 30, (64, 64))])


@needs_kernels
def test_groups_with_several_states_per_program():
    """Backward programs loop over several states (uneven split): register accumulation across
    states and the private read-modify-write of the state half of dW0."""
    torch.manual_seed(3)
    obs, actions = inputs(5, 11, 7, 3)
    critics = [make_critic(7, 3, (32, 32)) for _ in range(2)]
    torch.manual_seed(4)  # same upstream gradient for both calls
    _, g2 = compare(obs, actions, critics, groups=2)
    torch.manual_seed(4)
    _, g5 = compare(obs, actions, critics, groups=5)
    for a, b in zip(g2, g5):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_log_weights_normalizers_and_input_grads():
    """CQL-style importance weights (differentiable here to test that path), all normalizers,
    gradients w.r.t. obs and actions (accumulated over critics)."""
    torch.manual_seed(11)
    B, K, S, A = 3, 12, 6, 3
    obs, actions = inputs(B, K, S, A, grad=True)
    critics = [make_critic(S, A, (32, 32)) for _ in range(2)]
    lw = torch.randn(B, K, device=DEV).requires_grad_()
    compare(obs, actions, critics, lw, "none")
    compare(obs, actions, critics, lw, "batch")
    lw1 = torch.randn(K, device=DEV).requires_grad_()  # broadcast (K,) weights
    compare(obs, actions, critics, lw1, 0.5)


@needs_kernels
def test_cql_importance_sampled_logsumexp():
    """CQL(H): log-sum-exp over uniform + policy proposals with -log density weights equals the
    concatenated textbook formula."""
    torch.manual_seed(12)
    B, S, A, n = 3, 5, 2, 6
    obs = torch.randn(B, S, device=DEV)
    a_rand = torch.rand(B, n, A, device=DEV) * 2 - 1
    a_pi = torch.tanh(torch.randn(B, n, A, device=DEV))
    logp_pi = torch.randn(B, n, device=DEV) - 1.0
    critics = [make_critic(S, A, (32, 32)) for _ in range(2)]
    actions = torch.cat([a_rand, a_pi], 1)
    log_w = torch.cat([torch.full((B, n), A * math.log(2.0), device=DEV), -logp_pi], 1)  # -log q(a)
    out = sampled_q_log_mean_exp(obs, actions, critics, log_w, "none", backend="triton", precision="ieee")
    expected = naive_sampled_q_lse(obs, actions, critics, log_w, 0.0)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)


@needs_kernels
def test_neg_inf_log_weights():
    """A state whose samples are all masked (-inf weights) gives -inf and zero gradients; masked
    samples of other states get no gradient."""
    torch.manual_seed(13)
    obs, actions = inputs(3, 10, 4, 2, grad=True)
    critics = [make_critic(4, 2, (32, 32))]
    lw = torch.zeros(3, 10, device=DEV)
    lw[1] = -math.inf
    lw[2, ::2] = -math.inf
    for backend in ("triton", "torch"):
        out = sampled_q_log_mean_exp(obs, actions, critics, lw, backend=backend, precision="ieee")
        assert out[0, 1].item() == -math.inf and torch.isfinite(out[0, [0, 2]]).all()
        grads = torch.autograd.grad(out[torch.isfinite(out)].sum() + 0 * out.sum(), params_of(critics) + [obs, actions],
                                    allow_unused=True)
        for gr in grads:
            assert not torch.isnan(gr).any(), backend
        assert (grads[-1][1] == 0).all() and (grads[-1][2, ::2] == 0).all() and (grads[-2][1] == 0).all()
    # state 1 contributes nothing: gradients equal those of the other states alone
    out = sampled_q_log_mean_exp(obs, actions, critics, lw, backend="triton", precision="ieee")
    ga = torch.autograd.grad(out[0, [0, 2]].sum(), params_of(critics))
    gb = torch.autograd.grad(sampled_q_log_mean_exp_reference(obs, actions, critics, lw)[0, [0, 2]].sum(),
                             params_of(critics))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@needs_kernels
def test_tf32_precision_and_no_bias():
    """The default dot precision (tf32 on a GPU; the interpreter computes in fp32), bias-free layers."""
    torch.manual_seed(14)
    obs, actions = inputs(2, 16, 6, 3)
    critics = [make_critic(6, 3, (48, 40), bias=False) for _ in range(2)]
    compare(obs, actions, critics, precision="tf32")


@needs_kernels
def test_module_inputs_and_wrapper():
    """Critics given as nn.Sequential modules / nn.Linear lists, the nn.Module wrapper, and the
    wrapper's gradients landing in the modules' .grad."""
    torch.manual_seed(15)
    S, A, H = 5, 2, 32
    crits = [nn.Sequential(nn.Linear(S + A, H), nn.ELU(), nn.Linear(H, H), nn.ELU(), nn.Linear(H, 1)).to(DEV)
             for _ in range(2)]
    obs, actions = inputs(3, 8, S, A)
    op = SampledQLogMeanExp(normalizer="k", precision="ieee", backend="triton")
    out = op(obs, actions, crits)
    ref = sampled_q_log_mean_exp_reference(obs, actions, [[m for m in c if isinstance(m, nn.Linear)] for c in crits],
                                           activation="elu")
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    out.mean().backward()
    grads = [p.grad.clone() for c in crits for p in c.parameters()]
    for c in crits:
        c.zero_grad()
    ref.mean().backward()
    for a, p in zip(grads, [p for c in crits for p in c.parameters()]):
        torch.testing.assert_close(a, p.grad, atol=2e-4, rtol=2e-4)
    assert len(critic_layers(crits[0])) == 3


@needs_kernels
def test_bf16_samples():
    """bf16 obs/actions (e.g. from an autocast policy) are read as fp32 by the kernels."""
    torch.manual_seed(19)
    obs, actions = inputs(2, 10, 5, 3)
    critics = [make_critic(5, 3, (32, 32)) for _ in range(2)]
    compare(obs.bfloat16(), actions.bfloat16(), critics)


@needs_kernels
@pytest.mark.parametrize("E,hidden", [(2, (64, 48)), (3, (32,))])
def test_stacked_ensemble(E, hidden):
    """Critics stored stacked, weights (E, out, in) and biases (E, out) (an ensemble module's
    parameters): same values as per-critic views, gradients come back stacked, in one piece."""
    torch.manual_seed(20 + E)
    S, A = 6, 3
    obs, actions = inputs(3, 10, S, A)
    per = [make_critic(S, A, hidden) for _ in range(E)]
    stacked = [(torch.stack([c[j][0] for c in per]).detach().requires_grad_(),
                torch.stack([c[j][1] for c in per]).detach().requires_grad_()) for j in range(len(hidden) + 1)]
    out = sampled_q_log_mean_exp(obs, actions, stacked, backend="triton", precision="ieee", activation="elu")
    ref = sampled_q_log_mean_exp_reference(obs, actions, stacked, activation="elu")
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    wrt = [t for wb in stacked for t in wb]
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((out * g).sum(), wrt)
    gb = torch.autograd.grad((ref * g).sum(), wrt)
    for a, b, p in zip(ga, gb, wrt):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@needs_kernels
def test_ensemble_critic_module():
    """Drop-in with the project's stacked critic module (anything with ``stacked_layers()``)."""
    nets = pytest.importorskip("misa_fast.nets")
    if not hasattr(nets, "TwinCritic"):
        pytest.skip("misa_fast.nets.TwinCritic not available")
    torch.manual_seed(21)
    S, A = 5, 2
    critic = nets.TwinCritic(S, A, hidden=(32, 32)).to(DEV)
    obs, actions = inputs(3, 8, S, A)
    out = sampled_q_log_mean_exp(obs, actions, critic, backend="triton", precision="ieee")
    torch.testing.assert_close(torch.logsumexp(critic(obs, actions), -1) - math.log(8), out, atol=2e-4, rtol=2e-4)
    out.sum().backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    (torch.logsumexp(critic(obs, actions), -1) - math.log(8)).sum().backward()
    for a, p in zip(grads, critic.parameters()):
        torch.testing.assert_close(a, p.grad, atol=2e-4, rtol=2e-4)


@needs_kernels
def test_frozen_critic_and_partial_requires_grad():
    """Only the parameters that require grad get one (a frozen critic's kernels are skipped)."""
    torch.manual_seed(18)
    obs, actions = inputs(3, 9, 4, 2)
    frozen = StackedLayers([(w.detach(), b.detach()) for w, b in make_critic(4, 2, (32, 32))], "elu")
    live = make_critic(4, 2, (32, 32))
    live[0] = (live[0][0], live[0][1].detach())  # one frozen bias inside a trainable critic
    out = sampled_q_log_mean_exp(obs, actions, [frozen, live], backend="triton", precision="ieee")
    ref = sampled_q_log_mean_exp_reference(obs, actions, [frozen, live])
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    wrt = [t for wb in live for t in wb if t.requires_grad]
    for a, b in zip(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(ref.sum(), wrt)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@needs_kernels
def test_unsupported_configs_fall_back_or_raise():
    torch.manual_seed(16)
    obs, actions = inputs(2, 4, 3, 2)
    deep = [make_critic(3, 2, (16, 16, 16, 16, 16))]  # five hidden layers: torch reference only
    with pytest.raises(ValueError, match="hidden layers"):
        sampled_q_log_mean_exp(obs, actions, deep, backend="triton")
    with use_backend("auto"):
        out = sampled_q_log_mean_exp(obs, actions, deep)  # auto: no error (reference on CPU anyway)
    torch.testing.assert_close(out, naive_sampled_q_lse(obs, actions, deep))
    with pytest.raises(ValueError):
        sampled_q_log_mean_exp(obs, actions, [make_critic(3, 3, (16, 16))])  # wrong input width
    with pytest.raises(ValueError):
        sampled_q_log_mean_exp(obs, actions, deep, normalizer="bogus")


def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("MISA_FAST_OPS", raising=False)
    torch.manual_seed(17)
    obs, actions = inputs(2, 4, 3, 2)
    critics = [make_critic(3, 2, (8, 8), device="cpu")]
    out = sampled_q_log_mean_exp(obs.cpu(), actions.cpu(), critics)
    assert "misa_fast_sampled_q" not in type(out.grad_fn).__name__


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("A", [3, 6])
@pytest.mark.parametrize("precision", ["tf32", "bf16", "ieee"])
def test_cuda_misa_sizes(A, precision):
    torch.manual_seed(A)
    B, K, S = 256, 50, 17
    obs, actions = inputs(B, K, S, A)
    critics = [make_critic(S, A, (256, 256)) for _ in range(2)]
    compare(obs, actions, critics, precision=precision)
    # deterministic backward
    out = sampled_q_log_mean_exp(obs, actions, critics, precision=precision, backend="triton")
    g1 = torch.autograd.grad(out.sum(), params_of(critics))
    g2 = torch.autograd.grad(sampled_q_log_mean_exp(obs, actions, critics, precision=precision,
                                                    backend="triton").sum(), params_of(critics))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
