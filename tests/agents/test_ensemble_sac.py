"""SAC-N and EDAC as settings of the MISA learner: their losses (values and gradients) against a float64
computation of the papers' formulas, the diversity term's closed-form dQ/da against autograd, a
group of seeds against its single runs, torch.compile, and the per-dataset values."""
import io
import math

import pytest
import torch

from misa_fast import nets
from misa_fast.agents import MISA, losses, members
from misa_fast.agents import algorithms as algos
from misa_fast.agents.learner import as_batch, stack_tree
from misa_fast.agents.misa_config import MISAConfig, edac_values_for, sac_n_values_for

S, A, B = 3, 2, 6
SAC_N_KEYS = {"energy_bound", "use_ba", "bc_weight", "lagrange", "backup_entropy", "network_style", "use_hmc"}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)


def tiny_config(algo="edac", **kw):
    """The algorithm's own settings with tiny networks (3 hidden critic layers: the backward loop runs)."""
    values = {k: v for k, v in algos.get(algo).overrides.items() if k not in ("policy_hidden", "critic_hidden")}
    base = dict(obs_dim=S, act_dim=A, policy_hidden=(4, 4), critic_hidden=(5, 5, 5), batch_size=B, seed=0)
    return MISAConfig(**{**values, **base, **kw})


def make_batch(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch, S, generator=g),
        "actions": torch.rand(batch, A, generator=g) * 1.8 - 0.9,
        "rewards": torch.randn(batch, generator=g),
        "next_observations": torch.randn(batch, S, generator=g),
        "terminals": (torch.arange(batch) % 3 == 0).float(),
    }


def spice(agent, seed=0):
    """O(1) weights (the EDAC init gives near-zero Q and tiny gradients) and a distinct target."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(agent.critic.parameters()) + list(agent.policy.net.parameters()):
            p.normal_(0.0, 0.6, generator=g)
        agent.target_critic.load_state_dict(agent.critic.state_dict())
        for p in agent.target_critic.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        agent.log_alpha.fill_(-0.4)
    return agent


# --------------------------------------------------------------------------------------------------
# float64 reference: per-critic loops on concat(s, a), the formulas as the papers / CORL write them
def _f64(tensors):
    return [t.detach().double().clone().requires_grad_(True) for t in tensors]


def ref_q(weights, biases, i, obs, actions, act=torch.relu):
    x = torch.cat([obs, actions], dim=-1)
    for w, b in zip(weights[:-1], biases[:-1]):
        x = act(x @ w[i].T + b[i])
    return (x @ weights[-1][i].T + biases[-1][i])[..., 0]


def ref_policy(agent, obs, noise):
    """a = tanh(mu + sigma * eps) and log pi(a|s): separate mean and log-std heads (the one output
    layer's halves), log sigma = clip(raw, -5, 2), tanh change of variables."""
    linears = [m for m in agent.policy.net if isinstance(m, torch.nn.Linear)]
    x = obs
    for layer in linears[:-1]:
        x = torch.relu(x @ layer.weight.double().T + layer.bias.double())
    out = x @ linears[-1].weight.double().T + linears[-1].bias.double()
    mean, raw = out[:, :A].clamp(-9, 9), out[:, A:]
    std = raw.clamp(-5, 2).exp()
    u = mean + std * noise
    log_det = 2 * (math.log(2) - u - torch.nn.functional.softplus(-2 * u))  # log(1 - tanh(u)^2), stable
    log_pi = (-0.5 * noise**2 - std.log() - 0.5 * math.log(2 * math.pi) - log_det).sum(-1)
    return torch.tanh(u), log_pi


def ref_diversity(weights, biases, obs, actions, n, act=torch.relu):
    """(1/(N-1)) mean_b sum_{i != j} <g_i, g_j>, g_i = grad_a Q_i / (|grad_a Q_i| + 1e-10): the
    Gram matrix with its diagonal masked, as CORL's edac.py."""
    a = actions.clone().requires_grad_(True)
    grads = torch.stack([torch.autograd.grad(ref_q(weights, biases, i, obs, a, act).sum(), a, create_graph=True)[0]
                         for i in range(n)])  # (N, B, A)
    unit = grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)
    gram = torch.einsum("ibk,jbk->bij", unit, unit) * (1 - torch.eye(n, dtype=unit.dtype))
    return gram.sum(dim=(1, 2)).mean() / (n - 1)


def ref_losses(agent, batch, noise):
    cfg, n = agent.config, agent.config.num_critics
    obs, act, rew, nobs, done = (batch[k].double() for k in ("observations", "actions", "rewards",
                                                              "next_observations", "terminals"))
    weights, biases = _f64(agent.critic.weights), _f64(agent.critic.biases)
    t_weights, t_biases = [w.double() for w in agent.target_critic.weights], [b.double() for b in
                                                                               agent.target_critic.biases]
    alpha = agent.log_alpha.detach().double().exp()
    with torch.no_grad():
        next_a, next_log_pi = ref_policy(agent, nobs, noise.next_policy.double())
        next_q = torch.stack([ref_q(t_weights, t_biases, i, nobs, next_a) for i in range(n)]).min(0).values
        y = rew + cfg.gamma * (1 - done) * (next_q - alpha * next_log_pi)
    td = sum(((ref_q(weights, biases, i, obs, act) - y) ** 2).mean() for i in range(n))
    out = {"q_target": y.mean(), "td_loss": td}
    critic = td
    if cfg.diversity_weight > 0:
        out["diversity_loss"] = ref_diversity(weights, biases, obs, act, n)
        critic = critic + cfg.diversity_weight * out["diversity_loss"]
    out["critic_loss"] = critic
    new_a, log_pi = ref_policy(agent, obs, noise.policy.double())
    q_new = torch.stack([ref_q([w.detach() for w in weights], [b.detach() for b in biases], i, obs, new_a)
                         for i in range(n)]).min(0).values
    out["actor_loss"] = (alpha * log_pi - q_new).mean()
    out["alpha_loss"] = -(agent.log_alpha.detach().double() * (log_pi + agent.target_entropy)).mean()
    return out, weights + biases


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sac-n", "edac"])
@pytest.mark.parametrize("num_critics", [2, 10, 13])
def test_losses_and_critic_gradients_match_the_float64_formulas(algo, num_critics):
    agent = spice(MISA(tiny_config(algo, num_critics=num_critics, diversity_weight=0.0 if algo == "sac-n" else 1.7)))
    batch = make_batch(num_critics)
    noise = agent.draw_noise(B)
    out = agent.compute_losses(batch, noise)
    expected, ref_params = ref_losses(agent, batch, noise)
    assert set(out.losses) == {"critic_loss", "actor_loss", "alpha_loss"}  # nothing else is on
    for name in ("critic_loss", "actor_loss", "alpha_loss"):
        assert out.losses[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-5), name
    for name in ("q_target", "td_loss") + (("diversity_loss",) if algo == "edac" else ()):
        assert out.metrics[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-5), name
    if algo == "edac":
        assert expected["diversity_loss"].abs() > 0.05  # a non-trivial value is compared
    critic_params = list(agent.critic.weights) + list(agent.critic.biases)
    got = torch.autograd.grad(out.losses["critic_loss"], critic_params)
    want = torch.autograd.grad(expected["critic_loss"], ref_params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_critics", [2, 5])
def test_diversity_gradient_alone_matches_the_formula(num_critics):
    """The eta term by itself (the TD part would dominate the comparison above)."""
    agent = spice(MISA(tiny_config("edac", num_critics=num_critics)))
    batch = make_batch(1)
    obs, actions = batch["observations"], batch["actions"]
    layers = agent.critic.stacked_layers()
    _, action_grad = losses.q_and_action_grad(layers, agent.critic.first_layer_state_half(obs), actions)
    value = losses.ensemble_diversity(action_grad)
    weights, biases = _f64(agent.critic.weights), _f64(agent.critic.biases)
    expected = ref_diversity(weights, biases, obs.double(), actions.double(), num_critics)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # ReLU slopes are piecewise constant: no bias reaches dQ/da (None, or zeros through autograd).
    params = list(agent.critic.weights) + list(agent.critic.biases)
    got = torch.autograd.grad(value, params, allow_unused=True)
    want = torch.autograd.grad(expected, weights + biases, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in got[: len(weights)])
    for g, w, p in zip(got, want, params):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_closed_form_action_gradient_is_autograds_and_differentiable(activation):
    """Q and dQ/da of q_and_action_grad, and the weight-gradient of a function of dQ/da, against
    autograd's double backward, for both critic activations (MISA's ELU critics may use the term)."""
    g = torch.Generator().manual_seed(3)
    critic = nets.EnsembleCritic(S, A, (6, 5), 3, generator=g, activation=activation).double()
    with torch.no_grad():
        for p in critic.parameters():
            p.normal_(0.0, 0.7, generator=g)
    obs, actions = torch.randn(B, S, dtype=torch.float64), torch.rand(B, A, dtype=torch.float64) * 2 - 1
    q, grad = losses.q_and_action_grad(critic.stacked_layers(), critic.first_layer_state_half(obs), actions)
    act = torch.relu if activation == "relu" else torch.nn.functional.elu
    a = actions.clone().requires_grad_(True)
    ref_q_values = torch.stack([ref_q(critic.weights, critic.biases, i, obs, a, act) for i in range(3)])
    ref_grad = torch.stack([torch.autograd.grad(ref_q_values[i].sum(), a, create_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(q, ref_q_values)
    torch.testing.assert_close(grad, ref_grad)
    probe = torch.randn(grad.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = list(critic.parameters())
    got = torch.autograd.grad((grad * probe).sum() + q.sum(), params)
    want = torch.autograd.grad((ref_grad * probe).sum() + ref_q_values.sum(), params)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_diversity_term_edge_cases():
    """Ordered pairs i != j, over N - 1: N aligned gradients give N; two opposite ones -2; a zero
    gradient (a dead ReLU state) contributes 0 and a finite gradient."""
    g = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.5, 0.0]]])
    assert losses.ensemble_diversity(g).item() == pytest.approx(3.0)
    assert losses.ensemble_diversity(torch.tensor([[[1.0, 1.0]], [[-3.0, -3.0]]])).item() == pytest.approx(-2.0)
    zero = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]], requires_grad=True)
    value = losses.ensemble_diversity(zero)
    (grad,) = torch.autograd.grad(value, zero)
    assert value.item() == 0.0 and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
def test_sac_n_turns_every_misa_term_off():
    agent = MISA(tiny_config("sac-n"))
    noise = agent.draw_noise(B)
    assert noise.samples is None and noise.hmc is None and noise.uniform is None
    metrics = agent.update(make_batch())
    assert not {"lme_gap", "log_partition", "actor_ba_term", "actor_unbiased_term", "alpha_prime",
                "diversity_loss"} & set(metrics)
    assert not any(k.startswith(("hmc_", "snis_")) for k in metrics)
    assert metrics["critic_penalty"].item() == 0.0
    assert not agent.optimizers["alpha_prime"].state  # the Lagrange multiplier never steps
    # The actor is alpha log pi - min Q: bc_weight 1 multiplies the entropy term.
    assert agent.config.bc_weight == 1.0 and agent.config.actor_q_scale is None


def test_edac_networks_and_their_initialisation():
    cfg = tiny_config("edac", policy_hidden=(7, 7), critic_hidden=(8, 8, 8), num_critics=4)
    agent = MISA(cfg)
    assert agent.critic.activation == "relu"
    for i, (w, b) in enumerate(zip(agent.critic.weights, agent.critic.biases)):
        if i == len(agent.critic.weights) - 1:
            assert w.abs().max() <= 3e-3 and b.abs().max() <= 3e-3 and b.std() > 0
        else:
            assert torch.all(b == 0.1) and w.abs().max() <= 1 / math.sqrt(w.shape[-1])
            assert w.abs().max() > 0.5 / math.sqrt(w.shape[-1])  # uniform over the bound, not the flax normal
    linears = [m for m in agent.policy.net if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(layer.bias == 0.1) for layer in linears[:-1])
    assert linears[-1].weight.abs().max() <= 1e-3 and linears[-1].bias.abs().max() <= 1e-3
    # log sigma = clip(raw, -5, 2): the affine map of the MISA policy is the identity and stays so.
    assert agent.policy.log_std_multiplier.item() == 1.0 and agent.policy.log_std_offset.item() == 0.0
    for _ in range(2):
        agent.update(make_batch())
    assert agent.policy.log_std_multiplier.item() == 1.0 and agent.policy.log_std_offset.item() == 0.0
    # The default style is untouched: ELU critics, zero biases, learnable log-std affine.
    misa = MISA(cfg.replace(network_style="misa"))
    assert misa.critic.activation == "elu" and torch.all(misa.critic.biases[0] == 0)
    assert misa.policy.log_std_offset.requires_grad and misa.policy.log_std_offset.item() == -1.0


def test_new_fields_default_off_for_every_other_algorithm():
    cfg = MISAConfig()
    assert (cfg.network_style, cfg.backup_entropy, cfg.diversity_weight) == ("misa", False, 0.0)
    for name, algo in algos.ALGORITHMS.items():
        if algo.family == "misa" and name not in ("sac-n", "edac"):
            assert not {"network_style", "backup_entropy", "diversity_weight"} & set(algo.overrides), name
    assert SAC_N_KEYS <= set(algos.get("edac").overrides) and SAC_N_KEYS <= set(algos.get("sac-n").overrides)


def test_large_ensembles_log_summaries_instead_of_per_critic_metrics():
    metrics = MISA(tiny_config("edac", num_critics=11)).update(make_batch())
    assert {"q_data", "q_data_std"} <= set(metrics) and not any(k.startswith("q1_") for k in metrics)
    metrics = MISA(tiny_config("edac", num_critics=3)).update(make_batch())
    assert {"q1_td_loss", "q3_data"} <= set(metrics) and "q_data" not in metrics


def test_config_checks():
    with pytest.raises(ValueError, match="num_critics >= 2"):
        tiny_config("edac", num_critics=1)
    with pytest.raises(ValueError, match="diversity_weight"):
        tiny_config("edac", diversity_weight=-1.0)
    assert tiny_config("sac-n", num_critics=1).num_critics == 1  # SAC-1 is plain SAC


# --------------------------------------------------------------------------------------------------
def test_an_edac_group_of_two_seeds_is_its_single_runs():
    seeds, steps = (0, 5), 3
    cfg = tiny_config("edac", num_critics=4)
    singles = [MISA(cfg.replace(seed=s)) for s in seeds]
    group = members.stack_agents([MISA(cfg.replace(seed=s)) for s in seeds])
    for step in range(steps):
        batches = [make_batch(10 * step + m) for m in range(len(seeds))]
        single_metrics = [agent.update(b) for agent, b in zip(singles, batches)]
        group_metrics = group.update(stack_tree(batches))
        if step == 0:
            for m, metrics in enumerate(single_metrics):
                for name, value in metrics.items():
                    torch.testing.assert_close(group_metrics[name][m], value, rtol=1e-5, atol=1e-6, msg=name)
                stacked = group.state_tensors()
                for path, param in singles[m].state_tensors().items():
                    if param.grad is not None:
                        torch.testing.assert_close(stacked[path].grad[m], param.grad, rtol=1e-4, atol=1e-6)
    for m, state in enumerate(members.member_state_dicts(group)):
        for part in ("policy", "critic", "target_critic"):
            for key, value in singles[m].state_dict()[part].items():
                torch.testing.assert_close(state[part][key], value, rtol=1e-4, atol=1e-6, msg=f"{part}.{key}")


def test_edac_losses_compile_and_vmap_as_eager():
    """torch.compile (aot_eager: the real trace and joint forward/backward, no code generation) of a
    group's vmapped loss function gives the eager losses and critic gradients."""
    cfg = tiny_config("edac", num_critics=3)
    group = members.stack_agents([spice(MISA(cfg.replace(seed=s)), seed=s) for s in (0, 1)])
    noise, data = group.draw_noise(B), as_batch(stack_tree([make_batch(0), make_batch(1)]), "cpu")
    tensors = group.state_tensors()
    critic = [t for path, t in tensors.items() if path.startswith("critic.")]
    eager = group.loss_function()(tensors, data, noise)
    eager_grad = torch.autograd.grad(eager.losses["critic_loss"].sum(), critic)
    torch._dynamo.reset()
    compiled = torch.compile(group.loss_function(), backend="aot_eager")(tensors, data, noise)
    compiled_grad = torch.autograd.grad(compiled.losses["critic_loss"].sum(), critic)
    for name in eager.losses:
        torch.testing.assert_close(compiled.losses[name], eager.losses[name], msg=name)
    for x, y in zip(compiled_grad, eager_grad):
        torch.testing.assert_close(x, y)


def test_edac_checkpoint_resume_is_bit_identical():
    cfg = tiny_config("edac", num_critics=3)
    agent = MISA(cfg)
    for i in range(2):
        agent.update(make_batch(i))
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    expected = [agent.update(make_batch(i)) for i in (2, 3)]
    buffer.seek(0)
    resumed = MISA(cfg.replace(seed=9))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want, got in zip(expected, [resumed.update(make_batch(i)) for i in (2, 3)]):
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert not resumed.policy.log_std_offset.requires_grad


# --------------------------------------------------------------------------------------------------
def test_build_config_gives_the_papers_values_per_dataset():
    hopper = algos.build_config("edac", "locomotion", "hopper-medium-v2", obs_dim=11, act_dim=3)
    assert (hopper.num_critics, hopper.diversity_weight) == (50, 1.0)
    cheetah = algos.build_config("edac", "locomotion", "halfcheetah-medium-expert-v2", obs_dim=17, act_dim=6)
    assert (cheetah.num_critics, cheetah.diversity_weight) == (10, 5.0)
    assert algos.build_config("sac-n", "locomotion", "hopper-medium-v2").num_critics == 500
    assert algos.build_config("sac-n", "locomotion", "walker2d-medium-replay-v2").num_critics == 20
    assert sac_n_values_for("mujoco/hopper/medium-expert-v0") == {"num_critics": 200}
    assert edac_values_for("data/walker2d-medium-expert.hdf5") == {"num_critics": 10, "diversity_weight": 5.0}
    assert sac_n_values_for("hopper-random-v2") == edac_values_for("pendulum") == {}
    for algo in ("sac-n", "edac"):  # the CORL defaults where no dataset value is known
        cfg = algos.build_config(algo, "antmaze", "antmaze-umaze-v2")
        assert cfg.num_critics == 10 and not cfg.lagrange and cfg.energy_bound == "none"
        assert cfg.policy_hidden == cfg.critic_hidden == (256, 256, 256)
        assert (cfg.policy_lr, cfg.critic_lr, cfg.alpha_lr, cfg.batch_size, cfg.gamma, cfg.tau) == (
            3e-4, 3e-4, 3e-4, 256, 0.99, 5e-3)
        assert cfg.diversity_weight == (1.0 if algo == "edac" else 0.0)
        # raw rewards (CORL's normalize_reward: false) in every domain
        assert all(algos.get(algo).reward_transforms.get(d, "none") == "none"
                   for d in ("locomotion", "antmaze", "adroit", "kitchen"))
