"""MI lower bounds (misa_fast.agents.mi_bounds): closed-form Gaussian MI, the orderings of Theorem 4.1 that
hold deterministically for the sample estimates, what does (and does not) relate BA to the energy
bounds, gradients, a hand computation, and shape errors.

Monte-Carlo tolerances: a bound estimated from N i.i.d. per-state terms has standard error
SE = std / sqrt(N); checks allow 4 SE. The MISA and MISA-DV estimates take the log of a sample mean,
which is biased *high* (Jensen) by about Var(e^T) / (2 K E[e^T]^2) (delta method); they get an extra
allowance of twice that, estimated from the samples themselves (``_bias_allowance``).
"""
import math

import numpy as np
import pytest
import torch

from misa_fast import nets
from misa_fast.agents.mi_bounds import MIBounds, estimate_bounds, mi_bounds

BOUNDS = MIBounds._fields


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw their data from seeded generators; this pins anything else."""
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------
# Correlated Gaussians: S ~ N(0, I_d), A = rho S + sqrt(1 - rho^2) eps, so p(a|s) = N(rho s, 1 - rho^2),
# p(a) = N(0, 1) per dimension and I(S; A) = -d/2 log(1 - rho^2). Policies pi(a|s) = N(kappa rho s,
# var_pi): kappa = 1, var_pi = 1 - rho^2 is p(a|s) itself; kappa = 0.5, var_pi = 1 a worse one.
D, RHO, N, K = 2, 0.8, 4000, 256
TRUE_MI = -D / 2 * math.log(1 - RHO**2)
POLICIES = {"optimal": (1.0, 1 - RHO**2), "suboptimal": (0.5, 1.0)}


def _log_normal(x, mean, var):
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(-1)


def _closed_form(kappa, var_pi):
    """Exact (K -> infinity) bounds for pi = N(kappa rho s, var_pi) and three energies.

    Per dimension, with v1 = 1 - rho^2, v2 = var_pi, Delta(s) = (1 - kappa) rho s ~ N(0, dv), dv = (1-kappa)^2 rho^2:
    E_s KL(p(a|s) || pi) = log sqrt(v2/v1) + (v1 + dv) / (2 v2) - 1/2, and I_BA = I - d KL.
    For T = log w / 2 + 1 (w = p(a|s) / pi(a|s)), E_pi[w^(1/2)] is the Bhattacharyya coefficient
    BC(s) = sqrt(2 sqrt(v1 v2) / (v1 + v2)) exp(-Delta^2 / (4 (v1 + v2))), so
    I_MISA = I_BA + KL/2 - E_s log BC, I_MISA-DV = I_BA + KL/2 - log E_s BC (E exp(-a x^2) =
    (1 + 2 a dv)^(-1/2) for x ~ N(0, dv)), I_MISA-f = I_BA + KL/2 + 1 - E_s BC."""
    v1, v2, dv = 1 - RHO**2, var_pi, (1 - kappa) ** 2 * RHO**2
    kl = D * (0.5 * math.log(v2 / v1) + (v1 + dv) / (2 * v2) - 0.5)
    ba = TRUE_MI - kl
    log_c = 0.5 * math.log(2 * math.sqrt(v1 * v2) / (v1 + v2))
    e_log_bc = D * (log_c - dv / (4 * (v1 + v2)))
    log_e_bc = D * (log_c - 0.5 * math.log(1 + 2 * dv / (4 * (v1 + v2))))
    half = ba + kl / 2
    return {
        "one": dict(ba=ba, misa_f=ba, misa_dv=ba, misa=ba),  # T = 1: every bound is I_BA
        "zero": dict(ba=ba, misa_f=ba - math.exp(-1), misa_dv=ba, misa=ba),
        "optimal": dict(ba=ba, misa_f=TRUE_MI, misa_dv=TRUE_MI, misa=TRUE_MI),
        "half": dict(ba=ba, misa_f=half + 1 - math.exp(log_e_bc), misa_dv=half - log_e_bc, misa=half - e_log_bc),
    }


def _gaussian_batch(policy, energy, seed):
    """Per-sample inputs of mi_bounds (float64) and the log-density of the conditional."""
    g = torch.Generator().manual_seed(seed)
    kappa, var_pi = POLICIES[policy]
    s = torch.randn(N, D, generator=g, dtype=torch.float64)
    a = RHO * s + math.sqrt(1 - RHO**2) * torch.randn(N, D, generator=g, dtype=torch.float64)
    a_k = kappa * RHO * s[:, None] + math.sqrt(var_pi) * torch.randn(N, K, D, generator=g, dtype=torch.float64)

    def log_pi(s, a):
        return _log_normal(a, kappa * RHO * s, var_pi)

    def log_w(s, a):
        return _log_normal(a, RHO * s, 1 - RHO**2) - log_pi(s, a)

    T = {
        "one": lambda s, a: torch.ones(a.shape[:-1], dtype=a.dtype),
        "zero": lambda s, a: torch.zeros(a.shape[:-1], dtype=a.dtype),
        "optimal": lambda s, a: log_w(s, a) + 1.0,
        "half": lambda s, a: 0.5 * log_w(s, a) + 1.0,
        "quadratic": lambda s, a: 0.3 * (s * a).sum(-1) - 0.1 * (a * a).sum(-1),  # mis-specified
    }[energy]
    return log_pi(s, a), T(s, a), T(s[:, None], a_k), _log_normal(a, 0.0, 1.0)


def _standard_errors(log_pi, t_data, t_samples, log_marginal):
    """SE of each estimate. BA, MISA-f and MISA are means of i.i.d. per-state terms. MISA-DV is
    mean(x) - log mean(y) with y_s = mean_k e^T: delta method for the log, and SE(X - Y) <= SE(X) + SE(Y)."""
    x = log_pi - log_marginal + t_data
    y = t_samples.exp().mean(1)
    se = lambda v: (v.std() / math.sqrt(len(v))).item()  # noqa: E731
    return dict(
        ba=se(log_pi - log_marginal),
        misa_f=se(x - (t_samples - 1).exp().mean(1)),
        misa_dv=se(x) + se(y) / y.mean().item(),
        misa=se(x - torch.logsumexp(t_samples, 1)),
    )


def _bias_allowance(t_samples):
    """Twice the delta-method upward bias of -log(sample mean of e^T): per state (MISA), whole batch
    (MISA-DV). Zero for BA and MISA-f, whose estimates are unbiased."""
    w = (t_samples - t_samples.max()).exp()
    per_state = (w.var(1) / w.mean(1) ** 2).mean().item() / w.shape[1]
    whole = (w.var() / w.mean() ** 2).item() / w.numel()
    return dict(ba=0.0, misa_f=0.0, misa_dv=whole, misa=per_state)


GAUSSIAN_CASES = [("optimal", "one"), ("optimal", "zero"), ("optimal", "quadratic"), ("suboptimal", "one"),
                  ("suboptimal", "optimal"), ("suboptimal", "half"), ("suboptimal", "quadratic")]


@pytest.mark.parametrize("policy,energy", GAUSSIAN_CASES)
def test_bounds_on_correlated_gaussians(policy, energy):
    """Every estimate stays below I(S; A) + 4 SE (+ its bias allowance), and where the exact value is
    known in closed form (see ``_closed_form``), the estimate is within 4 SE of it:
    - pi = p(a|s), T = const: I_BA = I, the energy terms vanish (MISA-f pays 1/e at T = 0);
    - pi suboptimal: I_BA = I - KL stays well below I; the optimal energy T = log p(a|s)/pi(a|s) + 1
      lifts MISA, MISA-DV and MISA-f to I; T = half of it lands strictly between, at known values."""
    inputs = _gaussian_batch(policy, energy, seed=GAUSSIAN_CASES.index((policy, energy)))
    est = mi_bounds(*inputs)._asdict()
    se, bias = _standard_errors(*inputs), _bias_allowance(inputs[2])
    for name in BOUNDS:
        assert est[name].dtype == torch.float64
        assert est[name].item() <= TRUE_MI + 4 * se[name] + bias[name], (name, est[name].item(), TRUE_MI)
    expected = _closed_form(*POLICIES[policy]).get(energy)
    if expected is None:  # the mis-specified energy: only the upper bound is known
        return
    for name in BOUNDS:
        err = est[name].item() - expected[name]
        assert -4 * se[name] <= err <= 4 * se[name] + bias[name], (name, est[name].item(), expected[name])
    if policy == "suboptimal":  # the premise: BA is far from tight here, so the energy has work to do
        assert est["ba"].item() < TRUE_MI - 0.4
        if energy == "optimal":
            assert est["misa"].item() > est["ba"].item() + 0.4


# --------------------------------------------------------------------------------------------------
# Random networks
def _random_setup(seed, batch, obs_dim, act_dim, hidden, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    policy = nets.TanhGaussianPolicy(obs_dim, act_dim, hidden, generator=g)
    critic = nets.EnsembleCritic(obs_dim, act_dim, hidden, 2, generator=g)
    with torch.no_grad():  # O(1) policy means / stds and O(scale) energies, not the ~0 of a fresh init
        policy.net[-1].weight.normal_(0.0, 0.5, generator=g)
        critic.weights[-1].normal_(0.0, scale, generator=g)
        critic.biases[-1].normal_(0.0, scale, generator=g)
    obs = torch.randn(batch, obs_dim, generator=g)
    actions = torch.rand(batch, act_dim, generator=g) * 1.8 - 0.9
    return policy, critic, obs, actions, g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "batch,num_samples,obs_dim,act_dim,hidden", [(16, 8, 3, 2, (8,)), (64, 32, 5, 3, (16, 16)), (1, 1, 2, 1, (4,))]
)
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_theorem_4_1_ordering_on_the_same_samples(seed, batch, num_samples, obs_dim, act_dim, hidden, scale):
    """MISA-f <= MISA-DV <= MISA holds for the estimates themselves (no Monte-Carlo slack): with the
    same samples, mean_s log mean_k e^T <= log mean_{s,k} e^T (Jensen) and log x <= x / e. At
    scale 300 the energies reach hundreds, where a naive exp overflows float32 (checked): MISA and
    MISA-DV must stay finite. The slack 1e-6 * (1 + |value|) is float32 rounding only."""
    policy, critic, obs, actions, g = _random_setup(seed, batch, obs_dim, act_dim, hidden, scale)
    b = estimate_bounds(policy, critic, obs, actions, num_samples, generator=g)
    assert torch.isfinite(b.misa) and torch.isfinite(b.misa_dv) and torch.isfinite(b.ba)
    tol = lambda v: 1e-6 * (1 + abs(v.item()))  # noqa: E731
    assert b.misa_f <= b.misa_dv + tol(b.misa_dv)
    assert b.misa_dv <= b.misa + tol(b.misa)
    if scale > 1:  # the premise of "large magnitude": exp of some energy overflows float32
        assert torch.isinf(critic(obs, actions).detach().exp()).any()


def test_large_energies_match_a_float64_reference():
    """Energies in the thousands (exp overflows even float64): the stable log-sum-exps must agree
    with a float64 shifted computation, and MISA-f is -inf (its partition overflows: the true value)."""
    g = torch.Generator().manual_seed(3)
    log_pi = torch.randn(32, generator=g)
    t_data = 1000 * torch.randn(32, generator=g)
    t_samples = 1000 + 800 * torch.randn(32, 20, generator=g)
    assert torch.isinf(t_samples.exp().mean(1)).any()
    b = mi_bounds(log_pi, t_data, t_samples)
    d = t_samples.double()
    lme = torch.logsumexp(d, 1) - math.log(20)
    base = log_pi.double().mean() + t_data.double().mean()
    torch.testing.assert_close(b.misa.double(), base - lme.mean(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(b.misa_dv.double(), base - (torch.logsumexp(d.flatten(), 0) - math.log(d.numel())),
                               rtol=1e-6, atol=1e-3)
    assert b.misa_f.item() == -math.inf


# --------------------------------------------------------------------------------------------------
# What relates BA to the energy bounds (there is no ordering for an arbitrary T)
def _random_inputs(seed, batch=24, k=12, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return randn(batch), scale * randn(batch), scale * randn(batch, k), randn(batch)


@pytest.mark.parametrize("c", [-3.0, 0.0, 1.0, 2.5])
def test_constant_energy_reduces_to_ba(c):
    """T = c: the MISA and MISA-DV energy terms cancel exactly (= I_BA for every c); MISA-f pays
    c - e^(c-1) <= 0, zero only at c = 1 — the sense in which MISA-f >= BA for the best energy."""
    log_pi, _, samples, log_marginal = _random_inputs(0)
    b = mi_bounds(log_pi, torch.full_like(log_pi, c), torch.full_like(samples, c), log_marginal)
    ba = (log_pi - log_marginal).mean()
    torch.testing.assert_close(b.ba, ba)
    torch.testing.assert_close(b.misa, ba)
    torch.testing.assert_close(b.misa_dv, ba)
    torch.testing.assert_close(b.misa_f, ba + c - math.exp(c - 1))
    assert (b.misa_f < b.ba) == (c != 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shifts_of_the_energy(seed):
    """For any T: (i) MISA-DV is invariant to a constant shift and MISA to a per-state shift c(s)
    (which does change MISA-DV); (ii) MISA-f(T + c) is maximised at c* = 1 - log E e^T, where it equals
    MISA-DV(T) — so sup_c MISA-f = MISA-DV, and since T = 1 gives BA, sup_T MISA-f >= BA; (iii) a poor
    T (high on policy samples, low on data) puts every energy bound below BA: BA <= MISA-f is not a
    property of an arbitrary T. All identities hold exactly for the estimates (same samples)."""
    log_pi, t_data, t_samples, log_marginal = _random_inputs(seed)
    b = mi_bounds(log_pi, t_data, t_samples, log_marginal)
    g = torch.Generator().manual_seed(100 + seed)
    shift = 3 * torch.randn(len(log_pi), generator=g, dtype=torch.float64)
    per_state = mi_bounds(log_pi, t_data + shift, t_samples + shift[:, None], log_marginal)
    torch.testing.assert_close(per_state.misa, b.misa)
    assert abs(per_state.misa_dv - b.misa_dv) > 1e-3
    torch.testing.assert_close(mi_bounds(log_pi, t_data - 7.0, t_samples - 7.0, log_marginal).misa_dv, b.misa_dv)

    c_star = 1 - (torch.logsumexp(t_samples.flatten(), 0) - math.log(t_samples.numel()))
    best = mi_bounds(log_pi, t_data + c_star, t_samples + c_star, log_marginal).misa_f
    torch.testing.assert_close(best, b.misa_dv)
    for dc in (-1.0, -0.1, 0.1, 1.0):
        assert mi_bounds(log_pi, t_data + c_star + dc, t_samples + c_star + dc, log_marginal).misa_f < best

    poor = mi_bounds(log_pi, t_data - 5.0, t_samples.abs() + 5.0, log_marginal)
    assert poor.misa < poor.ba and poor.misa_dv <= poor.misa and poor.misa_f <= poor.misa_dv


# --------------------------------------------------------------------------------------------------
def test_hand_computation_and_marginal_shift():
    """Tiny fixed tensors against numpy float64; log_marginal=None shifts all four by +E log p(a)."""
    log_pi = torch.tensor([-1.0, 0.5])
    t_data = torch.tensor([0.2, -0.3])
    t_samples = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.0]])
    log_marginal = torch.tensor([-0.5, -1.0])
    b = mi_bounds(log_pi, t_data, t_samples, log_marginal)
    ts = t_samples.double().numpy()
    ba = np.mean([-1.0 + 0.5, 0.5 + 1.0])
    data = ba + np.mean([0.2, -0.3])
    expected = dict(
        ba=ba,
        misa_f=data - np.mean(np.exp(ts - 1)),
        misa_dv=data - np.log(np.mean(np.exp(ts))),
        misa=data - np.mean(np.log(np.mean(np.exp(ts), axis=1))),
    )
    for name in BOUNDS:
        assert getattr(b, name).dim() == 0 and getattr(b, name).dtype == torch.float32
        assert getattr(b, name).item() == pytest.approx(expected[name], abs=1e-6), name
    no_marginal = mi_bounds(log_pi, t_data, t_samples)
    for name in BOUNDS:
        assert getattr(no_marginal, name).item() == pytest.approx(expected[name] - 0.75, abs=1e-6), name
    # Low-precision inputs are reduced in float32.
    assert mi_bounds(log_pi.half(), t_data.half(), t_samples.half()).misa.dtype == torch.float32


class _PlainPolicy:
    """Only the Policy protocol (log_prob, sample), forcing estimate_bounds' generic path."""

    def __init__(self, policy):
        self.policy = policy

    def log_prob(self, obs, actions):
        return self.policy.log_prob(obs, actions)

    def sample(self, obs, generator=None):
        return self.policy.sample(obs, generator=generator)


def test_generic_policy_and_energy_paths_agree():
    """The TanhGaussianPolicy / EnsembleCritic fast paths equal the protocol paths (same noise: one
    (B*K, A) draw is the (B, K, A) draw flattened), so the critic path is min over critics and the
    samples are grouped per state; BA is the policy's mean log-likelihood of the data."""
    policy, critic, obs, actions, _ = _random_setup(5, 12, 4, 2, (8, 8))
    fast = estimate_bounds(policy, critic, obs, actions, 7, generator=torch.Generator().manual_seed(9))
    generic = estimate_bounds(_PlainPolicy(policy), lambda o, a: critic(o, a).min(0).values, obs, actions, 7,
                              generator=torch.Generator().manual_seed(9))
    for name in BOUNDS:
        torch.testing.assert_close(getattr(fast, name), getattr(generic, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.ba, policy.log_prob(obs, actions).mean())
    # A single critic of the ensemble gives a different energy (so the min is really taken).
    first = estimate_bounds(policy, lambda o, a: critic(o, a)[0], obs, actions, 7,
                            generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(first.misa, fast.misa)


def test_gradients_reach_policy_and_energy():
    """Every bound is differentiable; the energy bounds give finite, non-zero gradients to every
    parameter tensor of the policy and the critics; BA never touches the critics. With
    ``detach_samples`` the policy's gradient of MISA is exactly that of BA (samples are constants);
    without it the reparameterised samples add a pathwise term."""
    policy, critic, obs, actions, _ = _random_setup(1, 16, 3, 2, (8, 8))
    pol, cri = list(policy.parameters()), list(critic.parameters())
    b = estimate_bounds(policy, critic, obs, actions, 8, generator=torch.Generator().manual_seed(0))
    for name in ("misa_f", "misa_dv", "misa"):
        grads = torch.autograd.grad(getattr(b, name), pol + cri, retain_graph=True)
        for p, gr in zip(pol + cri, grads):
            assert torch.isfinite(gr).all() and gr.abs().sum() > 0, (name, p.shape)
    assert all(gr is None for gr in torch.autograd.grad(b.ba, cri, retain_graph=True, allow_unused=True))
    g_ba = torch.autograd.grad(b.ba, pol, retain_graph=True)
    g_misa = torch.autograd.grad(b.misa, pol)
    d = estimate_bounds(policy, critic, obs, actions, 8, generator=torch.Generator().manual_seed(0),
                        detach_samples=True)
    g_misa_detached = torch.autograd.grad(d.misa, pol)
    for a, c, e in zip(g_ba, g_misa_detached, g_misa):
        torch.testing.assert_close(a, c)
    assert any(not torch.allclose(a, e) for a, e in zip(g_ba, g_misa))


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(log_pi_data=torch.zeros(4, 1)), "log_pi_data"),
        (dict(log_pi_data=torch.zeros(0), energy_data=torch.zeros(0), energy_samples=torch.zeros(0, 3)),
         "log_pi_data"),
        (dict(energy_data=torch.zeros(3)), "energy_data"),
        (dict(energy_samples=torch.zeros(4)), "energy_samples"),
        (dict(energy_samples=torch.zeros(5, 3)), "energy_samples"),
        (dict(energy_samples=torch.zeros(4, 0)), "energy_samples"),
        (dict(log_marginal=torch.zeros(4, 3)), "log_marginal"),
    ],
)
def test_mi_bounds_shape_errors(kwargs, name):
    args = dict(log_pi_data=torch.zeros(4), energy_data=torch.zeros(4), energy_samples=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        mi_bounds(**args)


def test_estimate_bounds_shape_errors():
    policy, critic, obs, actions, _ = _random_setup(0, 6, 3, 2, (4,))
    with pytest.raises(ValueError, match="observations"):
        estimate_bounds(policy, critic, obs[0], actions)
    with pytest.raises(ValueError, match="observations"):
        estimate_bounds(policy, critic, obs[:, :2], actions)
    with pytest.raises(ValueError, match="actions"):
        estimate_bounds(policy, critic, obs, actions[:5])
    with pytest.raises(ValueError, match="actions"):
        estimate_bounds(policy, critic, obs, actions[:, :1])
    with pytest.raises(ValueError, match="num_samples"):
        estimate_bounds(policy, critic, obs, actions, num_samples=0)
    with pytest.raises(ValueError, match="log_marginal"):
        estimate_bounds(policy, critic, obs, actions, 4, log_marginal=torch.zeros(5))
    with pytest.raises(ValueError, match=r"energy\(observations, actions\)"):
        estimate_bounds(policy, lambda o, a: critic(o, a).min(0).values[:, None], obs, actions, 4)
    with pytest.raises(ValueError, match=r"policy\.sample"):
        estimate_bounds(_BadSampler(policy), critic, obs, actions, 4)


class _BadSampler(_PlainPolicy):
    def sample(self, obs, generator=None):
        return self.policy.sample(obs[: len(obs) // 2], generator=generator)
