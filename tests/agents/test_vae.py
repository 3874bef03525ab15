"""SPOT's conditional VAE: the three density estimates against independent references (numpy for the
same noise; numerical integration over a 1-D latent for the true log pi_beta(a|s)), their ordering
ELBO <= IW(L) <= log p with IW(L) -> log p, gradients, and pretraining."""
import math

import numpy as np
import pytest
import torch

from misa_fast.agents import TD3, NonFiniteLossError
from misa_fast.agents import vae as vae_lib
from misa_fast.agents.td3_config import TD3Config
from misa_fast.ops import use_backend

BETA = 0.5
SIGMA = math.sqrt(BETA / 4)


def tiny_vae(obs_dim=2, act_dim=1, latent=1, hidden=(5,), seed=0, scale=0.8):
    vae = vae_lib.ConditionalVAE(obs_dim, act_dim, hidden, latent, torch.Generator().manual_seed(seed)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # O(1) weights so that every term matters
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return vae


def _np(t):
    return t.detach().double().numpy()


def np_mlp(seq, x):
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    for layer in linears[:-1]:
        x = np.maximum(x @ _np(layer.weight).T + _np(layer.bias), 0)
    return x @ _np(linears[-1].weight).T + _np(linears[-1].bias)


def np_encode(vae, obs, act):
    out = np_mlp(vae.encoder, np.concatenate([obs, act], -1))
    d = vae.latent_dim
    return out[:, :d], np.exp(np.clip(out[:, d:], -4, 15))


def np_decode(vae, obs, z):  # obs (B, S), z (B, L, D) -> (B, L, A)
    obs_rep = np.broadcast_to(obs[:, None, :], z.shape[:2] + obs.shape[-1:])
    return np.tanh(np_mlp(vae.decoder, np.concatenate([obs_rep, z], -1)))


def np_log_normal(x, mean, std):
    return (-0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)


def data(B=4, S=2, A=1, L=3, D=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, S, generator=g, dtype=torch.float64)
    act = torch.rand(B, A, generator=g, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    return obs, act, noise


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("A, D, L", [(1, 1, 1), (2, 3, 4)])
def test_estimates_match_numpy_for_the_same_noise(A, D, L):
    vae = tiny_vae(obs_dim=2, act_dim=A, latent=D)
    obs, act, noise = data(A=A, L=L, D=D)
    o, a, n = _np(obs), _np(act), _np(noise)
    mean, std = np_encode(vae, o, a)
    z = mean[:, None] + std[:, None] * n
    dec = np_decode(vae, o, z)
    kl = 0.5 * (mean**2 + std**2 - 1) - np.log(std)  # (B, D)

    expected_loss = ((dec - a[:, None]) ** 2).mean(axis=(1, 2)) + BETA * kl.mean(-1)
    log_lik = np_log_normal(a[:, None], dec, SIGMA)  # (B, L)
    expected_elbo = log_lik.mean(-1) - kl.sum(-1)
    log_w = log_lik + np_log_normal(z, 0.0, 1.0) - np_log_normal(z, mean[:, None], std[:, None])
    m = log_w.max(-1)
    expected_iw = np.log(np.exp(log_w - m[:, None]).mean(-1)) + m

    assert np.allclose(_np(vae_lib.vae_loss(vae, obs, act, BETA, noise)), expected_loss, rtol=1e-10)
    assert np.allclose(_np(vae_lib.elbo(vae, obs, act, BETA, noise)), expected_elbo, rtol=1e-10)
    assert np.allclose(_np(vae_lib.importance_weighted_log_prob(vae, obs, act, BETA, noise)), expected_iw, rtol=1e-10)
    assert np.allclose(_np(vae_lib.neg_log_density(vae, obs, act, BETA, noise, "iwae")), -expected_iw, rtol=1e-10)
    assert np.allclose(_np(vae_lib.neg_log_density(vae, obs, act, BETA, noise, "elbo")), expected_loss, rtol=1e-10)


def test_training_loss_is_a_scaled_negative_elbo_when_latent_is_twice_the_action_dim():
    """With sigma^2 = beta/4 and D = 2A: vae_loss = beta/(2A) * (-ELBO) - beta/2 * (log sigma + log(2 pi)/2)."""
    A = 2
    vae = tiny_vae(obs_dim=2, act_dim=A, latent=2 * A)
    obs, act, noise = data(A=A, L=1, D=2 * A)
    loss = vae_lib.vae_loss(vae, obs, act, BETA, noise)
    elbo = vae_lib.elbo(vae, obs, act, BETA, noise)
    const = BETA / 2 * (math.log(SIGMA) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(loss, BETA / (2 * A) * -elbo - const, rtol=1e-10)


def test_gradients_reach_the_actions_and_match_finite_differences():
    vae = tiny_vae(obs_dim=2, act_dim=2, latent=2, hidden=(4, 4))
    obs, act, noise = data(A=2, L=3, D=2)
    for fn in (vae_lib.vae_loss, vae_lib.elbo, vae_lib.importance_weighted_log_prob):
        assert torch.autograd.gradcheck(lambda a: fn(vae, obs, a, BETA, noise), (act.clone().requires_grad_(),))
        assert torch.autograd.gradcheck(lambda o: fn(vae, o, act, BETA, noise), (obs.clone().requires_grad_(),))


# --------------------------------------------------------------------------------------------------
def log_p_by_integration(vae, obs, act, grid=np.linspace(-12, 12, 48_001)):
    """log p(a|s) = log int N(z; 0, 1) N(a; dec(s, z), sigma^2) dz, 1-D latent, trapezoid rule."""
    z = grid[None, :, None].repeat(obs.shape[0], 0)
    log_integrand = np_log_normal(act[:, None], np_decode(vae, obs, z), SIGMA) + np_log_normal(z, 0.0, 1.0)
    m = log_integrand.max(-1, keepdims=True)
    return np.log(np.trapezoid(np.exp(log_integrand - m), grid, axis=-1)) + m[:, 0]


def elbo_by_integration(vae, obs, act, grid=np.linspace(-12, 12, 48_001)):
    mean, std = np_encode(vae, obs, act)
    z = grid[None, :, None].repeat(obs.shape[0], 0)
    log_q = np_log_normal(z, mean[:, None], std[:, None])
    integrand = np.exp(log_q) * (np_log_normal(act[:, None], np_decode(vae, obs, z), SIGMA)
                                 + np_log_normal(z, 0.0, 1.0) - log_q)
    return np.trapezoid(integrand, grid, axis=-1)


def test_elbo_below_iw_below_log_p_and_iw_converges():
    vae = tiny_vae(obs_dim=2, act_dim=1, latent=1, hidden=(5,), seed=3, scale=0.5)
    obs, act, _ = data(B=3)
    assert np.all(np.abs(np_encode(vae, _np(obs), _np(act))[0]) < 2)  # q well inside the grid
    log_p = log_p_by_integration(vae, _np(obs), _np(act))
    exact_elbo = elbo_by_integration(vae, _np(obs), _np(act))
    assert np.all(log_p - exact_elbo > 0.05)  # a real gap, so the ordering below says something

    reps = 400  # expectations over independent noise draws, one row per replicate
    obs_r, act_r = obs.repeat_interleave(reps, 0), act.repeat_interleave(reps, 0)
    g = torch.Generator().manual_seed(7)

    def expected(fn, L):  # (mean, standard error) over the replicates
        noise = torch.randn(obs_r.shape[0], L, 1, generator=g, dtype=torch.float64)
        values = _np(fn(vae, obs_r, act_r, BETA, noise)).reshape(-1, reps)
        return values.mean(-1), values.std(-1) / math.sqrt(reps)

    elbo, _ = expected(vae_lib.elbo, 50)
    assert np.allclose(elbo, exact_elbo, atol=0.02)  # independent reference of the ELBO itself
    iw = {L: expected(vae_lib.importance_weighted_log_prob, L) for L in (1, 10, 100, 1000)}
    assert np.allclose(iw[1][0], exact_elbo, atol=4 * iw[1][1])  # IW(1) is an unbiased ELBO estimate
    for small, large in ((1, 10), (10, 100), (100, 1000)):  # non-decreasing in L, up to Monte Carlo error
        assert np.all(iw[small][0] < iw[large][0] + 4 * np.hypot(iw[small][1], iw[large][1]))
    for L, (mean, se) in iw.items():
        assert np.all(mean <= log_p + 4 * se), L
    assert np.all(log_p - iw[10][0] < 0.5 * (log_p - exact_elbo))  # the gap closes as L grows ...
    assert np.allclose(iw[1000][0], log_p, atol=0.01)  # ... and IW(L) -> log p


def test_importance_weighted_estimate_uses_the_fused_op(kernel_device):
    """On ``kernel_device`` (tests/conftest.py): CUDA where there is one, else the interpreter. The
    log-mean-exp kernel has no dots: fp32 throughout, on either device."""
    vae = tiny_vae(obs_dim=2, act_dim=2, latent=2).float().to(kernel_device)
    obs, act, noise = (t.float().to(kernel_device) for t in data(A=2, L=6, D=2))
    with use_backend("torch"):
        ref = vae_lib.importance_weighted_log_prob(vae, obs, act, BETA, noise)
    with use_backend("triton"):
        fused = vae_lib.importance_weighted_log_prob(vae, obs, act, BETA, noise)
    assert "misa_fast_log_mean_exp" in type(fused.grad_fn).__name__  # the kernel ran
    assert torch.allclose(ref, fused, rtol=1e-5, atol=1e-5)


def test_module_shapes_defaults_and_clamp():
    vae = vae_lib.ConditionalVAE(3, 2, (8, 8))
    assert vae.latent_dim == 4
    obs, act = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    mean, std = vae.encode(obs, act)
    assert mean.shape == std.shape == (5, 4)
    assert vae.decode(obs, torch.randn(5, 7, 4) * 100).abs().max() <= 1.0
    with torch.no_grad():
        vae.encoder[-1].bias.fill_(-100.0)
    assert torch.allclose(vae.encode(obs, act)[1], torch.tensor(math.exp(-4.0)))
    with pytest.raises(ValueError, match="density estimator"):
        vae_lib.neg_log_density(vae, obs, act, BETA, torch.randn(5, 1, 4), "kde")


# --------------------------------------------------------------------------------------------------
# pretraining through the agent
def spot_config(**kw):
    base = dict(obs_dim=2, act_dim=2, actor_hidden=(8,), critic_hidden=(8,), vae_hidden=(32, 32), batch_size=64,
                behavior_reg="vae", vae_steps=300, seed=0)
    return TD3Config(**{**base, **kw})


def behaviour_batches(seed=0, batch=64, noise=0.05):
    """Actions of a deterministic behaviour policy plus a little noise: a narrow pi_beta(a|s)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        obs = torch.randn(batch, 2, generator=g)
        act = (torch.tanh(obs @ torch.tensor([[1.0, -0.5], [0.3, 0.8]])) * 0.8
               + noise * torch.randn(batch, 2, generator=g)).clamp(-0.999, 0.999)
        yield {"observations": obs, "actions": act, "rewards": torch.zeros(batch),
               "next_observations": obs, "terminals": torch.zeros(batch)}


def test_pretraining_learns_the_behaviour_density_and_is_recorded():
    agent = TD3(spot_config())
    assert agent.needs_pretraining and agent.pretrain_steps == 300
    with pytest.raises(RuntimeError, match="pretrain_vae"):
        agent.update(next(behaviour_batches()))
    held_out = next(behaviour_batches(seed=99, batch=512))
    obs, act = held_out["observations"], held_out["actions"]
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(512, 20, 4, generator=g)

    def scores():
        with torch.no_grad():
            data_lp = vae_lib.importance_weighted_log_prob(agent.vae, obs, act, 0.5, noise).mean()
            off_lp = vae_lib.importance_weighted_log_prob(agent.vae, obs, -act, 0.5, noise).mean()
            return vae_lib.vae_loss(agent.vae, obs, act, 0.5, noise[:, :1]).mean(), data_lp, off_lp

    loss0, lp0, _ = scores()
    last = agent.pretrain_vae(behaviour_batches(), progress=False)
    loss1, lp1, off1 = scores()
    assert not agent.needs_pretraining and set(last) == {"vae_loss"}
    assert loss1 < 0.5 * loss0 and lp1 > lp0 + 1.0
    assert lp1 > off1 + 1.0  # the density is higher on the behaviour's actions than off them
    assert all(not p.requires_grad for p in agent.vae.parameters())  # frozen for the actor

    resumed = TD3(spot_config(seed=5))
    resumed.load_state_dict(agent.state_dict())
    assert not resumed.needs_pretraining
    for k, v in agent.vae.state_dict().items():
        assert torch.equal(v, resumed.vae.state_dict()[k])


def test_pretraining_guard_and_td3bc_has_no_vae():
    agent = TD3(spot_config())
    bad = next(behaviour_batches())
    bad["observations"][3, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="vae_loss"):
        agent.pretrain_vae(iter([bad]), 1, progress=False)
    assert agent.needs_pretraining
    bc = TD3(spot_config(behavior_reg="bc"))
    assert not bc.needs_pretraining and bc.pretrain_steps == 0 and bc.vae is None
    with pytest.raises(RuntimeError, match="VAE"):
        bc.pretrain_vae(behaviour_batches(), 1, progress=False)
