"""Loss functions against hand computations (numpy, float64) on tiny networks, and the direction of
the temperature / Lagrange updates."""
import math

import numpy as np
import pytest
import torch

from misa_fast import nets
from misa_fast.agents import losses

S, A, B, K, H = 3, 2, 3, 5, (4, 4)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw their data from seeded generators; this pins anything else."""
    torch.manual_seed(0)


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _np_q(critic, index, obs, actions):
    """Q_index(s, a) in numpy float64 from the nn.Linear-layout layers; obs/actions (..., S/A)."""
    x = np.concatenate([obs, actions], axis=-1).astype(np.float64)
    layers = [(w.detach().double().numpy(), b.detach().double().numpy()) for w, b in critic.layers(index)]
    for w, b in layers[:-1]:
        x = _elu(x @ w.T + b)
    w, b = layers[-1]
    return (x @ w.T + b)[..., 0]


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    critic = nets.EnsembleCritic(S, A, H, 2, generator=g)
    with torch.no_grad():  # O(1) outputs so the comparisons are not trivially ~0
        for w in critic.weights:
            w.normal_(0.0, 0.7, generator=g)
        for b in critic.biases:
            b.normal_(0.0, 0.3, generator=g)
    obs = torch.randn(B, S, generator=g)
    data_actions = torch.rand(B, A, generator=g) * 2 - 1
    sample_actions = torch.rand(B, K, A, generator=g) * 2 - 1
    return critic, obs, data_actions, sample_actions


def _np_sampled_q(critic, obs, sample_actions):
    obs_k = np.repeat(obs.numpy()[:, None, :], K, axis=1)
    return np.stack([_np_q(critic, i, obs_k, sample_actions.numpy()) for i in range(2)])  # (E, B, K)


# --------------------------------------------------------------------------------------------------
def test_td_target_and_td_loss():
    rewards = torch.tensor([1.0, 2.0, -3.0])
    dones = torch.tensor([0.0, 1.0, 0.0])
    next_q = torch.tensor([[0.5, 7.0, -1.0], [0.25, 9.0, 2.0]], requires_grad=True)
    y = losses.td_target(rewards, dones, next_q, gamma=0.9)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 0.25, 2.0, -3.0 - 0.9]))
    assert not y.requires_grad
    q_data = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -4.0]])
    td = losses.td_loss(q_data, y)
    expected = ((q_data.numpy() - y.numpy()) ** 2).mean(axis=1)
    assert np.allclose(td.numpy(), expected)


def test_log_norm_options():
    assert losses.log_norm("k", 50, 256) == pytest.approx(math.log(50))
    assert losses.log_norm("batch", 50, 256) == pytest.approx(math.log(256))


def test_sampled_q_matches_hand_computation(tiny):
    critic, obs, _, sample_actions = tiny
    q = losses.sampled_q(critic.stacked_layers(), obs, sample_actions, critic.first_layer_state_half(obs))
    # Without a precomputed state half, the same values.
    assert torch.allclose(q, losses.sampled_q(critic.stacked_layers(), obs, sample_actions), atol=1e-6)
    assert q.shape == (2, B, K)
    assert np.allclose(q.detach().numpy(), _np_sampled_q(critic, obs, sample_actions), atol=1e-5)


@pytest.mark.parametrize("norm_kind", ["k", "batch"])
def test_sampled_q_log_mean_exp(tiny, norm_kind):
    critic, obs, _, sample_actions = tiny
    norm = losses.log_norm(norm_kind, K, B)
    lme = losses.sampled_q_log_mean_exp(critic.stacked_layers(), obs, sample_actions, norm).values
    q = _np_sampled_q(critic, obs, sample_actions)
    expected = np.log(np.exp(q).sum(axis=2)) - (math.log(K) if norm_kind == "k" else math.log(B))
    assert lme.shape == (2, B)
    assert np.allclose(lme.detach().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("bound", ["misa", "dv", "f"])
def test_energy_gap_each_bound(tiny, bound):
    critic, obs, data_actions, sample_actions = tiny
    layers, half = critic.stacked_layers(), critic.first_layer_state_half(obs)
    q_data = nets.ensemble_q(layers, half, data_actions)
    gap, partition, _ = losses.energy_gap(bound, q_data, layers, obs, sample_actions, math.log(K), half)
    q = _np_sampled_q(critic, obs, sample_actions)
    q_d = np.stack([_np_q(critic, i, obs.numpy(), data_actions.numpy()) for i in range(2)])
    if bound == "misa":
        expected_partition = np.log(np.exp(q).mean(axis=2)).mean(axis=1)
    elif bound == "dv":
        expected_partition = np.log(np.exp(q).reshape(2, -1).mean(axis=1))
    else:
        expected_partition = np.exp(q - 1.0).reshape(2, -1).mean(axis=1)
    assert np.allclose(partition.detach().numpy(), expected_partition, atol=1e-5)
    assert np.allclose(gap.detach().numpy(), expected_partition - q_d.mean(axis=1), atol=1e-5)
    # The gap's gradient reaches the critic (it is the regulariser) but never the sample actions.
    gap.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in critic.weights)


def test_misa_gap_is_a_lower_bound_ordering(tiny):
    """Jensen: per-state log-mean-exp averaged over states <= log-mean-exp over everything, and
    log E e^Q <= E e^(Q-1) (log x <= x/e); the estimates mirror the bound ordering of Theorem 4.1."""
    critic, obs, data_actions, sample_actions = tiny
    layers, half = critic.stacked_layers(), critic.first_layer_state_half(obs)
    q_data = nets.ensemble_q(layers, half, data_actions)
    gaps = {
        b: losses.energy_gap(b, q_data, layers, obs, sample_actions, math.log(K), half).gap
        for b in ("misa", "dv", "f")
    }
    assert torch.all(gaps["misa"] <= gaps["dv"] + 1e-6) and torch.all(gaps["dv"] <= gaps["f"] + 1e-6)


def test_conservative_penalty_and_lagrange():
    gap = torch.tensor([2.0, -1.0], requires_grad=True)
    plain = losses.conservative_penalty(gap, 5.0)
    assert torch.allclose(plain, torch.tensor([10.0, -5.0]))
    log_alpha_prime = torch.tensor(1.0, requires_grad=True)
    alpha_prime = losses.alpha_prime_value(log_alpha_prime, 0.0, 1e6)
    assert alpha_prime.item() == pytest.approx(math.e)
    pen = losses.conservative_penalty(gap, 5.0, alpha_prime, tau=0.5)
    assert torch.allclose(pen, math.e * 5.0 * (gap - 0.5))
    # alpha' is a constant for the critic loss ...
    (g_gap, g_la) = torch.autograd.grad(pen.sum(), (gap, log_alpha_prime), allow_unused=True)
    assert g_la is None and torch.allclose(g_gap, torch.full((2,), math.e * 5.0))
    # ... and the gap a constant for the multiplier's loss.
    loss = losses.alpha_prime_loss(alpha_prime, gap, 5.0, tau=0.5)
    assert loss.item() == pytest.approx(-(math.e * 5.0 * ((2.0 - 0.5) + (-1.0 - 0.5)) / 2))
    g_gap, g_la = torch.autograd.grad(loss, (gap, log_alpha_prime), allow_unused=True)
    assert g_gap is None and g_la is not None


@pytest.mark.parametrize("gap_value,tau,direction", [(3.0, 1.0, +1), (0.5, 1.0, -1)])
def test_lagrange_multiplier_moves_the_right_way(gap_value, tau, direction):
    """Gradient descent on the alpha' loss raises alpha' when the gap exceeds tau, lowers it below."""
    log_alpha_prime = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([log_alpha_prime], lr=0.01)
    alpha_prime = losses.alpha_prime_value(log_alpha_prime, 0.0, 1e6)
    loss = losses.alpha_prime_loss(alpha_prime, torch.tensor([gap_value] * 2), 5.0, tau)
    loss.backward()
    opt.step()
    assert np.sign(log_alpha_prime.item() - 1.0) == direction


def test_alpha_prime_clip():
    assert losses.alpha_prime_value(torch.tensor(20.0), 0.0, 1e6).item() == 1e6
    assert losses.alpha_prime_value(torch.tensor(-2.0), 0.5, 1e6).item() == 0.5


def test_actor_loss_hand_computation():
    alpha = torch.tensor(0.5, requires_grad=True)
    log_pi_new = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    q_new = torch.tensor([3.0, 1.0, -1.0])
    log_pi_data = torch.tensor([-2.0, -4.0, 0.0])
    log_pi_mcmc = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, -3.0]])
    loss, terms = losses.actor_loss(alpha, log_pi_new, q_new, 0.5, log_pi_data, log_pi_mcmc, 0.1)
    expected = 0.5 * np.mean(0.5 * np.array([-1.0, 0.5, 2.0]) - np.array([-2.0, -4.0, 0.0])) - 1.0 + 0.1 * 1.0
    assert loss.item() == pytest.approx(expected)
    assert terms["actor_entropy_term"].item() == pytest.approx(0.5 * 0.5 * 0.5)
    assert terms["actor_ba_term"].item() == pytest.approx(-0.5 * -2.0)
    assert terms["actor_q_term"].item() == pytest.approx(-1.0)
    assert terms["actor_unbiased_term"].item() == pytest.approx(0.1)
    assert torch.autograd.grad(loss, alpha, allow_unused=True)[0] is None  # alpha is a constant here
    # Variants drop terms.
    loss_nb, terms_nb = losses.actor_loss(alpha, log_pi_new, q_new, 0.5)
    assert set(terms_nb) == {"actor_entropy_term", "actor_q_term"}
    assert loss_nb.item() == pytest.approx(0.5 * 0.5 * 0.5 - 1.0)


@pytest.mark.parametrize("mean_log_pi,direction", [(-1.0, -1), (5.0, +1)])
def test_alpha_loss_direction(mean_log_pi, direction):
    """alpha grows when log pi + H_target > 0, i.e. when the policy's entropy (-E log pi) is below
    the target entropy (here -3), and shrinks otherwise."""
    log_alpha = torch.nn.Parameter(torch.tensor(0.3))
    log_pi = torch.full((4,), mean_log_pi, requires_grad=True)
    loss = losses.alpha_loss(log_alpha, log_pi, target_entropy=-3.0)
    g_alpha, g_pi = torch.autograd.grad(loss, (log_alpha, log_pi), allow_unused=True)
    assert g_pi is None  # log pi is detached inside the temperature loss
    assert loss.item() == pytest.approx(-0.3 * (mean_log_pi - 3.0))
    assert np.sign(-g_alpha.item()) == direction  # direction of a descent step on log_alpha


def test_critic_loss_sums_each_critics_terms():
    td = torch.tensor([1.0, 2.0])
    pen = torch.tensor([0.5, -0.25])
    assert losses.critic_loss(td, pen).item() == pytest.approx(3.25)
