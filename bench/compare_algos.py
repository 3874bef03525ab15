"""Every algorithm at equal steps on the same data: normalized score mean +- std over seeds, steps/s.

    python -m bench.compare_algos --datasets ../shared/data/hopper-medium-local.hdf5 \\
        ../shared/data/hopper-medium-replay-local.hdf5 --seeds 0 1 2 --steps 1000 --jobs 2

Each run is one ``misa-fast train`` process (``--jobs`` at a time, each given its share of the
cores with ``--threads``: one each by default on two cores) writing to
``--runs/<dataset>/<algo>/seed<k>``; finished runs (a ``summary.json``) are not run again, so a killed
comparison continues where it stopped. The results go to ``--out`` (default
``bench/results/compare-<device>-<date>``): ``.json`` (every run), ``.md`` (the table) and ``.png``.
The paper-layout tables (last and best evaluation, domain totals) and learning curves of the same
runs: ``misa-fast report <--runs>``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from misa_fast.agents.algorithms import ALGORITHMS
from misa_fast.training.runtime import available_cpus


def run_one(dataset: str, algo: str, seed: int, args, run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        family_sets = args.misa_set if ALGORITHMS[algo].family == "misa" else args.td3_set
        cmd = [sys.executable, "-m", "misa_fast.cli", "train", "--dataset", dataset, "--algo", algo,
               "--seed", str(seed), "--steps", str(args.steps), "--eval-every", str(args.steps),
               "--eval-episodes", str(args.eval_episodes), "--device", args.device, "--out", str(run_dir),
               "--no-progress", "--no-tensorboard", "--resume"]
        for assignment in family_sets:
            cmd += ["--set", assignment]
        cmd += ["--threads", str(args.threads)]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            return {"dataset": dataset, "algo": algo, "seed": seed, "error": f"exit {done.returncode}, see "
                    f"{run_dir / 'stdout.log'}"}
    summary = json.loads(summary_path.read_text())
    with open(run_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = summary["last_eval"] or {}
    return {"dataset": dataset, "algo": algo, "seed": seed, "steps": summary["steps"],
            "normalized": last.get("mean_normalized"), "return": last.get("mean_return"),
            "steps_per_s": float(rows[-1]["steps_per_s"]) if rows and rows[-1].get("steps_per_s") else None}


def table(results: list, datasets: list, algos: list) -> str:
    names = [Path(d).stem for d in datasets]
    lines = ["| algo | " + " | ".join(f"{n} score | {n} steps/s" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for algo in algos:
        cells = []
        for dataset in datasets:
            runs = [r for r in results
                    if r["algo"] == algo and r["dataset"] == dataset and r.get("normalized") is not None]
            if not runs:
                cells += ["failed", "-"]
                continue
            scores = [r["normalized"] for r in runs]
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            speeds = [r["steps_per_s"] for r in runs if r["steps_per_s"]]
            cells += [f"{statistics.mean(scores):.1f} ± {std:.1f} (n={len(scores)})",
                      f"{statistics.median(speeds):.1f}" if speeds else "-"]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list, datasets: list, algos: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(algos) * len(datasets)), 4))
    width = 0.8 / len(datasets)
    for i, dataset in enumerate(datasets):
        means, stds = [], []
        for algo in algos:
            scores = [r["normalized"] for r in results
                      if r["algo"] == algo and r["dataset"] == dataset and r.get("normalized") is not None]
            means.append(np.mean(scores) if scores else np.nan)
            stds.append(np.std(scores, ddof=1) if len(scores) > 1 else 0.0)
        ax.bar(np.arange(len(algos)) + i * width, means, width, yerr=stds, capsize=3, label=Path(dataset).stem)
    ax.set_xticks(np.arange(len(algos)) + width * (len(datasets) - 1) / 2, algos, rotation=30, ha="right")
    ax.set_ylabel("normalized score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, help="intra-op threads per run (default: each run's share of the "
                                               "cores this process may use, at least 1)")
    p.add_argument("--misa-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--set for the MISA-family algorithms (e.g. num_samples=10)")
    p.add_argument("--td3-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--set for TD3+BC and SPOT (e.g. vae_steps=5000)")
    p.add_argument("--runs", default="runs/compare")
    p.add_argument("--out", help="output prefix (default: bench/results/compare-<device>-<date>)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, available_cpus() // args.jobs)

    jobs = [(d, a, s) for d in args.datasets for a in args.algos for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, d, a, s, args, Path(args.runs) / Path(d).stem / a / f"seed{s}")
                   for d, a, s in jobs]
        results = []
        for (d, a, s), fut in zip(jobs, futures):
            results.append(fut.result())
            r = results[-1]
            print(f"{Path(d).stem} {a} seed {s}: " + (r["error"] if "error" in r else
                  f"score {r['normalized']:.1f}, {r['steps_per_s'] or float('nan'):.1f} steps/s"), flush=True)

    out = Path(args.out or f"bench/results/compare-{args.device}-{datetime.date.today().isoformat()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "seeds": args.seeds, "eval_episodes": args.eval_episodes, "device": args.device,
            "jobs": args.jobs, "threads": args.threads, "misa_set": args.misa_set, "td3_set": args.td3_set,
            "command": " ".join(["python -m bench.compare_algos", *(argv if argv is not None else sys.argv[1:])])}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    text = table(results, args.datasets, args.algos)
    out.with_suffix(".md").write_text(text + "\n")
    plot(results, args.datasets, args.algos, out.with_suffix(".png"))
    print(text)
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
