"""ReBRAC as a setting of the deterministic-actor learner: its losses against a float64 hand
computation (values and gradients), the layer-normalised critic and actor against plain torch
modules, layer-normalised critics never read as plain MLPs by the fused ops, TD3+BC and SPOT's
numbers unchanged by the new options, a group of seeds equal to its single runs, the per-dataset
values, resume, the missing-next-actions error and the exported policy."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from misa_fast import nets
from misa_fast.agents import TD3, losses, members
from misa_fast.agents import algorithms as algos
from misa_fast.agents.td3_config import REBRAC_BC_COEFS, TD3Config, rebrac_values_for
from misa_fast.ops import CriticArchitectureError, sampled_q_log_mean_exp
from misa_fast.ops.testing import kernel_device
from misa_fast.training import checkpoint

S, A, B = 3, 2, 5
EPS = nets.LAYER_NORM_EPS


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)


def rebrac_config(**kw):
    """The rebrac algorithm's settings with tiny networks (default output init: larger Q values)."""
    base = algos.build_config("rebrac", "locomotion", "hopper-medium-replay-v2", obs_dim=S, act_dim=A, seed=0)
    tiny = dict(actor_hidden=(4, 4, 4), critic_hidden=(5, 5, 5), batch_size=B, actor_init_w=None, critic_init_w=None)
    return base.replace(**{**tiny, **kw})


def make_batch(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch, S, generator=g),
        "actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,
        "rewards": torch.randn(batch, generator=g),
        "next_observations": torch.randn(batch, S, generator=g),
        "terminals": (torch.arange(batch) % 2).float(),
        "next_actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,
    }


def randomise_norms(agent, seed=1):
    """Layer-norm scales and shifts away from their (1, 0) init, so that the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (agent.critic, agent.target_critic, agent.policy, agent.target_policy):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "scale" in name or name.endswith("weight")
                            else 0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# float64 references, written from the paper's formulas
def ref_layer_norm(x, scale, shift):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * scale + shift


def ref_mlp(params, norms, x, out=torch.tanh):
    """Linear -> ReLU -> [LayerNorm] per hidden layer, then ``out`` of the last Linear."""
    for i, (w, b) in enumerate(params[:-1]):
        x = torch.relu(x @ w.T + b)
        if norms:
            x = ref_layer_norm(x, *norms[i])
    w, b = params[-1]
    return out(x @ w.T + b)


def leaf(t, requires_grad):
    return t.detach().double().clone().requires_grad_(requires_grad)


def critic_params(critic, i, requires_grad=False):
    layers = critic.layers(i)
    norms = [(leaf(g, requires_grad), leaf(b, requires_grad)) for g, b in (layers.norms or [])]
    return [(leaf(w, requires_grad), leaf(b, requires_grad)) for w, b in layers], norms


def actor_params(actor, requires_grad=False):
    params = [(leaf(m.weight, requires_grad), leaf(m.bias, requires_grad)) for m in [*actor.hidden, actor.out]]
    norms = [(leaf(m.weight, requires_grad), leaf(m.bias, requires_grad)) for m in (actor.norms or [])]
    return params, norms


def ref_q(critic, obs, act):
    params, norms = critic
    return ref_mlp(params, norms, torch.cat([obs, act], -1), out=lambda x: x)[..., 0]


# --------------------------------------------------------------------------------------------------
def test_rebrac_actor_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    pi = (torch.rand(B, A, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    data = torch.rand(B, A, generator=g, dtype=torch.float64) * 2 - 1
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    q = (pi * c).sum(-1) - 0.2  # a Q that is linear in the action
    loss, terms = losses.rebrac_actor_loss(q, pi, data, 0.05)
    qv, p, d = q.detach().numpy(), pi.detach().numpy(), data.numpy()
    lam = 1.0 / np.abs(qv).mean()
    expected = np.mean(0.05 * ((p - d) ** 2).sum(-1) - lam * qv)  # the reference's mean of the sum
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert terms["actor_lambda"].item() == pytest.approx(lam, rel=1e-12)
    loss.backward()
    # lambda held fixed; the squared error is summed over action dims: d/dpi = 2 beta (pi - a) / B - lam c / B
    assert np.allclose(pi.grad.numpy(), 2 * 0.05 * (p - d) / B - lam * c.numpy()[None] / B, rtol=1e-12)


@pytest.mark.parametrize("actor_layer_norm", [False, True])
def test_update_matches_a_hand_computation(actor_layer_norm):
    """Critic loss (TD3 target of the smoothed action less critic_bc_coef ||a' - a'_D||^2), then
    the actor loss under min_i of the *updated* critics, with the gradients the optimizers saw
    (layer norms' included). A large critic lr makes the critic-then-actor order visible."""
    agent = TD3(rebrac_config(actor_layer_norm=actor_layer_norm, policy_freq=1, critic_lr=0.1, actor_bc_coef=0.3,
                              critic_bc_coef=0.7))
    randomise_norms(agent)
    batch = make_batch(3)
    noise = agent.draw_noise(B, actor_step=True)
    noise = noise._replace(target=torch.tensor([[4.0, -0.1], [-4.0, 0.3], [0.2, 9.0], [-0.6, 1.0], [0.0, -3.0]]))
    pol, tpol = actor_params(agent.policy, requires_grad=True), actor_params(agent.target_policy)
    crit = [critic_params(agent.critic, i, requires_grad=True) for i in range(2)]
    tcrit = [critic_params(agent.target_critic, i) for i in range(2)]
    metrics = agent.update(batch, noise)

    d = {k: v.double() for k, v in batch.items()}
    smooth = (0.2 * noise.target.double()).clamp(-0.5, 0.5)
    next_a = (ref_mlp(*tpol, d["next_observations"]) + smooth).clamp(-1, 1)
    penalty = ((next_a - d["next_actions"]) ** 2).sum(-1)
    next_q = torch.minimum(*[ref_q(c, d["next_observations"], next_a) for c in tcrit]) - 0.7 * penalty
    y = d["rewards"] + 0.99 * (1 - d["terminals"]) * next_q
    q = [ref_q(c, d["observations"], d["actions"]) for c in crit]
    critic_loss = sum(((qi - y) ** 2).mean() for qi in q)
    assert metrics["critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    assert metrics["q_target"].item() == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["critic_bc_penalty"].item() == pytest.approx(penalty.mean().item(), rel=1e-5)
    critic_loss.backward()
    for i, (params, norms) in enumerate(crit):
        for layer, (w, b) in enumerate(params):
            assert torch.allclose(agent.critic.weights[layer].grad[i].double(), w.grad, rtol=1e-4, atol=1e-6)
            assert torch.allclose(agent.critic.biases[layer].grad[i].double(), b.grad, rtol=1e-4, atol=1e-6)
        for layer, (g, b) in enumerate(norms):
            assert torch.allclose(agent.critic.norm_scales[layer].grad[i].double(), g.grad, rtol=1e-4, atol=1e-6)
            assert torch.allclose(agent.critic.norm_shifts[layer].grad[i].double(), b.grad, rtol=1e-4, atol=1e-6)

    # actor: pi(s) from the pre-step actor, min_i Q_i from the post-step critics
    pi = ref_mlp(*pol, d["observations"])
    q_pi = torch.minimum(*[ref_q(critic_params(agent.critic, i), d["observations"], pi) for i in range(2)])
    lam = 1.0 / q_pi.detach().abs().mean()
    actor_loss = (0.3 * ((pi - d["actions"]) ** 2).sum(-1) - lam * q_pi).mean()
    assert metrics["actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    assert metrics["actor_lambda"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert metrics["q_pi"].item() == pytest.approx(q_pi.mean().item(), rel=1e-5)
    detached = [[[(x.detach(), y.detach()) for x, y in part] for part in c] for c in crit]  # pre-step critics
    stale = torch.minimum(*[ref_q(c, d["observations"], pi) for c in detached])
    assert abs(stale.mean().item() - q_pi.mean().item()) > 1e-3  # the order is observable
    actor_loss.backward()
    modules = [*agent.policy.hidden, agent.policy.out]
    for m, (w, b) in zip(modules + list(agent.policy.norms or []), pol[0] + pol[1]):
        assert torch.allclose(m.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(m.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the networks
def test_layer_norm_critic_equals_an_nn_sequential_per_critic():
    critic = nets.EnsembleCritic(S, A, (5, 6, 5), 3, torch.Generator().manual_seed(0), activation="relu",
                                 layer_norm=True)
    with torch.no_grad():
        for p in list(critic.norm_scales) + list(critic.norm_shifts):
            p.add_(0.5 * torch.randn(p.shape))
    obs, act = torch.randn(4, S), torch.rand(4, 7, A) * 2 - 1
    out, out_single = critic(obs, act), critic(obs, act[:, 0])
    for i in range(3):
        layers = critic.layers(i)
        modules = []
        for j, (w, b) in enumerate(layers[:-1]):
            linear, norm = nn.Linear(w.shape[1], w.shape[0]), nn.LayerNorm(w.shape[0], eps=1e-6)
            linear.weight.data, linear.bias.data = w.detach().clone(), b.detach().clone()
            norm.weight.data, norm.bias.data = [t.detach().clone() for t in layers.norms[j]]
            modules += [linear, nn.ReLU(), norm]  # the reference's order: Linear -> ReLU -> LayerNorm
        last = nn.Linear(layers[-1][0].shape[1], 1)
        last.weight.data, last.bias.data = layers[-1][0].detach().clone(), layers[-1][1].detach().clone()
        reference = nn.Sequential(*modules, last)
        expected = reference(torch.cat([obs[:, None].expand(4, 7, S), act], -1))[..., 0]
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out_single[i], expected[:, 0], atol=1e-6, rtol=1e-5)


def test_layer_norm_actor_equals_an_nn_sequential():
    agent = TD3(rebrac_config(actor_layer_norm=True))
    randomise_norms(agent)
    actor = agent.policy
    modules = []
    for linear, norm in zip(actor.hidden, actor.norms):
        modules += [linear, nn.ReLU(), norm]
    reference = nn.Sequential(*modules, actor.out, nn.Tanh())
    obs = torch.randn(6, S)
    torch.testing.assert_close(actor.act(obs), reference(obs).detach(), atol=1e-6, rtol=1e-5)


def test_the_options_leave_the_default_networks_as_they_were():
    """No layer norm and no bias init: the same initial tensors and state-dict keys as before; with
    them the Linear layers keep the numbers a plain run draws (the norms draw nothing)."""
    plain = nets.EnsembleCritic(S, A, (5, 5), 2, torch.Generator().manual_seed(0))
    normed = nets.EnsembleCritic(S, A, (5, 5), 2, torch.Generator().manual_seed(0), layer_norm=True)
    assert set(plain.state_dict()) == {f"{k}.{i}" for k in ("weights", "biases") for i in range(3)}
    for k, v in plain.state_dict().items():
        assert torch.equal(normed.state_dict()[k], v)
    td3bc = TD3(TD3Config(obs_dim=S, act_dim=A, actor_hidden=(4, 4), critic_hidden=(5, 5)))
    options = TD3(TD3Config(obs_dim=S, act_dim=A, actor_hidden=(4, 4), critic_hidden=(5, 5), actor_layer_norm=True,
                            critic_layer_norm=True, hidden_bias_init=0.1))
    for part in ("policy", "critic"):
        state, other = td3bc.state_dict()[part], options.state_dict()[part]
        assert "norm" not in " ".join(state)
        for k, v in state.items():
            is_hidden_bias = ("bias" in k and "out" not in k and "biases.2" not in k)
            assert torch.equal(other[k], torch.full_like(v, 0.1) if is_hidden_bias else v), (part, k)


def test_a_layer_norm_critic_is_never_read_as_a_plain_mlp():
    critic = nets.EnsembleCritic(S, A, (8, 8), 2, torch.Generator().manual_seed(0), activation="relu",
                                 layer_norm=True)
    with torch.no_grad():
        critic.norm_shifts[0].add_(1.0)
    obs, actions = torch.randn(2, S), torch.rand(2, 3, A) * 2 - 1
    expected = torch.logsumexp(critic(obs, actions), -1) - np.log(3)
    torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, critic, backend="torch"), expected)
    for bare in (critic.stacked_layers(), [critic.layers(0), critic.layers(1)]):
        with pytest.raises(CriticArchitectureError, match="LayerNorm"):
            sampled_q_log_mean_exp(obs, actions, bare, backend="torch")
    with pytest.raises(ValueError, match="layer-normalised"):  # the HMC sampler's explicit backward
        layers = critic.stacked_layers(detach=True)
        nets.ensemble_q_and_action_grad(layers, nets.state_half(layers, obs), actions[:, 0])
    if kernel_device() is not None:
        with pytest.raises(CriticArchitectureError, match="LayerNorm"):
            sampled_q_log_mean_exp(obs.to(kernel_device()), actions.to(kernel_device()), critic.to(kernel_device()),
                                   backend="triton")


# --------------------------------------------------------------------------------------------------
def test_a_group_of_two_seeds_equals_its_single_runs():
    configs = [rebrac_config(actor_layer_norm=True, seed=s) for s in (0, 5)]
    singles, group = [TD3(c) for c in configs], TD3.group_of([TD3(c) for c in configs])
    for step in range(4):  # two critic-only and two actor steps
        batches = [make_batch(10 * m + step) for m in range(2)]
        single = [agent.update(b) for agent, b in zip(singles, batches)]
        stacked = group.update(members.stack_tree(batches))
        assert "critic_bc_penalty" in stacked
        for m, metrics in enumerate(single):
            for name, value in metrics.items():
                torch.testing.assert_close(stacked[name][m], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    for state, agent in zip(members.member_state_dicts(group), singles):
        for part in ("policy", "critic", "target_policy", "target_critic"):
            for k, v in agent.state_dict()[part].items():
                torch.testing.assert_close(state[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.parametrize("name, actor, critic", [
    ("hopper-medium-v2", 0.01, 0.01), ("hopper-medium-replay-v2", 0.05, 0.5),
    ("halfcheetah-medium-replay-v2", 0.01, 0.001),
    ("walker2d-random-v2", 0.01, 0.0), ("antmaze-medium-play-v2", 0.001, 0.0005), ("data/pen-human.hdf5", 0.1, 0.5),
    ("pendulum-default", 0.01, 0.01)])
def test_build_config_gives_the_papers_values(name, actor, critic):
    domain = {"antmaze-medium-play-v2": "antmaze", "data/pen-human.hdf5": "adroit", "pendulum-default": "pendulum"}
    cfg = algos.build_config("rebrac", domain.get(name, "locomotion"), name, obs_dim=S, act_dim=A)
    assert (cfg.behavior_reg, cfg.actor_bc_coef, cfg.critic_bc_coef) == ("rebrac", actor, critic)
    assert cfg.reads_next_actions == (critic > 0)
    assert (cfg.actor_hidden, cfg.critic_hidden) == ((256,) * 3, (256,) * 3)
    assert (cfg.critic_layer_norm, cfg.actor_layer_norm, cfg.actor_q, cfg.hidden_bias_init) == (True, False, "min", 0.1)
    assert (cfg.actor_init_w, cfg.critic_init_w, cfg.tau, cfg.policy_noise, cfg.noise_clip, cfg.policy_freq) == (
        1e-3, 3e-3, 5e-3, 0.2, 0.5, 2)
    lrs = {"antmaze": (3e-4, 5e-5, 256, 0.999), "adroit": (3e-4, 3e-4, 256, 0.99)}.get(domain.get(name))
    assert (cfg.actor_lr, cfg.critic_lr, cfg.batch_size, cfg.gamma) == (lrs or (1e-3, 1e-3, 1024, 0.99))
    algo = algos.get("rebrac")
    assert algo.default_obs_norm == "none" and algo.reward_transforms == {"adroit": "none", "antmaze": "rebrac-antmaze"}


def test_the_table_covers_the_d4rl_tasks():
    for task in ("halfcheetah", "hopper", "walker2d"):
        for data in ("random", "medium", "expert", "medium-expert", "medium-replay", "full-replay"):
            assert f"{task}-{data}" in REBRAC_BC_COEFS
    assert rebrac_values_for("hopper-medium-expert-v2") == {"actor_bc_coef": 0.1, "critic_bc_coef": 0.01}


def test_td3bc_and_spot_read_no_next_actions():
    for name in ("td3bc", "spot"):
        cfg = algos.build_config(name, "locomotion", "hopper-medium-v2", obs_dim=S, act_dim=A)
        assert cfg.critic_bc_coef == 0.0 and not cfg.reads_next_actions and cfg.actor_q == "first"


def test_missing_next_actions_is_a_clear_error():
    agent = TD3(rebrac_config())
    batch = make_batch()
    del batch["next_actions"]
    with pytest.raises(ValueError, match="next_actions"):
        agent.update(batch)
    assert agent.step == 0
    TD3(rebrac_config(critic_bc_coef=0.0)).update(batch)  # no penalty, no next actions needed


def test_checkpoint_resume_is_bit_identical_and_the_norms_are_architecture():
    agent = TD3(rebrac_config(actor_layer_norm=True))
    data = [make_batch(i) for i in range(6)]
    for b in data[:3]:
        agent.update(b)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    expected = [agent.update(b) for b in data[3:]]
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = TD3(rebrac_config(actor_layer_norm=True, seed=9))
    resumed.load_state_dict(state)
    for e, g in zip(expected, [resumed.update(b) for b in data[3:]]):
        assert all(torch.equal(e[k], g[k]) for k in e)
    with pytest.raises(ValueError, match="actor_layer_norm"):
        TD3(rebrac_config(actor_layer_norm=False)).load_state_dict(state)


@pytest.mark.parametrize("actor_layer_norm", [False, True])
def test_an_exported_rebrac_policy_loads(tmp_path, actor_layer_norm):
    agent = TD3(rebrac_config(actor_layer_norm=actor_layer_norm))
    randomise_norms(agent)
    path = checkpoint.export_policy(agent.policy, S, tmp_path / "policy.pt2")
    policy = checkpoint.load_exported_policy(path)
    obs = torch.randn(7, S)
    torch.testing.assert_close(policy(obs), agent.act(obs), atol=1e-6, rtol=1e-5)
