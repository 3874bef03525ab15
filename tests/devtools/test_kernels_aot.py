"""Every Triton kernel configuration the agent and the ops launch compiles for sm_80 and sm_90,
without a GPU, within its spill budget and the shared memory of the architecture.

``devtools/kernel_resources.py`` records the launches of the real code (each preset's MISA update,
the HMC and sampled-Q ops in every mode / precision / noise source, log-mean-exp at its callers'
sizes), specialises them with Triton's own JIT binder for each target, compiles them with the
bundled ptxas and reads the cubins. It runs in a subprocess: this process has
``TRITON_INTERPRET=1`` (set by the root conftest without a GPU), under which the kernels are
interpreter objects, not JITFunctions.

Compiling every distinct binary takes ~25 minutes on two cores, so CI compiles the ``pairwise``
scope (~3 minutes): per kernel and architecture, the binaries the presets' default agents launch
plus enough others that every pair of settings (precision x chain layout, x noise source, x tile
sizes, ...) is compiled together once. ``MISA_FAST_AOT_SCOPE=structural`` (every code path) or
``all`` (every binary: bench/results/kernels-aot-<date>.md) widens it. ``MISA_FAST_AOT_OUT=<folder>``
keeps the table there (``kernels-aot-test.{md,json}``); by default it goes to a temporary folder.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "devtools" / "kernel_resources.py"
ARCHS = (80, 90)
TIMEOUT_S = 3600  # scope "all" takes ~25 minutes on two cores


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = Path(os.environ.get("MISA_FAST_AOT_OUT") or tmp_path_factory.mktemp("kernels-aot"))
    scope = os.environ.get("MISA_FAST_AOT_SCOPE") or "pairwise"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--scope", scope, "--out", str(out), "--date", "test"]
    for arch in ARCHS:
        cmd += ["--arch", str(arch)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    path = out / "kernels-aot-test.json"
    assert path.exists(), f"no table written (exit {run.returncode}):\n{(run.stdout + run.stderr)[-5000:]}"
    table = json.loads(path.read_text())
    return run, table["rows"], table["meta"]


@pytest.mark.slow
def test_every_kernel_compiles_within_budget(table):
    run, rows, _ = table
    errors = [f"{r['kernel']} sm_{r['arch']} [{r['config']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    # budgets: DEFAULT_SPILL_BUDGET and KNOWN_SPILLS in devtools/kernel_resources.py
    over = [f"{r['kernel']} sm_{r['arch']} [{r['config']}]: {r['spill_bytes']} B > {r['spill_budget']} B"
            for r in rows if r["spill_bytes"] > r["spill_budget"]]
    assert not over, "spills above budget:\n" + "\n".join(over)
    # the script's own verdict (shared memory per architecture included)
    assert run.returncode == 0, run.stderr[-5000:]


@pytest.mark.slow
def test_every_family_and_arch_is_covered(table):
    _, rows, meta = table
    for arch in ARCHS:
        kernels = {r["kernel"] for r in rows if r["arch"] == arch}
        assert kernels == {"sq_fwd_kernel", "sq_bwd_trunk_kernel", "sq_bwd_head_kernel", "sq_bwd_mid_kernel",
                           "hmc_kernel", "lme_fwd_kernel", "lme_bwd_kernel"}, kernels
    users = set(meta["configurations"])  # every launch enumerated, compiled or represented
    # every preset environment's default agent launches the fused kernels; antmaze's three hidden
    # layers add the middle-layer gradient kernel
    for env in ("hopper", "halfcheetah", "walker2d", "ant", "antmaze", "pen", "door", "hammer", "relocate",
                "kitchen", "pendulum"):
        assert any(u.startswith(f"{env} agent") for u in users), env
        defaults = {r["kernel"] for r in rows if r["agent_default"] and any(u.startswith(f"{env} agent")
                                                                            for u in r["used_by"])}
        assert {"sq_fwd_kernel", "sq_bwd_trunk_kernel", "sq_bwd_head_kernel", "hmc_kernel"} <= defaults, env
        if env == "antmaze":
            assert "sq_bwd_mid_kernel" in defaults
    # critics beyond the presets': CORL's CQL critics, every activation, four hidden layers
    for precision in ("ieee", "tf32", "bf16"):
        assert f"corl cql 3x256 relu sampled_q {precision}" in users
    for act in ("relu", "elu", "leaky_relu", "silu", "tanh", "gelu", "gelu_tanh"):
        assert f"activation {act} 2x256 sampled_q tf32" in users
        assert f"activation {act} 2x256 hmc faithful tf32x3 noise" in users
    assert {"depth 4x256 relu sampled_q tf32", "depth 4x256 relu hmc faithful tf32x3 noise"} <= users
    for arch in ARCHS:  # every activation and every number of middle layers compiled, in both families
        for kernel in ("sq_bwd_trunk_kernel", "hmc_kernel"):
            acts = {p for r in rows if r["arch"] == arch and r["kernel"] == kernel
                    for p in r["config"].split() if p.startswith("ACT=")}
            assert acts == {f"ACT={i}" for i in range(7)}, (arch, kernel, acts)
            nmid = {p for r in rows if r["arch"] == arch and r["kernel"] == kernel
                    for p in r["config"].split() if p.startswith("NMID=")}
            assert nmid == {"NMID=0", "NMID=1", "NMID=2"}, (arch, kernel, nmid)
    for mode in ("faithful", "adaptive", "parallel"):
        for space in ("post_tanh", "pre_tanh"):
            for precision in ("ieee", "tf32", "tf32x3", "bf16"):
                for source in ("noise", "rng"):
                    assert f"halfcheetah hmc {mode} {space} {precision} {source}" in users
    # several seeds in one launch (misa-fast train --seeds): the HMC chains and the sampled-Q
    # log-partition's forward and backward kernels of every member, with their member offsets
    # (MEMBERS=1; antmaze's three hidden layers add the middle-layer kernel), on each architecture
    for arch in ARCHS:
        grouped = {r["kernel"] for r in rows if r["arch"] == arch
                   and any("seeds in one launch" in u for u in r["used_by"])}
        assert {"hmc_kernel", "sq_fwd_kernel", "sq_bwd_trunk_kernel", "sq_bwd_head_kernel",
                "sq_bwd_mid_kernel"} <= grouped, (arch, grouped)
        stacked = {r["kernel"] for r in rows if r["arch"] == arch and "MEMBERS=1" in r["config"].split()}
        assert {"sq_fwd_kernel", "sq_bwd_trunk_kernel", "sq_bwd_head_kernel", "sq_bwd_mid_kernel"} <= stacked, arch
    # both chain spaces were compiled (the SPLIT constexpr of the HMC kernel), on each architecture
    for arch in ARCHS:
        splits = {split for r in rows if r["arch"] == arch and r["kernel"] == "hmc_kernel"
                  for split in ("SPLIT=0", "SPLIT=1") if split in r["config"].split()}
        assert splits == {"SPLIT=0", "SPLIT=1"}, arch


@pytest.mark.slow
def test_matrix_instructions_match_the_precision(table):
    """ieee dots run on the FMA units, tf32 / tf32x3 dots on tf32 tensor cores, bf16 on bf16 ones;
    sm_80 has no wgmma; on sm_90 the HMC chain's two hidden-layer dots are wgmma (kernels/hmc_kernels.py
    says so), every other tensor-core kernel issues at least some."""
    _, rows, _ = table
    for r in rows:
        kinds = set(r["mma_counts"])
        if r["arch"] == 80:
            assert not any(k.startswith("wgmma") for k in kinds), r
        if r["precision"] in (None, "ieee"):
            assert not kinds, r
            continue
        operand = "bf16" if r["precision"] == "bf16" else "tf32"
        assert kinds and all(k.endswith(operand) for k in kinds), r
        if r["arch"] == 90:
            assert any(k.startswith("wgmma") for k in kinds), r
            if r["kernel"] == "hmc_kernel":  # two per hidden-to-hidden layer: forward and transposed
                nmid = int(next(p for p in r["config"].split() if p.startswith("NMID="))[5:])
                assert len(r["dots"]["wgmma"]) == 2 + 2 * nmid and "mma.sync" not in r["dots"], r
