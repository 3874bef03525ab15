"""HMC sampler: exactness against an independently written loop with the same noise, the
distribution it samples (KS test and closed forms), acceptance bookkeeping, adaptation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from misa_fast import nets
from misa_fast.ops import hmc_reference as hmc

S = 4
MODES = ["faithful", "adaptive", "parallel"]


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw their data from seeded generators; this pins anything else."""
    torch.manual_seed(0)


class Problem:
    """A tiny policy + twin critics with O(1) Q variation over the action box."""

    def __init__(self, batch=16, act_dim=2, seed=0, q_scale=0.6):
        g = torch.Generator().manual_seed(seed)
        self.policy = nets.TanhGaussianPolicy(S, act_dim, (8,), generator=g)
        self.critic = nets.EnsembleCritic(S, act_dim, (8, 8), 2, generator=g)
        with torch.no_grad():
            self.policy.net[-1].weight.normal_(0.0, 0.4, generator=g)
            for w in self.critic.weights:
                w.normal_(0.0, q_scale, generator=g)
        self.obs = torch.randn(batch, S, generator=g)
        self.init = torch.rand(batch, act_dim, generator=g) * 1.6 - 0.8
        self.mean, self.std = (t.detach() for t in self.policy.dist_params(self.obs))
        self.batch, self.act_dim = batch, act_dim

    def zero_q(self):
        with torch.no_grad():
            self.critic.weights[-1].zero_()
            self.critic.biases[-1].zero_()
        return self

    def sample(self, **kw):
        return hmc.hmc_sample(
            self.mean,
            self.std,
            self.critic.stacked_layers(detach=True),
            self.critic.first_layer_state_half(self.obs, detach=True),
            self.init,
            **kw,
        )


# --------------------------------------------------------------------------------------------------
# An independent implementation: autograd through torch.distributions and a concat-input critic,
# the current state's density recomputed every transition, explicit Hamiltonians.
def _naive_q(critic, index, obs, actions):
    x = torch.cat([obs, actions], dim=-1)
    layers = critic.layers(index)
    for w, b in layers[:-1]:
        x = F.elu(F.linear(x, w, b))
    return F.linear(x, *layers[-1]).squeeze(-1)


def naive_hmc(prob: Problem, noise, *, mode, num_samples, burn_in, leapfrog_steps, step_size,
              adapt=False, target_accept=0.65, adapt_rate=0.5):
    mean, std, obs = prob.mean, prob.std, prob.obs
    x = prob.init.clamp(-0.999, 0.999)
    if mode == "parallel":
        mean, std, obs, x = (t.repeat_interleave(num_samples, 0) for t in (mean, std, obs, x))
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform()]
    )

    def log_p_and_grad(a):
        a = a.detach().clamp(-1 + 1e-6, 1 - 1e-6).requires_grad_(True)
        lp = dist.log_prob(a).sum(-1) + torch.minimum(
            _naive_q(prob.critic, 0, obs, a), _naive_q(prob.critic, 1, obs, a)
        )
        (g,) = torch.autograd.grad(lp.sum(), a)
        return lp.detach(), g

    chains = x.shape[0]
    eps = torch.full((chains, 1), float(step_size))
    samples, accepted = [], []
    for t in range(noise.momentum.shape[0]):
        p0 = noise.momentum[t]
        lp0, g0 = log_p_and_grad(x)
        inside = torch.ones(chains, dtype=torch.bool)
        p = p0 + eps / 2 * g0
        xc = x
        for leap in range(leapfrog_steps):
            xc = xc + eps * p
            inside &= (xc.abs() < 1).all(-1)
            lpc, gc = log_p_and_grad(xc)
            p = p + (eps if leap < leapfrog_steps - 1 else eps / 2) * gc
        h_old = -lp0 + 0.5 * (p0**2).sum(-1)
        h_new = -lpc + 0.5 * (p**2).sum(-1)
        prob_acc = torch.where(inside, torch.exp(torch.clamp(h_old - h_new, max=0.0)), torch.zeros(chains))
        acc = noise.uniform[t] < prob_acc
        x = torch.where(acc[:, None], xc, x)
        if adapt and t < burn_in:
            eps = (eps * torch.exp(adapt_rate * (prob_acc[:, None] - target_accept))).clamp(1e-4, 10.0)
        if t >= burn_in:
            samples.append(x)
        accepted.append(acc)
    if mode == "parallel":
        out = samples[-1].view(prob.batch, num_samples, -1)
    else:
        out = torch.stack(samples, 1)
    return out, torch.stack(accepted), eps.squeeze(1)


# --------------------------------------------------------------------------------------------------
def test_layout_and_noise_shapes():
    assert hmc.layout("faithful", 256, 50, 5) == (256, 55)
    assert hmc.layout("adaptive", 256, 50, 5) == (256, 55)
    assert hmc.layout("parallel", 256, 50, 5) == (12800, 6)
    noise = hmc.draw_noise("parallel", 3, 4, 2, 2, torch.Generator().manual_seed(0))
    assert noise.momentum.shape == (3, 12, 2) and noise.uniform.shape == (3, 12)
    assert (noise.uniform >= 0).all() and (noise.uniform < 1).all()
    with pytest.raises(ValueError, match="noise"):
        Problem(batch=3).sample(mode="faithful", num_samples=4, burn_in=2, noise=noise)
    with pytest.raises(ValueError, match="mode"):
        hmc.layout("bogus", 1, 1, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step_size", [0.3, 1.0])
def test_matches_naive_loop_with_supplied_noise(mode, step_size):
    prob = Problem()
    kw = dict(mode=mode, num_samples=6, burn_in=3, leapfrog_steps=2)
    noise = hmc.draw_noise(mode, prob.batch, 6, 3, prob.act_dim, torch.Generator().manual_seed(1))
    res = prob.sample(step_size=step_size, noise=noise, **kw)
    ref, ref_acc, ref_step = naive_hmc(prob, noise, step_size=step_size, adapt=mode == "adaptive", **kw)
    assert res.samples.shape == (prob.batch, 6, prob.act_dim)
    assert torch.equal(res.accepted, ref_acc)  # identical decisions; positions agree to rounding
    assert torch.allclose(res.samples, ref, atol=1e-4)
    assert torch.allclose(res.step_size, ref_step, rtol=1e-5)
    assert res.accept_rate.item() == pytest.approx(ref_acc.float().mean().item())
    if step_size == 0.3:  # the comparison exercised accepts as well as rejects
        assert 0.1 < res.accept_rate.item() < 0.95


@pytest.mark.parametrize("mode", MODES)
def test_same_noise_same_samples_and_generator_path(mode):
    prob = Problem()
    kw = dict(mode=mode, num_samples=5, burn_in=2, leapfrog_steps=2, step_size=0.4)
    noise = hmc.draw_noise(mode, prob.batch, 5, 2, prob.act_dim, torch.Generator().manual_seed(7))
    a, b = prob.sample(noise=noise, **kw), prob.sample(noise=noise, **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.accepted, b.accepted)
    # Drawing from a generator == supplying draw_noise from the same generator state.
    c = prob.sample(generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.samples, c.samples)
    d = prob.sample(generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(a.samples, d.samples)


def test_fast_log_density_matches_autograd_and_rejects_outside():
    prob = Problem(batch=32)
    layers = prob.critic.stacked_layers(detach=True)
    half = prob.critic.first_layer_state_half(prob.obs, detach=True)
    fast = hmc.policy_q_log_density(prob.mean, prob.std, layers, half)

    def log_prob(a):
        return nets.tanh_gaussian_log_prob(prob.mean, prob.std, a) + prob.critic(prob.obs, a).min(0).values

    slow = hmc.autograd_log_density(log_prob)
    a = torch.rand(32, 2, generator=torch.Generator().manual_seed(3)) * 1.998 - 0.999
    (lf, gf), (ls, gs) = fast(a), slow(a)
    assert torch.allclose(lf, ls, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gf, gs, rtol=1e-4, atol=1e-4)
    a[0, 1], a[1, 0] = 1.0, -1.5
    lf, gf = fast(a)
    assert lf[0] == -math.inf and lf[1] == -math.inf and torch.isfinite(lf[2:]).all()
    assert torch.all(gf[:2] == 0) and torch.isfinite(gf).all()


def test_acceptance_rate_extremes_and_support():
    prob = Problem()
    kw = dict(mode="faithful", num_samples=10, burn_in=2, leapfrog_steps=2, generator=torch.Generator().manual_seed(0))
    tiny = prob.sample(step_size=1e-4, **kw)
    assert tiny.accept_rate.item() > 0.99
    assert torch.allclose(tiny.samples, prob.init.unsqueeze(1).expand_as(tiny.samples), atol=1e-2)
    huge = prob.sample(step_size=30.0, **kw)  # every leapfrog path leaves (-1, 1): all rejected
    assert huge.accept_rate.item() == 0.0
    assert torch.equal(huge.samples, prob.init.unsqueeze(1).expand_as(huge.samples))
    for res in (tiny, huge, prob.sample(step_size=0.5, **kw)):
        assert res.accept_rate.item() == pytest.approx(res.accepted.float().mean().item())
        assert (res.samples.abs() < 1).all()
        assert 0.0 <= res.accept_prob.item() <= 1.0


def test_a_path_through_a_hole_in_the_support_is_rejected():
    """Flat density on |x| outside [0.4, 0.6]: from 0.3 with momentum 1 and step 0.2 the first
    leapfrog position (0.5) is outside, the second (0.7) inside with equal energy. Leaving the
    support at any leapfrog position rejects the proposal."""

    def log_density(x):
        inside = ~((x.abs() > 0.4) & (x.abs() < 0.6)).squeeze(-1)
        return torch.where(inside, 0.0, -math.inf), torch.zeros_like(x)

    noise = hmc.HMCNoise(torch.ones(1, 2, 1), torch.full((1, 2), 0.5))
    init = torch.tensor([[0.3], [0.0]])  # the second chain stays inside: 0.2, 0.4... -> accepted
    out = hmc.run_chains(log_density, init, noise, leapfrog_steps=2, step_size=torch.tensor([0.2, 0.1]))
    assert out.accepted.tolist() == [[False, True]]
    assert out.states[-1, 0].item() == pytest.approx(0.3) and out.states[-1, 1].item() == pytest.approx(0.2)


def test_samples_are_detached():
    prob = Problem()
    mean = prob.mean.clone().requires_grad_(True)
    res = hmc.hmc_sample(
        mean, prob.std, prob.critic.stacked_layers(), prob.critic.first_layer_state_half(prob.obs), prob.init,
        num_samples=3, burn_in=1, step_size=0.3, generator=torch.Generator().manual_seed(0),
    )
    assert not res.samples.requires_grad


def test_adaptation_moves_step_sizes_towards_the_target_and_only_in_burn_in():
    prob = Problem()
    kw = dict(num_samples=4, burn_in=6, leapfrog_steps=2, generator=torch.Generator().manual_seed(0))
    shrink = prob.sample(mode="adaptive", step_size=2.0, **kw)  # acceptance ~0 -> smaller steps
    assert (shrink.step_size < 2.0).all()
    grow = prob.sample(mode="adaptive", step_size=1e-3, **kw)  # acceptance ~1 -> larger steps
    assert (grow.step_size > 1e-3).all()
    fixed = prob.sample(mode="faithful", step_size=0.7, **kw)
    assert torch.equal(fixed.step_size, torch.full((prob.batch,), 0.7))
    # Per-chain step sizes are accepted as input; burn_in=0 leaves nothing to adapt.
    per_chain = torch.linspace(0.1, 0.5, prob.batch)
    res = prob.sample(mode="adaptive", step_size=per_chain, num_samples=3, burn_in=0,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.step_size, per_chain)
    # Parallel chains adapt too when asked.
    par = prob.sample(mode="parallel", adapt=True, step_size=2.0, **kw)
    assert par.step_size.shape == (prob.batch * 4,) and (par.step_size < 2.0).all()


# --------------------------------------------------------------------------------------------------
# Distributional checks
def test_q_zero_stationary_chain_keeps_the_policy_distribution():
    """With Q = 0 the target is pi itself; chains started at exact draws from pi stay distributed as
    pi at every transition (any correct MH kernel). KS test of the standardised pre-tanh samples."""
    prob = Problem(batch=1500, act_dim=2, seed=1).zero_q()
    prob.mean = prob.mean.clamp(-1, 1)  # keep pi's mass well inside the +-0.999 start clip
    prob.std = prob.std.clamp(0.15, 0.4)
    g = torch.Generator().manual_seed(5)
    prob.init = torch.tanh(prob.mean + prob.std * torch.randn(prob.mean.shape, generator=g))
    res = prob.sample(mode="faithful", num_samples=8, burn_in=2, leapfrog_steps=2, step_size=0.2, generator=g)
    assert res.accept_rate.item() > 0.4  # the chain moves (a lazy kernel would pass trivially)
    z = (torch.atanh(res.samples[:, -1]) - prob.mean) / prob.std  # one sample per chain: independent
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    moved = (res.samples[:, -1] != prob.init).any(-1).float().mean().item()
    assert moved > 0.4


def test_q_zero_parallel_chains_converge_to_the_policy():
    """From a fixed start away from pi, independent parallel chains reach pi after burn-in."""
    prob = Problem(batch=250, act_dim=1, seed=2).zero_q()
    prob.mean = torch.full_like(prob.mean, 0.6)
    prob.std = torch.full_like(prob.std, 0.3)
    prob.init = torch.full_like(prob.init, -0.5)
    res = prob.sample(mode="parallel", num_samples=8, burn_in=60, leapfrog_steps=3, step_size=0.1,
                      generator=torch.Generator().manual_seed(0))
    assert res.accept_rate.item() > 0.5
    z = ((torch.atanh(res.samples) - 0.6) / 0.3).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_gaussian_target_closed_form_moments():
    """The generic core on a correlated 2-D Gaussian: mean and covariance of independent chains."""
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    precision = torch.linalg.inv(cov)

    def log_density(x):
        d = x - mean
        return -0.5 * ((d @ precision) * d).sum(-1), -(d @ precision)

    chains = 4000
    g = torch.Generator().manual_seed(0)
    noise = hmc.HMCNoise(torch.randn(25, chains, 2, generator=g), torch.rand(25, chains, generator=g))
    out = hmc.run_chains(log_density, torch.zeros(chains, 2), noise, leapfrog_steps=4, step_size=0.4, record_from=24)
    x = out.states[-1].double()
    assert out.accepted.float().mean() > 0.7
    se = torch.sqrt(torch.diagonal(cov).double() / chains)
    assert torch.all((x.mean(0) - mean.double()).abs() < 4 * se)
    assert torch.allclose(torch.cov(x.T), cov.double(), atol=0.08)


def test_tilted_target_matches_quadrature():
    """Q nonzero: 1-D action, critics linear in a (ELU is the identity on the positive pre-activation
    we build), Q1 = 4a, Q2 = 1 - 3a, so the target pi(a) exp(min(Q1, Q2)) has a kink; its mean
    and variance come from quadrature."""
    batch, per_state = 500, 8
    mu, sigma = 0.2, 0.6
    # layer 1: one unit, state half 10 (so z = 10 + a > 0), action weight 1; output w_i * z + b_i
    w1 = torch.zeros(2, 1, S + 1)
    w1[:, 0, -1] = 1.0
    layers = [(w1, torch.zeros(2, 1)), (torch.tensor([[[4.0]], [[-3.0]]]), torch.tensor([[-40.0], [31.0]]))]
    state_half = torch.full((2, batch, 1), 10.0)
    res = hmc.hmc_sample(
        torch.full((batch, 1), mu), torch.full((batch, 1), sigma), layers, state_half, torch.zeros(batch, 1),
        mode="parallel", num_samples=per_state, burn_in=30, leapfrog_steps=3, step_size=0.3,
        generator=torch.Generator().manual_seed(0),
    )
    a = res.samples.flatten().double()
    u = np.linspace(-8, 8, 200001)
    t = np.tanh(u)
    w = stats.norm.pdf(u, mu, sigma) * np.exp(np.minimum(4 * t, 1.0 - 3.0 * t))
    w /= w.sum()
    m, v = (w * t).sum(), (w * (t - (w * t).sum()) ** 2).sum()
    se = math.sqrt(v / a.numel())
    assert abs(a.mean().item() - m) < 4 * se
    assert abs(a.var().item() - v) < 0.1 * v
    # Sanity: the tilt matters (the policy alone has a different mean).
    w0 = stats.norm.pdf(u, mu, sigma)
    assert abs((w0 * t).sum() / w0.sum() - m) > 10 * se


@pytest.mark.parametrize("mode, burn_in, piece", [("adaptive", 3, 2), ("faithful", 1, 3), ("parallel", 4, 4)])
def test_running_the_chain_in_pieces_changes_nothing(mode, burn_in, piece):
    """run_chains cut into pieces of a few transitions (how the compiled backend runs it), adaptation
    ending inside a piece's natural span and recording starting mid-piece: bit-identical to one piece."""
    prob = Problem()
    kw = dict(mode=mode, num_samples=4, burn_in=burn_in, step_size=0.8, generator=torch.Generator().manual_seed(3))
    whole = prob.sample(**kw)
    with hmc.chain_runner(hmc.hmc_transitions, piece):
        pieces = prob.sample(**{**kw, "generator": torch.Generator().manual_seed(3)})
    for name in ("samples", "step_size", "accepted", "accept_rate", "accept_prob"):
        assert torch.equal(getattr(whole, name), getattr(pieces, name)), name


def test_compiled_transitions_reproduce_the_eager_chain():
    """torch.compile of the pieces (3 small graphs: adapting pieces of 2 and 1, recording pieces of 2):
    the same accept decisions, samples and step sizes up to float rounding."""
    prob = Problem(q_scale=1.0)
    noise = hmc.draw_noise("adaptive", prob.batch, 4, 3, prob.act_dim, torch.Generator().manual_seed(5))
    kw = dict(mode="adaptive", num_samples=4, burn_in=3, step_size=0.8, noise=noise)
    eager = prob.sample(**kw)
    with hmc.compiled_transitions(piece=2):
        compiled = prob.sample(**kw)
    assert torch.equal(eager.accepted, compiled.accepted)
    torch.testing.assert_close(compiled.samples, eager.samples, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.step_size, eager.step_size, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="piece must be >= 1"):
        with hmc.compiled_transitions(piece=0):
            pass


# --------------------------------------------------------------------------------------------------
# pre-tanh space: whitened pre-tanh positions, the Gaussian part integrated exactly
def naive_pre_tanh_hmc(prob: Problem, noise, *, mode, num_samples, burn_in, leapfrog_steps, step_size,
                       adapt=False, target_accept=0.65, adapt_rate=0.5):
    """Written from the definition: u ~ N(mean, std) tilted by exp(min_i Q_i(s, tanh u)), in
    z = (u - mean) / std with H(z, p) = |z|^2 / 2 - Q + |p|^2 / 2; the flow of |z|^2 / 2 + |p|^2 / 2
    for time eps is the rotation [[cos, sin], [-sin, cos]], Q enters through half/full kicks;
    autograd for dQ/dz, all densities recomputed every transition."""
    mean, std, obs = prob.mean, prob.std, prob.obs
    if mode == "parallel":
        mean, std, obs = (t.repeat_interleave(num_samples, 0) for t in (mean, std, obs))
    init = prob.init.clamp(-0.999, 0.999)
    if mode == "parallel":
        init = init.repeat_interleave(num_samples, 0)
    z = (torch.atanh(init) - mean) / std

    def q_and_grad(z):
        z = z.detach().requires_grad_(True)
        a = torch.tanh(mean + std * z)
        q = torch.minimum(_naive_q(prob.critic, 0, obs, a), _naive_q(prob.critic, 1, obs, a))
        (g,) = torch.autograd.grad(q.sum(), z)
        return q.detach(), g

    def hamiltonian(z, p):
        return -q_and_grad(z)[0] + 0.5 * (z**2).sum(-1) + 0.5 * (p**2).sum(-1)

    eps = torch.full((z.shape[0], 1), float(step_size))
    samples, accepted = [], []
    for t in range(noise.momentum.shape[0]):
        p0 = noise.momentum[t]
        zc, p = z, p0
        for leap in range(leapfrog_steps):
            p = p + eps / 2 * q_and_grad(zc)[1]
            zc, p = torch.cos(eps) * zc + torch.sin(eps) * p, -torch.sin(eps) * zc + torch.cos(eps) * p
            p = p + eps / 2 * q_and_grad(zc)[1]
        prob_acc = torch.exp(torch.clamp(hamiltonian(z, p0) - hamiltonian(zc, p), max=0.0))
        acc = noise.uniform[t] < prob_acc
        z = torch.where(acc[:, None], zc, z)
        if adapt and t < burn_in:
            eps = (eps * torch.exp(adapt_rate * (prob_acc[:, None] - target_accept))).clamp(
                1e-4, math.pi / (2 * leapfrog_steps))
        if t >= burn_in:
            samples.append(mean + std * z)
        accepted.append(acc)
    if mode == "parallel":
        u = samples[-1].view(prob.batch, num_samples, -1)
    else:
        u = torch.stack(samples, 1)
    return u, torch.stack(accepted), eps.squeeze(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step_size", [0.3, 0.9])
def test_pre_tanh_matches_naive_loop_with_supplied_noise(mode, step_size):
    prob = Problem(q_scale=1.5)
    prob.init[0] = torch.tensor([1.0, -1.0])  # clipped dataset actions, far in the policy's tail
    kw = dict(mode=mode, num_samples=6, burn_in=3, leapfrog_steps=2)
    noise = hmc.draw_noise(mode, prob.batch, 6, 3, prob.act_dim, torch.Generator().manual_seed(1))
    res = prob.sample(space="pre_tanh", step_size=step_size, noise=noise, **kw)
    u, ref_acc, ref_step = naive_pre_tanh_hmc(prob, noise, step_size=step_size, adapt=mode == "adaptive", **kw)
    assert torch.equal(res.accepted, ref_acc)
    torch.testing.assert_close(res.pre_tanh, u, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(res.samples, torch.tanh(u), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.step_size, ref_step, rtol=1e-4, atol=1e-7)
    assert 0.1 < res.accept_rate.item() < 1.0  # accepts and rejects both exercised


def test_pre_tanh_density_is_the_tilt_with_its_autograd_gradient():
    prob = Problem(batch=32)
    layers = prob.critic.stacked_layers(detach=True)
    half = prob.critic.first_layer_state_half(prob.obs, detach=True)
    fast = hmc.policy_q_log_density(prob.mean, prob.std, layers, half, space="pre_tanh")
    slow = hmc.autograd_log_density(
        lambda z: prob.critic(prob.obs, torch.tanh(prob.mean + prob.std * z)).min(0).values)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(3)) * 4.0  # saturated tanh included
    (lf, gf), (ls, gs) = fast(z), slow(z)
    torch.testing.assert_close(lf, ls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown HMC space"):
        hmc.policy_q_log_density(prob.mean, prob.std, layers, half, space="tanh")


def test_pre_tanh_tilted_target_matches_quadrature():
    """The kinked target of test_tilted_target_matches_quadrature, one sequential chain per state
    started at the box's edge: the pre-tanh chains reach its mean and variance; the post-tanh chains
    from the same start do not move (the official sampler's behaviour at step size 1)."""
    batch, mu, sigma = 400, 0.2, 0.6
    w1 = torch.zeros(2, 1, S + 1)
    w1[:, 0, -1] = 1.0
    layers = [(w1, torch.zeros(2, 1)), (torch.tensor([[[4.0]], [[-3.0]]]), torch.tensor([[-40.0], [31.0]]))]
    state_half = torch.full((2, batch, 1), 10.0)
    args = (torch.full((batch, 1), mu), torch.full((batch, 1), sigma), layers, state_half, torch.full((batch, 1), -1.0))
    kw = dict(mode="faithful", num_samples=20, burn_in=5)  # each space's default step size
    res = hmc.hmc_sample(*args, space="pre_tanh", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(res.step_size, torch.full((batch,), math.pi / 4))
    a = res.samples[:, -1].double()  # one sample per chain: independent
    u = np.linspace(-8, 8, 200001)
    t = np.tanh(u)
    w = stats.norm.pdf(u, mu, sigma) * np.exp(np.minimum(4 * t, 1.0 - 3.0 * t))
    w /= w.sum()
    m, v = (w * t).sum(), (w * (t - (w * t).sum()) ** 2).sum()
    se = math.sqrt(v / batch)
    assert abs(a.mean().item() - m) < 4 * se
    assert abs(a.var().item() - v) < 0.2 * v
    assert res.accept_rate.item() > 0.25  # the kink's slopes (4, -3) kick hard
    post = hmc.hmc_sample(*args, space="post_tanh", generator=torch.Generator().manual_seed(0), **kw)
    assert post.accept_rate.item() < 0.05 and abs(post.samples[:, -1].double().mean().item() - m) > 10 * se


def test_effective_sample_size():
    g = torch.Generator().manual_seed(0)
    n, k = 400, 50
    iid = torch.randn(n, k, generator=g)
    ar = torch.zeros(n, k)
    ar[:, 0] = torch.randn(n, generator=g)
    for t in range(1, k):  # AR(1), phi 0.9: true ESS 50 * 0.1 / 1.9 = 2.6 (short chains: biased up)
        ar[:, t] = 0.9 * ar[:, t - 1] + math.sqrt(1 - 0.81) * torch.randn(n, generator=g)
    ess_iid, ess_ar = hmc.effective_sample_size(iid), hmc.effective_sample_size(ar)
    assert ess_iid.shape == (n,) and 35 < ess_iid.mean().item() <= 50
    assert ess_ar.mean().item() < 12
    alternating = torch.tensor([[1.0, -1.0] * 25])  # anti-correlated: clamped to K
    assert hmc.effective_sample_size(alternating).item() == 50
    assert hmc.effective_sample_size(torch.full((3, k), 0.7)).tolist() == [1.0, 1.0, 1.0]  # never moved


def test_chain_diagnostics_of_a_stuck_and_a_mixing_chain():
    prob = Problem(batch=64)
    prob.init[:] = 0.9999  # clipped to 0.999: post-tanh steps of 1 leave the box, nothing moves
    stuck = prob.sample(mode="faithful", num_samples=20, burn_in=2, step_size=1.0,
                        generator=torch.Generator().manual_seed(0))
    d = hmc.chain_diagnostics(stuck, prob.mean, prob.std, prob.init)
    assert stuck.accept_rate.item() == 0.0
    assert d["hmc_dist_a"].item() == 0.0 and d["hmc_dist_u"].item() < 1e-4 and d["hmc_ess"].item() == 1.0
    mixing = prob.sample(mode="faithful", space="pre_tanh", num_samples=20, burn_in=2, step_size=0.7,
                         generator=torch.Generator().manual_seed(0))
    d = hmc.chain_diagnostics(mixing, prob.mean, prob.std, prob.init)
    assert d["hmc_dist_u"].item() > 1.0 and d["hmc_ess"].item() > 5.0
    parallel = prob.sample(mode="parallel", space="pre_tanh", num_samples=4, burn_in=2, step_size=0.7,
                           generator=torch.Generator().manual_seed(0))
    assert set(hmc.chain_diagnostics(parallel, prob.mean, prob.std, prob.init)) == {"hmc_dist_a", "hmc_dist_u"}


def test_pre_tanh_compiled_transitions_reproduce_the_eager_chain():
    prob = Problem(q_scale=1.0)
    noise = hmc.draw_noise("adaptive", prob.batch, 4, 3, prob.act_dim, torch.Generator().manual_seed(5))
    kw = dict(mode="adaptive", space="pre_tanh", num_samples=4, burn_in=3, step_size=0.6, noise=noise)
    eager = prob.sample(**kw)
    with hmc.compiled_transitions(piece=2):
        compiled = prob.sample(**kw)
    assert torch.equal(eager.accepted, compiled.accepted)
    torch.testing.assert_close(compiled.pre_tanh, eager.pre_tanh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.step_size, eager.step_size, rtol=1e-5, atol=1e-6)


def test_pre_tanh_default_step_is_a_quarter_rotation_that_leaves_any_tail():
    """A narrow policy (std 0.05) and dataset actions far in its tails (z up to ~80): with a quarter
    rotation per transition (the pre-tanh default) every chain reaches the target; with 1 rad per
    leapfrog step (2 per transition) chains started in one tail are carried to the far side of the
    other and rejected there again and again."""
    batch, mu, sd = 1000, 0.5, 0.05

    def q_and_grad(a):
        return (-8.0 * (a + 0.2) ** 2).sum(-1), -16.0 * (a + 0.2)

    init = torch.rand(batch, 1, generator=torch.Generator().manual_seed(1)) * 2 - 1
    args = (torch.full((batch, 1), mu), torch.full((batch, 1), sd), q_and_grad, init)
    kw = dict(space="pre_tanh", num_samples=20, burn_in=5, generator=torch.Generator().manual_seed(0))
    u = np.linspace(mu - 10 * sd, mu + 10 * sd, 100001)
    w = stats.norm.pdf(u, mu, sd) * np.exp(-8.0 * (np.tanh(u) + 0.2) ** 2)
    cdf = np.cumsum(w) / w.sum()
    quarter = hmc.sample_tilted(*args, **kw)
    assert stats.kstest(quarter.pre_tanh[:, -1, 0].double().numpy(), lambda x: np.interp(x, u, cdf)).pvalue > 1e-3
    wide = hmc.sample_tilted(*args, step_size=1.0, **kw)
    stuck = ((wide.pre_tanh[:, -1, 0] - mu).abs() > 10 * sd).float().mean().item()
    assert stuck > 0.05
