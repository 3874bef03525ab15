"""The TD3 family (TD3+BC, SPOT): every loss against an independent float64 computation (values and
gradients), target policy smoothing, delayed actor/target updates, the sequential critic-then-actor
order, the non-finite guard (including the undone critic step), bit-identical resume, learning
sanity checks, acting/export, and the config."""
import copy
import io
import math

import numpy as np
import pytest
import torch

from misa_fast import nets
from misa_fast.agents import TD3, NonFiniteLossError, TD3Noise, losses
from misa_fast.agents import algorithms as algos
from misa_fast.agents import vae as vae_lib
from misa_fast.agents.config_base import apply_overrides
from misa_fast.agents.learner import as_batch
from misa_fast.agents.td3_config import TD3_PRESETS, TD3Config, spot_lambda_for, td3_preset
from misa_fast.training import checkpoint

S, A, B = 3, 2, 5


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)


def tiny_config(**kw):
    base = dict(obs_dim=S, act_dim=A, actor_hidden=(4, 4), critic_hidden=(5, 5), vae_hidden=(6, 6), batch_size=B,
                seed=0)
    return TD3Config(**{**base, **kw})


def make_agent(**kw):
    agent = TD3(tiny_config(**kw))
    if agent.needs_pretraining:
        agent.pretrain_vae(batches(), 3, progress=False)
    return agent


def make_batch(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch, S, generator=g),
        "actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,
        "rewards": torch.randn(batch, generator=g),
        "next_observations": torch.randn(batch, S, generator=g),
        "terminals": (torch.arange(batch) % 2).float(),
    }


def batches(seed=0):
    while True:
        yield make_batch(seed)
        seed += 1


# --------------------------------------------------------------------------------------------------
# the loss functions, with analytic gradients
def test_smoothed_target_action_clips_the_noise_and_the_action():
    next_action = torch.tensor([[0.0, 0.9], [-0.95, 0.2], [0.3, -0.3]])
    noise = torch.tensor([[10.0, 0.5], [-0.4, -10.0], [1.0, 2.4]])
    out = losses.smoothed_target_action(next_action, noise, 0.2, 0.5)
    expected = torch.tensor([[0.5, 1.0],  # +0.5 (clipped noise); 0.9 + 0.1 = 1.0
                             [-1.0, -0.3],  # -0.95 - 0.08 clipped to -1; 0.2 - 0.5
                             [0.5, 0.18]])  # 0.3 + 0.2; -0.3 + 0.48
    assert torch.allclose(out, expected, atol=1e-6)
    big = losses.smoothed_target_action(torch.zeros(1000, 2), torch.randn(1000, 2) * 10, 0.2, 0.5)
    assert big.abs().max() == pytest.approx(0.5)  # |offset| never above noise_clip


def test_td3bc_actor_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(B, A, generator=g, dtype=torch.float64).requires_grad_()
    data = torch.rand(B, A, generator=g, dtype=torch.float64)
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    q = (pi * c).sum(-1) - 0.2  # a Q that is linear in the action
    loss, terms = losses.td3bc_actor_loss(q, pi, data, alpha=2.5)
    qv = q.detach().numpy()
    lam = 2.5 / np.abs(qv).mean()
    expected = -lam * qv.mean() + ((pi.detach().numpy() - data.numpy()) ** 2).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert terms["actor_lambda"].item() == pytest.approx(lam)
    loss.backward()
    # lambda is held fixed: d/dpi = -lam * c / B + 2 (pi - a) / (B A)
    grad = -lam * c.numpy()[None] / B + 2 * (pi.detach().numpy() - data.numpy()) / (B * A)
    assert np.allclose(pi.grad.numpy(), grad, rtol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_spot_actor_loss_value_and_gradient(normalize):
    g = torch.Generator().manual_seed(1)
    pi = torch.rand(B, A, generator=g, dtype=torch.float64).requires_grad_()
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    q = (pi * c).sum(-1) + 0.4
    nld = (pi ** 2).sum(-1)  # stands in for -log pi_beta(pi(s)|s)
    loss, terms = losses.spot_actor_loss(q, nld, 0.3, normalize)
    qv, p = q.detach().numpy(), pi.detach().numpy()
    scale = 1 / np.abs(qv).mean() if normalize else 1.0
    assert loss.item() == pytest.approx(-scale * qv.mean() + 0.3 * (p ** 2).sum(-1).mean(), rel=1e-12)
    loss.backward()
    assert np.allclose(pi.grad.numpy(), -scale * c.numpy()[None] / B + 0.3 * 2 * p / B, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# the agent against an independent float64 implementation (per-critic loops, explicit masks)
def ref_mlp(params, x, masks=(), out=torch.tanh):
    """params: [(W (out, in), b (out,)), ...] float64; ReLU hidden layers."""
    for i, (w, b) in enumerate(params[:-1]):
        x = x @ w.T + b
        if masks:
            x = x * masks[i]
        x = torch.relu(x)
    w, b = params[-1]
    return out(x @ w.T + b)


def actor_params(actor, requires_grad=False):
    layers = list(actor.hidden) + [actor.out]
    return [(m.weight.detach().double().clone().requires_grad_(requires_grad),
             m.bias.detach().double().clone().requires_grad_(requires_grad)) for m in layers]


def critic_params(critic, index, requires_grad=False):
    return [(w.detach().double().clone().requires_grad_(requires_grad),
             b.detach().double().clone().requires_grad_(requires_grad)) for w, b in critic.layers(index)]


def ref_q(params, obs, act):
    return ref_mlp(params, torch.cat([obs, act], -1), out=lambda x: x)[..., 0]


@pytest.mark.parametrize("reg, dropout, estimator, samples", [
    ("bc", 0.0, "elbo", 1), ("bc", 0.3, "elbo", 1), ("vae", None, "elbo", 1), ("vae", 0.2, "iwae", 3)])
def test_update_matches_a_hand_computation(reg, dropout, estimator, samples):
    """Critic loss (TD3 target with smoothing), then the actor loss under the *updated* Q1, with the
    gradients the optimizers saw. A large critic lr makes the critic-then-actor order visible."""
    agent = make_agent(behavior_reg=reg, actor_dropout=dropout, density_estimator=estimator,
                       density_samples=samples, policy_freq=1, critic_lr=0.1)
    batch = make_batch(3)
    noise = agent.draw_noise(B, actor_step=True)
    noise = noise._replace(target=torch.tensor([[4.0, -0.1], [-4.0, 0.3], [0.2, 9.0], [-0.6, 1.0], [0.0, -3.0]]))
    assert (len(noise.actor_masks) == 2) == (agent.dropout > 0) and agent.dropout == (
        dropout if dropout is not None else 0.1)
    pol, tpol = actor_params(agent.policy, requires_grad=True), actor_params(agent.target_policy)
    crit = [critic_params(agent.critic, i, requires_grad=True) for i in range(2)]
    tcrit = [critic_params(agent.target_critic, i) for i in range(2)]
    metrics = agent.update(batch, noise)

    d = {k: v.double() for k, v in batch.items()}
    masks = lambda ms: [m.double() for m in ms]  # noqa: E731
    smooth = (0.2 * noise.target.double()).clamp(-0.5, 0.5)
    next_a = (ref_mlp(tpol, d["next_observations"], masks(noise.target_masks)) + smooth).clamp(-1, 1)
    next_q = torch.minimum(*[ref_q(p, d["next_observations"], next_a) for p in tcrit])
    y = d["rewards"] + 0.99 * (1 - d["terminals"]) * next_q
    q = [ref_q(p, d["observations"], d["actions"]) for p in crit]
    critic_loss = sum(((qi - y) ** 2).mean() for qi in q)
    assert metrics["critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    assert metrics["q_target"].item() == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["q2_data"].item() == pytest.approx(q[1].mean().item(), rel=1e-5, abs=1e-6)
    critic_loss.backward()
    for i in range(2):
        for layer, (w, b) in enumerate(crit[i]):
            assert torch.allclose(agent.critic.weights[layer].grad[i].double(), w.grad, rtol=1e-4, atol=1e-6)
            assert torch.allclose(agent.critic.biases[layer].grad[i].double(), b.grad, rtol=1e-4, atol=1e-6)

    # actor: pi(s) from the pre-step actor, Q1 from the post-step critic
    pi = ref_mlp(pol, d["observations"], masks(noise.actor_masks))
    q_pi = ref_q(critic_params(agent.critic, 0), d["observations"], pi)
    if reg == "bc":
        lam = 2.5 / q_pi.detach().abs().mean()
        actor_loss = -lam * q_pi.mean() + ((pi - d["actions"]) ** 2).mean()
    else:
        vae = copy.deepcopy(agent.vae).double()
        nld = vae_lib.neg_log_density(vae, d["observations"], pi, 0.5, noise.density.double(), estimator)
        lam = 1.0 / q_pi.detach().abs().mean()
        actor_loss = -lam * q_pi.mean() + 0.1 * nld.mean()
        assert metrics["neg_log_density"].item() == pytest.approx(nld.mean().item(), rel=1e-5)
    assert metrics["actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    assert metrics["actor_lambda"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert metrics["q_pi"].item() == pytest.approx(q_pi.mean().item(), rel=1e-5)
    stale_q = ref_q([(w.detach(), b.detach()) for w, b in crit[0]], d["observations"], pi)  # pre-step Q1
    assert abs(stale_q.mean().item() - q_pi.mean().item()) > 1e-3  # the order is observable
    actor_loss.backward()
    for m, (w, b) in zip(list(agent.policy.hidden) + [agent.policy.out], pol):
        assert torch.allclose(m.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(m.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


def test_relu_critic_matches_a_per_critic_linear_stack():
    critic = nets.EnsembleCritic(S, A, (5, 5), 3, torch.Generator().manual_seed(0), activation="relu")
    obs, act = torch.randn(4, S), torch.rand(4, 7, A)
    out = critic(obs, act)
    for i in range(3):
        ref = ref_q([(w.double(), b.double()) for w, b in critic.layers(i)],
                    obs.double()[:, None].expand(4, 7, S), act.double())
        assert torch.allclose(out[i].double(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        nets.EnsembleCritic(S, A, activation="tanh")


def test_only_the_actor_gets_the_actor_gradient_and_the_vae_stays_frozen():
    agent = make_agent(behavior_reg="vae")
    vae_before = copy.deepcopy(agent.vae.state_dict())
    noise = agent.draw_noise(B, actor_step=True)
    actor_loss = agent.loss_function("actor")
    loss, _ = actor_loss(agent.state_tensors(), as_batch(make_batch(), "cpu"), noise)
    loss.backward()
    assert all(p.grad is None for p in list(agent.critic.parameters()) + list(agent.vae.parameters()))
    assert all(p.grad is not None for p in agent.policy.parameters())
    for b in [make_batch(i) for i in range(4)]:
        agent.update(b)
    for k, v in agent.vae.state_dict().items():
        assert torch.equal(v, vae_before[k])


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freq", [2, 3])
def test_actor_and_targets_change_only_every_policy_freq_steps(freq):
    agent = make_agent(policy_freq=freq)

    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()

    last_actor_metrics = None
    for step in range(7):
        before = {name: flat(getattr(agent, name)) for name in ("policy", "target_policy", "critic", "target_critic")}
        metrics = agent.update(make_batch(step))
        changed = {name: not torch.equal(before[name], flat(getattr(agent, name))) for name in before}
        actor_step = (step + 1) % freq == 0
        assert changed == {"policy": actor_step, "target_policy": actor_step, "critic": True,
                           "target_critic": actor_step}, step
        if step < freq - 1:
            assert math.isnan(metrics["actor_loss"].item())  # no actor step yet
        elif not actor_step:  # the last actor step's values, so every update has the same keys
            assert all(torch.equal(metrics[k], last_actor_metrics[k]) for k in last_actor_metrics)
        if actor_step:
            last_actor_metrics = {k: metrics[k] for k in ("actor_loss", "actor_q_term", "q_pi")}
    assert agent.step == 7


def test_metrics_are_detached_zero_dim_tensors():
    for reg in ("bc", "vae"):
        agent = make_agent(behavior_reg=reg, policy_freq=1)
        metrics = agent.update(make_batch())
        assert {"critic_loss", "q1_data", "q2_data", "q_target", "actor_loss", "q_pi", "actor_lambda"} <= set(metrics)
        assert ("actor_bc_term" in metrics) == (reg == "bc") and ("neg_log_density" in metrics) == (reg == "vae")
        assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


# --------------------------------------------------------------------------------------------------
def _assert_same_state(a, b):
    for key in ("policy", "critic", "target_policy", "target_critic", "vae"):
        for k in a[key] or {}:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys(), name
        for idx in sa:
            for k in sa[idx]:
                assert torch.equal(sa[idx][k], sb[idx][k]), (name, idx, k)


@pytest.mark.parametrize("freq", [1, 2])
def test_non_finite_guard_leaves_the_agent_as_it_was(freq):
    agent = make_agent(policy_freq=freq)
    if freq == 2:
        agent.update(make_batch(0))  # the next update is an actor step, with Adam state to restore
    snapshot = copy.deepcopy(agent.state_dict())
    step = agent.step
    bad = make_batch(1)
    bad["rewards"][2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="critic_loss") as info:
        agent.update(bad)
    assert info.value.step == step and agent.step == step
    _assert_same_state(agent.state_dict(), snapshot)
    # A non-finite actor loss comes after the critic step (as in the official order): undone.
    with torch.no_grad():
        agent.policy.out.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="actor_loss"):
        agent.update(make_batch(2))
    assert agent.step == step
    with torch.no_grad():
        agent.policy.out.bias.copy_(snapshot["policy"]["out.bias"])
    _assert_same_state(agent.state_dict(), snapshot)
    agent.update(make_batch(3))  # recovers
    assert agent.step == step + 1


@pytest.mark.parametrize("kw", [dict(behavior_reg="bc", actor_dropout=0.3),
                                dict(behavior_reg="vae"),
                                dict(behavior_reg="vae", density_estimator="iwae", density_samples=4)])
def test_checkpoint_resume_is_bit_identical(kw):
    agent = make_agent(**kw)
    data = [make_batch(i) for i in range(7)]
    for b in data[:3]:
        agent.update(b)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    expected = [agent.update(b) for b in data[3:]]
    buffer.seek(0)
    resumed = TD3(tiny_config(**{**kw, "seed": 123}))  # different init and stream, all overwritten
    assert resumed.needs_pretraining == (kw["behavior_reg"] == "vae")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert not resumed.needs_pretraining  # the trainer must not pretrain again after a resume
    got = [resumed.update(b) for b in data[3:]]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            assert torch.equal(e[k], g[k]) or (e[k].isnan() and g[k].isnan()), k
    _assert_same_state(agent.state_dict(), resumed.state_dict())
    assert resumed.step == agent.step == 7
    assert torch.equal(agent.generator.get_state(), resumed.generator.get_state())


def test_load_rejects_a_different_architecture():
    state = make_agent().state_dict()
    with pytest.raises(ValueError, match="critic_hidden"):
        TD3(tiny_config(critic_hidden=(7, 7))).load_state_dict(state)
    with pytest.raises(ValueError, match="behavior_reg"):
        TD3(tiny_config(behavior_reg="vae")).load_state_dict(state)


def test_seeding():
    a, b, c = make_agent(seed=1), make_agent(seed=1), make_agent(seed=2)
    ma, mb, mc = (x.update(make_batch()) for x in (a, b, c))
    assert all(torch.equal(ma[k], mb[k]) or (ma[k].isnan() and mb[k].isnan()) for k in ma)
    assert not torch.equal(ma["critic_loss"], mc["critic_loss"])


# --------------------------------------------------------------------------------------------------
# learning sanity checks
def synthetic_dataset(n=512, seed=0):
    """A behaviour policy a*(s) plus noise; the reward peaks at a*(s): BC and the Q term agree."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -0.6]])
    obs = torch.randn(n, S, generator=g)
    best = 0.8 * torch.tanh(obs @ w.T)
    actions = (best + 0.2 * torch.randn(n, A, generator=g)).clamp(-0.999, 0.999)
    rewards = 1.0 - 2.0 * ((actions - best) ** 2).sum(-1)
    next_obs = torch.randn(n, S, generator=g)
    terminals = (torch.rand(n, generator=g) < 0.5).float()
    return dict(observations=obs, actions=actions, rewards=rewards, next_observations=next_obs, terminals=terminals,
                best=best)


def sampler(data, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(data["rewards"]), (batch,), generator=g)
        yield {k: v[idx] for k, v in data.items() if k != "best"}


def bc_error(agent, data):
    return float(((agent.act(data["observations"]) - data["actions"]) ** 2).mean())


def test_td3bc_learns_the_behaviour_on_a_tiny_dataset():
    data = synthetic_dataset()
    agent = TD3(tiny_config(actor_hidden=(32, 32), critic_hidden=(32, 32), batch_size=64))
    source = sampler(data, 64)

    def regret():
        return float(((agent.act(data["observations"]) - data["best"]) ** 2).mean())

    start_bc, start_regret = bc_error(agent, data), regret()
    critic = [float(agent.update(next(source))["critic_loss"]) for _ in range(400)]
    assert bc_error(agent, data) < 0.5 * start_bc
    assert regret() < 0.35 * start_regret
    assert np.mean(critic[-50:]) < 0.3 * np.mean(critic[:50])


def test_spot_density_term_pulls_the_actor_to_the_data():
    data = synthetic_dataset()
    agent = TD3(tiny_config(behavior_reg="vae", actor_hidden=(32, 32), critic_hidden=(32, 32), vae_hidden=(64, 64),
                            batch_size=64, spot_lambda=1.0))
    agent.pretrain_vae(sampler(data, 64, seed=1), 400, progress=False)
    source = sampler(data, 64)
    start = bc_error(agent, data)
    density = [float(agent.update(next(source))["neg_log_density"]) for _ in range(300)]
    assert bc_error(agent, data) < 0.5 * start
    assert np.mean(density[-50:]) < 0.7 * np.mean(density[1:51])


# --------------------------------------------------------------------------------------------------
def test_act_explore_and_export(tmp_path):
    agent = make_agent(behavior_reg="vae", actor_dropout=0.5)
    obs = np.random.default_rng(0).normal(size=(6, S)).astype(np.float32)
    out = agent.act(obs)
    assert isinstance(out, np.ndarray) and out.shape == (6, A) and np.abs(out).max() <= 1
    assert np.array_equal(out, agent.act(obs))  # no dropout when acting
    ref = ref_mlp(actor_params(agent.policy), torch.as_tensor(obs).double()).numpy()
    assert np.allclose(out, ref, atol=1e-6)
    assert isinstance(agent.act(torch.as_tensor(obs)), torch.Tensor)

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    e1, e2 = agent.act_explore(obs, 0.3, g1), agent.act_explore(obs, 0.3, g2)
    assert np.array_equal(e1, e2) and np.abs(e1).max() <= 1.0
    expected = np.clip(out + 0.3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).numpy(), -1, 1)
    assert np.allclose(e1, expected, atol=1e-6)
    state = agent.generator.get_state()
    agent.act_explore(obs, 0.1)  # default: the agent's own generator
    assert not torch.equal(state, agent.generator.get_state())
    assert np.abs(agent.act_explore(obs, 100.0)).max() == 1.0

    path = checkpoint.export_policy(agent.policy, S, tmp_path / "policy.pt2")
    program = torch.export.load(str(path)).module()
    assert np.allclose(program(torch.as_tensor(obs)).numpy(), out, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# config
def test_config_defaults_are_the_official_values():
    cfg = TD3Config()
    assert (cfg.gamma, cfg.tau, cfg.batch_size, cfg.actor_lr, cfg.critic_lr) == (0.99, 5e-3, 256, 3e-4, 3e-4)
    assert (cfg.policy_noise, cfg.noise_clip, cfg.policy_freq, cfg.bc_alpha) == (0.2, 0.5, 2, 2.5)
    assert (cfg.actor_hidden, cfg.critic_hidden, cfg.critic_activation) == ((256, 256), (256, 256), "relu")
    assert (cfg.vae_hidden, cfg.vae_beta, cfg.vae_lr, cfg.vae_steps) == ((750, 750), 0.5, 1e-3, 100_000)
    assert (cfg.density_estimator, cfg.density_samples, cfg.spot_lambda) == ("elbo", 1, 0.1)
    assert cfg.resolved_actor_dropout == 0.0 and cfg.replace(behavior_reg="vae").resolved_actor_dropout == 0.1
    assert cfg.replace(behavior_reg="vae", actor_dropout=0.0).resolved_actor_dropout == 0.0
    assert cfg.resolved_vae_latent(3) == 6 and cfg.replace(vae_latent=2).resolved_vae_latent(3) == 2
    agent = TD3(tiny_config(behavior_reg="vae"))
    assert agent.vae.latent_dim == 2 * A


@pytest.mark.parametrize("bad", [dict(policy_freq=0), dict(actor_dropout=1.0), dict(vae_beta=0.0),
                                 dict(noise_clip=-0.1), dict(density_samples=0), dict(behavior_reg="cql"),
                                 dict(actor_hidden=()), dict(critic_activation="tanh"), dict(vae_steps=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TD3Config(**bad)


def test_overrides_presets_and_round_trip():
    cfg = apply_overrides(TD3Config(), ["behavior_reg=vae", "vae_hidden=16", "actor_dropout=none",
                                        "density_estimator=iwae", "vae_steps=1e3"])
    assert (cfg.behavior_reg, cfg.vae_hidden, cfg.actor_dropout, cfg.vae_steps) == ("vae", (16,), None, 1000)
    assert TD3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="did you mean"):
        apply_overrides(TD3Config(), ["policy_frq=3"])
    assert td3_preset("antmaze").actor_lr == 1e-4 and td3_preset("antmaze").actor_dropout == 0.0
    assert set(TD3_PRESETS) >= {"locomotion", "antmaze", "pendulum"}


@pytest.mark.parametrize("name, lam", [
    ("hopper-medium-v2", 0.1), ("hopper-medium-replay-v2", 0.1), ("hopper-medium-expert-v2", 0.2),
    ("walker2d-medium-v2", 0.2), ("walker2d-medium-expert-v2", 0.5), ("halfcheetah-medium-replay-v2", 0.05),
    ("halfcheetah-medium-expert-v2", 1.0), ("antmaze-umaze-v2", 0.25), ("antmaze-umaze-diverse-v2", 0.25),
    ("antmaze-medium-play-v2", 0.05), ("antmaze-medium-diverse-v2", 0.025), ("antmaze-large-play-v2", 0.025),
    ("data/walker2d-medium-expert.hdf5", 0.5), ("hopper-medium-replay-local", 0.1), ("pendulum", 0.1),
    ("kitchen-complete-v0", 0.1)])
def test_spot_lambda_per_dataset(name, lam):
    assert spot_lambda_for(name) == lam


def test_algorithm_registry_builds_td3_agents():
    cfg = algos.build_config("spot", "locomotion", "halfcheetah-medium-expert-v2", obs_dim=S, act_dim=A,
                             seed=0, device="cpu")
    assert isinstance(cfg, TD3Config) and cfg.behavior_reg == "vae" and cfg.spot_lambda == 1.0
    assert isinstance(algos.make_agent(cfg.replace(vae_hidden=(4,), actor_hidden=(4,), critic_hidden=(4,))), TD3)
    cfg = algos.build_config("td3bc", "locomotion", "hopper-medium-v2", obs_dim=S, act_dim=A)
    assert cfg.behavior_reg == "bc"
    with pytest.raises(ValueError, match="obs_dim"):
        TD3(TD3Config())
    assert isinstance(TD3Noise(torch.zeros(1, A), ()), tuple)
