"""Networks: tanh-Gaussian policy, ensemble critics (stacked), initialisation, Polyak averaging."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from misa_fast import nets

S, A = 5, 3


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw their data from seeded generators; this pins anything else."""
    torch.manual_seed(0)


def _policy(hidden=(8, 8), seed=0):
    return nets.TanhGaussianPolicy(S, A, hidden, generator=torch.Generator().manual_seed(seed))


def _critic(hidden=(8, 8), n=2, seed=0):
    return nets.EnsembleCritic(S, A, hidden, n, generator=torch.Generator().manual_seed(seed))


def _reference_log_prob(mean, std, action):
    """torch.distributions' tanh-transformed Normal, in float64."""
    base = torch.distributions.Normal(mean.double(), std.double())
    dist = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform()])
    return dist.log_prob(action.double()).sum(-1)


# --------------------------------------------------------------------------------------------------
def test_policy_shapes_and_initial_distribution():
    policy = _policy(hidden=(64, 64))
    obs = torch.randn(100, S, generator=torch.Generator().manual_seed(0))
    mean, std = policy.dist_params(obs)
    assert mean.shape == std.shape == (100, A)
    # Small-scale output layer (1e-2 variance): mean ~ 0 and log_std ~ c = -1 at initialisation,
    # where a unit-scale output layer would give O(1) spreads.
    assert mean.std() < 0.2 and (std.log() + 1.0).std() < 0.2
    assert torch.equal(policy.act(obs), torch.tanh(mean))


def test_policy_clipping_of_mean_and_log_std():
    policy = _policy()
    out = policy.net[-1]
    with torch.no_grad():
        out.weight.zero_()
        out.bias[:A] = torch.tensor([20.0, -20.0, 0.5])  # mean
        out.bias[A:] = torch.tensor([10.0, -10.0, 0.5])  # raw log-std
        policy.log_std_multiplier.fill_(2.0)
        policy.log_std_offset.fill_(0.25)
    mean, std = policy.dist_params(torch.randn(4, S))
    assert torch.allclose(mean[0], torch.tensor([9.0, -9.0, 0.5]))
    assert torch.allclose(std[0].log(), torch.tensor([2.0, -5.0, 2 * 0.5 + 0.25]))


def test_log_std_scalars_are_learnable():
    policy = _policy()
    names = {n for n, _ in policy.named_parameters()}
    assert {"log_std_multiplier", "log_std_offset"} <= names
    assert policy.log_std_multiplier.item() == 1.0 and policy.log_std_offset.item() == -1.0
    action, log_prob = policy.sample(torch.randn(6, S), generator=torch.Generator().manual_seed(1))
    log_prob.sum().backward()
    assert policy.log_std_offset.grad is not None and policy.log_std_offset.grad != 0
    assert policy.log_std_multiplier.grad is not None


def test_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, A, generator=g) * 2
    std = torch.rand(50, A, generator=g) + 0.05
    action = torch.rand(50, A, generator=g) * 1.99 - 0.995
    ours = nets.tanh_gaussian_log_prob(mean, std, action)
    assert torch.allclose(ours.double(), _reference_log_prob(mean, std, action), rtol=1e-4, atol=1e-3)


def test_sample_log_prob_equals_log_prob_of_the_sample():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(40, A, generator=g)
    std = torch.rand(40, A, generator=g) + 0.1
    noise = torch.randn(40, A, generator=g)
    action, log_prob = nets.tanh_gaussian_sample(mean, std, noise)
    assert torch.equal(action, torch.tanh(mean + std * noise))
    assert torch.allclose(log_prob, nets.tanh_gaussian_log_prob(mean, std, action), rtol=1e-4, atol=1e-3)
    # The gradient identity behind using noise directly for (u - mean) / std.
    m, s = mean.clone().requires_grad_(), std.clone().requires_grad_()
    _, lp_fast = nets.tanh_gaussian_sample(m, s, noise)
    u = m + s * noise
    lp_ref = nets.tanh_gaussian_log_prob_pre_tanh(m, s, u)
    g_fast = torch.autograd.grad(lp_fast.sum(), (m, s))
    g_ref = torch.autograd.grad(lp_ref.sum(), (m, s))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_tanh_jacobian_is_stable_for_large_inputs():
    u = torch.tensor([-40.0, -10.0, 0.0, 3.0, 10.0, 40.0])
    ldj = nets.tanh_log_det_jacobian(u)
    assert torch.isfinite(ldj).all()
    ref = torch.log1p(-torch.tanh(u.double()) ** 2)
    finite = torch.isfinite(ref)
    assert torch.allclose(ldj.double()[finite], ref[finite], atol=1e-5)
    # Asymptote log(4) - 2|u| where the naive formula gives -inf.
    assert abs(ldj[-1].item() - (math.log(4.0) - 80.0)) < 1e-4


def test_log_prob_at_the_boundary_is_finite_and_batched():
    policy = _policy()
    obs = torch.randn(3, S, generator=torch.Generator().manual_seed(0))
    actions = torch.tensor([[1.0, -1.0, 0.999], [0.0, 0.5, -0.5], [0.3, 0.2, 0.1]])
    lp = policy.log_prob(obs, actions)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    batched = policy.log_prob(obs, actions.unsqueeze(1).expand(3, 4, A))
    assert batched.shape == (3, 4)
    assert torch.allclose(batched, lp.unsqueeze(1).expand(3, 4), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
def _manual_q(critic, index, obs, actions):
    x = torch.cat([obs, actions], dim=-1)
    layers = critic.layers(index)
    for weight, bias in layers[:-1]:
        x = F.elu(F.linear(x, weight, bias))
    return F.linear(x, *layers[-1]).squeeze(-1)


@pytest.mark.parametrize("hidden", [(8, 8), (6, 7, 5)])
def test_critic_forward_matches_a_per_critic_linear_stack(hidden):
    critic = _critic(hidden, n=3)
    with torch.no_grad():  # the output layer is tiny at init; make the comparison meaningful
        for w in critic.weights:
            w.normal_(0.0, 0.5)
        for b in critic.biases:
            b.normal_(0.0, 0.5)
    obs, act = torch.randn(9, S), torch.rand(9, A) * 2 - 1
    q = critic(obs, act)
    assert q.shape == (3, 9)
    for i in range(3):
        assert torch.allclose(q[i], _manual_q(critic, i, obs, act), atol=1e-5)
    # K actions per state share the state half.
    acts = torch.rand(9, 4, A) * 2 - 1
    qk = critic(obs, acts)
    assert qk.shape == (3, 9, 4)
    for k in range(4):
        assert torch.allclose(qk[:, :, k], critic(obs, acts[:, k]), atol=1e-5)


def test_first_layer_state_half():
    critic = _critic()
    obs = torch.randn(4, S)
    half = critic.first_layer_state_half(obs)
    for i in range(2):
        (w, b) = critic.layers(i)[0]
        assert torch.allclose(half[i], obs @ w[:, :S].T + b, atol=1e-6)
    assert critic.layers(0)[0][0].shape == (8, S + A)  # nn.Linear layout
    assert critic.first_layer_state_half(obs, detach=True).requires_grad is False


def test_initialisation_follows_flax_defaults():
    critic = _critic(hidden=(256, 256), seed=3)
    w_hidden, w_out = critic.weights[1], critic.weights[-1]
    # lecun_normal: variance 1/fan_in, truncated at 2 std.
    assert abs(w_hidden.std().item() * math.sqrt(256) - 1.0) < 0.02
    assert w_hidden.abs().max() <= 2.0 / 0.8796 / math.sqrt(256) + 1e-6
    # Output layer: variance_scaling(1e-2, fan_in, uniform) -> |w| <= sqrt(3e-2 / fan_in).
    limit = math.sqrt(3e-2 / 256)
    assert w_out.abs().max() <= limit and w_out.abs().max() > 0.9 * limit
    assert all(torch.count_nonzero(b) == 0 for b in critic.biases)
    # Independent critics, deterministic given the generator.
    assert not torch.equal(critic.weights[0][0], critic.weights[0][1])
    assert torch.equal(_critic(seed=5).weights[0], _critic(seed=5).weights[0])
    policy = _policy(hidden=(256, 256))
    assert policy.net[-1].weight.abs().max() <= limit


def test_analytic_action_gradient_matches_autograd():
    critic = _critic(hidden=(7, 6, 5))
    with torch.no_grad():
        for w in critic.weights:
            w.normal_(0.0, 0.8)
    obs, act = torch.randn(11, S), torch.rand(11, A) * 2 - 1
    q, grad = nets.ensemble_q_and_action_grad(
        critic.stacked_layers(detach=True), critic.first_layer_state_half(obs, detach=True), act
    )
    act_ = act.clone().requires_grad_()
    q_ref = critic(obs, act_)
    for i in range(2):
        (g_ref,) = torch.autograd.grad(q_ref[i].sum(), act_, retain_graph=True)
        assert torch.allclose(grad[i], g_ref, atol=1e-5)
    assert torch.allclose(q, q_ref, atol=1e-5)


def test_polyak_update():
    online, target = _critic(seed=1), _critic(seed=2)
    before = [p.detach().clone() for p in target.parameters()]
    nets.polyak_update(target, online, 0.25)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * o, atol=1e-7)


def test_twin_critic_is_an_ensemble_of_two():
    twin = nets.TwinCritic(S, A, (4, 4))
    assert twin.num_critics == 2 and twin(torch.randn(2, S), torch.zeros(2, A)).shape == (2, 2)
    assert len(twin.stacked_layers()) == 3 and np.all([w.shape[0] == 2 for w, _ in twin.stacked_layers()])
