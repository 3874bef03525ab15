"""End to end: the default `misa-fast train` on the embedded Pendulum dataset learns on a CPU.

Baseline: a uniform random policy, which is normalized score 0 by construction (Pendulum's
reference minimum is its mean return over 100 episodes; see misa_fast/data/registry.py). The
untrained policy (actions ~ 0) is evaluated too, so the test shows learning, not a lucky init.
"""
import pytest

from misa_fast.agents.algorithms import make_agent
from misa_fast.agents.misa_config import preset
from misa_fast.data import DEFAULT_DATASET, prepare
from misa_fast.training.evaluation import evaluate_policy
from misa_fast.training.loop import RunConfig, train

STEPS = 2000


@pytest.mark.slow
def test_default_run_beats_the_random_policy_within_cpu_minutes(tmp_path):
    _, info = prepare(DEFAULT_DATASET)
    untrained = make_agent(preset("pendulum").replace(obs_dim=info.obs_dim, act_dim=info.act_dim))
    before = evaluate_policy(untrained, info, episodes=10, seed=1_000_000)["mean_normalized"]

    summary = train(RunConfig(steps=STEPS, eval_every=STEPS, eval_episodes=10, out=str(tmp_path / "run"),
                              progress=False, tensorboard=False, device="cpu"))
    after = summary["last_eval"]["mean_normalized"]
    assert after > 20.0, f"normalized score {after:.1f} after {STEPS} steps (random policy: 0)"
    assert after > before + 15.0, f"untrained {before:.1f} -> trained {after:.1f}"
