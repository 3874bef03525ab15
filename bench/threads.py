"""How many intra-op threads should a CPU training step use? Times one full training step (batch
from the prefetcher, as ``misa-fast train`` runs on CPU) for each preset's network sizes and K, with
1 thread, 2 threads and every core, on an idle machine and with one core taken by another process
(a single-threaded busy loop: a browser tab, a second sweep trial, finetune's environment).

    python -m bench.threads --out bench/results/threads-cpu-<n>core-<date>.json
    python -m bench.threads --cases pendulum-misa --threads 1 2 --loads idle busy   # a subset

Each measurement runs in a fresh process (OpenMP reads its settings once), sets the thread count
with ``torch.set_num_threads`` and ``OMP_NUM_THREADS``, warms up, then times steps until
``--steps`` steps or ``--seconds`` seconds, whichever comes first (a thrashing configuration can
take seconds per step). ``passive`` adds the variant with ``OMP_WAIT_POLICY=PASSIVE`` (threads
sleep at barriers instead of spinning). Not collected by pytest: a measurement, not a test.
The rule ``misa_fast.training.runtime.default_threads`` applies was chosen from this file's results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# case -> (algo, preset, obs_dim, act_dim): each preset's network sizes and K at a dataset's shapes.
CASES = {
    "pendulum-misa": ("misa", "pendulum", 3, 1),  # the embedded default (K=10; 64x64 until 2026-12-03)
    "locomotion-misa": ("misa", "locomotion", 11, 3),  # 256x256, K=50 (hopper)
    "antmaze-misa": ("misa", "antmaze", 29, 8),  # critics 3x256, K=50
    "adroit-misa": ("misa", "adroit", 45, 24),  # 256x256, K=50 (pen)
    "kitchen-misa": ("misa", "kitchen", 59, 9),  # 256x256, K=50
    "locomotion-td3bc": ("td3bc", "locomotion", 11, 3),  # 256x256, no sampling
}


def busy_loop() -> subprocess.Popen:
    """One single-threaded process that keeps a core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure_one(case: str, threads: int, steps: int, seconds: float) -> dict:
    """Runs in the measuring process: median seconds per training step."""
    import numpy as np
    import torch

    from misa_fast.agents import algorithms as algos
    from misa_fast.replay.sources import make_source
    from misa_fast.training.backends import make_step
    from misa_fast.training.runtime import tune_host_allocator

    tune_host_allocator()
    torch.set_num_threads(threads)
    algo, preset_name, obs_dim, act_dim = CASES[case]
    cfg = algos.build_config(algo, preset_name, seed=0, device="cpu", obs_dim=obs_dim, act_dim=act_dim)
    agent = algos.make_agent(cfg)
    rng = np.random.default_rng(0)
    rows = 20_000
    data = {"observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-0.99, 0.99, size=(rows, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=rows).astype(np.float32),
            "next_observations": rng.normal(size=(rows, obs_dim)).astype(np.float32),
            "terminals": (rng.random(rows) < 0.01).astype(np.float32)}
    source = make_source("prefetch", data, cfg.batch_size, 0, "cpu")
    step = make_step(agent, source, "eager")
    try:
        for _ in range(2):
            step()
        times = []
        deadline = time.perf_counter() + seconds
        while len(times) < steps and (len(times) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        source.close()
    return {"case": case, "algo": algo, "preset": preset_name, "obs_dim": obs_dim, "act_dim": act_dim,
            "hidden": list(getattr(cfg, "critic_hidden", ())), "num_samples": getattr(cfg, "num_samples", None)
            if algo != "td3bc" else None, "threads": torch.get_num_threads(), "steps_timed": len(times),
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def run_measurement(case: str, threads: int, load: str, passive: bool, steps: int, seconds: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, "-m", "bench.threads", "--measure-one", case, "--threads", str(threads),
           "--steps", str(steps), "--seconds", str(seconds)]
    spinner = busy_loop() if load == "busy" else None
    try:
        time.sleep(0.2 if spinner else 0)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{case} threads={threads} {load}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(load=load, wait_policy="passive" if passive else "default")
    return result


def summarize(results: list) -> str:
    """A Markdown table: one row per case and load, one column per thread setting (median ms)."""
    settings = sorted({(r["threads"], r["wait_policy"]) for r in results})
    names = [f"{t} thr" + (" passive" if w == "passive" else "") for t, w in settings]
    lines = ["| case | load | " + " | ".join(names) + " | best |", "|---|---|" + "---:|" * (len(names) + 1)]
    for case in dict.fromkeys(r["case"] for r in results):
        for load in dict.fromkeys(r["load"] for r in results if r["case"] == case):
            by = {(r["threads"], r["wait_policy"]): r["median_ms"] for r in results
                  if r["case"] == case and r["load"] == load}
            cells = [f"{by[s]:.1f}" if s in by else "" for s in settings]
            best = names[settings.index(min(by, key=by.get))]
            lines.append(f"| {case} | {load} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", nargs="+", type=int, default=sorted({1, 2, cores}),
                   help="intra-op thread counts (default: 1, 2 and every core: %(default)s)")
    p.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    p.add_argument("--passive", action="store_true", help="also time OMP_WAIT_POLICY=PASSIVE for >1 thread")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (at most)")
    p.add_argument("--seconds", type=float, default=8.0, help="time budget per measurement (at least 3 steps)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--measure-one", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure_one(args.measure_one, args.threads[0], args.steps, args.seconds)))
        return 0

    results = []
    for case in args.cases:
        for load in args.loads:
            for threads in args.threads:
                for passive in ([False, True] if args.passive and threads > 1 else [False]):
                    r = run_measurement(case, threads, load, passive, args.steps, args.seconds)
                    results.append(r)
                    print(f"{case:18s} {load:4s} threads={threads} {r['wait_policy']:7s} "
                          f"{r['median_ms']:8.1f} ms/step ({r['steps_timed']} steps)", flush=True)
    table = summarize(results)
    print(table)
    if args.out:
        import torch

        doc = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": cores,
               "processor": platform.processor(), "torch": torch.__version__,
               "command": "python -m bench.threads " + " ".join(argv if argv is not None else sys.argv[1:]),
               "busy_load": "one single-threaded busy-loop process", "results": results, "table": table}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
