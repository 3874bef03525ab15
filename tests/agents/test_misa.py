"""The MISA agent: every loss term against a numpy hand computation, gradient isolation, the
Lagrange / temperature directions, the non-finite guard, checkpoint round trips, and the config."""
import copy
import io
import math

import numpy as np
import pytest
import torch

from misa_fast.agents import MISA, NonFiniteLossError, config_base
from misa_fast.agents.algorithms import ALGORITHMS
from misa_fast.agents.config_base import apply_overrides
from misa_fast.agents.misa_config import MISAConfig, preset

S, A, B, K = 3, 2, 3, 5


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw their data from seeded generators; this pins anything else."""
    torch.manual_seed(0)


def tiny_config(**kw):
    base = dict(
        obs_dim=S, act_dim=A, policy_hidden=(4, 4), critic_hidden=(4, 4), num_samples=K, batch_size=B,
        hmc_burn_in=2, hmc_step_size=0.3, seed=0,
    )
    return MISAConfig(**{**base, **kw})


def make_batch(seed=0, batch=B, obs_dim=S, act_dim=A):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch, obs_dim, generator=g),
        "actions": torch.rand(batch, act_dim, generator=g) * 1.8 - 0.9,
        "rewards": torch.randn(batch, generator=g),
        "next_observations": torch.randn(batch, obs_dim, generator=g),
        "terminals": (torch.arange(batch) % 2).float(),
    }


def spice(agent, seed=0):
    """Give the tiny networks O(1) outputs so hand comparisons are not trivially ~0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(agent.critic.parameters()) + list(agent.policy.net.parameters()):
            p.normal_(0.0, 0.5, generator=g)
        agent.target_critic.load_state_dict(agent.critic.state_dict())
        for p in agent.target_critic.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        agent.log_alpha.fill_(0.3)
    return agent


# --------------------------------------------------------------------------------------------------
# numpy float64 reference
def _np(t):
    return t.detach().double().numpy()


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def np_policy(agent, obs):
    linears = [m for m in agent.policy.net if isinstance(m, torch.nn.Linear)]
    x = obs
    for layer in linears[:-1]:
        x = np.maximum(x @ _np(layer.weight).T + _np(layer.bias), 0)
    out = x @ _np(linears[-1].weight).T + _np(linears[-1].bias)
    act_dim = out.shape[1] // 2
    mean, raw = out[:, :act_dim], out[:, act_dim:]
    log_std = np.clip(agent.policy.log_std_multiplier.item() * raw + agent.policy.log_std_offset.item(), -5, 2)
    return np.clip(mean, -9, 9), np.exp(log_std)


def np_log_prob(mean, std, action):
    return np_log_prob_pre_tanh(mean, std, np.arctanh(action))


def np_log_prob_pre_tanh(mean, std, u):
    normal = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return (normal - np.log(1 - np.tanh(u) ** 2)).sum(-1)


def np_q(critic, obs, action):
    """(E, ...) Q values of the concat-input MLP (ELU, or ReLU for the EDAC networks)."""
    act = _elu if critic.activation == "elu" else (lambda z: np.maximum(z, 0))
    out = []
    for i in range(critic.num_critics):
        x = np.concatenate([obs, action], axis=-1)
        layers = [(_np(w), _np(b)) for w, b in critic.layers(i)]
        for w, b in layers[:-1]:
            x = act(x @ w.T + b)
        out.append((x @ layers[-1][0].T + layers[-1][1])[..., 0])
    return np.stack(out)


def np_diversity(critic, obs, action):
    """EDAC's (1/(N-1)) mean_s sum_{i != j} <g_i, g_j>, g_i = dQ_i/da / (|dQ_i/da| + 1e-10), with dQ/da
    by the chain rule through the MLP."""
    grads = []
    for i in range(critic.num_critics):
        x, pre = np.concatenate([obs, action], axis=-1), []
        layers = [(_np(w), _np(b)) for w, b in critic.layers(i)]
        for w, b in layers[:-1]:
            pre.append(x @ w.T + b)
            x = _elu(pre[-1]) if critic.activation == "elu" else np.maximum(pre[-1], 0)
        g = np.broadcast_to(layers[-1][0], x.shape)
        for (w, _), z in zip(reversed(layers[:-1]), reversed(pre)):
            g = (g * (np.exp(np.minimum(z, 0)) if critic.activation == "elu" else (z > 0))) @ w
        grads.append(g[:, -action.shape[1]:])
    unit = np.stack(grads) / (np.linalg.norm(np.stack(grads), axis=-1, keepdims=True) + 1e-10)
    gram = np.einsum("ibk,jbk->bij", unit, unit) * (1 - np.eye(len(grads)))
    return gram.sum((1, 2)).mean() / (len(grads) - 1)


def add_diversity(out, agent, obs, action):
    """EDAC: the diversity term, and eta times it in the critic loss (nothing while eta is 0)."""
    if agent.config.diversity_weight > 0:
        out["diversity_loss"] = np_diversity(agent.critic, obs, action)
        out["critic_loss"] += agent.config.diversity_weight * out["diversity_loss"]


def hand_losses(agent, batch, noise, hmc_samples):
    cfg = agent.config
    obs, act = _np(batch["observations"]), _np(batch["actions"])
    rew, nobs = _np(batch["rewards"]).reshape(-1), _np(batch["next_observations"])
    done = _np(batch["terminals"]).reshape(-1)
    B, A, K = obs.shape[0], act.shape[1], cfg.num_samples  # noqa: N806 - the module's names
    mean, std = np_policy(agent, obs)
    u_new = mean + std * _np(noise.policy)
    a_new = np.tanh(u_new)
    log_pi_new = np_log_prob(mean, std, a_new)
    nmean, nstd = np_policy(agent, nobs)
    a_next = np.tanh(nmean + nstd * _np(noise.next_policy))
    entropy = math.exp(agent.log_alpha.item()) * np_log_prob(nmean, nstd, a_next) if cfg.backup_entropy else 0.0
    y = rew + cfg.gamma * (1 - done) * (np_q(agent.target_critic, nobs, a_next).min(0) - entropy)
    q_data = np_q(agent.critic, obs, act)
    out = {"q_target": y.mean()}
    td = ((q_data - y) ** 2).mean(1)
    energy = agent.critic if agent.energy is None else agent.energy
    energy_data = np_q(energy, obs, act)
    samples_noise = np.zeros((B, K, A)) if noise.samples is None else _np(noise.samples)
    u_samples = mean[:, None] + std[:, None] * samples_noise
    samples, log_w = np.tanh(u_samples), 0.0
    if cfg.energy_bound == "cql":  # uniform, policy at s, policy at s' proposals, importance-weighted
        u_next = nmean[:, None] + nstd[:, None] * _np(noise.next_samples)
        samples = np.concatenate([_np(noise.uniform), samples, np.tanh(u_next)], axis=1)
        log_w = np.concatenate([np.full((B, K), A * math.log(2)),
                                -np_log_prob_pre_tanh(mean[:, None], std[:, None], u_samples),
                                -np_log_prob_pre_tanh(nmean[:, None], nstd[:, None], u_next)], axis=1)
    q_samples = np_q(energy, np.repeat(obs[:, None], samples.shape[1], 1), samples)  # (E, B, K)
    norm = math.log(K) if cfg.lse_norm == "k" else math.log(B)
    if cfg.energy_bound == "misa":
        partition = (np.log(np.exp(q_samples).sum(-1)) - norm).mean(1)
    elif cfg.energy_bound == "cql":
        partition = np.log(np.exp(q_samples + log_w).sum(-1)).mean(1)
    elif cfg.energy_bound == "dv":
        partition = np.log(np.exp(q_samples).reshape(len(q_samples), -1).mean(-1))
    else:
        partition = np.exp(q_samples - 1).mean((1, 2))
    gap = partition - energy_data.mean(1)
    if cfg.energy_bound == "none":
        penalty = np.zeros_like(td)
    elif agent.energy is not None:
        penalty = np.zeros_like(td)
        out["energy_loss"] = gap.sum()
    elif cfg.lagrange:
        alpha_prime = min(max(math.exp(agent.log_alpha_prime.item()), cfg.alpha_prime_min), cfg.alpha_prime_max)
        penalty = alpha_prime * cfg.min_q_weight * (gap - cfg.lagrange_tau)
        out["alpha_prime_loss"] = -(alpha_prime * cfg.min_q_weight * (gap - cfg.lagrange_tau)).mean()
        out["alpha_prime"] = alpha_prime
    else:
        penalty = cfg.min_q_weight * gap
    out.update(td_loss=td.sum(), critic_penalty=penalty.sum(), critic_loss=td.sum() + penalty.sum())
    add_diversity(out, agent, obs, act)
    if cfg.energy_bound != "none":
        out.update(lme_gap=gap.mean(), log_partition=partition.mean())
    for i in range(cfg.num_critics):
        out[f"q{i + 1}_td_loss"], out[f"q{i + 1}_data"] = td[i], q_data[i].mean()
        if cfg.energy_bound != "none" and agent.energy is None:
            out[f"q{i + 1}_lme_gap"] = gap[i]
    alpha = math.exp(agent.log_alpha.item())
    q_new = np_q(agent.critic, obs, a_new).min(0)
    lam = 1.0 if cfg.actor_q_scale is None else cfg.actor_q_scale / np.abs(q_new).mean()
    if cfg.actor_q_scale is not None:
        out["actor_lambda"] = lam
    out.update(
        actor_entropy_term=cfg.bc_weight * alpha * log_pi_new.mean(),
        actor_q_term=-lam * q_new.mean(),
        log_pi=log_pi_new.mean(), q_pi=q_new.mean(), alpha=alpha,
        alpha_loss=-agent.log_alpha.item() * (log_pi_new.mean() + agent.target_entropy),
    )
    if cfg.use_ba:
        log_pi_data = np_log_prob(mean, std, act)
        out.update(actor_ba_term=-cfg.bc_weight * log_pi_data.mean(), log_pi_data=log_pi_data.mean())
    if hmc_samples is not None:
        log_pi_mcmc = np_log_prob(mean[:, None], std[:, None], _np(hmc_samples))
        out["actor_unbiased_term"] = cfg.unbiased_weight * log_pi_mcmc.mean()
    out["actor_loss"] = sum(out.get(f"actor_{t}_term", 0.0) for t in ("entropy", "ba", "q", "unbiased"))
    return out


MISA_FAMILY = [name for name, algo in ALGORITHMS.items() if algo.family == "misa"]


@pytest.mark.parametrize("algo", MISA_FAMILY)
@pytest.mark.parametrize("lagrange,lse_norm,q_scale", [(False, "k", None), (True, "batch", None), (False, "k", 2.5)])
def test_every_loss_term_matches_a_hand_computation(algo, lagrange, lse_norm, q_scale):
    """Every variant of the learner (misa_fast.agents.algorithms), with and without the Lagrange
    multiplier, with the raw and the scale-free actor Q term (tiny networks whatever the algorithm's)."""
    overrides = {k: v for k, v in ALGORITHMS[algo].overrides.items()
                 if k not in ("num_samples", "policy_hidden", "critic_hidden")}
    if lagrange and (overrides.get("energy_bound") == "none" or overrides.get("energy_network") == "separate"):
        pytest.skip("no Lagrange multiplier without a critic regulariser")
    overrides.update(lagrange=lagrange, lagrange_tau=0.7, lse_norm=lse_norm, actor_q_scale=q_scale)
    agent = spice(MISA(tiny_config(**overrides)))
    batch = make_batch()
    noise = agent.draw_noise(B)
    out = agent.compute_losses(batch, noise)
    expected = hand_losses(agent, batch, noise, None if out.hmc is None else out.hmc.samples)
    for name, value in expected.items():
        assert out.metrics[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert set(expected) >= set(out.metrics) - {"hmc_accept_rate", "hmc_accept_prob", "hmc_step_size", "hmc_dist_a",
                                                "hmc_dist_u", "hmc_ess"}  # sampler diagnostics: see test_hmc_reference
    expected_losses = {"critic_loss", "actor_loss", "alpha_loss"} | ({"alpha_prime_loss"} if lagrange else set())
    expected_losses |= {"energy_loss"} if agent.energy is not None else set()
    assert set(out.losses) == expected_losses
    # HMC samples are those of the sampler run on the same inputs and noise (tested in test_hmc).
    assert (out.hmc is not None) == agent.config.use_hmc
    if out.hmc is not None:
        assert out.hmc.samples.shape == (B, K, A)


def test_metrics_are_detached_zero_dim_tensors_and_update_changes_parameters():
    agent = MISA(tiny_config())
    before = copy.deepcopy(agent.state_dict())
    metrics = agent.update(make_batch())
    assert agent.step == 1
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
        assert math.isfinite(value.item()), name
    for key in ("hmc_accept_rate", "hmc_step_size", "lme_gap", "alpha", "critic_loss", "actor_loss",
                "actor_unbiased_term", "actor_ba_term", "q_target", "q1_data"):
        assert key in metrics
    for group in ("policy", "critic"):
        changed = [not torch.equal(before[group][k], v) for k, v in agent.state_dict()[group].items()]
        assert all(changed), group
    # Polyak: target' = (1 - tau) target + tau critic' (after the critic step).
    tau = agent.config.tau
    for k, v in agent.target_critic.state_dict().items():
        assert torch.allclose(v, (1 - tau) * before["target_critic"][k] + tau * agent.critic.state_dict()[k], atol=1e-7)


@pytest.mark.parametrize("overrides", [dict(lagrange=True), ALGORITHMS["misa-t"].overrides,
                                       dict(ALGORITHMS["cql"].overrides, lagrange=True)], ids=["misa", "misa-t", "cql"])
def test_gradient_isolation(overrides):
    agent = spice(MISA(tiny_config(**overrides)))
    out = agent.compute_losses(make_batch())
    groups = {
        "policy": list(agent.policy.parameters()),
        "critic": list(agent.critic.parameters()),
        "alpha": [agent.log_alpha],
        "alpha_prime": [agent.log_alpha_prime],
    }
    if agent.energy is not None:
        groups["energy"] = list(agent.energy.parameters())
    owner = {"critic_loss": "critic", "actor_loss": "policy", "alpha_loss": "alpha", "alpha_prime_loss": "alpha_prime",
             "energy_loss": "energy"}
    per_loss = {}
    for loss_name, loss in out.losses.items():
        for group, params in groups.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert nonzero == (group == owner[loss_name]), (loss_name, group)
            if group == owner[loss_name]:
                per_loss[group] = grads
    assert out.hmc is None or not out.hmc.samples.requires_grad
    assert not any(p.requires_grad for p in agent.target_critic.parameters())
    # The single backward of the summed losses gives each group exactly its own loss's gradient.
    sum(out.losses.values()).backward()
    for group, grads in per_loss.items():
        for p, g in zip(groups[group], grads):
            assert torch.allclose(p.grad, torch.zeros_like(p) if g is None else g, atol=1e-6), group


@pytest.mark.parametrize("tau,direction", [(-50.0, +1), (50.0, -1)])
def test_lagrange_multiplier_direction_in_the_agent(tau, direction):
    agent = MISA(tiny_config(lagrange=True, lagrange_tau=tau))
    start = agent.log_alpha_prime.item()
    metrics = agent.update(make_batch())
    assert np.sign(metrics["lme_gap"].item() - tau) == direction
    assert np.sign(agent.log_alpha_prime.item() - start) == direction


def test_non_finite_guard_raises_before_any_step():
    agent = MISA(tiny_config(lagrange=True))
    agent.update(make_batch(0))
    snapshot = copy.deepcopy(agent.state_dict())
    bad = make_batch(1)
    bad["rewards"][1] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        agent.update(bad)
    assert info.value.term == "critic_loss" and info.value.step == 1
    assert agent.step == 1
    _assert_same_learner_state(agent.state_dict(), snapshot)
    # The actor side is checked too, and nothing (not even the critic) steps.
    with torch.no_grad():
        agent.log_alpha.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="actor_loss"):
        agent.update(make_batch(2))
    with torch.no_grad():
        agent.log_alpha.copy_(snapshot["log_alpha"])
    _assert_same_learner_state(agent.state_dict(), snapshot)
    agent.update(make_batch(3))  # recovers
    assert agent.step == 2


def _assert_same_learner_state(a, b):
    for key in ("policy", "critic", "target_critic", "energy"):
        for k in a[key] or {}:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for key in ("log_alpha", "log_alpha_prime"):
        assert torch.equal(a[key], b[key]), key
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        for idx in sa:
            for k in sa[idx]:
                assert torch.equal(sa[idx][k], sb[idx][k]), (name, idx, k)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, algo", [("faithful", "misa"), ("adaptive", "misa"), ("parallel", "misa"),
                                        ("faithful", "misa-t"), ("faithful", "cql")])
def test_checkpoint_resume_is_bit_identical(mode, algo):
    overrides = {k: v for k, v in ALGORITHMS[algo].overrides.items() if k != "num_samples"}
    lagrange = overrides.get("energy_network") != "separate"
    cfg = tiny_config(**{"hmc_mode": mode, "lagrange": lagrange, "lr_schedule": "cosine", "lr_decay_steps": 10,
                         **overrides})
    batches = [make_batch(i) for i in range(6)]
    agent = MISA(cfg)
    for b in batches[:3]:
        agent.update(b)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    expected = [agent.update(b) for b in batches[3:]]
    buffer.seek(0)
    resumed = MISA(cfg.replace(seed=123))  # a different init and stream, all overwritten by the load
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.update(b) for b in batches[3:]]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            assert torch.equal(e[k], g[k]), k
    _assert_same_learner_state(agent.state_dict(), resumed.state_dict())
    assert resumed.step == agent.step == 6
    assert torch.equal(agent.generator.get_state(), resumed.generator.get_state())
    assert agent.optimizers["policy"].param_groups[0]["lr"] == resumed.optimizers["policy"].param_groups[0]["lr"]


@pytest.mark.gpu
def test_cuda_update_matches_cpu_and_resumes():
    """Same init and supplied noise on both devices: the losses agree (without HMC, whose accept
    decisions may flip on rounding); a CUDA run with HMC resumes from its state_dict."""
    from misa_fast.ops.testing import dot_tolerance

    cfg = tiny_config(lagrange=True)
    cpu, gpu = MISA(cfg.replace(use_hmc=False)), MISA(cfg.replace(use_hmc=False, device="cuda"))
    batch = make_batch()
    noise = cpu.draw_noise(B)
    moved = type(noise)(noise.policy.cuda(), noise.next_policy.cuda(), noise.samples.cuda(), None)
    m_cpu = cpu.compute_losses(batch, noise).metrics
    m_gpu = gpu.compute_losses({k: v.cuda() for k, v in batch.items()}, moved).metrics
    # On CUDA the log-partition is the fused sampled-Q kernel at the config's dot precision (tf32 by
    # default), the CPU's the fp32 torch code: one forward through the critic's three Linear layers.
    # (Never tighter than the rel=1e-3, abs=1e-4 the fp32 comparison has always used.)
    tol = dot_tolerance(cfg.sampled_q_precision, reduction=S + A, depth=len(cfg.critic_hidden) + 1, floor=1e-4)
    for k in m_cpu:
        assert m_gpu[k].device.type == "cuda"
        assert m_gpu[k].item() == pytest.approx(m_cpu[k].item(), rel=max(tol["rtol"], 1e-3), abs=tol["atol"]), k
    for i in range(2):
        gpu.update(batch)
    state = copy.deepcopy(gpu.state_dict())
    expected = gpu.update(batch)
    resumed = MISA(cfg.replace(device="cuda", seed=5))
    resumed.load_state_dict(state)
    got = resumed.update(batch)
    for k in expected:
        assert torch.allclose(expected[k], got[k], rtol=1e-5, atol=1e-6), k


def test_load_rejects_a_different_architecture():
    state = MISA(tiny_config()).state_dict()
    with pytest.raises(ValueError, match="critic_hidden"):
        MISA(tiny_config(critic_hidden=(4, 4, 4))).load_state_dict(state)


def test_seeding():
    a, b, c = MISA(tiny_config(seed=1)), MISA(tiny_config(seed=1)), MISA(tiny_config(seed=2))
    assert torch.equal(a.critic.weights[0], b.critic.weights[0])
    assert not torch.equal(a.critic.weights[0], c.critic.weights[0])
    batch = make_batch()
    ma, mb = a.update(batch), b.update(batch)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_batch_shapes_and_numpy_input():
    batch = make_batch()
    column = dict(batch, rewards=batch["rewards"][:, None], terminals=batch["terminals"][:, None])
    as_numpy = {k: v.numpy() for k, v in batch.items()}
    results = [MISA(tiny_config()).update(b) for b in (batch, column, as_numpy)]
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_cosine_schedule():
    agent = MISA(tiny_config(lr_schedule="cosine", lr_decay_steps=8, use_hmc=False))
    for _ in range(3):
        agent.update(make_batch())
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert agent.optimizers["policy"].param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
    assert agent.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(3e-4 * factor)
    assert agent.optimizers["alpha"].param_groups[0]["lr"] == pytest.approx(1e-4)  # temperatures: constant


def test_adaptive_mode_carries_its_step_size():
    agent = MISA(tiny_config(hmc_mode="adaptive", hmc_step_size=1.0))
    assert agent.hmc_step_size.item() == pytest.approx(1.0)
    metrics = agent.update(make_batch())
    assert agent.hmc_step_size.item() == pytest.approx(metrics["hmc_step_size"].item(), rel=0.5)
    assert agent.hmc_step_size.item() != pytest.approx(1.0)
    fixed = MISA(tiny_config(hmc_mode="faithful", hmc_step_size=0.3))
    fixed.update(make_batch())
    assert fixed.hmc_step_size.item() == pytest.approx(0.3)


@pytest.mark.parametrize(
    "overrides,absent",
    [
        (dict(energy_bound="dv", use_hmc=False), {"hmc_accept_rate", "actor_unbiased_term"}),
        (dict(energy_bound="f", use_hmc=False), {"hmc_accept_rate"}),
        (dict(energy_bound="none", use_hmc=False), {"lme_gap", "hmc_accept_rate"}),
        (dict(use_ba=False), {"actor_ba_term", "log_pi_data"}),
        (dict(auto_alpha=False), {"alpha_loss"}),
        (dict(hmc_mode="parallel", num_critics=3), set()),
    ],
)
def test_variants_are_configuration(overrides, absent):
    agent = MISA(tiny_config(**overrides))
    alpha_before = agent.log_alpha.item()
    for i in range(2):
        metrics = agent.update(make_batch(i))
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert not absent & set(metrics)
    if overrides.get("auto_alpha") is False:
        assert agent.log_alpha.item() == alpha_before


def test_act():
    agent = MISA(tiny_config())
    obs = np.random.default_rng(0).normal(size=(4, S)).astype(np.float32)
    out = agent.act(obs)
    assert isinstance(out, np.ndarray) and out.shape == (4, A)
    mean, _ = agent.policy.dist_params(torch.as_tensor(obs))
    assert np.allclose(out, torch.tanh(mean).detach().numpy())
    assert isinstance(agent.act(torch.as_tensor(obs)), torch.Tensor)


def test_agent_needs_dimensions():
    with pytest.raises(ValueError, match="obs_dim"):
        MISA(MISAConfig())
    agent = MISA(MISAConfig(policy_hidden=(4,), critic_hidden=(4,), num_samples=2), obs_dim=S, act_dim=A)
    assert agent.config.obs_dim == S and agent.target_entropy == -A


# --------------------------------------------------------------------------------------------------
# config
def test_config_defaults_are_the_official_values():
    cfg = MISAConfig()
    assert (cfg.gamma, cfg.tau, cfg.batch_size, cfg.num_samples) == (0.99, 5e-3, 256, 50)
    assert (cfg.min_q_weight, cfg.bc_weight, cfg.unbiased_weight) == (5.0, 0.5, 0.1)
    assert (cfg.policy_lr, cfg.critic_lr, cfg.alpha_lr) == (1e-4, 3e-4, 1e-4)
    assert (cfg.hmc_burn_in, cfg.hmc_leapfrog_steps, cfg.resolved_hmc_step_size, cfg.hmc_mode, cfg.hmc_space) == (
        5, 2, 1.0, "faithful", "post_tanh")
    assert cfg.replace(hmc_space="pre_tanh").resolved_hmc_step_size == pytest.approx(math.pi / 4)
    assert (cfg.lagrange, cfg.log_alpha_prime_init, cfg.alpha_prime_max) == (False, 1.0, 1e6)
    assert cfg.policy_hidden == cfg.critic_hidden == (256, 256)
    assert cfg.resolved_target_entropy(6) == -6.0
    assert not cfg.adapt_hmc and cfg.replace(hmc_mode="adaptive").adapt_hmc


def test_presets():
    loco = preset("locomotion")
    assert not loco.lagrange and loco.critic_hidden == (256, 256)
    ant = preset("antmaze")
    assert ant.critic_hidden == (256, 256, 256) and ant.policy_hidden == (256, 256)
    assert ant.lagrange and ant.lagrange_tau == 10.0 and ant.lse_norm == "batch"
    for name in ("adroit", "kitchen"):
        cfg = preset(name)
        assert cfg.lagrange and cfg.lagrange_tau == 3.0 and cfg.lse_norm == "batch"
    pendulum = preset("pendulum")  # the locomotion learner at K=10: small networks collapse on the demo data
    assert pendulum.policy_hidden == pendulum.critic_hidden == (256, 256) and pendulum.num_samples == 10
    assert pendulum.replace(num_samples=50) == loco
    assert preset("antmaze", seed=3).seed == 3
    with pytest.raises(ValueError, match="preset"):
        preset("atari")
    names = {"antmaze-umaze-v0": "antmaze", "ant-medium-v2": "locomotion", "hopper-medium-v2": "locomotion",
             "kitchen-mixed-v0": "kitchen", "pen-human-v1": "adroit", "halfcheetah-expert-v2": "locomotion"}
    for env, expected in names.items():
        assert config_base.preset_name_for_env(env) == expected


def test_apply_overrides_parses_and_type_checks():
    cfg = apply_overrides(MISAConfig(), [
        "hmc_mode=parallel", "critic_hidden=256-256-256", "policy_hidden=[64, 64]", "policy_lr=3e-4",
        "lagrange=true", "num_samples=20", "target_entropy=none", "hmc_adapt=yes", "lr_decay_steps=1e6",
    ])
    assert cfg.hmc_mode == "parallel" and cfg.critic_hidden == (256, 256, 256) and cfg.policy_hidden == (64, 64)
    assert cfg.policy_lr == 3e-4 and cfg.lagrange is True and cfg.num_samples == 20
    assert cfg.target_entropy is None and cfg.hmc_adapt is True and cfg.lr_decay_steps == 1_000_000
    assert apply_overrides(cfg, ["target_entropy=-2.5"]).target_entropy == -2.5
    for bad, match in [
        (["min_q_wieght=1"], "min_q_wieght.*min_q_weight"),
        (["hmc_mode=fast"], "hmc_mode"),
        (["gamma=high"], "gamma"),
        (["num_samples=2.5"], "num_samples"),
        (["use_hmc=maybe"], "use_hmc"),
        (["seed"], "key=value"),
        (["num_samples=0"], "num_samples"),
        (["energy_bound=dv"], "use_hmc"),  # HMC correction needs the MISA bound
    ]:
        with pytest.raises(ValueError, match=match):
            apply_overrides(cfg, bad)


def test_config_round_trip_and_replace_checks():
    cfg = preset("antmaze", obs_dim=29, act_dim=8)
    assert MISAConfig.from_dict(cfg.to_dict()) == cfg
    as_lists = dict(cfg.to_dict(), critic_hidden=[256, 256, 256])  # e.g. after a JSON round trip
    assert MISAConfig.from_dict(as_lists) == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        cfg.replace(not_a_field=1)
    with pytest.raises(ValueError, match="gamma"):
        cfg.replace(gamma="0.9")
    assert cfg.replace(gamma=1).gamma == 1.0 and isinstance(cfg.replace(gamma=1).gamma, float)


def test_sampled_q_precision_is_a_validated_config_key():
    """``--set sampled_q_precision=...`` (the fused sampled-Q op's dot precision): tf32 by default,
    and a value the kernel has no path for is an error naming the key and the choices."""
    assert MISAConfig().sampled_q_precision == "tf32"
    assert apply_overrides(MISAConfig(), ["sampled_q_precision=ieee"]).sampled_q_precision == "ieee"
    with pytest.raises(ValueError, match=r"'tf32x3' for config key 'sampled_q_precision'; choose one of "
                                         r"\('tf32', 'ieee', 'bf16'\)"):
        apply_overrides(MISAConfig(), ["sampled_q_precision=tf32x3"])
    with pytest.raises(ValueError, match="sampled_q_precision"):
        MISAConfig(sampled_q_precision="fp8")


@pytest.mark.parametrize("bound", ["misa", "cql"])
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_sampled_q_precision_reaches_the_fused_op(monkeypatch, bound, precision):
    """Where the dispatch picks Triton (forced here on any machine), the agent's log-partition is
    the fused op called with the config's precision (the spy returns the reference's values)."""
    from misa_fast import ops

    seen = []

    def spy(obs, actions, layers, log_weights=None, normalizer="k", *, precision, **options):
        seen.append(precision)
        return ops.sampled_q_log_mean_exp_reference(obs, actions, layers, log_weights, normalizer)

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(ops, "sampled_q_log_mean_exp", spy)
    agent = MISA(tiny_config(energy_bound=bound, use_hmc=False, sampled_q_precision=precision))
    agent.update(make_batch())
    assert seen == [precision]


@pytest.mark.parametrize("mode", ["faithful", "adaptive"])
def test_pre_tanh_hmc_space_feeds_eq15_with_its_exact_pre_tanh_samples(mode):
    """hmc_space=pre_tanh (also as --set hmc_space=pre_tanh): the correction term is w_u times the
    mean log pi of the sampler's pre-tanh samples (no atanh round trip, finite where tanh
    saturates); the chains move, and the diagnostics are reported."""
    from misa_fast import nets

    cfg = apply_overrides(tiny_config(), [f"hmc_mode={mode}", "hmc_space=pre_tanh", "hmc_step_size=0.7"])
    assert cfg.hmc_space == "pre_tanh"
    agent = MISA(cfg)
    batch = make_batch()
    out = agent.compute_losses(batch, agent.draw_noise(B))
    assert out.hmc.pre_tanh is not None and out.hmc.pre_tanh.shape == (B, K, A)
    mean, std = agent.policy.dist_params(batch["observations"])
    expected = cfg.unbiased_weight * nets.tanh_gaussian_log_prob_pre_tanh(
        mean.unsqueeze(1), std.unsqueeze(1), out.hmc.pre_tanh).mean()
    assert out.metrics["actor_unbiased_term"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.hmc.accept_rate.item() > 0.3
    assert out.metrics["hmc_dist_u"].item() > 0 and 1 <= out.metrics["hmc_ess"].item() <= K
    agent.update(batch)
    assert 0 < agent.hmc_step_size.item() <= math.pi / (2 * cfg.hmc_leapfrog_steps) + 1e-6  # a quarter rotation
    with pytest.raises(ValueError, match="hmc_space"):
        apply_overrides(tiny_config(), ["hmc_space=tanh"])


def test_the_non_finite_error_survives_copy_and_pickle():
    """A sweep's worker hands the error to the driver by pickling it."""
    import copy
    import pickle

    from misa_fast.agents import NonFiniteLossError

    error = NonFiniteLossError("critic_loss", 7)
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert (type(again), again.term, again.step, str(again)) == (type(error), "critic_loss", 7, str(error))


def test_loss_terms_match_a_hand_computation_late_in_a_real_run(tmp_path):
    """The hand computation on a trained agent and a batch of the data it learned from: at a late
    step the critics' values are large (-90 on the demo data) and the policy narrow, which random
    tiny networks do not show. ``MISA_FAST_AUDIT_RUN=<run directory>`` audits that run's
    checkpoint (e.g. a long run of the demo); without it, a short run of the pendulum preset."""
    import os

    from misa_fast.agents.algorithms import agent_from_checkpoint
    from misa_fast.data.prepare import prepare
    from misa_fast.data.registry import DEFAULT_DATASET
    from misa_fast.training import checkpoint as ckpt
    from misa_fast.training.loop import RunConfig, train

    run_dir = os.environ.get("MISA_FAST_AUDIT_RUN")
    if not run_dir:
        run_dir = tmp_path / "run"
        train(RunConfig(steps=150, eval_every=150, eval_episodes=1, out=str(run_dir), progress=False,
                        tensorboard=False, device="cpu", overrides=("batch_size=32",)))
    state = ckpt.load(os.path.join(run_dir, "checkpoint.pt"))
    agent = agent_from_checkpoint(state)
    data, _ = prepare(state["run"]["dataset"] or DEFAULT_DATASET, obs_norm=state["run"]["obs_norm"])
    rows = torch.randperm(len(data["rewards"]), generator=torch.Generator().manual_seed(1))[:64]
    batch = {k: torch.as_tensor(data[k][rows.numpy()]) for k in
             ("observations", "actions", "rewards", "next_observations", "terminals")}
    noise = agent.draw_noise(len(rows))
    out = agent.compute_losses(batch, noise)
    expected = hand_losses(agent, batch, noise, None if out.hmc is None else out.hmc.samples)
    for name, value in expected.items():
        assert out.metrics[name].item() == pytest.approx(value, rel=1e-4, abs=1e-4), name
