"""--matmul-precision auto and --backend auto: what each decides, and that config.json records it."""
import json

import pytest
import torch

from misa_fast.training import loop, runtime
from misa_fast.training.loop import RunConfig, resolve_automatic_options


@pytest.mark.parametrize("bfloat16, device, expected", [(True, "cpu", "medium"), (False, "cpu", "highest"),
                                                        (True, "cuda", "highest")])
def test_auto_precision_is_medium_only_on_a_cpu_with_bfloat16_products(monkeypatch, bfloat16, device, expected):
    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: bfloat16)
    assert runtime.resolve_matmul_precision("auto", device) == expected
    assert runtime.resolve_matmul_precision("high", device) == "high"  # a named precision is kept
    with pytest.raises(ValueError, match="--matmul-precision"):
        runtime.resolve_matmul_precision("low", device)


def test_the_precision_block_resolves_auto_and_restores_the_callers_setting(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: True)
    before = torch.get_float32_matmul_precision()
    with runtime.matmul_precision("auto", "cpu") as name:
        assert name == "medium" == torch.get_float32_matmul_precision()
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("algo, steps, grouped, compiler, expected", [
    ("misa", 3000, False, True, "compiled"),   # the embedded dataset's run
    ("cql", 1_000_000, False, True, "compiled"),
    ("misa", 1999, False, True, "eager"),     # too short to pay back the compile
    ("misa", 3000, True, True, "eager"),      # a group compiles its whole chain: minutes
    ("td3bc", 3000, False, True, "eager"),    # only the MISA learner has a compiled step
    ("iql", 3000, False, True, "eager"),
    ("misa", 3000, False, False, "eager"),    # no C++ compiler for inductor
])
def test_auto_backend(monkeypatch, algo, steps, grouped, compiler, expected):
    monkeypatch.setattr(loop, "_has_cpp_compiler", lambda: compiler)
    run = resolve_automatic_options(RunConfig(algo=algo, steps=steps, device="cpu"), grouped=grouped)
    assert run.backend == expected
    assert run.matmul_precision in ("highest", "medium")
    chosen = resolve_automatic_options(RunConfig(algo=algo, steps=steps, device="cpu", backend="eager",
                                                 matmul_precision="high"), grouped=grouped)
    assert (chosen.backend, chosen.matmul_precision) == ("eager", "high")  # what a user names is kept


def test_config_json_records_what_auto_decided(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: True)
    run = RunConfig(steps=4, eval_every=4, eval_episodes=1, out=str(tmp_path / "run"), device="cpu", progress=False,
                    tensorboard=False, overrides=("policy_hidden=8,8", "critic_hidden=8,8", "num_samples=2",
                                                  "batch_size=8", "hmc_burn_in=1"))
    loop.train(run)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert (recorded["backend"], recorded["matmul_precision"]) == ("eager", "medium")
