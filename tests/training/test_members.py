"""Several seeds in one process: each member equals the single run with its seed, writes an ordinary
run directory, resumes bit-identically after kill -9, and stops alone on a non-finite loss."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from misa_fast.agents import algorithms as algos
from misa_fast.agents import members
from misa_fast.agents.config_base import apply_overrides
from misa_fast.data import DEFAULT_DATASET, prepare
from misa_fast.replay.sources import make_source
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.evaluation import evaluate_policy
from misa_fast.training.loop import RunConfig, train

TINY = ("policy_hidden=32,32", "critic_hidden=32,32", "num_samples=4", "batch_size=32", "hmc_burn_in=1")
TINY_BY_FAMILY = {"misa": TINY, "td3": ("actor_hidden=32,32", "critic_hidden=32,32", "batch_size=32"),
                  "weighted": ("actor_hidden=32,32", "critic_hidden=32,32", "value_hidden=32,32", "batch_size=32")}
SEEDS = (0, 3, 7)


@pytest.fixture(scope="module")
def data():
    return prepare(DEFAULT_DATASET, obs_norm="none")


@pytest.fixture(scope="module")
def data_with_next_actions():
    return prepare(DEFAULT_DATASET, obs_norm="none", next_actions=True)


def make(algo, seed, info, extra=()):
    cfg = algos.build_config(algo, "pendulum", info.name, seed=seed, device="cpu", obs_dim=info.obs_dim,
                             act_dim=info.act_dim)
    tiny = () if algo in ("td3bc", "spot") else TINY_BY_FAMILY[algos.get(algo).family]
    return algos.make_agent(apply_overrides(cfg, tiny + tuple(extra)))


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every tensor of two parameter dicts."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def parameters(state: dict) -> dict:
    return {f"{part}.{k}": v for part in ("policy", "critic") if state.get(part) is not None
            for k, v in state[part].items()}


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]), ("5", [5]),
                                         (" 0-2, 10 ", [0, 1, 2, 10])])
def test_seeds_are_parsed(text, seeds):
    assert members.parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [("", "empty"), ("a", "not a seed"), ("4-1", "ends before it starts"),
                                           ("0,0", "appears twice"), ("-1", "not a seed"), ("0-100000", "more than")])
def test_bad_seeds_are_a_clear_error(text, message):
    with pytest.raises(ValueError, match=f"--seeds: .*{message}"):
        members.parse_seeds(text)


def test_bad_seeds_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "misa_fast.cli", "train", "--seeds", "3-1", "--out", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert result.returncode == 2
    assert "--seeds: the range '3-1' ends before it starts" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("algo, extra", [("misa", ()), ("misa", ("unbiased_estimator=snis",)), ("misa-t", ()),
                                         ("cql", ()), ("td3bc", ()), ("spot", ("vae_steps=5",)), ("edac", ()),
                                         ("sac-n", ()), ("rebrac", ()), ("bc", ()), ("awac", ()), ("onestep", ()),
                                         ("iql", ())])
def test_each_member_equals_the_single_run_with_its_seed(data, data_with_next_actions, algo, extra):
    """Every learner family, and each algorithm with its own data needs (ReBRAC's and OneStep's next
    actions come from the device-resident source: the C++ buffer holds the five transition fields)."""
    arrays, info = data_with_next_actions if algo in ("rebrac", "onestep") else data
    singles = [make(algo, s, info, extra) for s in SEEDS]
    group = [make(algo, s, info, extra) for s in SEEDS]
    for agent in singles + group:
        if getattr(agent, "needs_pretraining", False):
            source = make_source("auto", arrays, agent.config.batch_size, agent.config.seed, "cpu")
            agent.pretrain_vae(source, progress=False)
            source.close()
    stacked = members.stack_agents(group)
    for m, agent in enumerate(singles):  # the members start from the single runs' initial networks
        assert relative_difference(parameters(members.member_state_dicts(stacked)[m]),
                                   parameters(agent.state_dict())) == 0.0
    single_sources = [make_source("auto", arrays, singles[0].config.batch_size, s, "cpu") for s in SEEDS]
    group_sources = [make_source("auto", arrays, singles[0].config.batch_size, s, "cpu") for s in SEEDS]
    try:
        for step in range(20):
            single_metrics = [a.update(next(s)) for a, s in zip(singles, single_sources)]
            group_metrics = stacked.update(members.stack_tree([next(s) for s in group_sources]))
            states = members.member_state_dicts(stacked)
            if step == 0:  # losses, gradients and parameters of the first update: fp32 rounding
                for m, (agent, metrics) in enumerate(zip(singles, single_metrics)):
                    for name, value in metrics.items():
                        torch.testing.assert_close(group_metrics[name][m], value, rtol=1e-5, atol=1e-6,
                                                   equal_nan=True, msg=name)
                    stacked_params = dict(members._state_tensors(stacked))
                    for path, param in members._state_tensors(agent).items():
                        if getattr(param, "grad", None) is not None:
                            torch.testing.assert_close(stacked_params[path].grad[m], param.grad, rtol=1e-4,
                                                       atol=1e-6, msg=path)
                    assert relative_difference(parameters(states[m]), parameters(agent.state_dict())) < 1e-6
        for m, agent in enumerate(singles):
            assert relative_difference(parameters(states[m]), parameters(agent.state_dict())) < 1e-4
            assert states[m]["step"] == agent.step == 20
            # The member's state is a single run's: it loads into an agent of that seed.
            clone = make(algo, SEEDS[m], info, extra)
            clone.load_state_dict(states[m])
            assert torch.equal(clone.generator.get_state(), agent.generator.get_state())
    finally:
        for source in single_sources + group_sources:
            source.close()


def test_identical_parameters_give_identical_evaluation_returns(data):
    _, info = data
    single = make("misa", 3, info)
    stacked = members.stack_agents([make("misa", s, info) for s in SEEDS])
    member = make("misa", 3, info)
    member.policy.load_state_dict(members.member_state_dicts(stacked)[1]["policy"])
    a = evaluate_policy(single, info, 2, seed=3 + 1_000_000)
    b = evaluate_policy(member, info, 2, seed=3 + 1_000_000)
    assert a == b


def tiny_group(out, steps, seeds="0,3", **kw):
    base = dict(steps=steps, out=str(out), seeds=seeds, eval_every=steps, eval_episodes=1, log_every=10,
                checkpoint_every=10, overrides=TINY, progress=False, tensorboard=False, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_members_write_ordinary_run_directories_that_every_command_reads(tmp_path):
    out = tmp_path / "group"
    summary = train(tiny_group(out, 20, eval_every=10))
    assert summary["seeds"] == [0, 3] and len(summary["members"]) == 2
    for seed in (0, 3):
        run = out / f"seed{seed}"
        for name in ("config.json", "progress.csv", "checkpoint.pt", "policy.pt2", "learning_curve.png",
                     "summary.json"):
            assert (run / name).exists(), f"seed{seed}/{name}"
        state = ckpt.load(run / ckpt.CHECKPOINT_NAME)
        assert state["run"]["seed"] == seed and state["agent_config"]["seed"] == seed
        assert state["run"]["out"] == str(run) and state["run"]["seeds"] is None
        rows = list(csv.DictReader(open(run / "progress.csv")))
        assert [int(r["step"]) for r in rows] == [10, 20] and rows[-1]["eval_return"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "misa_fast.cli", *map(str, args)], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "return" in cli("eval", "--checkpoint", out / "seed3", "--episodes", "1")
    # A member directory resumes as the single run it is.
    cli("train", "--out", out / "seed3", "--resume", "--steps", "30", "--no-progress", "--no-tensorboard",
        "--eval-every", "30", "--eval-episodes", "1")
    assert ckpt.load(out / "seed3" / ckpt.CHECKPOINT_NAME)["step"] == 30
    cli("finetune", "--checkpoint", out / "seed0", "--out", tmp_path / "ft", "--steps", "20", "--eval-every", "20",
        "--eval-episodes", "1", "--no-progress", "--no-tensorboard", "--start-updates-after", "10")
    cli("report", out, "--out", tmp_path / "report")
    assert "(n=2)" in (tmp_path / "report" / "report.md").read_text()  # one cell over the two seeds


def test_kill_9_then_resume_is_bit_identical_for_the_group(tmp_path):
    args = ["--steps", "200", "--seeds", "0,3", "--eval-every", "200", "--eval-episodes", "1",
            "--checkpoint-every", "10", "--log-every", "10", "--device", "cpu", "--no-progress", "--no-tensorboard"]
    args += [x for kv in TINY for x in ("--set", kv)]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "misa_fast.cli", "train"]
    full = subprocess.run(command + args + ["--out", str(tmp_path / "full")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(command + args + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        paths = [out / f"seed{s}" / ckpt.CHECKPOINT_NAME for s in (0, 3)]
        if all(p.exists() for p in paths) and min(ckpt.load(p)["step"] for p in paths) >= 30:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = {ckpt.load(out / f"seed{s}" / ckpt.CHECKPOINT_NAME)["step"] for s in (0, 3)}
    if len(killed_at) > 1:  # killed between the two members' writes: resume reports it
        pytest.skip(f"killed between the members' checkpoint writes ({killed_at})")
    assert 30 <= min(killed_at) < 200
    result = subprocess.run(command + args + ["--out", str(out), "--resume"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    for seed in (0, 3):
        a = ckpt.load(tmp_path / "full" / f"seed{seed}" / ckpt.CHECKPOINT_NAME)
        b = ckpt.load(out / f"seed{seed}" / ckpt.CHECKPOINT_NAME)
        assert a["step"] == b["step"] == 200
        for part in ("policy", "critic", "target_critic"):
            for k in a["agent"][part]:
                assert torch.equal(a["agent"][part][k], b["agent"][part][k]), f"seed{seed} {part}.{k}"
        steps = [int(r["step"]) for r in csv.DictReader(open(out / f"seed{seed}" / "progress.csv"))]
        assert steps == list(range(10, 201, 10))


def test_a_non_finite_member_stops_alone(tmp_path):
    out = tmp_path / "group"
    train(tiny_group(out, 20, seeds="0,3,7"))
    # Seed 3's checkpoint now holds a critic that returns inf: its next loss is non-finite.
    path = out / "seed3" / ckpt.CHECKPOINT_NAME
    state = ckpt.load(path)
    weights = [k for k in state["agent"]["critic"] if k.startswith("weights")]
    state["agent"]["critic"][weights[-1]].fill_(float("inf"))
    ckpt.save_atomic(state, path)
    poisoned = ckpt.load(path)
    summary = train(tiny_group(out, 40, seeds="0,3,7", resume=True))
    stopped = {m["out"]: m for m in summary["members"]}[str(out / "seed3")]["stopped"]
    assert stopped["step"] == 21 and "critic" in stopped["term"]
    record = json.loads((out / "seed3" / "summary.json").read_text())
    assert record["stopped"]["step"] == 21
    kept = ckpt.load(path)  # its last good checkpoint (the one it started this session from) is untouched
    assert kept["step"] == 20
    assert torch.equal(kept["agent"]["policy"]["net.0.weight"], poisoned["agent"]["policy"]["net.0.weight"])
    for seed in (0, 7):  # the others went on, and equal what they would have been without seed 3
        assert ckpt.load(out / f"seed{seed}" / ckpt.CHECKPOINT_NAME)["step"] == 40
    train(tiny_group(tmp_path / "pair", 40, seeds="0,7"))
    for seed in (0, 7):
        a = ckpt.load(out / f"seed{seed}" / ckpt.CHECKPOINT_NAME)["agent"]
        b = ckpt.load(tmp_path / "pair" / f"seed{seed}" / ckpt.CHECKPOINT_NAME)["agent"]
        assert relative_difference(parameters(a), parameters(b)) < 1e-4
    # Resuming the group again leaves the stopped seed alone.
    summary = train(tiny_group(out, 50, seeds="0,3,7", resume=True))
    assert [Path(m["out"]).name for m in summary["members"]] == ["seed0", "seed7"]


def test_one_progress_bar_shows_each_members_score(tmp_path, capsys):
    train(tiny_group(tmp_path / "g", 10, progress=True))
    err = capsys.readouterr().err
    assert "seeds 0,3" in err and "scores 0:" in err and " 3:" in err


def test_compiled_backend_trains_a_group_as_eager_does(tmp_path):
    # One compiled graph of the whole member vmap (a cold compile: about a minute on two cores).
    summary = train(tiny_group(tmp_path / "compiled", 10, backend="compiled"))
    assert all(m["last_eval"] is not None for m in summary["members"])
    train(tiny_group(tmp_path / "eager", 10))
    for seed in (0, 3):
        a = ckpt.load(tmp_path / "compiled" / f"seed{seed}" / ckpt.CHECKPOINT_NAME)["agent"]
        b = ckpt.load(tmp_path / "eager" / f"seed{seed}" / ckpt.CHECKPOINT_NAME)["agent"]
        assert relative_difference(parameters(a), parameters(b)) < 1e-3


def test_graph_backend_with_several_seeds_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--backend graph captures one seed"):
        train(tiny_group(tmp_path / "g", 10, backend="graph"))
