"""unbiased_estimator=snis: the actor's eq. 15 term by self-normalised importance sampling over the
K policy samples and Q values of the critic's log-partition term (no HMC chain)."""
import math

import pytest
import torch

from misa_fast import nets, ops
from misa_fast.agents import MISA, losses
from misa_fast.agents.algorithms import ALGORITHMS
from misa_fast.agents.config_base import apply_overrides
from misa_fast.agents.misa_config import MISAConfig
from misa_fast.ops import hmc_reference as hmc_lib
from misa_fast.training import checkpoint
from misa_fast.training.loop import ProgressLog, snis_collapse_warning

S, A, B, K = 3, 2, 4, 6


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)


def tiny_config(**kw):
    base = dict(obs_dim=S, act_dim=A, policy_hidden=(4, 4), critic_hidden=(4, 4), num_samples=K, batch_size=B,
                seed=0, unbiased_estimator="snis")
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


def spice(agent, seed=0, scale=0.7):
    """O(1) critic outputs, so the weights are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (agent.critic, agent.energy):
            for p in ([] if net is None else net.parameters()):
                p.normal_(0.0, scale, generator=g)
        for p in agent.policy.net.parameters():
            p.normal_(0.0, 0.5, generator=g)
    return agent


def capture_actor_terms(monkeypatch):
    """The actor's loss terms with their graphs (the agent's metrics are detached copies)."""
    captured = {}
    original = losses.actor_loss

    def spy(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        captured.update(terms)
        return loss, terms

    monkeypatch.setattr(losses, "actor_loss", spy)
    return captured


# The MISA variants that have the eq. 15 term (use_hmc=True): misa, no-ba, misa-t; and misa with Lagrange.
WITH_TERM = [name for name, algo in ALGORITHMS.items() if algo.family == "misa"
             and MISAConfig(**{k: v for k, v in algo.overrides.items()}).use_hmc]


def test_the_variants_with_the_term_are_the_expected_ones():
    assert set(WITH_TERM) == {"misa", "misa-t", "no-ba"}


# ------------------------------------------------------------------------------------------ config
def test_config_key_defaults_to_hmc_and_parses_snis():
    assert MISAConfig().unbiased_estimator == "hmc"
    cfg = apply_overrides(MISAConfig(), ["unbiased_estimator=snis"])
    assert cfg.unbiased_estimator == "snis" and cfg.snis_term and not cfg.hmc_chain
    assert MISAConfig().hmc_chain and not MISAConfig().snis_term
    assert not MISAConfig(use_hmc=False, unbiased_estimator="snis").snis_term  # MISA-biased: no term at all
    with pytest.raises(ValueError, match="unbiased_estimator"):
        apply_overrides(MISAConfig(), ["unbiased_estimator=is"])


# ------------------------------------------------------------------------------------------ losses
def test_snis_weights_and_kish_ess():
    q = torch.tensor([[[0.0, 1.0, 2.0]], [[0.5, 0.0, 3.0]]])  # (E=2, B=1, K=3)
    w = losses.snis_weights(q)
    expected = torch.softmax(torch.tensor([0.0, 0.0, 2.0]), 0)  # min over critics, then softmax over k
    torch.testing.assert_close(w[0], expected)
    assert losses.kish_ess(torch.full((1, 4), 0.25)).item() == pytest.approx(4.0)
    assert losses.kish_ess(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(1.0)
    ess = torch.tensor([1.0, 2.0, 3.0, 4.0] * 5)
    w = torch.stack([torch.full((8,), 1.0 / 8) if e == 4 else torch.eye(8)[0] for e in ess])
    d = losses.snis_diagnostics(w)
    assert d["snis_ess"].item() == pytest.approx(float(losses.kish_ess(w).mean()))
    assert d["snis_ess_p05"].item() == pytest.approx(float(losses.kish_ess(w).quantile(0.05)))


def test_actor_loss_with_weights_is_the_weighted_sum_per_state():
    log_pi = torch.randn(B, K, requires_grad=True)
    w = torch.softmax(torch.randn(B, K), 1)
    alpha, lp_new, q_new = torch.tensor(0.5), torch.randn(B), torch.randn(B)
    _, terms = losses.actor_loss(alpha, lp_new, q_new, 0.5, None, log_pi, 0.3, w)
    assert terms["actor_unbiased_term"].detach().item() == pytest.approx(
        0.3 * float((w * log_pi.detach()).sum(1).mean()), rel=1e-6)
    terms["actor_unbiased_term"].backward()
    torch.testing.assert_close(log_pi.grad, 0.3 * w / B)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused-op"])
def test_energy_gap_returns_the_q_values_of_its_log_partition(monkeypatch, fused):
    agent = spice(MISA(tiny_config()))
    batch = make_batch()
    obs = batch["observations"]
    samples = torch.rand(B, K, A) * 2 - 1
    layers = agent.critic.stacked_layers()
    q_data = nets.ensemble_q(layers, agent.critic.first_layer_state_half(obs), batch["actions"])
    if fused:  # the dispatch picks Triton (forced here): the op's own return_q is what comes back
        calls = []

        def spy(obs, actions, layers, log_weights=None, normalizer="k", *, return_q=False, **options):
            calls.append(return_q)
            return ops.sampled_q_log_mean_exp_reference(obs, actions, layers, log_weights, normalizer, return_q)

        monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: "triton")
        monkeypatch.setattr(ops, "sampled_q_log_mean_exp", spy)
    gap, partition, q = losses.energy_gap("misa", q_data, layers, obs, samples, math.log(K), return_q=True)
    gap2, partition2, _ = losses.energy_gap("misa", q_data, layers, obs, samples, math.log(K))
    if fused:
        assert calls == [True, False]
    expected_q = nets.ensemble_q(layers, agent.critic.first_layer_state_half(obs), samples)
    torch.testing.assert_close(q, expected_q.detach())
    assert not q.requires_grad
    torch.testing.assert_close(gap, gap2)
    torch.testing.assert_close(partition, (torch.logsumexp(expected_q, 2) - math.log(K)).mean(1))
    with pytest.raises(ValueError, match="return_q"):
        losses.energy_gap("dv", q_data, layers, obs, samples, math.log(K), return_q=True)


# ------------------------------------------------------------------------------------------ agent
def _direct_term(agent, batch, noise):
    """The SNIS term computed directly, in float64, from the same noise: w_u mean_s sum_k w_k
    log pi(a_k|s), w_k = softmax_k(min_i Q_i(s, a_k)) (the energy network's Q for MISA-T)."""
    obs = batch["observations"].double()
    with torch.no_grad():
        h = agent.policy.net.double()(obs)
        agent.policy.net.float()
    mean, raw = h.chunk(2, -1)
    mean = mean.clamp(nets.MEAN_MIN, nets.MEAN_MAX)
    std = (agent.policy.log_std_multiplier.double() * raw + agent.policy.log_std_offset.double()).clamp(
        nets.LOG_STD_MIN, nets.LOG_STD_MAX).exp()
    u = mean[:, None] + std[:, None] * noise.samples.double()
    energy = agent.critic if agent.energy is None else agent.energy
    q = []
    for i in range(agent.config.num_critics if agent.energy is None else 1):
        x = torch.cat([obs[:, None].expand(-1, K, -1), torch.tanh(u)], -1)
        layers = [(w[i].double(), b[i].double()) for w, b in energy.stacked_layers(detach=True)]
        for w, b in layers[:-1]:
            x = torch.nn.functional.elu(x @ w.T + b)
        q.append((x @ layers[-1][0].T + layers[-1][1])[..., 0])
    w = torch.softmax(torch.stack(q).min(0).values, 1)
    z = (u - mean[:, None]) / std[:, None]
    log_pi = (-0.5 * z * z - torch.log(std[:, None]) - 0.5 * math.log(2 * math.pi)
              - 2.0 * (math.log(2.0) - u - torch.nn.functional.softplus(-2.0 * u))).sum(-1)
    return agent.config.unbiased_weight * float((w * log_pi).sum(1).mean().detach()), w


@pytest.mark.parametrize("algo", WITH_TERM + ["misa-lagrange"])
def test_snis_term_equals_a_direct_computation_and_no_chain_runs(monkeypatch, algo):
    """Every MISA variant with the eq. 15 term: the term is the direct float64 computation on the
    same K samples; the HMC sampler is never called and no HMC noise is drawn; the diagnostics are
    the Kish ESS of those weights; the other losses are those of the variant without the term plus
    exactly this term."""
    overrides = ({"lagrange": True} if algo == "misa-lagrange" else
                 {k: v for k, v in ALGORITHMS[algo].overrides.items() if k != "num_samples"})

    def no_chain(*args, **kwargs):
        raise AssertionError("the HMC sampler ran under unbiased_estimator=snis")

    monkeypatch.setattr(ops, "hmc_sample", no_chain)
    monkeypatch.setattr(hmc_lib, "hmc_sample", no_chain)
    agent = spice(MISA(tiny_config(**overrides)))
    batch = make_batch()
    noise = agent.draw_noise(B)
    assert noise.hmc is None
    out = agent.compute_losses(batch, noise)
    assert out.hmc is None and not any(k.startswith("hmc_") for k in out.metrics)
    expected, w = _direct_term(agent, batch, noise)
    assert out.metrics["actor_unbiased_term"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    ess = 1.0 / (w.detach() ** 2).sum(1)
    assert out.metrics["snis_ess"].item() == pytest.approx(float(ess.mean()), rel=1e-5)
    assert out.metrics["snis_ess_p05"].item() == pytest.approx(float(ess.quantile(0.05)), rel=1e-5)
    assert 1.0 <= out.metrics["snis_ess_p05"].item() <= out.metrics["snis_ess"].item() <= K
    # Without the term (use_hmc=False) on the same noise: everything else is identical.
    biased = spice(MISA(tiny_config(**{**overrides, "use_hmc": False})))
    ref = biased.compute_losses(batch, noise)
    for name, value in ref.metrics.items():
        if name == "actor_loss":
            value = value + out.metrics["actor_unbiased_term"]
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-6, atol=1e-6, msg=name)
    agent.update(batch)  # and it trains


def test_snis_term_gradient_is_the_direct_gradient_and_reaches_only_the_policy(monkeypatch):
    captured = capture_actor_terms(monkeypatch)
    agent = spice(MISA(tiny_config()))
    batch = make_batch()
    noise = agent.draw_noise(B)
    agent.compute_losses(batch, noise)
    term = captured["actor_unbiased_term"]
    params = list(agent.policy.parameters())
    grads = torch.autograd.grad(term, params + list(agent.critic.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads[len(params):])  # weights and samples are detached
    mean, std = agent.policy.dist_params(batch["observations"])
    with torch.no_grad():
        u = mean[:, None] + std[:, None] * noise.samples
        layers = agent.critic.stacked_layers(detach=True)
        q = nets.ensemble_q(layers, agent.critic.first_layer_state_half(batch["observations"], detach=True),
                            torch.tanh(u))
        w = torch.softmax(q.min(0).values, 1)
    direct = agent.config.unbiased_weight * (w * nets.tanh_gaussian_log_prob_pre_tanh(
        mean[:, None], std[:, None], u)).sum(1).mean()
    for g, d in zip(grads[:len(params)], torch.autograd.grad(direct, params)):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-7)


def test_snis_evaluates_the_critics_no_more_than_without_the_term(monkeypatch):
    """No second critic evaluation: as many critic forward passes as MISA-biased (use_hmc=False)."""
    counts = []

    def counting(fn):
        def wrapped(*args, **kwargs):
            counts[-1] += 1
            return fn(*args, **kwargs)
        return wrapped

    for module in (nets, losses):
        monkeypatch.setattr(module, "ensemble_q", counting(nets.ensemble_q))
    for overrides in ({"use_hmc": False}, {}):
        counts.append(0)
        agent = MISA(tiny_config(**overrides))
        agent.compute_losses(make_batch(), agent.draw_noise(B))
    assert counts[0] == counts[1] > 0


def test_the_fused_op_gives_the_weights_its_q_values(monkeypatch):
    """Where the dispatch picks Triton, the log-partition and the SNIS weights come from one call of
    the fused op with return_q=True (the spy returns the reference's values)."""
    calls = []

    def spy(obs, actions, layers, log_weights=None, normalizer="k", *, return_q=False, **options):
        calls.append(return_q)
        return ops.sampled_q_log_mean_exp_reference(obs, actions, layers, log_weights, normalizer, return_q)

    batch = make_batch()
    eager = spice(MISA(tiny_config()))
    expected = eager.compute_losses(batch, eager.draw_noise(B)).metrics
    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(ops, "sampled_q_log_mean_exp", spy)
    agent = spice(MISA(tiny_config()))
    got = agent.compute_losses(batch, agent.draw_noise(B)).metrics
    assert calls == [True]
    for name in ("actor_unbiased_term", "snis_ess", "snis_ess_p05", "log_partition"):
        torch.testing.assert_close(got[name], expected[name], msg=name)


# -------------------------------------------------------------------- convergence to the exact gradient
def _exact_eq15_gradient(agent, obs, params, points=6001, width=12.0):
    """grad_theta w_u mean_s E_p[log pi_theta(a|s)] with p(a|s) ~ pi(a|s) exp(min_i Q_i(s, a)), for a
    1-D action, by quadrature over the pre-tanh action (pi(a) da = N(u; mu, sigma) du, so p(u) ~
    N(u; mu, sigma) exp(Q(tanh u)); the tanh Jacobian of log pi does not depend on theta)."""
    mean, std = agent.policy.dist_params(obs)  # (B, 1)
    z = torch.linspace(-width, width, points)
    u = (mean.detach() + std.detach() * z)  # (B, N)
    layers = agent.critic.stacked_layers(detach=True)
    with torch.no_grad():
        q = nets.ensemble_q(layers, agent.critic.first_layer_state_half(obs, detach=True),
                            torch.tanh(u).unsqueeze(-1)).min(0).values
        p = torch.softmax((-0.5 * z * z + q).double(), 1).float()
    log_pi = -0.5 * ((u - mean) / std) ** 2 - torch.log(std)
    objective = agent.config.unbiased_weight * (p * log_pi).sum(1).mean()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, params)])


def test_snis_gradient_converges_to_the_quadrature_gradient_as_k_grows(monkeypatch):
    """A 1-D policy and critic (random networks with O(1) Q variation over the action): the agent's
    own SNIS term, averaged over 500 replicates of each of 4 states (one batch), approaches the
    exact eq. 15 gradient (quadrature) as K grows; at K=2 its O(1/K) bias is visible."""
    captured = capture_actor_terms(monkeypatch)
    states, reps = 4, 500
    obs0 = torch.randn(states, 2, generator=torch.Generator().manual_seed(3))
    obs = obs0.repeat_interleave(reps, 0)
    batch = {"observations": obs, "actions": torch.zeros(len(obs), 1), "rewards": torch.zeros(len(obs)),
             "next_observations": obs, "terminals": torch.zeros(len(obs))}
    errors = {}
    for k in (2, 8, 32, 128):
        cfg = MISAConfig(obs_dim=2, act_dim=1, policy_hidden=(8,), critic_hidden=(8,), num_samples=k,
                         batch_size=len(obs), unbiased_estimator="snis", unbiased_weight=1.0, seed=0)
        agent = spice(MISA(cfg), seed=1)
        params = list(agent.policy.parameters())
        exact = _exact_eq15_gradient(agent, obs0, params)
        out = agent.compute_losses(batch, agent.draw_noise(len(obs)))
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(captured["actor_unbiased_term"], params)])
        errors[k] = float((g - exact).norm() / exact.norm())
        if k == 2:
            assert out.metrics["snis_ess"].item() < 1.9  # a real tilt: the weights are far from uniform
    assert errors[2] > 0.1
    assert errors[2] > errors[8] > errors[32] > errors[128]
    assert errors[128] < 0.02, errors


# ------------------------------------------------------------------------------------------ logging
def test_progress_csv_puts_the_snis_columns_where_the_hmc_ones_go(tmp_path):
    log = ProgressLog(tmp_path, None, tensorboard=False)
    log.write(1, {"alpha": 1.0, "snis_ess": 5.0, "snis_ess_p05": 2.0, "log_pi": 0.1, "actor_loss": 0.0})
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    # where an HMC run has hmc_accept_prob, hmc_accept_rate, ... (between alpha and log_pi)
    assert header[:6] == ["step", "actor_loss", "alpha", "snis_ess", "snis_ess_p05", "log_pi"]


def test_collapse_warning():
    assert snis_collapse_warning({"alpha": 1.0}, 10) is None  # HMC runs: no SNIS columns
    assert snis_collapse_warning({"snis_ess": 7.5, "snis_ess_p05": 3.0}, 10) is None
    text = snis_collapse_warning({"snis_ess": 1.2, "snis_ess_p05": 1.0}, 500)
    assert "step 500" in text and "1.20" in text and "unbiased_estimator=hmc" in text


def test_train_writes_the_snis_columns_and_warns_once_when_the_weights_collapse(tmp_path, monkeypatch, capsys):
    from misa_fast.cli import main
    from misa_fast.training import loop as train_lib

    monkeypatch.setattr(losses, "SNIS_ESS_WARN", 1e9)  # every row "collapsed": the warning path
    out = tmp_path / "run"
    main(["train", "--steps", "4", "--eval-every", "4", "--eval-episodes", "1", "--log-every", "2",
          "--out", str(out), "--set", "unbiased_estimator=snis", "--set", "batch_size=8",
          "--set", "policy_hidden=8-8", "--set", "critic_hidden=8-8", "--no-tensorboard"])
    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"snis_ess", "snis_ess_p05"} <= set(header) and not any(c.startswith("hmc_") for c in header)
    err = capsys.readouterr().err
    assert err.count("SNIS weights of the actor's correction term have collapsed") == 1
    assert train_lib.snis_collapse_warning is snis_collapse_warning


@pytest.mark.parametrize("algo", [name for name, algo in ALGORITHMS.items() if algo.family == "misa"])
def test_every_misa_variant_accepts_the_setting(algo):
    """--set unbiased_estimator=snis on any MISA-family algorithm: those with the term use SNIS,
    the others (misa-biased, misa-dv, misa-f, ba, cql) have no term to estimate and train as before."""
    overrides = {k: v for k, v in ALGORITHMS[algo].overrides.items() if k != "num_samples"}
    agent = MISA(tiny_config(**overrides))
    metrics = agent.update(make_batch())
    has_term = agent.config.use_hmc
    assert ("snis_ess" in metrics) == has_term and ("actor_unbiased_term" in metrics) == has_term
    assert not any(k.startswith("hmc_") for k in metrics)
    assert all(bool(torch.isfinite(v)) for v in metrics.values())


def _load_bench(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "studies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_study_has_the_agent_snis_row(tmp_path):
    """bench/studies/hmc_accuracy.py's "snis (agent)" row: the learner's own update code at the study's
    states, leaving the agent's config and generator as they were."""
    import json

    from misa_fast.cli import main

    hmc_accuracy = _load_bench("hmc_accuracy")
    run = tmp_path / "run"
    main(["train", "--steps", "2", "--eval-every", "2", "--eval-episodes", "1", "--out", str(run),
          "--set", "batch_size=8", "--set", "policy_hidden=8-8", "--set", "critic_hidden=8-8", "--no-tensorboard"])
    out = tmp_path / "acc"
    hmc_accuracy.main(["--checkpoint", str(run / "checkpoint.pt"), "--states", "8", "--is-samples", "200",
                       "--seeds", "2", "--warm-calls", "1", "--out", str(out)])
    rows = {r["sampler"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    row = rows["snis (agent)"]
    assert len(row["cosine"]) == 2 and all(-1.0 <= c <= 1.0 for c in row["cosine"])
    assert all(1.0 <= e <= 10 for e in row["ess"])  # K=10 (the pendulum preset)
    state = checkpoint.load(run)
    problem = hmc_accuracy.Problem(state, None, 8, 0)
    config, generator = problem.agent.config, problem.agent.generator
    term, per_state, ess = hmc_accuracy.snis_agent_term(problem, 0)
    assert problem.agent.config is config and problem.agent.generator is generator
    assert per_state.shape == (8,) and term.requires_grad
    assert float(term.detach()) == pytest.approx(float(per_state.mean()), rel=1e-5)
