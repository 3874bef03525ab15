"""Training-step backends (misa_fast.training.backends): compiled and graph give eager's losses, parameters,
optimizer state and generator positions for the same seed and batches; loading state after a graph
was captured copies into the captured tensors; clear errors where a backend cannot run. The compiled
cases use a tiny config (hidden 8, K=3, burn-in 1, batch 16): compiling it takes ~15-30 s on a
2-core CPU (cold inductor cache); the graph cases need CUDA."""
import copy

import numpy as np
import pytest
import torch

from misa_fast.agents import MISA, NonFiniteLossError
from misa_fast.agents.misa_config import MISAConfig
from misa_fast.replay.sources import DeviceSource, PrefetchSource, StaticBatch
from misa_fast.training.backends import (
    BACKENDS,
    GraphStep,
    NonFiniteStepApplied,
    load_state_in_place,
    make_step,
    set_capturable,
)

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


def run_steps(backend, device, steps, source_kind="device", step_options=None, **overrides):
    agent = MISA(tiny_config(device=device, **overrides))
    source = (DeviceSource(dataset(), B, seed=7, device=device) if source_kind == "device"
              else PrefetchSource(dataset(), B, seed=7, device=device))
    step = make_step(agent, source, backend, **(step_options or {}))
    metrics = [{k: v.clone() for k, v in step().items()} for _ in range(steps)]
    return agent, metrics


def assert_same_state(agent_a, agent_b, rtol, atol):
    assert agent_a.step == agent_b.step
    for name in ("policy", "critic", "target_critic", "energy"):
        if getattr(agent_a, name) is None:
            continue
        sa, sb = getattr(agent_a, name).state_dict(), getattr(agent_b, name).state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=f"{name}.{k}")
    for name in ("log_alpha", "log_alpha_prime", "hmc_log_step_size"):
        torch.testing.assert_close(getattr(agent_a, name), getattr(agent_b, name), rtol=rtol, atol=atol, msg=name)
    for name, opt_a in agent_a.optimizers.items():
        state_a, state_b = opt_a.state_dict()["state"], agent_b.optimizers[name].state_dict()["state"]
        assert state_a.keys() == state_b.keys(), name
        for index in state_a:
            for key in state_a[index]:
                torch.testing.assert_close(state_a[index][key].float().cpu(), state_b[index][key].float().cpu(),
                                           rtol=rtol, atol=atol, msg=f"{name}[{index}].{key}")
    # The same random numbers were consumed: the generators are at the same position.
    assert torch.equal(agent_a.generator.get_state(), agent_b.generator.get_state())


def assert_same_run(a, b, rtol, atol):
    (agent_a, metrics_a), (agent_b, metrics_b) = a, b
    assert len(metrics_a) == len(metrics_b)
    for ma, mb in zip(metrics_a, metrics_b):
        assert ma.keys() == mb.keys()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=rtol, atol=atol, msg=k)
    assert_same_state(agent_a, agent_b, rtol, atol)


# ------------------------------------------------------------------------------------------ any device
def test_static_batch_refill_draws_what_next_draws():
    data = dataset()
    a, b = DeviceSource(data, B, seed=3, device="cpu"), DeviceSource(data, B, seed=3, device="cpu")
    static = b.static_batch()
    assert isinstance(static, StaticBatch)
    for _ in range(3):
        expected = next(a)
        b.refill(static)
        for k in expected:
            assert torch.equal(expected[k], static[k]), k
    with pytest.raises(TypeError, match="static_batch"):
        b.refill(next(a))


def test_unknown_backend_graph_on_cpu_and_td3_are_clear_errors():
    agent = MISA(tiny_config())
    source = DeviceSource(dataset(), B, seed=0, device="cpu")
    assert BACKENDS == ("eager", "compiled", "graph")
    with pytest.raises(ValueError, match="--backend"):
        make_step(agent, source, "fast")
    with pytest.raises(ValueError, match=r"--backend graph needs a CUDA device \(--device cuda"):
        make_step(agent, source, "graph")
    from misa_fast.agents import TD3
    from misa_fast.agents.td3_config import TD3Config

    td3 = TD3(TD3Config(obs_dim=S, act_dim=A, batch_size=B, actor_hidden=(8, 8), critic_hidden=(8, 8)))
    with pytest.raises(ValueError, match="MISA-family"):
        make_step(td3, source, "compiled")
    make_step(td3, source, "eager")()  # eager runs every learner


def test_eager_step_is_agent_update_on_the_next_batch():
    agent_a, agent_b = MISA(tiny_config()), MISA(tiny_config())
    source_a = DeviceSource(dataset(), B, seed=1, device="cpu")
    source_b = DeviceSource(dataset(), B, seed=1, device="cpu")
    step = make_step(agent_a, source_a, "eager")
    for _ in range(2):
        ma, mb = step(), agent_b.update(next(source_b))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert_same_state(agent_a, agent_b, 0, 0)


def test_train_cli_reports_the_backend_error(tmp_path, capsys):
    from misa_fast.cli import main

    code = main(["train", "--steps", "2", "--backend", "graph", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-tensorboard"])
    assert code == 2
    assert "--backend graph needs a CUDA device" in capsys.readouterr().err


def _trained(seed, steps):
    agent = MISA(tiny_config(seed=seed))
    source = DeviceSource(dataset(), B, seed=seed, device="cpu")
    for _ in range(steps):
        agent.update(next(source))
    return agent


def _state_tensors(agent):
    tensors = [agent.hmc_log_step_size, agent.log_alpha, agent.log_alpha_prime]
    tensors += [t for m in (agent.policy, agent.critic, agent.target_critic) for t in m.parameters()]
    for opt in agent.optimizers.values():
        tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return tensors


@pytest.mark.parametrize("saved_steps", [3, 0], ids=["trained", "fresh-checkpoint"])
def test_load_state_in_place_keeps_every_tensor_and_matches_load_state_dict(saved_steps):
    """What the graph backend relies on: after loading, every tensor a captured graph holds is the
    same object with the loaded values, and training continues exactly as after load_state_dict."""
    saved = copy.deepcopy(_trained(seed=5, steps=saved_steps).state_dict())
    agent = _trained(seed=0, steps=2)  # has Adam state, a different step size, generator position
    before = _state_tensors(agent)
    load_state_in_place(agent, saved)
    after = _state_tensors(agent)
    assert len(before) == len(after) and all(x is y for x, y in zip(before, after))

    reference = MISA(tiny_config(seed=0))
    reference.load_state_dict(saved)
    if saved_steps:  # (a fresh checkpoint has no Adam state: in place it is zeros, the same thing)
        assert_same_state(agent, reference, 0, 0)
    data = DeviceSource(dataset(), B, seed=9, device="cpu")
    for _ in range(2):
        batch = next(data)
        agent.update(batch)
        reference.update(batch)
    assert_same_state(agent, reference, 0, 0)


def test_eager_step_accepts_a_checkpoint_written_with_capturable_adam():
    """The graph backend saves Adam with capturable=True; on a CPU that flag cannot run."""
    saved = copy.deepcopy(_trained(seed=1, steps=1).state_dict())
    for opt_state in saved["optimizers"].values():
        for group in opt_state["param_groups"]:
            group["capturable"] = True
    agent = MISA(tiny_config())
    agent.load_state_dict(saved)
    step = make_step(agent, DeviceSource(dataset(), B, seed=0, device="cpu"), "eager")
    assert all(not g["capturable"] for opt in agent.optimizers.values() for g in opt.param_groups)
    step()
    set_capturable(agent.optimizers["critic"], False)  # idempotent


@pytest.mark.parametrize("hmc_piece", [2, 0], ids=["chain-in-pieces", "chain-unrolled"])
def test_compiled_matches_eager(hmc_piece):
    """One compile each (~15-40 s cold on 2 cores): the adaptive chain (the faithful one plus the
    step-size carry-over) with the Lagrange multiplier, i.e. every loss and state update of MISA; the
    HMC chain run in compiled pieces (as by default, here of 2) or unrolled into the loss graph."""
    overrides = {"hmc_mode": "adaptive", "lagrange": True}
    eager = run_steps("eager", "cpu", 3, **overrides)
    compiled = run_steps("compiled", "cpu", 3, step_options={"hmc_piece": hmc_piece}, **overrides)
    assert_same_run(eager, compiled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"unbiased_estimator": "snis", "lagrange": True},
                                       {"unbiased_estimator": "snis", "use_ba": False}],
                         ids=["snis-lagrange", "snis-no-ba"])
def test_compiled_matches_eager_with_the_snis_estimator(overrides):
    """unbiased_estimator=snis through torch.compile: no chain to run in pieces (the sampler is not
    wrapped), and the run is eager's."""
    eager = run_steps("eager", "cpu", 3, **overrides)
    agent = MISA(tiny_config(**overrides))
    attributes = dict(vars(agent))
    step = make_step(agent, DeviceSource(dataset(), B, seed=7, device="cpu"), "compiled")
    assert vars(agent) == attributes
    metrics = [{k: v.clone() for k, v in step().items()} for _ in range(3)]
    assert "snis_ess" in metrics[0] and not any(k.startswith("hmc_") for k in metrics[0])
    assert_same_run(eager, (agent, metrics), rtol=1e-4, atol=1e-5)


def test_graph_body_with_the_snis_estimator_is_the_eager_run():
    """What the graph backend would capture under unbiased_estimator=snis, run on a CPU."""
    overrides = {"unbiased_estimator": "snis"}
    agent = MISA(tiny_config(**overrides))
    step = _graph_body_on_cpu(agent, DeviceSource(dataset(), B, seed=7, device="cpu"))
    metrics = [{k: v.clone() for k, v in step._body().items()} for _ in range(3)]
    assert bool(step._ok) and "snis_ess_p05" in metrics[0]
    assert_same_run(run_steps("eager", "cpu", 3, **overrides), (agent, metrics), rtol=0, atol=0)


def test_compiled_step_holds_its_compiled_function_and_leaves_the_agent_alone():
    agent = MISA(tiny_config())
    attributes = dict(vars(agent))
    step = make_step(agent, DeviceSource(dataset(), B, seed=0, device="cpu"), "compiled")
    assert callable(step.losses) and vars(agent) == attributes
    # Past dynamo's default of 8 compiled configurations per function a process would silently fall
    # back to eager (a benchmark suite or a sweep compiles many).
    assert torch._dynamo.config.recompile_limit >= 64
    step.close()
    assert vars(agent) == attributes
    with pytest.raises(ValueError, match="hmc_piece must be >= 0"):
        make_step(agent, DeviceSource(dataset(), B, seed=0, device="cpu"), "compiled", hmc_piece=-1)


def _graph_body_on_cpu(agent, source, warmup=2):
    """GraphStep minus CUDA: the buffers, the undone warm-up, and the body that would be captured."""
    step = GraphStep.__new__(GraphStep)
    step._setup(agent, source, torch.device("cpu"), check_every=1)
    step._warm_up(warmup)
    return step


def test_graph_body_after_the_undone_warm_up_is_the_eager_run():
    """What the graph backend captures and replays, run eagerly on a CPU: the warm-up leaves no
    trace (parameters, Adam, generators, counters) and the body draws the batches and the noise
    that eager would, so the run is eager's, bit for bit."""
    overrides = {"hmc_mode": "adaptive", "lagrange": True}
    agent = MISA(tiny_config(**overrides))
    step = _graph_body_on_cpu(agent, DeviceSource(dataset(), B, seed=7, device="cpu"))
    assert agent.step == 0 and step.sample_in_graph
    metrics = [{k: v.clone() for k, v in step._body().items()} for _ in range(3)]
    assert bool(step._ok)
    assert_same_run(run_steps("eager", "cpu", 3, **overrides), (agent, metrics), rtol=0, atol=0)


def test_graph_finite_flag_is_sticky_and_reported_after_the_step():
    data = dataset()
    data["rewards"][:] = np.nan
    agent = MISA(tiny_config())
    step = _graph_body_on_cpu(agent, DeviceSource(data, B, seed=0, device="cpu"))
    assert bool(step._ok)  # the warm-up's NaNs were forgotten with its state
    step.metrics = step._body()
    assert not bool(step._ok)
    with pytest.raises(NonFiniteLossError, match="already been applied") as info:
        step.check()
    assert isinstance(info.value, NonFiniteStepApplied) and info.value.applied
    assert info.value.term in step.metrics


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{}, {"hmc_mode": "adaptive", "lagrange": True}, {"hmc_mode": "parallel"},
                                       {"energy_bound": "cql", "use_hmc": False}, {"use_hmc": False},
                                       {"energy_network": "separate"},
                                       {"hmc_mode": "adaptive", "hmc_space": "pre_tanh"},
                                       {"unbiased_estimator": "snis"}],
                         ids=["faithful", "adaptive-lagrange", "parallel", "cql", "no-hmc", "misa-t",
                              "adaptive-pre-tanh", "snis"])
def test_graph_matches_eager_on_cuda(overrides):
    eager = run_steps("eager", "cuda", 5, **overrides)
    graph = run_steps("graph", "cuda", 5, **overrides)
    assert_same_run(eager, graph, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_graph_with_the_prefetcher_matches_eager_on_cuda():
    eager = run_steps("eager", "cuda", 4, source_kind="prefetch")
    graph = run_steps("graph", "cuda", 4, source_kind="prefetch")
    assert_same_run(eager, graph, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_graph_load_state_dict_after_capture_replays_from_the_loaded_state():
    agent = MISA(tiny_config(device="cuda"))
    source = DeviceSource(dataset(), B, seed=7, device="cuda")
    step = make_step(agent, source, "graph")
    for _ in range(2):
        step()
    saved_agent, saved_source = copy.deepcopy(agent.state_dict()), copy.deepcopy(source.state_dict())
    first = [{k: v.clone() for k, v in step().items()} for _ in range(3)]
    after_first = copy.deepcopy(agent.state_dict())
    step.load_state_dict(saved_agent, saved_source)
    assert agent.step == 2
    second = [{k: v.clone() for k, v in step().items()} for _ in range(3)]
    for ma, mb in zip(first, second):
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-6, atol=1e-6, msg=k)
    reloaded = MISA(tiny_config(device="cuda"))
    reloaded.load_state_dict(after_first)
    assert_same_state(agent, reloaded, 1e-6, 1e-6)


@pytest.mark.gpu
def test_graph_reports_a_non_finite_step_after_the_replay():
    agent = MISA(tiny_config(device="cuda"))
    data = dataset()
    data["rewards"][:] = np.nan
    step = make_step(agent, DeviceSource(data, B, seed=0, device="cuda"), "graph")
    with pytest.raises(NonFiniteLossError) as info:
        step()
    assert isinstance(info.value, NonFiniteStepApplied) and info.value.applied
    assert agent.step == 1  # applied: the graph backend cannot stop a captured step


@pytest.mark.gpu
def test_graph_rejects_a_learning_rate_schedule():
    agent = MISA(tiny_config(device="cuda", lr_schedule="cosine"))
    with pytest.raises(ValueError, match="lr_schedule"):
        make_step(agent, DeviceSource(dataset(), B, seed=0, device="cuda"), "graph")


# ------------------------------------------------------------------------------------------ bench/report
def test_report_compares_each_backend_with_eager_of_the_same_parameters(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "summarize.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    entries = [("eager", "K50", 0.200), ("compiled", "K50", 0.100), ("eager", "K5", 0.040), ("compiled", "K5", 0.020),
               ("graph", "K5", 0.004)]
    results = tmp_path / "step.json"
    results.write_text(json.dumps({"benchmarks": [
        {"name": f"test_train_step[{k}-{backend}]", "group": "step-cpu-hopper", "stats": {"median": median},
         "params": {"backend": backend, "k": k}, "extra_info": {"device": "cpu"}}
        for backend, k, median in entries]}))
    assert report.main([str(results), "--png", str(tmp_path / "chart.png")]) == 0
    out = capsys.readouterr().out
    assert "speed-up over eager with the same parameters" in out
    assert "| test_train_step[K50-compiled] | cpu | 100.000 | 10.0 | 27.8 h | 2.00x |" in out
    assert "| test_train_step[K5-graph] | cpu | 4.000 | 250.0 | 1.1 h | 10.00x |" in out
    assert "| test_train_step[K50-eager] | cpu | 200.000 | 5.0 | 55.6 h | 1.00x |" in out
