"""The weighted-regression family (BC, 10%BC, AWAC, OneStep, IQL): every loss and its gradients against
an independent float64 computation written from the papers' formulas, the lr schedule, the
non-finite guard, bit-identical resume, a group of seeds equal to its single runs, a learning sanity
check, acting/export, and the config (fields, presets, --set parsing, the algorithm registry)."""
import io
import math

import numpy as np
import pytest
import torch

from misa_fast.agents import NonFiniteLossError
from misa_fast.agents import algorithms as algos
from misa_fast.agents.config_base import apply_overrides
from misa_fast.agents.members import member_state_dicts
from misa_fast.agents.weighted import (
    GaussianActor,
    Weighted,
    WeightedNoise,
    exp_advantage_weights,
    expectile_loss,
    gaussian_log_prob,
    weighted_log_likelihood_loss,
    weighted_squared_error_loss,
)
from misa_fast.agents.weighted_config import WEIGHTED_PRESETS, WeightedConfig, weighted_preset
from misa_fast.training import checkpoint

S, A, B, K = 3, 2, 6, 4
F64 = torch.float64

# The methods as their Algorithm entries define them (tiny networks below; OneStep with a larger
# temperature, so that the tiny critics' advantages give weights visibly different from 1), plus
# variants that exercise the other code paths: IQL's dropout and deterministic actor, AWAC's weight
# clip with three critics, OneStep's twin critics.
METHODS = {name: dict(algos.get(name).overrides) for name in ("bc", "awac", "onestep", "iql")}
METHODS["onestep"]["beta"] = 20.0
VARIANTS = {
    **METHODS,
    "iql-dropout": {**METHODS["iql"], "actor_dropout": 0.3},
    "iql-deterministic": {**METHODS["iql"], "policy": "deterministic"},
    "awac-clipped": {**METHODS["awac"], "awac_lambda": 0.01, "exp_adv_max": 1.2, "num_critics": 3},
    "onestep-twin": {**METHODS["onestep"], "num_critics": 2},
}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)


def tiny_config(**kw):
    base = dict(obs_dim=S, act_dim=A, actor_hidden=(5, 4), critic_hidden=(5, 5), value_hidden=(4, 6),
                batch_size=B, num_samples=K, seed=0, beta=2.0, awac_lambda=0.5)
    return WeightedConfig(**{**base, **kw})


def make_agent(variant="iql", **kw):
    return Weighted(tiny_config(**{**VARIANTS[variant], **kw}))


def make_batch(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch, S, generator=g),
        "actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,
        "rewards": torch.randn(batch, generator=g),
        "next_observations": torch.randn(batch, S, generator=g),
        "terminals": (torch.arange(batch) % 2).float(),
        "next_actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,  # OneStep's SARSA target reads them
    }


# --------------------------------------------------------------------------------------------------
# the loss functions
def test_expectile_loss_value_and_gradient():
    q = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=F64)
    v = torch.tensor([0.5, 0.5, 3.0, 0.25], dtype=F64, requires_grad=True)
    loss = expectile_loss(q - v, 0.7)
    u = (q - v).detach().numpy()
    weights = np.where(u < 0, 0.3, 0.7)
    assert loss.item() == pytest.approx(np.mean(weights * u ** 2), rel=1e-12)
    loss.backward()
    assert np.allclose(v.grad.numpy(), -2 * weights * u / 4, rtol=1e-12)
    # tau > 1/2 puts the value above the mean: an expectile, not the mean
    target = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    value = torch.zeros((), dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([value], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        expectile_loss(target - value, 0.9).backward()
        opt.step()
    assert value.item() > 2.0


def test_exp_advantage_weights_clip_and_carry_no_gradient():
    adv = torch.tensor([-1.0, 0.0, 0.5, 3.0], requires_grad=True)
    w = exp_advantage_weights(adv, 2.0, 100.0)
    assert torch.allclose(w, torch.tensor([math.exp(-2), 1.0, math.e, 100.0]))
    assert not w.requires_grad


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_std, a = (torch.randn(B, A, generator=g, dtype=F64) for _ in range(3))
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(a).sum(-1)
    assert torch.allclose(gaussian_log_prob(mean, log_std, a), expected, rtol=1e-12)


def test_actor_losses_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(B, A, generator=g, dtype=F64).requires_grad_()
    data = torch.rand(B, A, generator=g, dtype=F64)
    w = torch.rand(B, generator=g, dtype=F64) * 3
    p, d = pred.detach().numpy(), data.numpy()
    assert weighted_squared_error_loss(pred, data).item() == pytest.approx(((p - d) ** 2).mean(), rel=1e-12)
    loss = weighted_squared_error_loss(pred, data, w)
    assert loss.item() == pytest.approx((w.numpy() * ((p - d) ** 2).sum(-1)).mean(), rel=1e-12)
    loss.backward()
    assert np.allclose(pred.grad.numpy(), 2 * w.numpy()[:, None] * (p - d) / B, rtol=1e-12)
    log_prob = torch.randn(B, generator=g, dtype=F64, requires_grad=True)
    loss = weighted_log_likelihood_loss(log_prob, w)
    assert loss.item() == pytest.approx(-(w * log_prob).mean().item(), rel=1e-12)
    loss.backward()
    assert np.allclose(log_prob.grad.numpy(), -w.numpy() / B, rtol=1e-12)
    assert weighted_log_likelihood_loss(log_prob).item() == pytest.approx(-log_prob.mean().item())


# --------------------------------------------------------------------------------------------------
# the agent against an independent float64 computation of the papers' formulas
def leaf(t):
    return t.detach().to(F64).clone().requires_grad_()


class Ref:
    """float64 copies of a single agent's networks (leaves with gradients), evaluated by hand."""

    def __init__(self, agent):
        self.cfg, net = agent.config, agent.networks

        def mlp(module):
            layers = list(module.hidden) + [module.out] if hasattr(module, "hidden") else list(module.layers)
            return [(leaf(m.weight), leaf(m.bias)) for m in layers]

        self.policy = mlp(net.policy)
        self.policy_log_std = leaf(net.policy.log_std) if getattr(net.policy, "log_std", None) is not None else None
        self.behavior = mlp(net.behavior) if net.behavior is not None else None
        self.behavior_log_std = (leaf(net.behavior.log_std) if net.behavior is not None
                                 and net.behavior.log_std is not None else None)
        critics = range(self.cfg.num_critics)
        self.critics = [[(leaf(w), leaf(b)) for w, b in net.critic.layers(i)] for i in critics] if net.critic else []
        self.targets = [[(w.detach().to(F64), b.detach().to(F64)) for w, b in net.target_critic.layers(i)]
                        for i in critics] if net.critic else []
        self.value = mlp(net.value) if net.value is not None else None

    @staticmethod
    def mlp(params, x, masks=()):
        for i, (w, b) in enumerate(params[:-1]):
            x = x @ w.T + b
            if masks:
                x = x * masks[i]
            x = torch.relu(x)
        w, b = params[-1]
        return x @ w.T + b

    def gaussian(self, params, log_std_param, obs, masks=()):
        cfg, out = self.cfg, self.mlp(params, obs, masks)
        mean = out[..., :A]
        if cfg.log_std == "state":  # lo + (hi - lo) * sigmoid(2 x) = lo + (hi - lo) (tanh(x) + 1) / 2
            log_std = cfg.log_std_min + (cfg.log_std_max - cfg.log_std_min) * torch.sigmoid(2 * out[..., A:])
        else:
            log_std = torch.clamp(log_std_param, cfg.log_std_min, cfg.log_std_max).expand_as(mean)
        return (torch.tanh(mean) if cfg.tanh_mean else mean), log_std

    def q(self, params, obs, actions):
        if actions.dim() == 3:
            obs = obs[:, None].expand(-1, actions.shape[1], -1)
        return self.mlp(params, torch.cat([obs, actions], -1))[..., 0]

    def min_q(self, nets, obs, actions):
        return torch.stack([self.q(p, obs, actions) for p in nets]).min(0).values


def d(x):
    return None if x is None else x.to(F64)


def ref_critic_loss(ref, batch, noise):
    """TD errors to r + gamma (1 - d) * (the method's next-state value), summed (AWAC, OneStep) or
    averaged (IQL) over critics; returns (loss, advantage of the weight)."""
    cfg = ref.cfg
    obs, actions, rewards, next_obs, dones, next_actions = (d(x) for x in batch)
    with torch.no_grad():
        if cfg.critic_target == "policy":
            if cfg.policy == "gaussian":
                mean, log_std = ref.gaussian(ref.policy, ref.policy_log_std, next_obs)
                next_a = (mean + log_std.exp() * d(noise.next_policy)).clamp(-1, 1)
            else:
                next_a = torch.tanh(ref.mlp(ref.policy, next_obs))
            next_v = ref.min_q(ref.targets, next_obs, next_a)
        elif cfg.critic_target == "behavior":
            next_v = ref.min_q(ref.targets, next_obs, next_actions)  # SARSA: the data's next action
        else:
            next_v = ref.mlp(ref.value, next_obs)[..., 0]
        y = rewards + cfg.gamma * (1 - dones) * next_v
    errors = torch.stack([((ref.q(p, obs, actions) - y) ** 2).mean() for p in ref.critics])
    return errors.mean() if cfg.critic_target == "value" else errors.sum()


def ref_advantage(ref, batch, noise):
    cfg = ref.cfg
    obs, actions = d(batch[0]), d(batch[1])
    with torch.no_grad():
        if cfg.critic_target == "value":
            return ref.min_q(ref.targets, obs, actions) - ref.mlp(ref.value, obs)[..., 0]
        q = ref.min_q(ref.critics, obs, actions)
        if cfg.critic_target == "behavior":
            mean, log_std = ref.gaussian(ref.behavior, ref.behavior_log_std, obs)
            samples = (mean[:, None] + log_std.exp()[:, None] * d(noise.behavior)).clamp(-1, 1)
            return q - ref.min_q(ref.critics, obs, samples).mean(-1)
        if cfg.policy == "gaussian":
            mean, log_std = ref.gaussian(ref.policy, ref.policy_log_std, obs)
            pi_a = (mean + log_std.exp() * d(noise.policy)).clamp(-1, 1)
        else:
            pi_a = torch.tanh(ref.mlp(ref.policy, obs))
        return q - ref.min_q(ref.critics, obs, pi_a)


def ref_losses(ref, batch, noise):
    """Every loss of the method from its formulas."""
    cfg = ref.cfg
    obs, actions = d(batch[0]), d(batch[1])
    masks = tuple(d(m) for m in noise.actor_masks)
    out = {}
    weights = None
    if cfg.critic_target != "none":
        out["critic_loss"] = ref_critic_loss(ref, batch, noise)
        adv = ref_advantage(ref, batch, noise)
        scaled = adv / cfg.awac_lambda if cfg.weight == "awac" else cfg.beta * adv
        weights = torch.exp(scaled).clamp(max=cfg.exp_adv_max)
    if cfg.critic_target == "value":
        with torch.no_grad():
            q_t = ref.min_q(ref.targets, obs, actions)
        u = q_t - ref.mlp(ref.value, obs)[..., 0]
        out["value_loss"] = (torch.where(u < 0, 1 - cfg.expectile, cfg.expectile) * u ** 2).mean()
    if cfg.critic_target == "behavior":
        mean, log_std = ref.gaussian(ref.behavior, ref.behavior_log_std, obs)
        out["behavior_loss"] = -torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1).mean()
    if cfg.policy == "deterministic":
        err = (torch.tanh(ref.mlp(ref.policy, obs, masks)) - actions) ** 2
        out["actor_loss"] = err.mean() if weights is None else (weights * err.sum(-1)).mean()
    else:
        mean, log_std = ref.gaussian(ref.policy, ref.policy_log_std, obs, masks)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
        out["actor_loss"] = -(log_prob if weights is None else weights * log_prob).mean()
    return out, weights


def agent_and_ref_params(agent, ref):
    """(agent parameter, its member index in a stacked critic or None, float64 leaf) per network."""
    net = agent.networks

    def mlp(module, params, log_std=None):
        layers = list(module.hidden) + [module.out] if hasattr(module, "hidden") else list(module.layers)
        pairs = [(m.weight, None, w) for m, (w, _) in zip(layers, params)]
        pairs += [(m.bias, None, b) for m, (_, b) in zip(layers, params)]
        return pairs + ([(module.log_std, None, log_std)] if log_std is not None else [])

    out = {"actor_loss": mlp(net.policy, ref.policy, ref.policy_log_std)}
    if net.critic is not None:
        stacked = list(zip(net.critic.weights, net.critic.biases))
        out["critic_loss"] = [(param, i, ref.critics[i][layer][j]) for layer, params in enumerate(stacked)
                              for j, param in enumerate(params) for i in range(ref.cfg.num_critics)]
    if net.value is not None:
        out["value_loss"] = mlp(net.value, ref.value)
    if net.behavior is not None:
        out["behavior_loss"] = mlp(net.behavior, ref.behavior, ref.behavior_log_std)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_losses_and_gradients_match_a_float64_computation(variant):
    agent = make_agent(variant)
    for i in range(3):  # Adam-moved critics and Polyak-lagged targets: a mixed-up network shows
        agent.update(make_batch(10 + i))
    batch = make_batch(0)
    noise = agent.draw_noise(B)
    for opt in agent.optimizers.values():
        opt.zero_grad(set_to_none=True)
    out, metrics = agent.compute_losses(batch, noise)
    ref = Ref(agent)
    expected, weights = ref_losses(ref, [batch[k] for k in ("observations", "actions", "rewards",
                                                            "next_observations", "terminals", "next_actions")],
                                   noise)
    assert set(out) == set(expected)
    for name in out:
        assert out[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-7), name
    if weights is not None:
        assert metrics["weight_mean"].item() == pytest.approx(weights.mean().item(), rel=1e-5)
        assert weights.max().item() > weights.min().item() + 0.05  # not all alike: the weighting is exercised
    if variant == "awac-clipped":
        assert weights.max().item() == pytest.approx(1.2)  # the clip is exercised
    # One backward pass of the sum: each network gets exactly its own loss's gradient.
    sum(out.values()).backward()
    for name, pairs in agent_and_ref_params(agent, ref).items():
        grads = torch.autograd.grad(expected[name], [r for _, _, r in pairs])
        for (param, index, _), grad in zip(pairs, grads):
            assert param.grad is not None, name
            got = param.grad if index is None else param.grad[index]
            assert torch.allclose(got.to(F64), grad, rtol=1e-4, atol=1e-6), name
    if agent.target_critic is not None:
        assert all(p.grad is None for p in agent.target_critic.parameters())


def test_noise_is_what_the_method_reads():
    shapes = {name: {k: tuple(v.shape) for k, v in make_agent(name).draw_noise(B)._asdict().items()
                     if isinstance(v, torch.Tensor)} for name in ("bc", "awac", "onestep", "iql")}
    assert shapes == {"bc": {}, "iql": {}, "awac": {"next_policy": (B, A), "policy": (B, A)},
                      "onestep": {"behavior": (B, K, A)}}
    masks = make_agent("iql-dropout").draw_noise(B).actor_masks
    assert [m.shape for m in masks] == [(B, 5), (B, 4)]
    assert all(((m == 0) | torch.isclose(m, torch.tensor(1 / 0.7))).all() for m in masks)


# --------------------------------------------------------------------------------------------------
def test_metrics_and_which_networks_move():
    for name in ("bc", "awac", "onestep", "iql"):
        agent = make_agent(name)
        before = {k: v.detach().clone() for k, v in agent.state_tensors().items()}
        metrics = agent.update(make_batch())
        assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
        assert "actor_loss" in metrics and ("critic_loss" in metrics) == (name != "bc")
        moved = {k.split(".")[0] for k, v in agent.state_tensors().items() if not torch.equal(v, before[k])}
        expected = {"bc": {"policy"}, "awac": {"policy", "critic", "target_critic"},
                    "onestep": {"policy", "critic", "target_critic", "behavior"},
                    "iql": {"policy", "critic", "target_critic", "value"}}[name]
        assert moved == expected, name
    agent = make_agent("iql")
    old_target = agent.target_critic.weights[0].detach().clone()
    agent.update(make_batch())
    expected = 0.995 * old_target + 0.005 * agent.critic.weights[0].detach()
    assert torch.allclose(agent.target_critic.weights[0], expected, atol=1e-7)


def test_iql_actor_lr_follows_a_cosine_then_stays_at_zero():
    agent = make_agent("iql", lr_decay_steps=4)
    lrs = []
    for i in range(6):
        lrs.append(agent.optimizers["policy"].param_groups[0]["lr"])
        agent.update(make_batch(i))
    assert lrs == pytest.approx([3e-4 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in range(6)])
    assert agent.optimizers["critic"].param_groups[0]["lr"] == 3e-4
    assert make_agent("awac").schedulers == {}


def test_non_finite_guard_leaves_the_agent_as_it_was():
    agent = make_agent("iql")
    agent.update(make_batch(0))
    snapshot = {k: v.detach().clone() for k, v in agent.state_tensors().items()}
    adam = {k: v.clone() for k, v in agent.optimizers["critic"].state_dict()["state"][0].items()}
    bad = make_batch(1)
    bad["rewards"][2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="critic_loss") as info:
        agent.update(bad)
    assert info.value.step == 1 and agent.step == 1
    assert all(torch.equal(v, snapshot[k]) for k, v in agent.state_tensors().items())
    assert all(torch.equal(v, adam[k]) for k, v in agent.optimizers["critic"].state_dict()["state"][0].items())
    agent.update(make_batch(2))
    assert agent.step == 2


# --------------------------------------------------------------------------------------------------
def _assert_same_state(a, b, exact=True):
    def same(x, y):
        # Not exact: fp32 rounding (a group's batched products sum in another order), which Adam's
        # moments of the log-likelihood gradients (w (a - mu) / sigma^2) magnify to ~1e-5 relative.
        return torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-4, atol=1e-6)

    for key in ("policy", "behavior", "critic", "target_critic", "value"):
        assert (a[key] is None) == (b[key] is None), key
        for k in a[key] or {}:
            assert same(a[key][k], b[key][k]), (key, k)
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys(), name
        for idx in sa:
            for k in sa[idx]:
                assert same(sa[idx][k], sb[idx][k]), (name, idx, k)
    assert a["schedulers"].keys() == b["schedulers"].keys()


@pytest.mark.parametrize("variant", ["bc", "awac", "onestep", "iql", "iql-dropout"])
def test_checkpoint_resume_is_bit_identical(variant):
    agent = make_agent(variant)
    data = [make_batch(i) for i in range(6)]
    for b in data[:3]:
        agent.update(b)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    expected = [agent.update(b) for b in data[3:]]
    buffer.seek(0)
    resumed = make_agent(variant, seed=123)  # different init and stream, all overwritten
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.update(b) for b in data[3:]]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys() and all(torch.equal(e[k], g[k]) for k in e)
    _assert_same_state(agent.state_dict(), resumed.state_dict())
    assert resumed.step == agent.step == 6
    assert torch.equal(agent.generator.get_state(), resumed.generator.get_state())
    if agent.schedulers:
        assert resumed.optimizers["policy"].param_groups[0]["lr"] == agent.optimizers["policy"].param_groups[0]["lr"]


def test_load_rejects_a_different_architecture():
    state = make_agent("iql").state_dict()
    with pytest.raises(ValueError, match="critic_hidden"):
        make_agent("iql", critic_hidden=(7, 7)).load_state_dict(state)
    with pytest.raises(ValueError, match="critic_target"):
        make_agent("awac").load_state_dict(state)
    make_agent("iql", beta=9.0, expectile=0.9).load_state_dict(state)  # hyperparameters may differ


@pytest.mark.parametrize("variant", ["bc", "awac", "onestep", "iql-dropout"])
def test_a_group_trains_each_member_as_its_single_run(variant):
    seeds = [0, 5]
    singles = [make_agent(variant, seed=s) for s in seeds]
    group = Weighted.group_of([make_agent(variant, seed=s) for s in seeds])
    for step in range(3):
        batches = [make_batch(100 * m + step) for m in range(len(seeds))]
        single_metrics = [agent.update(b) for agent, b in zip(singles, batches)]
        group_metrics = group.update({k: torch.stack([b[k] for b in batches]) for k in batches[0]})
        for m, metrics in enumerate(single_metrics):
            for k, v in metrics.items():
                assert torch.allclose(group_metrics[k][m], v, rtol=1e-5, atol=1e-6), (step, m, k)
    for single, member in zip(singles, member_state_dicts(group)):
        _assert_same_state(single.state_dict(), member, exact=False)
        assert torch.equal(single.generator.get_state(), member["generator"])
    assert group.step == 3


# --------------------------------------------------------------------------------------------------
def synthetic_dataset(n=512, seed=0):
    """A behaviour policy a*(s) plus noise; the reward peaks at a*(s)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -0.6]])
    obs = torch.randn(n, S, generator=g)
    best = 0.8 * torch.tanh(obs @ w.T)
    actions = (best + 0.2 * torch.randn(n, A, generator=g)).clamp(-0.999, 0.999)
    rewards = 1.0 - 2.0 * ((actions - best) ** 2).sum(-1)
    return dict(observations=obs, actions=actions, rewards=rewards, next_observations=torch.randn(n, S, generator=g),
                terminals=(torch.rand(n, generator=g) < 0.5).float(), best=best)


@pytest.mark.parametrize("variant", ["bc", "iql"])
def test_the_actor_learns_the_behaviour_on_a_tiny_dataset(variant):
    data = synthetic_dataset()
    agent = make_agent(variant, actor_hidden=(32, 32), critic_hidden=(32, 32), value_hidden=(32, 32), batch_size=64,
                       actor_lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def regret():
        return float(((agent.act(data["observations"]) - data["best"]) ** 2).mean())

    start = regret()
    for _ in range(300):
        idx = torch.randint(0, 512, (64,), generator=g)
        agent.update({k: v[idx] for k, v in data.items() if k != "best"})
    assert regret() < 0.2 * start


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["bc", "awac", "onestep", "iql"])
def test_act_explore_and_export(variant, tmp_path):
    agent = make_agent(variant)
    obs = np.random.default_rng(0).normal(size=(6, S)).astype(np.float32)
    out = agent.act(obs)
    assert isinstance(out, np.ndarray) and out.shape == (6, A) and np.abs(out).max() <= 1
    assert isinstance(agent.act(torch.as_tensor(obs)), torch.Tensor)
    ref = Ref(agent)
    with torch.no_grad():
        x = torch.as_tensor(obs, dtype=F64)
        if agent.config.policy == "gaussian":
            expected = ref.gaussian(ref.policy, ref.policy_log_std, x)[0].clamp(-1, 1)
        else:
            expected = torch.tanh(ref.mlp(ref.policy, x))
    assert np.allclose(out, expected.numpy(), atol=1e-6)
    e1 = agent.act_explore(obs, 0.3, torch.Generator().manual_seed(3))
    e2 = agent.act_explore(obs, 0.3, torch.Generator().manual_seed(3))
    assert np.array_equal(e1, e2) and np.abs(e1).max() <= 1.0 and not np.array_equal(e1, out)
    state = agent.generator.get_state()
    agent.act_explore(obs)  # default: the agent's own generator
    assert not torch.equal(state, agent.generator.get_state())

    path = checkpoint.export_policy(agent.policy, S, tmp_path / "policy.pt2")
    program = checkpoint.load_exported_policy(path)  # refuses any operator outside the allowed set
    assert np.allclose(program(torch.as_tensor(obs)).numpy(), out, atol=1e-6)


def test_gaussian_actor_log_std_modes():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(4, S)
    state = GaussianActor(S, A, (8,), g, "state", -5.0, 0.0)
    mean, log_std = state.dist_params(obs)
    assert log_std.shape == (4, A) and (log_std > -5).all() and (log_std < 0).all() and mean.abs().max() < 1
    free = GaussianActor(S, A, (8,), g, "global", -20.0, 2.0, tanh_mean=False)
    with torch.no_grad():
        free.out.bias.fill_(3.0)
        free.log_std.copy_(torch.tensor([5.0, -30.0]))
    mean, log_std = free.dist_params(obs)
    assert mean.max() > 1 and torch.equal(log_std[0], torch.tensor([2.0, -20.0]))  # unbounded mean, clipped std
    assert free.act(obs).max() == 1.0
    samples = free.sample(obs, torch.randn(4, 7, A, generator=g))
    assert samples.shape == (4, 7, A) and samples.abs().max() <= 1.0


# --------------------------------------------------------------------------------------------------
# config
def test_config_defaults_are_corl_iql():
    cfg = WeightedConfig()
    assert (cfg.policy, cfg.critic_target, cfg.weight, cfg.top_fraction) == ("gaussian", "value", "iql", 1.0)
    assert (cfg.gamma, cfg.tau, cfg.batch_size, cfg.actor_lr, cfg.critic_lr, cfg.value_lr) == (
        0.99, 5e-3, 256, 3e-4, 3e-4, 3e-4)
    assert (cfg.expectile, cfg.beta, cfg.exp_adv_max, cfg.num_critics) == (0.7, 3.0, 100.0, 2)
    assert (cfg.log_std, cfg.log_std_min, cfg.log_std_max, cfg.tanh_mean) == ("global", -20.0, 2.0, True)
    assert (cfg.actor_lr_schedule, cfg.lr_decay_steps, cfg.actor_dropout) == ("cosine", 1_000_000, 0.0)
    assert cfg.resolved_hidden("actor") == cfg.resolved_hidden("value") == (256, 256)
    awac = algos.build_config("awac", "locomotion")
    assert awac.resolved_hidden("actor") == awac.resolved_hidden("critic") == (256, 256, 256)
    assert awac.awac_lambda == 0.3333 and not awac.tanh_mean and awac.actor_lr_schedule == "constant"
    onestep = algos.build_config("onestep", "locomotion")
    assert onestep.resolved_hidden("critic") == (1024, 1024) and onestep.batch_size == 512
    assert (onestep.actor_lr, onestep.num_critics, onestep.log_std_min, onestep.log_std_max) == (1e-4, 1, -5.0, 0.0)


@pytest.mark.parametrize("bad", [dict(top_fraction=0.0), dict(top_fraction=1.5), dict(expectile=1.0),
                                 dict(weight="none"), dict(critic_target="none"),
                                 dict(critic_target="policy"), dict(weight="awac"), dict(actor_dropout=1.0),
                                 dict(num_samples=0), dict(actor_hidden=()), dict(log_std_min=3.0),
                                 dict(awac_lambda=0.0), dict(policy="tanh"), dict(actor_lr_schedule="linear")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        WeightedConfig(**bad)


def test_set_keys_parse_and_round_trip():
    cfg = apply_overrides(WeightedConfig(), [
        "policy=deterministic", "critic_target=behavior", "weight=iql", "top_fraction=0.25", "actor_hidden=16-16",
        "critic_hidden=[8, 8, 8]", "value_hidden=none", "log_std=state", "tanh_mean=false", "beta=0.5",
        "awac_lambda=0.1", "expectile=0.9", "exp_adv_max=50", "num_samples=3", "actor_lr_schedule=constant",
        "lr_decay_steps=1e5", "actor_dropout=0.1", "num_critics=1", "behavior_lr=1e-4"])
    assert (cfg.policy, cfg.critic_target, cfg.top_fraction, cfg.actor_hidden, cfg.critic_hidden) == (
        "deterministic", "behavior", 0.25, (16, 16), (8, 8, 8))
    assert (cfg.value_hidden, cfg.log_std, cfg.tanh_mean, cfg.lr_decay_steps, cfg.behavior_lr) == (
        None, "state", False, 100_000, 1e-4)
    assert WeightedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="did you mean"):
        apply_overrides(WeightedConfig(), ["expectle=0.8"])
    with pytest.raises(ValueError, match="critic"):
        apply_overrides(WeightedConfig(), ["weight=awac"])  # AWAC's weight needs AWAC's critic too


def test_presets_and_the_algorithm_registry():
    assert set(WEIGHTED_PRESETS) == {"locomotion", "antmaze", "adroit", "kitchen", "pendulum"}
    assert (weighted_preset("antmaze").expectile, weighted_preset("antmaze").beta) == (0.9, 10.0)
    assert weighted_preset("pendulum").resolved_hidden("critic") == (64, 64)
    with pytest.raises(ValueError, match="preset"):
        weighted_preset("atari")
    iql = algos.build_config("iql", "adroit", "pen-human-v1", obs_dim=S, act_dim=A)
    assert (iql.beta, iql.actor_dropout) == (0.5, 0.1)
    assert algos.build_config("awac", "adroit").actor_dropout == 0.0  # dropout is IQL's alone
    assert algos.build_config("onestep", "antmaze").beta == 0.01
    assert algos.build_config("10bc", "locomotion").top_fraction == 0.1
    assert algos.build_config("bc", "locomotion").top_fraction == 1.0
    assert algos.get("iql").reward_transforms == {"locomotion": "iql-locomotion", "antmaze": "iql-antmaze"}
    assert {n: algos.get(n).default_obs_norm for n in ("bc", "10bc", "awac", "onestep", "iql")} == {
        "bc": "per-dim", "10bc": "per-dim", "awac": "per-dim", "onestep": "none", "iql": "per-dim"}
    for name in ("bc", "10bc", "awac", "onestep", "iql"):
        cfg = algos.build_config(name, "pendulum", obs_dim=S, act_dim=A)
        agent = algos.make_agent(cfg)
        assert isinstance(agent, Weighted) and algos.family_of(cfg) == "weighted"
        assert not agent.needs_pretraining and agent.pretrain_steps == 0
    with pytest.raises(ValueError, match="obs_dim"):
        Weighted(WeightedConfig())
    assert isinstance(WeightedNoise(()), tuple)
