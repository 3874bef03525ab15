"""The first minutes on a GPU, as one command: correctness, timings and kernel resources of
misa-fast on one CUDA device, written to one JSON file and summarised on stdout.

    python -m devtools.gpu_check                    # everything, under 8 minutes on one H100/H200
    python -m devtools.gpu_check --quick            # shorter budgets, no compiled backend (~4 minutes)
    python -m devtools.gpu_check --only op_timings,full_step --out /tmp/check
    python -m devtools.gpu_check --skip gpu_tests --budget full_step=200 --deadline 600

Run it from the root of a checkout whose package is installed with its extension built (``pip
install -e .`` or ``pip install .``); it needs no network. Output:
``<out>/gpu-check-<device>-<date>.json`` (default ``bench/results``; ``-2``, ``-3``, ... when the
name is taken), rewritten after every section, so an interrupted run keeps what it measured.

Sections, in order, each with its own time budget (seconds; ``--quick`` budgets in brackets), each
run under try/except so that a failure is recorded with its traceback and the rest still runs:

- ``environment`` (20 [20]): Python, torch, CUDA, Triton and misa-fast versions, the device, and the
  settings that change results (TF32 matmul flags, ``MISA_FAST_OPS``). Always runs.
- ``gpu_tests`` (150 [90]): ``pytest tests -m gpu`` in a subprocess (JUnit XML: pass/fail counts,
  the failing tests and their messages).
- ``hmc_exact`` (45 [30]): the exact-noise tests of the fused HMC chain against the reference
  (``tests/ops/test_hmc.py``, supplied noise) on CUDA tensors.
- ``kernel_tests`` (50 [skipped]): the other kernel-vs-reference tests (sampled-Q, log-mean-exp,
  the agent's fused update, SPOT's density) on CUDA tensors, with the tolerances of
  ``misa_fast.ops.testing.dot_tolerance``.
- ``op_timings`` (50 [30]): CUDA-event medians of ``hmc_sample`` (faithful and parallel, every dot
  precision, B=256, K=50, burn-in 5, hopper shapes, supplied noise) and of the sampled-Q
  log-mean-exp forward+backward (every precision, twin 256-256 critics), beside the torch
  references.
- ``full_step`` (110 [60]): steps/s of one full training update (``bench/bench_step.py``'s
  construction) for the reference cases, faithful K=50 burn-in 5 and parallel K=50, hopper shapes,
  backends eager, graph and compiled (compiled only when enough budget is left for its first-step
  compile; never under ``--quick``), plus each case's first-call seconds.
- ``kernel_resources`` (15 [15]): registers, spills and shared memory of the Triton kernels as
  compiled on this device (read from the JIT caches of the kernels the sections above launched),
  and ``devtools.kernel_resources.compile_table`` for the device's architecture, computed in a
  background process from the start of the run.

A watchdog enforces ``--deadline`` (default 450 s from the start of the process): it records the
section it interrupts as timed out, writes the JSON, prints the summary and exits with status 3.
Exit status: 0 all selected sections passed; 1 a section failed or ran out of time; 2 bad
arguments or no CUDA device; 3 the overall deadline was hit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

PROCESS_START = time.monotonic()  # the deadline counts from here: imports and CUDA start-up included
REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "misa-fast/gpu-check/1"
DEFAULT_DEADLINE_S = 450.0  # 7.5 minutes: the check must finish in under 8
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# Time kept back from the deadline for writing the JSON and the summary after the last section.
FINISH_RESERVE_S = 5.0
# A section that would get less than this is skipped instead of started.
MIN_SECTION_S = 3.0


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: float
    quick_budget_s: Optional[float]  # None: not run under --quick
    description: str


SECTIONS = (
    Section("environment", 20, 20, "versions, device and result-changing settings"),
    Section("gpu_tests", 150, 90, "pytest tests -m gpu"),
    Section("hmc_exact", 45, 30, "exact-noise HMC kernel tests on CUDA tensors"),
    Section("kernel_tests", 50, None, "kernel-vs-reference tests on CUDA tensors"),
    Section("op_timings", 50, 30, "hmc_sample and sampled-Q forward+backward, CUDA events"),
    Section("full_step", 110, 60, "steps/s of the reference cases, eager / graph / compiled"),
    Section("kernel_resources", 15, 15, "registers / spills / shared memory of the kernels"),
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)
ALWAYS_RUN = ("environment",)  # names the output file and records what ran where

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# arguments and plan
# ----------------------------------------------------------------------------------------------
def _section_list(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTION_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; sections: {', '.join(SECTION_NAMES)}")
    return names


def _budget(text: str):
    name, sep, value = text.partition("=")
    if not sep or name.strip() not in SECTION_NAMES:
        raise argparse.ArgumentTypeError(f"expected SECTION=SECONDS with SECTION one of {', '.join(SECTION_NAMES)}, "
                                         f"got {text!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad seconds in {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a budget must be > 0 seconds, got {text!r}")
    return name.strip(), seconds


def build_parser() -> argparse.ArgumentParser:
    sections = "\n".join(f"  {s.name:17s} {s.budget_s:4.0f} s "
                         f"({f'--quick {s.quick_budget_s:.0f} s' if s.quick_budget_s else 'not under --quick'})"
                         f"  {s.description}" for s in SECTIONS)
    p = argparse.ArgumentParser(
        prog="python -m devtools.gpu_check",
        description="Correctness, timings and kernel resources of misa-fast on one CUDA device, in one "
                    "JSON file (<out>/gpu-check-<device>-<date>.json) plus a printed summary. Run from the "
                    "root of a checkout with the package installed (extension built); no network needed.",
        epilog=f"sections (default budget, --quick budget, what):\n{sections}\n\n"
               "Each section runs under try/except (a failure is recorded with its traceback) within its "
               "budget; a watchdog stops the run at --deadline. Exit status: 0 all passed, 1 a section "
               "failed or timed out, 2 bad arguments or no CUDA device, 3 overall deadline hit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="shorter budgets; skips kernel_tests and the compiled backend")
    p.add_argument("--only", type=_section_list, metavar="A,B",
                   help="run only these sections (environment always runs)")
    p.add_argument("--skip", type=_section_list, default=[], metavar="A,B", help="do not run these sections")
    p.add_argument("--budget", type=_budget, action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's budget (repeatable)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                   help=f"hard limit for the whole run, from process start (default {DEFAULT_DEADLINE_S:.0f})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="directory of the JSON file (default bench/results)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ALWAYS_RUN:
        if name in args.skip:
            build_parser().error(f"--skip {name}: that section always runs")
    if args.deadline <= FINISH_RESERVE_S + MIN_SECTION_S:
        build_parser().error(f"--deadline must exceed {FINISH_RESERVE_S + MIN_SECTION_S:.0f} seconds")
    return args


def plan(args: argparse.Namespace) -> Dict[str, Optional[float]]:
    """Section name -> budget in seconds, in run order; None: not run (its reason is in ``skip_reason``)."""
    overrides = dict(args.budget)
    out: Dict[str, Optional[float]] = {}
    for s in SECTIONS:
        budget = s.quick_budget_s if args.quick else s.budget_s
        selected = s.name in ALWAYS_RUN or ((args.only is None or s.name in args.only) and s.name not in args.skip)
        if not selected or (budget is None and s.name not in overrides):
            out[s.name] = None
        else:
            out[s.name] = overrides.get(s.name, budget)
    return out


def skip_reason(args: argparse.Namespace, name: str) -> str:
    if args.only is not None and name not in args.only:
        return "not in --only"
    if name in args.skip:
        return "--skip"
    return "not run under --quick"


# ----------------------------------------------------------------------------------------------
# running sections
# ----------------------------------------------------------------------------------------------
@dataclass
class SectionContext:
    """What a section function gets: its budget, the run's options, a place for state that
    outlives the section (e.g. a background process a later section collects; a callable under
    ``shared["cleanup"]`` runs after the last section) and the list of subprocesses the watchdog
    kills at the deadline (append to ``children`` what you start)."""

    name: str
    budget_s: float
    quick: bool
    repo_root: Path
    planned: Mapping[str, Optional[float]]
    shared: dict
    children: list
    started: float = field(default_factory=time.monotonic)

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


class Run:
    """The results document and how it reaches the disk: ``record`` after every section, the
    watchdog's ``abort`` at the deadline. One lock: the watchdog may fire mid-section."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]):
        self.args = args
        self.lock = threading.RLock()
        self.path: Optional[Path] = None
        self.current: Optional[tuple] = None  # (name, SectionContext) of the section running now
        self.children: list = []  # subprocesses to stop at the deadline (objects with .kill())
        self.doc = {
            "schema": SCHEMA,
            "started_at": _utc_now(),
            "argv": list(argv),
            "options": {"quick": args.quick, "only": args.only, "skip": args.skip, "deadline_s": args.deadline,
                        "budgets": {k: v for k, v in plan(args).items()}},
            "device": None,
            "sections": {},
            "complete": False,
        }

    def record(self, name: str, entry: dict) -> None:
        with self.lock:
            self.doc["sections"][name] = entry
            if name == "environment":
                self.doc["device"] = (entry.get("result") or {}).get("device")
            self._write()

    def finish(self) -> None:
        with self.lock:
            self.doc["complete"] = True
            self._write()

    def abort(self, reason: str) -> None:
        with self.lock:
            for child in list(self.children):
                try:
                    child.kill()
                except Exception:
                    pass
            if self.current is not None:
                name, ctx = self.current
                self.doc["sections"][name] = {"status": "timeout", "reason": reason,
                                              "elapsed_s": round(time.monotonic() - ctx.started, 1),
                                              "budget_s": round(ctx.budget_s, 1)}
            self.doc["aborted"] = reason
            self._write()

    def _write(self) -> None:
        self.doc["finished_at"] = _utc_now()
        self.doc["wall_s"] = round(time.monotonic() - PROCESS_START, 1)
        if self.path is None:
            device = self.doc.get("device") or {}
            self.path = result_path(self.args.out, device.get("name", "unknown-device"))
        write_json_atomic(self.path, self.doc)


def run_sections(run: Run, functions: Mapping[str, Callable[[SectionContext], dict]], deadline: float,
                 planned: Mapping[str, Optional[float]]) -> None:
    """Run each planned section with ``functions[name](context)`` within its budget and before
    ``deadline`` (a ``time.monotonic()`` value), recording status, timing and result or traceback."""
    shared: dict = {}
    for name, budget in planned.items():
        if budget is None:
            run.record(name, {"status": "skipped", "reason": skip_reason(run.args, name)})
            continue
        available = deadline - FINISH_RESERVE_S - time.monotonic()
        if available < MIN_SECTION_S:
            run.record(name, {"status": "skipped", "reason": f"overall deadline: {max(available, 0):.0f} s left",
                              "budget_s": budget})
            continue
        effective = min(budget, available)
        ctx = SectionContext(name, effective, run.args.quick, REPO_ROOT, planned, shared, run.children)
        with run.lock:
            run.current = (name, ctx)
        entry = {"budget_s": round(effective, 1)}
        try:
            result = functions[name](ctx)
            entry.update(status=result.pop("_status", "ok"), result=result)
        except Exception as err:
            entry.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        entry["elapsed_s"] = round(time.monotonic() - ctx.started, 1)
        with run.lock:
            run.current = None
            run.record(name, entry)
    cleanup = shared.get("cleanup")
    if cleanup is not None:
        cleanup()


def exit_status(doc: Mapping) -> int:
    statuses = [s.get("status") for s in doc.get("sections", {}).values()]
    return EXIT_OK if all(s in ("ok", "skipped") for s in statuses) else EXIT_FAILED


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200"; anything but letters and digits becomes one dash."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def result_path(out_dir: Path, device_name: str, date: Optional[datetime.date] = None) -> Path:
    """``out_dir/gpu-check-<device>-<date>.json``, or with ``-2``, ``-3``, ... when that exists (a
    rerun the same day keeps the first run's file)."""
    date = date or datetime.date.today()
    stem = f"gpu-check-{device_slug(device_name)}-{date.isoformat()}"
    path = Path(out_dir) / f"{stem}.json"
    n = 2
    while path.exists():
        path = Path(out_dir) / f"{stem}-{n}.json"
        n += 1
    return path


def write_json_atomic(path: Path, doc: Mapping) -> None:
    """Write ``doc`` so that ``path`` always holds a complete document (misa_fast.training.checkpoint's
    temporary file + rename); values JSON cannot hold are written as text."""
    from misa_fast.training.checkpoint import write_atomic

    text = json.dumps(doc, indent=1, default=str) + "\n"  # serialised first: a bad document writes nothing
    write_atomic(path, lambda f: f.write(text.encode()))


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_summary(doc: Mapping, path: Optional[Path] = None) -> str:
    """A plain-text report of a results document (tolerates any section missing or failed)."""
    lines = []
    device = doc.get("device") or {}
    env = (doc.get("sections", {}).get("environment") or {}).get("result") or {}
    lines.append(f"misa-fast gpu check: {device.get('name', 'unknown device')} "
                 f"(sm_{device.get('capability', '?')}, {_fmt(device.get('memory_gib'), '.0f')} GiB)")
    versions = env.get("versions") or {}
    if versions:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"  wall {_fmt(doc.get('wall_s'), '.0f')} s"
                 + (f"; ABORTED: {doc['aborted']}" if doc.get("aborted") else ""))
    lines.append("")
    lines.append("  section           status    time / budget")
    for name in SECTION_NAMES:
        entry = doc.get("sections", {}).get(name)
        if entry is None:
            continue
        status = entry.get("status", "?")
        timing = f"{_fmt(entry.get('elapsed_s'), '.0f')} / {_fmt(entry.get('budget_s'), '.0f')} s"
        note = entry.get("reason") or entry.get("error") or ("see below" if status in ("failed", "timeout") else "")
        lines.append(f"  {name:17s} {status:9s} {timing:14s} {note}".rstrip())
    sections = doc.get("sections", {})
    for name in ("gpu_tests", "hmc_exact", "kernel_tests"):
        result = (sections.get(name) or {}).get("result") or {}
        if "counts" in result:
            c = result["counts"]
            lines.append("")
            lines.append(f"{name}: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
                         f"{c.get('errors', 0)} errors, {c.get('skipped', 0)} skipped"
                         + (" (TIMED OUT: partial)" if result.get("timed_out") else ""))
            for failure in result.get("failures", [])[:20]:
                lines.append(f"  FAILED {failure['test']}: {failure.get('message', '')[:160]}")
    timings = (sections.get("op_timings") or {}).get("result") or {}
    if timings.get("hmc") or timings.get("sampled_q"):
        lines.append("")
        lines.append("op timings (CUDA events, median ms; first call s):")
        for row in timings.get("hmc", []):
            lines.append(f"  hmc_sample {row['mode']:9s} {row['impl']:15s} {_fmt(row.get('median_ms'), '9.3f')} ms"
                         f"   first {_fmt(row.get('first_call_s'), '.1f')} s")
        for row in timings.get("sampled_q", []):
            lines.append(f"  sampled-Q fwd+bwd {row['impl']:17s} {_fmt(row.get('median_ms'), '9.3f')} ms"
                         f"   first {_fmt(row.get('first_call_s'), '.1f')} s")
    steps = (sections.get("full_step") or {}).get("result") or {}
    if steps.get("cases"):
        lines.append("")
        lines.append("full step, hopper shapes, B=256 (steps/s; first call s):")
        for row in steps["cases"]:
            if row.get("skipped"):
                lines.append(f"  {row['case']:20s} {row['backend']:9s} skipped: {row['skipped']}")
            elif row.get("error"):
                lines.append(f"  {row['case']:20s} {row['backend']:9s} FAILED: {row['error'][:120]}")
            else:
                lines.append(f"  {row['case']:20s} {row['backend']:9s} {_fmt(row.get('steps_per_s'), '8.1f')} steps/s"
                             f"  ({_fmt(row.get('median_ms'), '.2f')} ms)"
                             f"  first {_fmt(row.get('first_call_s'), '.1f')} s")
    resources = (sections.get("kernel_resources") or {}).get("result") or {}
    if resources.get("jit"):
        lines.append("")
        lines.append("kernels as compiled on this device (registers, spill bytes, shared KiB):")
        for row in resources["jit"]:
            lines.append(f"  {row['kernel']:28s} warps={_fmt(row.get('num_warps'), 'd')} "
                         f"regs={_fmt(row.get('registers'), 'd')} spills={_fmt(row.get('spill_bytes'), 'd')} "
                         f"smem={_fmt(row.get('shared_kib'), '.1f')}")
    if resources.get("compile_table_error"):
        lines.append(f"  compile table: {resources['compile_table_error'][:160]}")
    elif resources.get("compile_table"):
        lines.append(f"  compile table (devtools.kernel_resources, sm_{resources.get('arch', '?')}): "
                     f"{len(resources['compile_table'])} rows in the JSON")
    if path is not None:
        lines.append("")
        lines.append(f"results: {path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _prefer_installed_package() -> None:
    """``python -m`` puts the current directory first on sys.path, so a checkout's ``misa_fast/``
    would shadow the installed package (whose compiled extension a non-editable install keeps in
    site-packages only). Move it to the end: ``bench`` is still found there, ``misa_fast`` first
    where it is installed (an editable install maps back to this checkout itself)."""
    checkout = {"", ".", os.getcwd(), str(REPO_ROOT)}
    sys.path[:] = [entry for entry in sys.path if entry not in checkout] + [str(REPO_ROOT)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    deadline = PROCESS_START + args.deadline
    # Kernels must compile for the device, not run in the interpreter (set before they are imported).
    interpreter_was_set = os.environ.pop("TRITON_INTERPRET", None)
    _prefer_installed_package()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs one GPU. "
              "The CPU parts of misa-fast are covered by the test suite.", file=sys.stderr)
        return EXIT_USAGE
    import importlib

    sections = importlib.import_module("devtools.gpu_check_sections")
    run = Run(args, argv)
    if interpreter_was_set is not None:
        run.doc["warnings"] = [f"TRITON_INTERPRET={interpreter_was_set} was set: removed for this run"]

    def on_deadline():
        run.abort(f"overall deadline of {args.deadline:.0f} s reached")
        print(format_summary(run.doc, run.path), flush=True)
        os._exit(EXIT_DEADLINE)

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), on_deadline)
    watchdog.daemon = True
    watchdog.start()
    functions = {name: getattr(sections, name) for name in SECTION_NAMES}
    run_sections(run, functions, deadline, plan(args))
    watchdog.cancel()
    run.finish()
    print(format_summary(run.doc, run.path))
    return exit_status(run.doc)


if __name__ == "__main__":
    sys.exit(main())
