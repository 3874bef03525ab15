"""The critic's losses under ``--matmul-precision medium`` (a CPU's bfloat16 products with fp32
accumulation) against float64 hand computations, at a tolerance derived from bfloat16's rounding
instead of a guessed one.

The derivation: rounding an operand to bfloat16 (8 significant bits, unit roundoff u = 2^-8) scales it
by (1 + d) with d spread evenly over [-u, u] (standard deviation u / sqrt 3), independently for
every operand. A product w x then carries an error of standard deviation sqrt(2/3) u |w x|, and a
layer's output y_i = sum_j W_ij h_j + b_i the sum of n such errors, plus what its input brought:

    var(y_i) = (2/3) u^2 sum_j (W_ij h_j)^2 + sum_j W_ij^2 var(h_j).

ELU and ReLU have slopes of at most 1, so they pass an input's error on no larger. Carried from the
exact input to the output, that gives each Q value a standard deviation sigma; the tolerance is
6 sigma (one entry in 5e8 beyond it if the errors were Gaussian) plus fp32's accumulation. A
log-mean-exp moves by at most the largest change of its terms, a mean of Q by the mean of their
changes, and a squared TD error (q - y)^2 by 2 |q - y| e + e^2. Each check also shows that the
tolerance is tight: the bf16 products do move the values (else the CPU has no bfloat16 matmul and
the test is skipped), and by more than a tenth of the tolerance.
"""
import math

import numpy as np
import pytest
import torch

from misa_fast import nets
from misa_fast.agents import losses
from misa_fast.training.runtime import matmul_precision

BF16_UNIT_ROUNDOFF = 2.0 ** -8
SIGMAS = 6.0
FP32_UNIT_ROUNDOFF = 2.0 ** -24
S, A, B, K, H = 11, 3, 32, 10, (256, 256)  # hopper's widths, the locomotion critic


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def q_and_bound(critic, index, obs, actions):
    """Q_index(s, a) in float64 and the tolerance on it when every product is a bfloat16 one."""
    x = np.concatenate([obs, actions], axis=-1).astype(np.float64)
    variance, magnitude = np.zeros_like(x), np.zeros(x.shape[:-1] + (1,))
    layers = [(w.detach().double().numpy(), b.detach().double().numpy()) for w, b in critic.layers(index)]
    for i, (w, b) in enumerate(layers):
        variance = (2 / 3) * BF16_UNIT_ROUNDOFF ** 2 * (x ** 2 @ (w ** 2).T) + variance @ (w ** 2).T
        magnitude = np.abs(x) @ np.abs(w).T
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = _elu(x)
    accumulation = layers[-1][0].shape[1] * FP32_UNIT_ROUNDOFF * magnitude
    return x[..., 0], np.sqrt(variance)[..., 0], accumulation[..., 0]


def tolerance(sigma, accumulation):
    return SIGMAS * sigma + accumulation


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    critic = nets.EnsembleCritic(S, A, H, 2, generator=g)  # the learner's own initialisation
    obs = torch.randn(B, S, generator=g)
    data_actions = torch.rand(B, A, generator=g) * 2 - 1
    sample_actions = torch.rand(B, K, A, generator=g) * 2 - 1
    return critic, obs, data_actions, sample_actions


def sampled_reference(critic, obs, sample_actions):
    obs_k = np.repeat(obs.numpy()[:, None, :], K, axis=1)
    pairs = [q_and_bound(critic, i, obs_k, sample_actions.numpy()) for i in range(2)]
    return tuple(np.stack([p[j] for p in pairs]) for j in range(3))  # Q, sigma, accumulation: (E, B, K)


def at(precision, fn):
    with matmul_precision(precision):
        return fn().detach().double().numpy()


def check(values, reference, bound, full_precision_values):
    if np.array_equal(values, full_precision_values):
        pytest.skip("this CPU computes 'medium' products in fp32 (no bfloat16 matmul): nothing to bound")
    error = np.abs(values - reference)
    assert (error <= bound).all(), f"max excess {(error - bound).max():.3g}"
    assert error.max() > 0.1 * bound.max()  # the tolerance is not vacuous


def test_q_within_the_bf16_bound(problem):
    critic, obs, data_actions, _ = problem
    layers, half = critic.stacked_layers(), critic.first_layer_state_half(obs)
    q = at("medium", lambda: nets.ensemble_q(layers, critic.first_layer_state_half(obs), data_actions))
    full = at("highest", lambda: nets.ensemble_q(layers, half, data_actions))
    pairs = [q_and_bound(critic, i, obs.numpy(), data_actions.numpy()) for i in range(2)]
    expected, sigma, accumulation = (np.stack([p[j] for p in pairs]) for j in range(3))
    check(q, expected, tolerance(sigma, accumulation), full)


def test_sampled_log_mean_exp_within_the_bf16_bound(problem):
    critic, obs, _, sample_actions = problem
    norm = losses.log_norm("k", K, B)

    def lme():
        return losses.sampled_q_log_mean_exp(critic.stacked_layers(), obs, sample_actions, norm).values

    q, sigma, accumulation = sampled_reference(critic, obs, sample_actions)
    expected = np.log(np.exp(q).sum(axis=2)) - math.log(K)
    # a softmax-weighted mean of its terms' errors: no larger than the largest
    check(at("medium", lme), expected, tolerance(sigma.max(axis=2), accumulation.max(axis=2)), at("highest", lme))


def test_energy_gap_and_td_loss_within_the_bf16_bound(problem):
    """Means over the batch: the states' errors are independent, so their standard deviations add
    in quadrature (divided by B) where the per-entry tolerances above would add up."""
    critic, obs, data_actions, sample_actions = problem
    layers = critic.stacked_layers()
    target = torch.randn(B, generator=torch.Generator().manual_seed(1))

    def terms():
        half = critic.first_layer_state_half(obs)
        q_data = nets.ensemble_q(layers, half, data_actions)
        gap = losses.energy_gap("misa", q_data, layers, obs, sample_actions, math.log(K), half).gap
        return torch.cat([gap, losses.td_loss(q_data, target)])

    q, q_sigma, q_accumulation = sampled_reference(critic, obs, sample_actions)
    pairs = [q_and_bound(critic, i, obs.numpy(), data_actions.numpy()) for i in range(2)]
    q_data, data_sigma, data_accumulation = (np.stack([p[j] for p in pairs]) for j in range(3))
    gap = np.log(np.exp(q).mean(axis=2)).mean(axis=1) - q_data.mean(axis=1)
    gap_sigma = np.sqrt((q_sigma.max(axis=2) ** 2 + data_sigma ** 2).sum(axis=1)) / B
    gap_accumulation = q_accumulation.max(axis=2).mean(axis=1) + data_accumulation.mean(axis=1)
    residual = np.abs(q_data - target.double().numpy())
    td = (residual ** 2).mean(axis=1)
    td_sigma = np.sqrt(((2 * residual * data_sigma) ** 2).sum(axis=1)) / B
    second_order = (tolerance(data_sigma, data_accumulation) ** 2).mean(axis=1)
    td_accumulation = (2 * residual * data_accumulation).mean(axis=1) + second_order
    check(at("medium", terms), np.concatenate([gap, td]),
          tolerance(np.concatenate([gap_sigma, td_sigma]), np.concatenate([gap_accumulation, td_accumulation])),
          at("highest", terms))
