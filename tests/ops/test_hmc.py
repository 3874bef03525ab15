"""Fused HMC chain (``misa_fast.ops.hmc_sample``, kernel ``kernels/hmc_kernels.py``) against the torch
reference sampler ``misa_fast.ops.hmc_reference.hmc_sample``. On CPU the kernel runs in the Triton interpreter.

Tolerance logic of the exact-noise tests: both implementations compute in fp32 (``precision="ieee"``)
from the same momentum and uniforms; they differ only in the order of floating-point reductions, so
log-densities agree to ~1e-6 and positions to ~1e-6 after a few leapfrog steps with these small,
smooth networks. An accept decision can then differ only when ``uniform`` lies within ~1e-5 of the
acceptance probability, which for the ~100 decisions of a test has probability ~1e-3; the inputs
come from fixed seeds, so a passing test is deterministic. The tests therefore demand identical
decisions and positions within 2e-5. On a GPU (tests marked ``gpu``, MISA sizes: 14,080 decisions)
up to 0.5% of the chains may flip a decision; samples are compared on the chains that did not.

Shapes stay small (a few programs of 16 chains, hidden widths 16..64 but one case at 256).
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from misa_fast import nets
from misa_fast.ops import hmc_reference as hmc
from misa_fast.ops import hmc_sample, use_backend
from misa_fast.ops.testing import kernel_device, kernels_compiled

# Forced-Triton calls need tensors where the kernels run: CUDA on a GPU host (compiled kernels,
# no interpreter), the CPU under TRITON_INTERPRET=1 (see misa_fast.ops.testing).
needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"
MODES = ["faithful", "adaptive", "parallel"]


class Problem:
    """Per-state policy mean/std, stacked critics with O(1) Q variation over the action box, their
    layer-1 state halves and the dataset actions the chains start from."""

    def __init__(self, batch=5, obs_dim=4, act_dim=2, hidden=(32, 32), n_critics=2, seed=0, q_scale=0.5,
                 zero_q=False, device=DEV, activation="elu"):
        g = torch.Generator().manual_seed(seed)
        critic = nets.EnsembleCritic(obs_dim, act_dim, hidden, n_critics, generator=g, activation=activation)
        with torch.no_grad():
            for w in critic.weights:
                w.normal_(0.0, q_scale / math.sqrt(w.shape[-1]) * 2.0, generator=g)
            for b in critic.biases:
                b.normal_(0.0, 0.1, generator=g)
            if zero_q:
                critic.weights[-1].zero_()
                critic.biases[-1].zero_()
        obs = torch.randn(batch, obs_dim, generator=g)
        self.layers = nets.StackedLayers([(w.to(device), b.to(device)) for w, b in critic.stacked_layers(detach=True)],
                                         critic.activation)
        self.state_half = critic.first_layer_state_half(obs, detach=True).to(device)
        self.mean = (torch.randn(batch, act_dim, generator=g) * 0.5).to(device)
        self.std = torch.exp(torch.rand(batch, act_dim, generator=g) * 1.2 - 1.5).to(device)
        self.init = (torch.rand(batch, act_dim, generator=g) * 1.6 - 0.8).to(device)
        self.batch, self.act_dim = batch, act_dim

    def args(self):
        return self.mean, self.std, self.layers, self.state_half, self.init

    def fused(self, precision="ieee", backend="triton", **kw):
        return hmc_sample(*self.args(), precision=precision, backend=backend, **kw)

    def reference(self, **kw):
        return hmc.hmc_sample(*self.args(), **kw)

    def noise(self, mode, num_samples, burn_in, seed=1):
        n = hmc.draw_noise(mode, self.batch, num_samples, burn_in, self.act_dim, torch.Generator().manual_seed(seed))
        return hmc.HMCNoise(n.momentum.to(DEV), n.uniform.to(DEV))


def assert_same_chains(res, ref, atol=1e-4, max_flip_fraction=0.0):
    """Same decisions (up to ``max_flip_fraction`` of the chains) and, on the chains whose
    decisions all agree, the same samples and step sizes."""
    assert res.samples.shape == ref.samples.shape and res.samples.dtype == ref.samples.dtype
    assert res.accepted.shape == ref.accepted.shape and res.accepted.dtype == torch.bool
    assert res.step_size.shape == ref.step_size.shape
    same = (res.accepted == ref.accepted).all(0)  # (C,)
    assert (~same).float().mean().item() <= max_flip_fraction, f"{int((~same).sum())} chains flipped a decision"
    B, K, A = ref.samples.shape
    chain_ok = same.view(B, -1)  # (B, 1) faithful or (B, K) parallel
    rows = chain_ok.expand(B, K)
    torch.testing.assert_close(res.samples[rows], ref.samples[rows], atol=atol, rtol=0)
    torch.testing.assert_close(res.step_size[same], ref.step_size[same], atol=1e-6, rtol=1e-5)
    assert (res.pre_tanh is None) == (ref.pre_tanh is None)
    if ref.pre_tanh is not None:  # pre-tanh space: the samples' u, as recorded
        torch.testing.assert_close(res.pre_tanh[rows], ref.pre_tanh[rows], atol=atol, rtol=0)
        torch.testing.assert_close(torch.tanh(res.pre_tanh), res.samples, atol=1e-6, rtol=0)
    if max_flip_fraction == 0.0:
        assert res.accept_rate.item() == pytest.approx(ref.accept_rate.item(), abs=1e-7)
        assert res.accept_prob.item() == pytest.approx(ref.accept_prob.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# exact agreement with supplied noise
# ----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_supplied_noise_reproduces_reference(mode):
    prob = Problem(batch=5, act_dim=3, seed=1)
    kw = dict(mode=mode, num_samples=6, burn_in=3, leapfrog_steps=2, step_size=0.3,
              noise=prob.noise(mode, 6, 3))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert res.samples.shape == (5, 6, 3)
    assert_same_chains(res, ref)
    assert 0.1 < ref.accept_rate.item() < 0.95  # accepts and rejects were both exercised
    assert (res.samples.abs() < 1).all()


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_pre_tanh_supplied_noise_reproduces_reference(mode):
    """The pre-tanh chains (whitened positions, exact Gaussian rotation, Q kicks): same decisions,
    same pre-tanh samples. Dataset actions at +-1 and a larger Q exercise saturated tanh."""
    prob = Problem(batch=5, act_dim=3, seed=3, q_scale=1.5)
    prob.init[0] = torch.tensor([1.0, -1.0, 0.999])
    kw = dict(mode=mode, space="pre_tanh", num_samples=6, burn_in=3, leapfrog_steps=2, step_size=0.9,
              noise=prob.noise(mode, 6, 3))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert res.samples.shape == res.pre_tanh.shape == (5, 6, 3)
    assert_same_chains(res, ref)
    assert 0.1 < ref.accept_rate.item() < 1.0  # accepts and rejects were both exercised


@needs_kernels
@pytest.mark.parametrize("mode,B,K,S,A,hidden,E", [
    ("adaptive", 5, 3, 7, 8, (48, 40), 2),  # adapted steps hit the quarter-period bound
    ("faithful", 5, 4, 6, 1, (24,), 3),  # one hidden layer, A = 1, three critics
])
def test_pre_tanh_shapes_and_step_bound(mode, B, K, S, A, hidden, E):
    prob = Problem(batch=B, obs_dim=S, act_dim=A, hidden=hidden, n_critics=E, seed=B + A, q_scale=0.2)
    C, _ = hmc.layout(mode, B, K, 3)
    steps = torch.linspace(0.05, 0.78, C, device=DEV)
    kw = dict(mode=mode, space="pre_tanh", num_samples=K, burn_in=3, leapfrog_steps=2, step_size=steps,
              noise=prob.noise(mode, K, 3, seed=A))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert_same_chains(res, ref)
    if mode == "adaptive":  # mostly accepted: the steps grow, up to a quarter rotation per transition
        assert res.step_size.max().item() == pytest.approx(math.pi / 4, rel=1e-6)


@needs_kernels
def test_pre_tanh_zero_q_accepts_everything_and_samples_the_policy():
    """Q = 0: the exact rotation leaves H unchanged, so every transition is accepted whatever the
    start (dataset actions at +-0.999, far in the policy's tail), and after a quarter rotation per
    transition the last sample is a fresh policy draw (KS of the PIT through each state's CDF)."""
    B, A = 320, 2
    prob = Problem(batch=B, act_dim=A, hidden=(16,), zero_q=True, seed=4)
    prob.init = torch.where(torch.rand(B, A, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0).to(DEV)
    res = prob.fused(mode="faithful", space="pre_tanh", num_samples=2, burn_in=1, step_size=math.pi / 4,
                     generator=torch.Generator(device=DEV).manual_seed(3))
    assert res.accept_rate.item() == 1.0
    a = res.samples[:, -1].double().cpu().numpy()
    m, s = prob.mean.double().cpu().numpy(), prob.std.double().cpu().numpy()
    for d in range(A):
        assert stats.kstest(_tanh_gaussian_cdf(a[:, d], m[:, d], s[:, d]), "uniform").pvalue > 1e-3, d


@needs_kernels
@pytest.mark.skipif(kernels_compiled(), reason="CPU interpreter semantics (fp32 dots)")
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_tensor_core_precisions_in_the_interpreter(precision):
    """The tf32 / tf32x3 code paths (the interpreter computes their dots in fp32, so they reproduce
    the reference like "ieee"; their GPU accuracy is checked in the gpu tests). bf16 is not tested
    here: the interpreter's bf16 dot is wrong."""
    prob = Problem(batch=5, act_dim=3, seed=1)
    kw = dict(mode="faithful", num_samples=4, burn_in=2, step_size=0.3, noise=prob.noise("faithful", 4, 2))
    assert_same_chains(prob.fused(precision=precision, **kw), prob.reference(**kw))


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_per_chain_step_sizes(mode):
    """A (C,) step-size tensor spanning 'always accept' to 'always leave the box'; adaptation moves
    each chain's own step size."""
    prob = Problem(batch=6, act_dim=2, seed=2)
    C, _ = hmc.layout(mode, 6, 3, 3)
    steps = torch.logspace(math.log10(0.03), math.log10(2.0), C, device=DEV)
    kw = dict(mode=mode, num_samples=3, burn_in=3, step_size=steps, noise=prob.noise(mode, 3, 3, seed=5))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert_same_chains(res, ref)
    if mode == "adaptive":
        assert not torch.allclose(res.step_size, steps)
    else:
        assert torch.equal(res.step_size, steps)


@needs_kernels
@pytest.mark.parametrize(
    "mode,B,K,burn_in,S,A,hidden,L,E",
    [
        ("faithful", 4, 1, 2, 5, 3, (32, 32), 2, 2),  # K = 1
        ("parallel", 3, 1, 2, 5, 3, (32, 32), 2, 2),  # K = 1, parallel
        ("faithful", 5, 4, 2, 3, 1, (30, 18), 2, 2),  # A = 1, widths not multiples of 4 (padded TMA rows)
        ("adaptive", 5, 3, 3, 7, 8, (48, 40), 3, 2),  # A = 8, non powers of two, L = 3
        ("faithful", 5, 4, 2, 6, 5, (24,), 1, 2),  # one hidden layer, L = 1
        ("faithful", 4, 3, 0, 4, 4, (64, 48), 2, 3),  # no burn-in, three critics
        ("parallel", 2, 20, 1, 4, 2, (16, 16), 2, 2),  # 40 chains: 3 programs, a state across programs
        ("faithful", 17, 2, 1, 3, 2, (16, 16), 2, 2),  # 17 chains: a masked second program
        ("faithful", 2, 2, 1, 11, 6, (256, 256), 2, 2),  # the MISA widths
    ],
)
def test_shapes_and_edge_cases(mode, B, K, burn_in, S, A, hidden, L, E):
    prob = Problem(batch=B, obs_dim=S, act_dim=A, hidden=hidden, n_critics=E, seed=B * 7 + A)
    kw = dict(mode=mode, num_samples=K, burn_in=burn_in, leapfrog_steps=L, step_size=0.25,
              noise=prob.noise(mode, K, burn_in, seed=A))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert res.samples.shape == (B, K, A)
    assert_same_chains(res, ref)


@needs_kernels
def test_support_boundary_and_init_clip():
    """Dataset actions at exactly +-1 start at +-init_clip; a step size that leaves the box at every
    leapfrog position rejects everything; a moderate one rejects the paths that leave it."""
    prob = Problem(batch=5, act_dim=2, seed=3)
    prob.init[0] = torch.tensor([1.0, -1.0])
    prob.init[1, 0] = 0.9999
    for step in (30.0, 0.6):
        kw = dict(mode="faithful", num_samples=4, burn_in=1, step_size=step, noise=prob.noise("faithful", 4, 1, seed=9))
        res, ref = prob.fused(**kw), prob.reference(**kw)
        assert_same_chains(res, ref)
        if step == 30.0:
            assert res.accept_rate.item() == 0.0 and res.accept_prob.item() == 0.0
            expected = prob.init.clamp(-0.999, 0.999).unsqueeze(1).expand_as(res.samples)
            assert torch.equal(res.samples, expected)
        assert (res.samples.abs() < 1).all()


# ----------------------------------------------------------------------------------------------
# in-kernel random numbers
# ----------------------------------------------------------------------------------------------
def _tanh_gaussian_cdf(a, mean, std):
    u = np.arctanh(np.clip(a, -1 + 1e-7, 1 - 1e-7))
    return stats.norm.cdf((u - mean) / std)


@needs_kernels
def test_random_mode_with_zero_q_samples_the_policy():
    """Q = 0: the target is the tanh-Gaussian policy. Chains started at exact policy samples stay
    distributed as the policy under any correct transition (detailed balance), so the samples'
    probability-integral transforms through each state's policy CDF are uniform (KS test per dim)."""
    B, A = 320, 2
    prob = Problem(batch=B, act_dim=A, hidden=(16,), zero_q=True, seed=4)
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(B, A, generator=g).to(DEV)
    prob.init = torch.tanh(prob.mean + prob.std * eps)
    res = prob.fused(mode="faithful", num_samples=2, burn_in=1, step_size=0.2,
                     generator=torch.Generator(device=DEV).manual_seed(3))
    assert 0.3 < res.accept_rate.item() < 0.995
    moved = (res.samples[:, -1] != prob.init.clamp(-0.999, 0.999)).any(-1).float().mean().item()
    assert moved > 0.3
    a = res.samples[:, -1].double().cpu().numpy()
    m, s = prob.mean.double().cpu().numpy(), prob.std.double().cpu().numpy()
    for d in range(A):
        pit = _tanh_gaussian_cdf(a[:, d], m[:, d], s[:, d])
        assert stats.kstest(pit, "uniform").pvalue > 1e-3, d


@needs_kernels
def test_random_mode_matches_reference_distribution():
    """Nonzero Q, parallel chains from the dataset actions: after the same number of transitions
    the fused sampler (Philox noise) and the reference (torch noise) give the same distribution
    (two-sample KS per dim, means) and the same acceptance rate, though not the same samples."""
    prob = Problem(batch=4, act_dim=2, hidden=(16, 16), seed=6, q_scale=0.8)
    kw = dict(mode="parallel", burn_in=2, step_size=0.35)
    res = prob.fused(num_samples=64, generator=torch.Generator(device=DEV).manual_seed(0), **kw)
    ref = prob.reference(num_samples=1024, generator=torch.Generator(device=DEV).manual_seed(0), **kw)
    assert res.samples.shape == (4, 64, 2)
    n_k, n_r = res.accepted.numel(), ref.accepted.numel()
    p = ref.accept_rate.item()
    assert abs(res.accept_rate.item() - p) < 4 * math.sqrt(p * (1 - p) / n_k) + 1e-3
    for b in range(4):
        for d in range(2):
            xs, ys = res.samples[b, :, d].cpu().numpy(), ref.samples[b, :, d].cpu().numpy()
            assert stats.ks_2samp(xs, ys).pvalue > 1e-4, (b, d)
    mean_k, mean_r = res.samples.mean(1), ref.samples.mean(1)
    se = ref.samples.std(1) / math.sqrt(64)
    assert ((mean_k - mean_r).abs() < 4.5 * se + 1e-3).all()
    assert n_k < n_r


@needs_kernels
def test_in_kernel_noise_is_standard():
    """The Philox streams themselves. Momentum: with a tiny step every move is accepted and
    x1 = x0 + eps * (p0 + eps/2 grad), so (x1 - x0) / eps recovers p0 ~ N(0, 1) (KS). Uniforms:
    sum over decisions of (accepted - prob) is a martingale sum with variance sum prob (1 - prob)
    exactly when the uniforms are U(0, 1) (z-test on the kernel's per-decision probabilities)."""
    from misa_fast.kernels import hmc_kernels as hk

    prob = Problem(batch=4, act_dim=3, hidden=(16,), seed=12)
    eps = 1e-3
    res = prob.fused(mode="parallel", num_samples=100, burn_in=0, leapfrog_steps=1, step_size=eps,
                     generator=torch.Generator(device=DEV).manual_seed(1))
    assert res.accept_rate.item() == 1.0
    p0 = ((res.samples - prob.init.unsqueeze(1)) / eps).flatten().double().cpu().numpy()
    assert stats.kstest(p0, "norm").pvalue > 1e-3
    assert abs(p0.mean()) < 0.15 and abs(p0.std() - 1.0) < 0.1

    C, T = 256, 5
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEV)
    out = hk.hmc_chains(prob.mean, prob.std, prob.init, prob.layers, prob.state_half,
                        torch.full((C,), 0.35, device=DEV), transitions=T, leapfrog_steps=2, repeats=C // 4,
                        record_from=T - 1, seed=seed, precision=0)
    p = out.accept_prob.double()
    z = ((out.accepted.double() - p).sum() / (p * (1 - p)).sum().sqrt()).item()
    assert 0.1 < p.mean().item() < 0.9
    assert abs(z) < 4.0, z


@needs_kernels
def test_random_mode_seeding():
    """The stream is drawn from the caller's generator (one int64 per call): same generator state,
    same samples; the generator advances; another seed gives other samples."""
    prob = Problem(batch=3, act_dim=2, hidden=(16, 16), seed=7)
    kw = dict(mode="faithful", num_samples=3, burn_in=1, step_size=0.3)
    g = torch.Generator(device=DEV).manual_seed(5)
    a = prob.fused(generator=g, **kw)
    b = prob.fused(generator=g, **kw)  # advanced generator: new samples
    c = prob.fused(generator=torch.Generator(device=DEV).manual_seed(5), **kw)
    assert torch.equal(a.samples, c.samples) and torch.equal(a.accepted, c.accepted)
    assert not torch.equal(a.samples, b.samples)
    torch.manual_seed(123)  # generator=None draws from the default generator
    d = prob.fused(**kw)
    torch.manual_seed(123)
    e = prob.fused(**kw)
    assert torch.equal(d.samples, e.samples)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("MISA_FAST_OPS", raising=False)
    prob = Problem(batch=3, act_dim=2, hidden=(8, 8), device="cpu")
    kw = dict(mode="faithful", num_samples=3, burn_in=1, step_size=0.4)
    a = hmc_sample(*prob.args(), generator=torch.Generator().manual_seed(2), **kw)
    b = hmc.hmc_sample(*prob.args(), generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.accepted, b.accepted)


@needs_kernels
def test_backend_overrides(monkeypatch):
    """MISA_FAST_OPS=triton forces the kernel (its Philox stream differs from the reference's torch
    stream, which tells the two apart); use_backend and backend= win over the variable."""
    prob = Problem(batch=3, act_dim=2, hidden=(16, 16), seed=8)
    kw = dict(mode="faithful", num_samples=2, burn_in=1, step_size=0.3)

    def run(**extra):
        return hmc_sample(*prob.args(), generator=torch.Generator(device=DEV).manual_seed(4), **kw, **extra)

    fused = run(backend="triton")
    ref = hmc.hmc_sample(*prob.args(), generator=torch.Generator(device=DEV).manual_seed(4), **kw)
    assert not torch.equal(fused.samples, ref.samples)
    monkeypatch.setenv("MISA_FAST_OPS", "triton")
    assert torch.equal(run().samples, fused.samples)
    with use_backend("torch"):
        assert torch.equal(run().samples, ref.samples)
    assert torch.equal(run(backend="torch").samples, ref.samples)
    monkeypatch.setenv("MISA_FAST_OPS", "torch")
    assert torch.equal(run().samples, ref.samples)


@needs_kernels
def test_unsupported_calls_fall_back_or_raise():
    deep = Problem(batch=2, act_dim=2, hidden=(8, 8, 8, 8, 8), seed=9)  # five hidden layers
    kw = dict(mode="faithful", num_samples=2, burn_in=1, step_size=0.3, noise=deep.noise("faithful", 2, 1))
    with pytest.raises(ValueError, match="hidden layers"):
        deep.fused(**kw)
    with use_backend("auto"):
        out = hmc_sample(*deep.args(), **kw)  # auto: the reference, no error
    ref = deep.reference(**kw)
    assert torch.equal(out.samples, ref.samples)
    wide = Problem(batch=2, act_dim=33, hidden=(8, 8), seed=9)
    with pytest.raises(ValueError, match="action dim"):
        wide.fused(mode="faithful", num_samples=1, burn_in=0)
    prob = Problem(batch=2, act_dim=2, hidden=(8, 8), seed=9)
    bad = prob.noise("parallel", 2, 1)  # noise for another mode
    with pytest.raises(ValueError, match="noise"):
        prob.fused(mode="faithful", num_samples=2, burn_in=1, noise=bad)
    with pytest.raises(ValueError, match="precision"):
        prob.fused(precision="fp8", mode="faithful", num_samples=1, burn_in=0)
    with pytest.raises(ValueError, match="leapfrog"):
        prob.fused(mode="faithful", num_samples=1, burn_in=0, leapfrog_steps=0)
    with pytest.raises(ValueError, match="mode"):
        prob.fused(mode="bogus", num_samples=1, burn_in=0)


# ----------------------------------------------------------------------------------------------
# the critics' own architecture: activation and depth
# ----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("hidden,activation", [((16, 24), "relu"), ((16, 24, 16), "relu"),
                                               ((16, 24, 20, 16), "elu"), ((24, 16, 32), "relu")])
@pytest.mark.parametrize("space", ["post_tanh", "pre_tanh"])
def test_depth_and_activation_reproduce_reference(hidden, activation, space):
    """ReLU critics are computed with ReLU and 3 or 4 hidden layers run fused: the supplied-noise
    chains are those of the reference for the same critics."""
    prob = Problem(batch=3, act_dim=2, hidden=hidden, seed=1, activation=activation)
    kw = dict(mode="faithful", num_samples=3, burn_in=2, step_size=0.3 if space == "post_tanh" else 0.5,
              space=space, noise=prob.noise("faithful", 3, 2))
    res, ref = prob.fused(**kw), prob.reference(**kw)
    assert_same_chains(res, ref)
    if space == "post_tanh":
        assert 0.1 < ref.accept_rate.item() < 0.95
    # the same layers read as ELU are another target: the chains differ
    other = "elu" if activation == "relu" else "relu"
    mean, std, layers, half, init = prob.args()
    wrong = hmc_sample(mean, std, list(layers), half, init, activation=other, precision="ieee", backend="triton", **kw)
    assert not torch.equal(wrong.samples, res.samples)
    with pytest.raises(ValueError, match="carry"):  # the layers know their network
        hmc_sample(*prob.args(), activation=other, precision="ieee", backend="triton", **kw)


@needs_kernels
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "tanh", "gelu", "gelu_tanh", ("elu", 0.5)])
def test_other_activations_reproduce_reference(activation):
    prob = Problem(batch=2, act_dim=2, hidden=(16, 16), seed=2)
    prob.layers = list(prob.layers)  # plain tensors: the activation is the argument's
    kw = dict(mode="parallel", num_samples=2, burn_in=2, step_size=0.3, noise=prob.noise("parallel", 2, 2),
              activation=activation)
    res = prob.fused(**kw)
    ref = hmc_sample(*prob.args(), backend="torch", **kw)
    assert_same_chains(res, ref)


def test_plain_tensors_need_an_activation_and_float64_is_not_downcast():
    from misa_fast.ops import CriticArchitectureError

    prob = Problem(batch=2, act_dim=2, hidden=(8, 8), seed=3, device="cpu")
    plain = [(w, b) for w, b in prob.layers]
    kw = dict(mode="faithful", num_samples=2, burn_in=1, step_size=0.3, noise=prob.noise("faithful", 2, 1))
    kw["noise"] = hmc.HMCNoise(kw["noise"].momentum.cpu(), kw["noise"].uniform.cpu())
    for backend in ("torch", "auto"):
        with pytest.raises(CriticArchitectureError, match="activation="):
            hmc_sample(prob.mean, prob.std, plain, prob.state_half, prob.init, backend=backend, **kw)
    ref = hmc_sample(prob.mean, prob.std, plain, prob.state_half, prob.init, activation="elu", backend="torch", **kw)
    assert torch.equal(ref.samples, prob.reference(**kw).samples)
    d = [t.double() for t in (prob.mean, prob.std)]
    layers64 = nets.StackedLayers([(w.double(), b.double()) for w, b in prob.layers], "elu")
    noise64 = hmc.HMCNoise(kw["noise"].momentum.double(), kw["noise"].uniform.double())
    out = hmc_sample(*d, layers64, prob.state_half.double(), prob.init.double(), backend="auto",
                     **{**kw, "noise": noise64})
    assert out.samples.dtype == torch.float64
    if kernel_device() is not None:
        with pytest.raises(ValueError, match="float64"):
            layers_dev = nets.StackedLayers([(w.to(DEV), b.to(DEV)) for w, b in layers64], "elu")
            hmc_sample(*[t.to(DEV) for t in d], layers_dev,
                       prob.state_half.double().to(DEV), prob.init.double().to(DEV), backend="triton",
                       **{**kw, "noise": hmc.HMCNoise(noise64.momentum.to(DEV), noise64.uniform.to(DEV))})


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("A", [3, 6])
@pytest.mark.parametrize("mode", ["faithful", "parallel"])
def test_cuda_misa_sizes(mode, A):
    """B = 256, K = 50, twin 256-256 critics: fp32 dots reproduce the reference's chains (up to rare
    near-tie decisions); tf32 dots give the same statistics; in-kernel noise runs."""
    B, K, S = 256, 50, 17
    prob = Problem(batch=B, obs_dim=S, act_dim=A, hidden=(256, 256), seed=A, q_scale=0.3)
    noise = prob.noise(mode, K, 5, seed=A)
    kw = dict(mode=mode, num_samples=K, burn_in=5, step_size=0.2, noise=noise)
    ref = prob.reference(**kw)
    assert_same_chains(prob.fused(precision="ieee", **kw), ref, atol=1e-3, max_flip_fraction=0.005)
    x3 = prob.fused(precision="tf32x3", **kw)  # ~fp32 on tensor cores: nearly all chains identical
    assert_same_chains(x3, ref, atol=1e-2, max_flip_fraction=0.05)
    tf = prob.fused(precision="tf32", **kw)
    assert abs(tf.accept_rate.item() - ref.accept_rate.item()) < 0.02
    torch.testing.assert_close(tf.samples.mean((0, 1)), ref.samples.mean((0, 1)), atol=0.02, rtol=0)
    bf = prob.fused(precision="bf16", **kw)  # bf16 weights and activations: a coarser target
    assert (bf.samples.abs() < 1).all() and abs(bf.accept_rate.item() - ref.accept_rate.item()) < 0.1
    rnd = prob.fused(precision="tf32", mode=mode, num_samples=K, burn_in=5, step_size=0.2,
                     generator=torch.Generator(device="cuda").manual_seed(0))
    assert rnd.samples.shape == (B, K, A) and (rnd.samples.abs() < 1).all()
    assert abs(rnd.accept_rate.item() - ref.accept_rate.item()) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["faithful", "adaptive", "parallel"])
def test_cuda_misa_sizes_pre_tanh(mode):
    """The pre-tanh chains at MISA sizes: fp32 dots reproduce the reference (rare near-tie flips),
    tf32x3 nearly so; in-kernel noise gives the reference's acceptance."""
    B, K, S, A = 256, 50, 17, 6
    prob = Problem(batch=B, obs_dim=S, act_dim=A, hidden=(256, 256), seed=A, q_scale=0.3)
    kw = dict(mode=mode, space="pre_tanh", num_samples=K, burn_in=5, step_size=0.7,
              noise=prob.noise(mode, K, 5, seed=A))
    ref = prob.reference(**kw)
    assert_same_chains(prob.fused(precision="ieee", **kw), ref, atol=1e-3, max_flip_fraction=0.005)
    assert_same_chains(prob.fused(precision="tf32x3", **kw), ref, atol=1e-2, max_flip_fraction=0.05)
    rnd = prob.fused(precision="tf32x3", **{**kw, "noise": None},
                     generator=torch.Generator(device="cuda").manual_seed(0))
    assert abs(rnd.accept_rate.item() - ref.accept_rate.item()) < 0.05


# ----------------------------------------------------------------------------------------------
# several members (seeds) in one launch
# ----------------------------------------------------------------------------------------------
def _member_problems(count, **kw):
    return [Problem(seed=10 + m, **kw) for m in range(count)]


@needs_kernels
@pytest.mark.parametrize("mode, space, hidden", [("faithful", "post_tanh", (32, 32)), ("parallel", "pre_tanh", (32,)),
                                                 ("adaptive", "post_tanh", (16, 32, 16))])
def test_member_stacked_launch_equals_one_launch_per_member(mode, space, hidden):
    from misa_fast.kernels import hmc_kernels as hk

    problems = _member_problems(3, hidden=hidden, batch=3)
    K, burn_in = 2, 2
    noises = [p.noise(mode, K, burn_in, seed=m) for m, p in enumerate(problems)]
    singles = [p.fused(mode=mode, space=space, num_samples=K, burn_in=burn_in, noise=n, adapt=mode == "adaptive")
               for p, n in zip(problems, noises)]

    def stack(get):
        return torch.stack([get(p) for p in problems])

    layers = [(torch.stack([p.layers[i][0] for p in problems]), torch.stack([p.layers[i][1] for p in problems]))
              for i in range(len(problems[0].layers))]
    chains, transitions = hmc.layout(mode, 3, K, burn_in)
    step = torch.full((3, chains), hmc.default_step_size(space, 2), device=DEV)
    out = hk.hmc_chains(stack(lambda p: p.mean), stack(lambda p: p.std), stack(lambda p: p.init), layers,
                        stack(lambda p: p.state_half), step, transitions=transitions, leapfrog_steps=2,
                        repeats=K if mode == "parallel" else 1, record_from=burn_in,
                        adapt_steps=burn_in if mode == "adaptive" else 0,
                        momentum=torch.stack([n.momentum for n in noises]),
                        uniform=torch.stack([n.uniform for n in noises]), precision=0, split=space == "pre_tanh",
                        max_step=hmc.max_step_size(2, space == "pre_tanh"), activation=(hk.ACTIVATIONS["elu"], 1.0))
    for m, single in enumerate(singles):
        assert torch.equal(out.accepted[m], single.accepted)
        recorded = out.states[m].view(single.samples.shape)
        expected = single.pre_tanh if space == "pre_tanh" else single.samples
        torch.testing.assert_close(recorded, expected, atol=0, rtol=0)
        torch.testing.assert_close(out.step_size[m], single.step_size, atol=0, rtol=0)


@needs_kernels
def test_hmc_sample_under_member_vmap_is_one_launch_equal_to_each_members_call(monkeypatch):
    from misa_fast.kernels import hmc_kernels as hk
    from misa_fast.ops.dispatch import member_map

    problems = _member_problems(2)
    noises = [p.noise("faithful", 3, 2, seed=m) for m, p in enumerate(problems)]
    singles = [p.fused(mode="faithful", num_samples=3, burn_in=2, noise=n) for p, n in zip(problems, noises)]
    launches = []
    real = hk.hmc_chains
    monkeypatch.setattr(hk, "hmc_chains", lambda *a, **k: launches.append(a[0].shape) or real(*a, **k))

    def one(mean, std, w0, b0, w1, b1, w2, b2, state_half, init, momentum, uniform):
        layers = nets.StackedLayers([(w0, b0), (w1, b1), (w2, b2)], "elu")
        res = hmc_sample(mean, std, layers, state_half, init, mode="faithful", num_samples=3, burn_in=2,
                         noise=hmc.HMCNoise(momentum, uniform), precision="ieee", backend="triton")
        return res.samples, res.accepted

    def stack(values):
        return torch.stack(list(values))

    args = [stack(p.mean for p in problems), stack(p.std for p in problems)]
    for i in range(3):
        args += [stack(p.layers[i][0] for p in problems), stack(p.layers[i][1] for p in problems)]
    args += [stack(p.state_half for p in problems), stack(p.init for p in problems),
             stack(n.momentum for n in noises), stack(n.uniform for n in noises)]
    with member_map():
        samples, accepted = torch.func.vmap(one)(*args)
    assert launches == [(2, problems[0].batch, problems[0].act_dim)]  # one launch, both members
    for m, single in enumerate(singles):
        assert torch.equal(accepted[m], single.accepted)
        torch.testing.assert_close(samples[m], single.samples, atol=0, rtol=0)
