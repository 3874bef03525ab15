"""What ``python -m devtools.gpu_check`` measures: one function per section, each taking the
section's context (budget, options; ``devtools.gpu_check.SectionContext``) and returning a
JSON-ready dict. A key ``_status`` in that dict overrides the section's status ("ok" by default;
"failed" when a part failed, "timeout" when a test run ran out of budget).

Not a pytest module: the functions need a CUDA device (the pytest-output parsers are the
exception, and tests/devtools/test_gpu_check.py checks them on any machine). Imports of torch, the package
and the other bench modules happen inside the functions.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional

# The tests of the fused HMC chain that feed it the reference's own noise and demand the same
# chains (tests/ops/test_hmc.py): on a CUDA host they run on CUDA tensors at fp32 dots.
EXACT_NOISE_HMC_TESTS = ("supplied_noise_reproduces_reference or per_chain_step_sizes or shapes_and_edge_cases "
                         "or support_boundary_and_init_clip or pre_tanh_shapes_and_step_bound")
# The other kernel-vs-reference tests that run on CUDA tensors on a CUDA host (not gpu-marked).
KERNEL_TEST_TARGETS = [
    "tests/ops/test_sampled_q.py",
    "tests/ops/test_log_mean_exp.py",
    "tests/ops/test_hmc.py",
    "tests/agents/test_misa_fused.py",
    "tests/agents/test_vae.py::test_importance_weighted_estimate_uses_the_fused_op",
]
# Sizes of the reference problem: B states, K samples, burn-in, leapfrog steps, hopper dims.
BATCH, SAMPLES, BURN_IN, LEAPFROG = 256, 50, 5, 2
HOPPER = (11, 3)
HMC_IMPLS = ("fused-tf32", "fused-tf32x3", "fused-ieee", "fused-bf16", "reference-eager")
SAMPLED_Q_IMPLS = ("fused-tf32", "fused-bf16", "fused-ieee", "reference-eager", "naive-eager")
STEP_CASES = {
    "faithful-K50-BI5": dict(hmc_mode="faithful", num_samples=50, hmc_burn_in=5),
    "parallel-K50-BI5": dict(hmc_mode="parallel", num_samples=50, hmc_burn_in=5),
}
# The compiled backend's first step compiles the losses and the HMC pieces (10-60 s on a 2-core
# CPU; on a GPU host inductor also compiles Triton kernels): not started with less time left.
COMPILE_ALLOWANCE_S = 60.0


# ----------------------------------------------------------------------------------------------
# pytest in a subprocess
# ----------------------------------------------------------------------------------------------
class ProcessGroup:
    """A child started in its own session; ``kill`` stops it and everything it started."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def child_env() -> Dict[str, str]:
    """The environment of the test runs: no interpreter (compiled kernels on the device), and the
    installed package rather than the checkout's source tree (PYTHONSAFEPATH, as scripts/test.sh)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONSAFEPATH"] = "1"
    return env


def parse_junit(xml_text: str) -> dict:
    """Counts and failures from pytest's JUnit XML (``--junitxml``)."""
    root = ET.fromstring(xml_text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "errors"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
            if child.tag in ("failure", "error"):
                failures.append({"test": test, "kind": child.tag, "message": (child.get("message") or "")[:500],
                                 "details": (child.text or "")[-3000:]})
        counts[outcome] += 1
    return {"counts": counts, "failures": failures}


_VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_OUTCOME_KEY = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                "XFAIL": "skipped"}


def parse_verbose_output(text: str) -> dict:
    """Counts and failures from ``pytest -v`` output: what a run cut short leaves (no JUnit file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for line in text.splitlines():
        match = _VERBOSE_LINE.match(line.strip())
        if match is None:
            continue
        key = _OUTCOME_KEY[match.group(2)]
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append({"test": match.group(1), "kind": key, "message": ""})
    return {"counts": counts, "failures": failures}


def run_pytest(ctx, selection: List[str]) -> dict:
    """``pytest <selection>`` in a subprocess within the section's budget, from the repository root."""
    junit = Path(tempfile.mkdtemp(prefix="misa-gpu-check-")) / "junit.xml"
    command = [sys.executable, "-m", "pytest", *selection, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    proc = subprocess.Popen(command, cwd=ctx.repo_root, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    group = ProcessGroup(proc)
    ctx.children.append(group)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(ctx.time_left(), 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        group.kill()
        output, _ = proc.communicate()
    finally:
        ctx.children.remove(group)
    if junit.is_file() and not timed_out:
        result = parse_junit(junit.read_text())
    else:
        result = parse_verbose_output(output or "")
    result.update(command=" ".join(command[1:]), returncode=proc.returncode, timed_out=timed_out,
                  output_tail=(output or "")[-6000:])
    ran = sum(result["counts"].values())
    if timed_out:
        result["_status"] = "timeout"
    elif proc.returncode != 0 or ran == 0:  # 5: nothing collected, also a failure here
        result["_status"] = "failed"
    return result


def gpu_tests(ctx) -> dict:
    return run_pytest(ctx, ["tests", "-m", "gpu"])


def hmc_exact(ctx) -> dict:
    return run_pytest(ctx, ["tests/ops/test_hmc.py", "-k", EXACT_NOISE_HMC_TESTS])


def kernel_tests(ctx) -> dict:
    return run_pytest(ctx, [*KERNEL_TEST_TARGETS, "-m", "not gpu and not slow", "-k", f"not ({EXACT_NOISE_HMC_TESTS})"])


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
def _git_commit(root: Path) -> Optional[str]:
    """The checked-out commit, read from .git without running git (None when not a git checkout)."""
    head = root / ".git" / "HEAD"
    if not head.is_file():
        return None
    text = head.read_text().strip()
    if not text.startswith("ref: "):
        return text
    ref = text[5:]
    loose = root / ".git" / ref
    if loose.is_file():
        return loose.read_text().strip()
    packed = root / ".git" / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    return None


def _nvidia_smi() -> Optional[dict]:
    fields = "driver_version,clocks.max.sm,power.limit,pstate"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    return dict(zip(fields.split(","), [v.strip() for v in out[0].split(",")]))


def environment(ctx) -> dict:
    import torch
    import triton

    from misa_fast.replay._native import load_extension

    props = torch.cuda.get_device_properties(0)
    device = {"name": torch.cuda.get_device_name(0), "capability": f"{props.major}{props.minor}",
              "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
              "visible_devices": torch.cuda.device_count()}
    try:
        package = importlib.metadata.version("misa-fast")
    except importlib.metadata.PackageNotFoundError:
        package = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__, "misa-fast": package}
    import misa_fast

    package_info = {"path": str(Path(misa_fast.__file__).parent), "commit": _git_commit(ctx.repo_root)}
    try:
        package_info["extension"] = str(load_extension().__file__)
    except ImportError as err:  # recorded, and the section fails, but the device is still named
        package_info["extension_error"] = str(err)
    result = {
        "device": device,
        "versions": versions,
        "nvidia_smi": _nvidia_smi(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "package": package_info,
        # Settings that change what the torch references compute (TF32 would loosen them).
        "settings": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision(),
                     **{name: os.environ.get(name) for name in ("MISA_FAST_OPS", "CUDA_VISIBLE_DEVICES",
                                                                 "TRITON_CACHE_DIR", "OMP_NUM_THREADS")}},
    }
    if ctx.planned.get("kernel_resources") is not None:
        result["compile_table"] = _start_compile_table(ctx, props.major * 10 + props.minor)
    if "extension_error" in package_info:
        result["_status"] = "failed"
    return result


# ----------------------------------------------------------------------------------------------
# the ahead-of-time compile table, computed in the background from the start of the run
# ----------------------------------------------------------------------------------------------
# A few workers and one compile per code path ("structural"): the table shares the machine with
# the timings; if that interface is absent, the plain call.
_COMPILE_TABLE_SCRIPT = """
import json, sys
sys.path.append(sys.argv[3])
from devtools.kernel_resources import compile_table
arch = int(sys.argv[1])
try:
    rows = compile_table(archs=(arch,), scope="structural", workers=4)
except TypeError:
    rows = compile_table(archs=(arch,))
with open(sys.argv[2], "w") as f:
    json.dump(rows, f, default=str)
"""


def _start_compile_table(ctx, arch: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="misa-gpu-check-")) / "compile-table.json"
    log = out.with_suffix(".log")
    log_file = open(log, "w")

    def lower_priority():  # a CPU-bound ptxas run beside host-bound timings: let them win
        os.nice(10)

    proc = subprocess.Popen([sys.executable, "-c", _COMPILE_TABLE_SCRIPT, str(arch), str(out), str(ctx.repo_root)],
                            cwd=ctx.repo_root, env=child_env(), stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lower_priority)
    group = ProcessGroup(proc)
    ctx.children.append(group)
    ctx.shared["compile_table"] = {"process": proc, "group": group, "out": out, "log": log, "log_file": log_file,
                                   "arch": arch, "started": time.monotonic()}

    def cleanup():
        group.kill()
        log_file.close()

    ctx.shared["cleanup"] = cleanup
    return {"arch": arch, "started": True}


def _collect_compile_table(ctx) -> dict:
    job = ctx.shared.get("compile_table")
    if job is None:
        return {"compile_table_error": "not started (the environment section starts it)"}
    proc = job["process"]
    try:
        proc.wait(timeout=max(ctx.time_left() - 2.0, 0.1))
    except subprocess.TimeoutExpired:
        job["group"].kill()
        proc.wait()
        return {"arch": job["arch"], "compile_table_error": f"still compiling after "
                f"{time.monotonic() - job['started']:.0f} s: stopped"}
    finally:
        job["log_file"].close()
        if job["group"] in ctx.children:
            ctx.children.remove(job["group"])
    seconds = round(time.monotonic() - job["started"], 1)
    if proc.returncode != 0 or not job["out"].is_file():
        tail = job["log"].read_text()[-3000:] if job["log"].is_file() else ""
        return {"arch": job["arch"], "compile_table_error": f"exit status {proc.returncode}: {tail}"}
    return {"arch": job["arch"], "compile_table_s": seconds, "compile_table": json.loads(job["out"].read_text())}


def _jit_cache_rows() -> List[dict]:
    """Every kernel specialisation this process compiled and loaded, with what the driver reports
    for it (triton's ``CompiledKernel.n_regs`` / ``n_spills``, spill in bytes per thread)."""
    import importlib

    from triton.runtime.jit import JITFunction

    rows = []
    for family in ("hmc", "sampled_q", "log_mean_exp"):
        module = importlib.import_module(f"misa_fast.kernels.{family}")
        for attr, fn in vars(module).items():
            if not isinstance(fn, JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for compiled in caches[0].values():
                    meta = compiled.metadata
                    rows.append({"kernel": f"{family}.{attr}", "num_warps": meta.num_warps,
                                 "num_stages": getattr(meta, "num_stages", None),
                                 "registers": getattr(compiled, "n_regs", None),
                                 "spill_bytes": getattr(compiled, "n_spills", None),
                                 "shared_kib": round(meta.shared / 1024, 1),
                                 "wgmma": "wgmma" in (compiled.asm.get("ptx", "") or "")})
    return rows


def kernel_resources(ctx) -> dict:
    result: dict = {}
    try:
        result["jit"] = _jit_cache_rows()
    except Exception as err:  # triton's cache layout is not an API: record, do not fail the rest
        result["jit_error"] = f"{type(err).__name__}: {err}"
    result.update(_collect_compile_table(ctx))
    if "jit_error" in result or "compile_table_error" in result:
        result["_status"] = "failed"
    return result


# ----------------------------------------------------------------------------------------------
# timings
# ----------------------------------------------------------------------------------------------
def cuda_event_timing(fn: Callable[[], object], *, time_left: Callable[[], float], warmup: int = 3,
                      repeats: int = 20, first_call: bool = True) -> dict:
    """Median / min milliseconds of ``fn`` between two CUDA events on the current stream (host
    launch gaps included: what a training loop pays), after ``warmup`` calls. ``first_call``: time
    the first call on its own (compilation, autotuning, allocations). Stops early, after at least
    three timed calls, when the section's time runs out."""
    import torch

    out: dict = {}
    if first_call:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out["first_call_s"] = round(time.perf_counter() - start, 3)
        warmup -= 1
    for _ in range(max(warmup, 0)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if len(times) >= 3 and time_left() < 1.0:
            break
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    out.update(median_ms=round(statistics.median(times), 4), min_ms=round(min(times), 4), repeats=len(times))
    return out


def _timed_rows(ctx, cases, run_case) -> List[dict]:
    """``run_case(case) -> dict`` for each case while the budget lasts; a failing case is recorded
    with its error and the others still run."""
    rows = []
    for case in cases:
        row = dict(case)
        if ctx.time_left() < 3.0:
            row["skipped"] = "section budget used up"
        else:
            try:
                row.update(run_case(case))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
                row["traceback"] = traceback.format_exc()
        rows.append(row)
    return rows


def op_timings(ctx) -> dict:
    import torch

    from bench.bench_ops import hmc_problem, make_critics, naive_sampled_q_lme
    from misa_fast.ops import hmc_reference as hmc_lib
    from misa_fast.ops import hmc_sample, sampled_q_log_mean_exp, sampled_q_log_mean_exp_reference

    S, A = HOPPER
    torch.manual_seed(0)
    problems = {}
    # the official post-tanh chains in both layouts, and the pre-tanh chains (its own step size)
    for name, mode, space, step in (("faithful", "faithful", "post_tanh", 0.3),
                                    ("parallel", "parallel", "post_tanh", 0.3),
                                    ("faithful-pre_tanh", "faithful", "pre_tanh", 0.7)):
        mean, std, layers, state_half, init = hmc_problem(S, A, "cuda")
        noise = hmc_lib.draw_noise(mode, BATCH, SAMPLES, BURN_IN, A, torch.Generator(device="cuda").manual_seed(0),
                                   "cuda")
        problems[name] = ((mean, std, layers, state_half, init),
                          dict(mode=mode, space=space, num_samples=SAMPLES, burn_in=BURN_IN, leapfrog_steps=LEAPFROG,
                               step_size=step, noise=noise))

    def hmc_case(case):
        args, kw = problems[case["mode"]]
        if case["impl"] == "reference-eager":
            def call():
                return hmc_lib.hmc_sample(*args, **kw)
            repeats = 5
        else:
            precision = case["impl"].split("-", 1)[1]

            def call():
                return hmc_sample(*args, precision=precision, backend="triton", **kw)
            repeats = 20
        row = cuda_event_timing(call, time_left=ctx.time_left, repeats=repeats)
        row["accept_rate"] = round(call().accept_rate.item(), 4)
        return row

    # Each implementation for both modes before the next implementation: tf32 first, as the agent runs.
    hmc_cases = [{"mode": mode, "impl": impl} for impl in HMC_IMPLS for mode in problems]
    hmc_rows = _timed_rows(ctx, hmc_cases, hmc_case)

    obs = torch.randn(BATCH, S, device="cuda")
    actions = torch.rand(BATCH, SAMPLES, A, device="cuda") * 2 - 1
    critics = make_critics(S, A, (256, 256), "cuda")  # per critic, as a plain-torch agent holds them
    stacked = [(torch.stack([c[j][0] for c in critics]).detach().requires_grad_(),
                torch.stack([c[j][1] for c in critics]).detach().requires_grad_()) for j in range(len(critics[0]))]
    stacked_params = [t for wb in stacked for t in wb]
    critic_params = [t for c in critics for wb in c for t in wb]

    def sampled_q_case(case):
        impl = case["impl"]
        if impl == "naive-eager":
            def call():
                return torch.autograd.grad(naive_sampled_q_lme(obs, actions, critics).sum(), critic_params)
        elif impl == "reference-eager":
            def call():
                return torch.autograd.grad(
                    sampled_q_log_mean_exp_reference(obs, actions, stacked, activation="elu").sum(), stacked_params)
        else:
            precision = impl.split("-", 1)[1]

            def call():  # the agent's layout: stacked twin critics
                out = sampled_q_log_mean_exp(obs, actions, stacked, precision=precision, backend="triton",
                                             activation="elu")
                return torch.autograd.grad(out.sum(), stacked_params)
        return cuda_event_timing(call, time_left=ctx.time_left)

    sampled_q_rows = _timed_rows(ctx, [{"impl": impl} for impl in SAMPLED_Q_IMPLS], sampled_q_case)
    result = {"problem": {"batch": BATCH, "samples": SAMPLES, "burn_in": BURN_IN, "leapfrog_steps": LEAPFROG,
                          "obs_dim": S, "act_dim": A, "hidden": [256, 256], "critics": 2, "hmc_noise": "supplied"},
              "hmc": hmc_rows, "sampled_q": sampled_q_rows}
    if any("error" in row for row in hmc_rows + sampled_q_rows):
        result["_status"] = "failed"
    return result


def full_step(ctx) -> dict:
    import torch

    from bench.bench_step import make_train_step

    backends = ["eager", "graph"] + ([] if ctx.quick else ["compiled"])
    cases = [{"case": name, "backend": backend} for backend in backends for name in STEP_CASES]

    def step_case(case):
        if case["backend"] == "compiled" and ctx.time_left() < COMPILE_ALLOWANCE_S:
            return {"skipped": f"compiling needs ~{COMPILE_ALLOWANCE_S:.0f} s; {ctx.time_left():.0f} s left"}
        step, first_call_s = make_train_step("hopper", "cuda", case["backend"], **STEP_CASES[case["case"]])
        try:
            row = cuda_event_timing(step, time_left=ctx.time_left, warmup=3, repeats=30, first_call=False)
        finally:
            step.close()
            del step
            torch.cuda.empty_cache()
        row["first_call_s"] = round(first_call_s, 2)
        row["steps_per_s"] = round(1000.0 / row["median_ms"], 2)
        return row

    rows = _timed_rows(ctx, cases, step_case)
    result = {"shape": "hopper", "batch": BATCH, "cases": rows}
    if any("error" in row for row in rows):
        result["_status"] = "failed"
    return result
