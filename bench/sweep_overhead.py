"""Ray Tune's overhead for misa-fast sweep on this machine: the same 6 trials (embedded Pendulum
dataset, misa and td3bc, seeds 0-2, 2000 steps, an evaluation of 10 episodes every 500) run
  1. as one sweep, 2 trials at a time (--cpus-per-trial 1 on a 2-CPU Ray instance),
  2. by hand, one `misa-fast train --threads 1` after the other,
  3. as one sweep, 1 trial at a time (--max-concurrent 1): Ray's cost alone, no parallelism.
Wall times of one run each, written to <--out>/overhead.json, with the sweep's report beside it.

    python -m bench.sweep_overhead [--work /tmp/sweep-measure] [--out bench/results/sweep-pendulum-<date>]
    python -m bench.sweep_overhead --only-parallel-sweep --json overhead-rerun.json
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--steps", "2000", "--eval-every", "500"]
ALGOS, SEEDS = ("misa", "td3bc"), (0, 1, 2)


def timed(cmd, env):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if "train" in cmd else None)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/sweep-measure")
    p.add_argument("--skip-serial-sweep", action="store_true")
    p.add_argument("--only-parallel-sweep", action="store_true", help="phase 1 only (no report written)")
    p.add_argument("--json", default="overhead.json")
    p.add_argument("--out", default=f"bench/results/sweep-pendulum-{time.strftime('%Y-%m-%d')}",
                   help="folder for the JSON and the sweep's report")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    exe = [sys.executable, "-m", "misa_fast.cli"]
    result = {"machine": f"{os.cpu_count()} CPUs", "loadavg_start": os.getloadavg(), "steps": 2000,
              "eval_every": 500, "eval_episodes": 10, "algos": ALGOS, "seeds": SEEDS}
    sweep = [*exe, "sweep", "--algos", *ALGOS, "--seeds", "0-2", *COMMON, "--cpus-per-trial", "1",
             "--num-cpus", "2", "--progress-every", "30"]
    result["sweep_2_at_a_time_s"] = timed([*sweep, "--out", str(work / "sweep")], env)
    trials = {}
    for t in json.loads((work / "sweep" / "sweep.json").read_text())["trials"]:
        a = json.loads((Path(t["out"]) / "trial.json").read_text())["attempts"][-1]
        trials[t["label"]] = round(a["ended"] - a["started"], 1)
    result["sweep_2_at_a_time_trial_s"] = trials
    if args.only_parallel_sweep:
        result["loadavg_end"] = os.getloadavg()
        (out / args.json).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    runs = {}
    for algo in ALGOS:
        for seed in SEEDS:
            runs[f"{algo}-seed{seed}"] = timed([*exe, "train", "--algo", algo, "--seed", str(seed), *COMMON,
                                                "--threads", "1", "--no-progress", "--out",
                                                str(work / "by-hand" / f"{algo}-seed{seed}")], env)
    result["by_hand_runs_s"] = runs
    result["by_hand_sequential_s"] = sum(runs.values())
    if not args.skip_serial_sweep:
        result["sweep_1_at_a_time_s"] = timed([*sweep, "--max-concurrent", "1", "--no-progress",
                                               "--out", str(work / "sweep-serial")], env)
    result["loadavg_end"] = os.getloadavg()
    result["sweep_over_by_hand"] = result["sweep_2_at_a_time_s"] / result["by_hand_sequential_s"]
    if "sweep_1_at_a_time_s" in result:
        result["serial_sweep_over_by_hand"] = result["sweep_1_at_a_time_s"] / result["by_hand_sequential_s"]
    (out / args.json).write_text(json.dumps(result, indent=2))
    subprocess.run([*exe, "report", str(work / "sweep"), "--out", str(out)], check=True, env=env)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
