"""devtools/gpu_check.py, the parts that need no GPU: arguments and the section plan, the runner's
bookkeeping (budgets, the deadline, a failure recorded with its traceback while the rest runs),
the JSON writer, the summary, the parsers of the pytest runs, and that without a GPU the command
says so and fails (``--help`` still works)."""
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", ROOT / "devtools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_bench_module("gpu_check")


@pytest.fixture(scope="module")
def sections():
    return load_bench_module("gpu_check_sections")


def command_env():
    """``python -m bench...`` must find bench/ in the current directory: no safe path."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    return env


# ----------------------------------------------------------------------------------------------
# arguments
def test_default_and_quick_plans(gpu_check):
    default = gpu_check.plan(gpu_check.parse_args([]))
    assert list(default) == list(gpu_check.SECTION_NAMES)
    assert default == {s.name: s.budget_s for s in gpu_check.SECTIONS}
    # The budgets fit the deadline with the time kept for writing the results.
    assert sum(default.values()) <= gpu_check.DEFAULT_DEADLINE_S - gpu_check.FINISH_RESERVE_S
    assert gpu_check.DEFAULT_DEADLINE_S < 8 * 60
    quick = gpu_check.plan(gpu_check.parse_args(["--quick"]))
    assert quick["kernel_tests"] is None and quick["gpu_tests"] < default["gpu_tests"]


def test_only_skip_and_budget_options(gpu_check):
    args = gpu_check.parse_args(["--only", "op_timings,full_step", "--budget", "full_step=200", "--out", "/tmp/x"])
    planned = gpu_check.plan(args)
    assert {name for name, budget in planned.items() if budget is not None} == {"environment", "op_timings",
                                                                                "full_step"}
    assert planned["full_step"] == 200.0 and args.out == Path("/tmp/x")
    assert gpu_check.skip_reason(args, "gpu_tests") == "not in --only"
    args = gpu_check.parse_args(["--skip", "gpu_tests", "--quick", "--budget", "kernel_tests=30"])
    planned = gpu_check.plan(args)
    assert planned["gpu_tests"] is None and gpu_check.skip_reason(args, "gpu_tests") == "--skip"
    assert planned["kernel_tests"] == 30.0  # an explicit budget brings a --quick-less section back


@pytest.mark.parametrize("argv", [["--only", "bogus"], ["--skip", "environment"], ["--budget", "nope=3"],
                                  ["--budget", "full_step=-1"], ["--budget", "full_step"], ["--deadline", "2"]])
def test_bad_arguments_exit_with_usage(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the runner
def fake_functions(calls, failing=()):
    def make(name):
        def section(ctx):
            calls.append((name, ctx.budget_s))
            assert ctx.time_left() <= ctx.budget_s
            if name in failing:
                raise RuntimeError(f"{name} exploded")
            if name == "environment":
                return {"device": {"name": "Fake GPU 9000", "capability": "90", "memory_gib": 141.0}}
            if name == "op_timings":
                return {"_status": "failed", "hmc": [{"mode": "faithful", "impl": "fused-tf32", "error": "x"}]}
            return {"value": name}
        return section

    return {name: make(name) for name in ("environment", "gpu_tests", "hmc_exact", "kernel_tests", "op_timings",
                                          "full_step", "kernel_resources")}


def test_runner_records_a_failure_with_its_traceback_and_runs_the_rest(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--quick", "--out", str(tmp_path)])
    run = gpu_check.Run(args, ["--quick"])
    calls = []
    gpu_check.run_sections(run, fake_functions(calls, failing={"gpu_tests"}), time.monotonic() + 1000,
                           gpu_check.plan(args))
    run.finish()
    assert [name for name, _ in calls] == ["environment", "gpu_tests", "hmc_exact", "op_timings", "full_step",
                                           "kernel_resources"]
    doc = json.loads(run.path.read_text())
    assert run.path.name == f"gpu-check-fake-gpu-9000-{datetime.date.today().isoformat()}.json"
    assert doc["schema"] == gpu_check.SCHEMA and doc["complete"] and doc["device"]["name"] == "Fake GPU 9000"
    failed = doc["sections"]["gpu_tests"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: gpu_tests exploded"
    assert "Traceback" in failed["traceback"] and "gpu_tests exploded" in failed["traceback"]
    assert doc["sections"]["hmc_exact"] == {"budget_s": 30.0, "status": "ok", "result": {"value": "hmc_exact"},
                                            "elapsed_s": 0.0}
    assert doc["sections"]["kernel_tests"] == {"status": "skipped", "reason": "not run under --quick"}
    assert doc["sections"]["op_timings"]["status"] == "failed"  # a section may report its own failure
    assert gpu_check.exit_status(doc) == gpu_check.EXIT_FAILED
    doc["sections"] = {k: v for k, v in doc["sections"].items() if k not in ("gpu_tests", "op_timings")}
    assert gpu_check.exit_status(doc) == gpu_check.EXIT_OK


def test_runner_keeps_sections_inside_the_deadline(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    run = gpu_check.Run(args, [])
    calls = []
    deadline = time.monotonic() + gpu_check.FINISH_RESERVE_S + 10.0
    gpu_check.run_sections(run, fake_functions(calls), deadline, gpu_check.plan(args))
    assert calls and all(budget <= 10.0 for _, budget in calls)  # budgets clipped to the time left
    calls.clear()
    run = gpu_check.Run(args, [])
    gpu_check.run_sections(run, fake_functions(calls), time.monotonic() + 1.0, gpu_check.plan(args))
    assert calls == []  # too little time for any section: each recorded as skipped
    assert all(entry["status"] == "skipped" and entry["reason"].startswith("overall deadline")
               for entry in run.doc["sections"].values())


def test_abort_records_the_interrupted_section_and_kills_children(gpu_check, tmp_path):
    run = gpu_check.Run(gpu_check.parse_args(["--out", str(tmp_path)]), [])
    killed = []
    run.children.append(SimpleNamespace(kill=lambda: killed.append(True)))
    run.current = ("full_step", SimpleNamespace(started=time.monotonic() - 2.0, budget_s=110.0))
    run.abort("overall deadline of 450 s reached")
    doc = json.loads(run.path.read_text())
    assert killed == [True]
    assert doc["sections"]["full_step"]["status"] == "timeout" and doc["aborted"].startswith("overall deadline")
    assert doc["sections"]["full_step"]["budget_s"] == 110.0 and doc["sections"]["full_step"]["elapsed_s"] >= 2.0
    assert not doc["complete"] and run.path.name.startswith("gpu-check-unknown-device-")


# ----------------------------------------------------------------------------------------------
# output
def test_json_writer_is_atomic_and_names_are_stable(gpu_check, tmp_path):
    assert gpu_check.device_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.device_slug("  ") == "unknown-device"
    day = datetime.date(2026, 12, 2)
    first = gpu_check.result_path(tmp_path / "out", "NVIDIA H200", day)
    assert first == tmp_path / "out" / "gpu-check-nvidia-h200-2026-12-02.json"
    gpu_check.write_json_atomic(first, {"a": 1})  # creates the directory
    gpu_check.write_json_atomic(first, {"a": 2, "path": Path("/x")})  # overwrites; non-JSON types as text
    assert json.loads(first.read_text()) == {"a": 2, "path": "/x"}
    assert gpu_check.result_path(tmp_path / "out", "NVIDIA H200", day).name == "gpu-check-nvidia-h200-2026-12-02-2.json"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name]  # no temporary file left behind
    with pytest.raises(TypeError):
        gpu_check.write_json_atomic(first, {1j: 1})  # a key JSON cannot hold: fails before anything is written
    assert json.loads(first.read_text()) == {"a": 2, "path": "/x"}  # the previous document survives
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name]


def fake_document():
    return {
        "schema": "misa-fast/gpu-check/1", "wall_s": 401.2,
        "device": {"name": "NVIDIA H200", "capability": "90", "memory_gib": 139.8},
        "sections": {
            "environment": {"status": "ok", "elapsed_s": 2.0, "budget_s": 20,
                            "result": {"versions": {"torch": "2.13.0", "triton": "3.7.1"}}},
            "gpu_tests": {"status": "failed", "elapsed_s": 88.0, "budget_s": 150, "result": {
                "counts": {"passed": 16, "failed": 1, "errors": 0, "skipped": 0},
                "failures": [{"test": "tests.test_backends::test_graph_matches_eager_on_cuda[o0]",
                              "message": "AssertionError: 0.1 != 0.2"}]}},
            "hmc_exact": {"status": "timeout", "elapsed_s": 45.0, "budget_s": 45, "result": {
                "counts": {"passed": 7, "failed": 0, "errors": 0, "skipped": 0}, "failures": [], "timed_out": True}},
            "kernel_tests": {"status": "skipped", "reason": "not run under --quick"},
            "op_timings": {"status": "ok", "elapsed_s": 30.0, "budget_s": 50, "result": {
                "hmc": [{"mode": "faithful", "impl": "fused-tf32", "median_ms": 1.234, "first_call_s": 9.5}],
                "sampled_q": [{"impl": "fused-bf16", "median_ms": 0.456, "first_call_s": 2.0}]}},
            "full_step": {"status": "ok", "elapsed_s": 100.0, "budget_s": 110, "result": {"cases": [
                {"case": "faithful-K50-BI5", "backend": "graph", "median_ms": 4.0, "steps_per_s": 250.0,
                 "first_call_s": 3.1},
                {"case": "faithful-K50-BI5", "backend": "compiled", "skipped": "compiling needs ~60 s; 20 s left"},
                {"case": "parallel-K50-BI5", "backend": "eager", "error": "RuntimeError: CUDA error"}]}},
            "kernel_resources": {"status": "failed", "elapsed_s": 1.0, "budget_s": 15, "result": {
                "jit": [{"kernel": "hmc._hmc_kernel", "num_warps": 8, "registers": 232, "spill_bytes": 0,
                         "shared_kib": 120.5}],
                "compile_table_error": "ImportError: cannot import name 'compile_table'"}},
        },
    }


def test_summary_of_a_results_document(gpu_check):
    text = gpu_check.format_summary(fake_document(), Path("bench/results/gpu-check-nvidia-h200-2026-12-02.json"))
    for expected in [
        "misa-fast gpu check: NVIDIA H200 (sm_90, 140 GiB)",
        "torch 2.13.0, triton 3.7.1",
        "gpu_tests         failed    88 / 150 s",
        "kernel_tests      skipped   - / - s        not run under --quick",
        "kernel_resources  failed    1 / 15 s       see below",
        "gpu_tests: 16 passed, 1 failed, 0 errors, 0 skipped",
        "FAILED tests.test_backends::test_graph_matches_eager_on_cuda[o0]: AssertionError: 0.1 != 0.2",
        "hmc_exact: 7 passed, 0 failed, 0 errors, 0 skipped (TIMED OUT: partial)",
        "hmc_sample faithful  fused-tf32          1.234 ms   first 9.5 s",
        "sampled-Q fwd+bwd fused-bf16            0.456 ms",
        "faithful-K50-BI5     graph        250.0 steps/s  (4.00 ms)  first 3.1 s",
        "faithful-K50-BI5     compiled  skipped: compiling needs ~60 s; 20 s left",
        "parallel-K50-BI5     eager     FAILED: RuntimeError: CUDA error",
        "hmc._hmc_kernel              warps=8 regs=232 spills=0 smem=120.5",
        "compile table: ImportError: cannot import name 'compile_table'",
        "results: bench/results/gpu-check-nvidia-h200-2026-12-02.json",
    ]:
        assert expected in text, expected
    assert "misa-fast gpu check: unknown device" in gpu_check.format_summary({})  # nothing ran: no crash


# ----------------------------------------------------------------------------------------------
# the pytest runs
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="1" tests="5"><testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok2[x]" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">long text</failure>
</testcase><testcase classname="tests.test_b" name="test_err"><error message="fixture broke">tb</error></testcase>
<testcase classname="tests.test_b" name="test_skip"><skipped message="needs a CUDA device"/></testcase>
</testsuite></testsuites>"""


def test_junit_and_verbose_parsers(sections):
    parsed = sections.parse_junit(JUNIT)
    assert parsed["counts"] == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    assert [(f["test"], f["kind"], f["message"]) for f in parsed["failures"]] == [
        ("tests.test_a::test_bad", "failure", "assert 1 == 2"), ("tests.test_b::test_err", "error", "fixture broke")]
    verbose = ("tests/test_a.py::test_ok PASSED      [ 20%]\n"
               "tests/test_a.py::test_bad[p-1] FAILED  [ 40%]\n"
               "tests/test_b.py::test_skip SKIPPED (needs a CUDA device) [ 60%]\n"
               "some other line\n")
    parsed = sections.parse_verbose_output(verbose)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert parsed["failures"] == [{"test": "tests/test_a.py::test_bad[p-1]", "kind": "failed", "message": ""}]


def test_run_pytest_end_to_end_on_a_cpu_suite(sections):
    ctx = SimpleNamespace(repo_root=ROOT, children=[], time_left=lambda: 300.0)
    result = sections.run_pytest(ctx, ["tests/bench/test_summarize.py"])
    assert result["counts"]["passed"] >= 1 and result["counts"]["failed"] == 0, result["output_tail"]
    assert "_status" not in result and result["returncode"] == 0 and not result["timed_out"]
    assert ctx.children == []
    result = sections.run_pytest(ctx, ["tests/bench/test_summarize.py", "-k", "no_such_test"])
    assert result["_status"] == "failed"  # nothing ran: not a pass


def test_exact_noise_selection_is_the_supplied_noise_hmc_tests(sections):
    env = sections.child_env()
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/ops/test_hmc.py", "-k", sections.EXACT_NOISE_HMC_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    names = {i.split("::")[1].split("[")[0] for i in ids}
    assert names == {"test_supplied_noise_reproduces_reference", "test_per_chain_step_sizes",
                     "test_shapes_and_edge_cases", "test_support_boundary_and_init_clip",
                     "test_pre_tanh_supplied_noise_reproduces_reference",
                     "test_pre_tanh_shapes_and_step_bound"}, out.stdout[-2000:]


# ----------------------------------------------------------------------------------------------
# the command
def test_help_documents_the_run():
    out = subprocess.run([sys.executable, "-m", "devtools.gpu_check", "--help"], cwd=ROOT, env=command_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("--quick", "--only", "--skip", "--out", "--deadline", "gpu-check-<device>-<date>.json", "gpu_tests",
                 "hmc_exact", "op_timings", "full_step", "kernel_resources", "Exit status"):
        assert word in out.stdout, word


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch missing")
def test_without_a_cuda_device_the_command_fails_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = subprocess.run([sys.executable, "-m", "devtools.gpu_check", "--quick"], cwd=ROOT, env=command_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and out.stdout == ""
