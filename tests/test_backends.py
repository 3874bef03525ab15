"""Training-step backends: compiled and graph give eager's losses and parameters for the same seed
and batches; clear errors where a backend cannot run; the static-batch sampler matches ``next``."""
import numpy as np
import pytest
import torch

from misa_fast.agents import MISA, NonFiniteLossError
from misa_fast.backends import make_step
from misa_fast.config import MISAConfig
from misa_fast.samplers import DeviceSource

S, A, B = 3, 2, 16


def tiny_config(**kw):
    base = dict(obs_dim=S, act_dim=A, policy_hidden=(8, 8), critic_hidden=(8, 8), num_samples=3, batch_size=B,
                hmc_burn_in=1, hmc_step_size=0.3, seed=0)
    return MISAConfig(**{**base, **kw})


def dataset(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(n, S)).astype(np.float32),
        "actions": rng.uniform(-0.9, 0.9, size=(n, A)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, S)).astype(np.float32),
        "terminals": (rng.random(n) < 0.1).astype(np.float32),
    }


def run_steps(backend, device, steps, **overrides):
    agent = MISA(tiny_config(device=device, **overrides))
    source = DeviceSource(dataset(), B, seed=7, device=device)
    step = make_step(agent, source, backend)
    metrics = [{k: v.clone() for k, v in step().items()} for _ in range(steps)]
    return agent, metrics


def assert_same_run(a, b, rtol, atol):
    (agent_a, metrics_a), (agent_b, metrics_b) = a, b
    assert agent_a.step == agent_b.step
    for ma, mb in zip(metrics_a, metrics_b):
        assert ma.keys() == mb.keys()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=rtol, atol=atol, msg=k)
    for name in ("policy", "critic", "target_critic"):
        sa, sb = getattr(agent_a, name).state_dict(), getattr(agent_b, name).state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=f"{name}.{k}")


def test_static_batch_refill_draws_what_next_draws():
    data = dataset()
    a, b = DeviceSource(data, B, seed=3, device="cpu"), DeviceSource(data, B, seed=3, device="cpu")
    static = b.static_batch()
    for _ in range(3):
        expected = next(a)
        b.refill(static)
        for k in expected:
            assert torch.equal(expected[k], static[k]), k


def test_unknown_backend_and_graph_on_cpu_are_clear_errors():
    agent = MISA(tiny_config())
    source = DeviceSource(dataset(), B, seed=0, device="cpu")
    with pytest.raises(ValueError, match="--backend"):
        make_step(agent, source, "fast")
    with pytest.raises(ValueError, match="--backend graph needs a CUDA device"):
        make_step(agent, source, "graph")


@pytest.mark.parametrize("overrides", [{}, {"hmc_mode": "adaptive", "lagrange": True}], ids=["misa", "adaptive-lagrange"])
def test_compiled_matches_eager(overrides):
    eager = run_steps("eager", "cpu", 3, **overrides)
    compiled = run_steps("compiled", "cpu", 3, **overrides)
    assert_same_run(eager, compiled, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{}, {"hmc_mode": "adaptive", "lagrange": True}, {"hmc_mode": "parallel"}],
                         ids=["faithful", "adaptive-lagrange", "parallel"])
def test_graph_matches_eager_on_cuda(overrides):
    eager = run_steps("eager", "cuda", 5, **overrides)
    graph = run_steps("graph", "cuda", 5, **overrides)
    assert_same_run(eager, graph, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_graph_reports_a_non_finite_step_after_the_replay():
    agent = MISA(tiny_config(device="cuda"))
    data = dataset()
    data["rewards"][:] = np.nan
    step = make_step(agent, DeviceSource(data, B, seed=0, device="cuda"), "graph")
    with pytest.raises(NonFiniteLossError):
        step()


@pytest.mark.gpu
def test_graph_rejects_a_learning_rate_schedule():
    agent = MISA(tiny_config(device="cuda", lr_schedule="cosine"))
    with pytest.raises(ValueError, match="lr_schedule"):
        make_step(agent, DeviceSource(dataset(), B, seed=0, device="cuda"), "graph")


def test_train_cli_reports_the_backend_error(tmp_path, capsys):
    from misa_fast.cli import main

    code = main(["train", "--steps", "2", "--backend", "graph", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-tensorboard"])
    assert code == 2
    assert "--backend graph needs a CUDA device" in capsys.readouterr().err
