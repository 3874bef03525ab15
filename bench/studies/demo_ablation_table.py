"""The ablation table of the demo study: one row per sweep trial group (sweep folder x trial column),
the mean over seeds of the normalized score at chosen steps, the lowest score from the third
evaluation on, and the critics' log-mean-exp gap at the last logged step.

    python bench/studies/demo_ablation_table.py SWEEPS_ROOT   # folders made by bench/studies/demo_ablation.sh
    python bench/studies/demo_ablation_table.py --long SWEEPS_ROOT   # the docs' curves (5 seeds, 9,000 steps)

``--long``: per trial column (finished runs), the mean ± std over seeds at the end of the default
run (3,000 steps) and at the last evaluation, the seeds at or above the data's own score (66.7) at
3,000, and the lowest evaluation after the first third (3,000 steps on) with the seeds whose every
such evaluation stays above 50.

Each sweep folder holds ``runs/<dataset>/<column>/seed<N>/progress.csv`` (``misa-fast sweep``)."""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def eval_scores(records) -> dict:
    """{step: normalized score} of a run's evaluation rows."""
    return {int(r["step"]): float(r["eval_normalized"]) for r in records if r.get("eval_normalized")}


def rows(root: Path):
    groups: dict = {}
    for path in sorted(root.glob("*/runs/*/*/seed*/progress.csv")):
        sweep, column = path.relative_to(root).parts[0], path.parts[-3]
        records = list(csv.DictReader(path.open()))
        scores = eval_scores(records)
        gap = next((float(r["lme_gap"]) for r in reversed(records) if r.get("lme_gap")), float("nan"))
        groups.setdefault((sweep, column), []).append((scores, gap))
    for (sweep, column), runs in groups.items():
        steps = sorted(set.intersection(*(set(s) for s, _ in runs)))
        mean = {t: statistics.mean(s[t] for s, _ in runs) for t in steps}
        lowest = statistics.mean(min(s[t] for t in steps[2:]) for s, _ in runs) if len(steps) > 2 else float("nan")
        yield sweep, column, len(runs), mean, lowest, statistics.mean(g for _, g in runs)


DATA_SCORE = 66.7  # the embedded dataset's own normalized score


def long_table(root: Path) -> None:
    groups: dict = {}
    for path in sorted(root.glob("*/runs/*/*/seed*/progress.csv")):
        scores = eval_scores(csv.DictReader(path.open()))
        if scores and (path.parent / "summary.json").exists():  # finished runs only
            groups.setdefault(path.parts[-3], []).append(scores)
    print("| trial | seeds | steps | 3k (default run) | seeds >= 66.7 at 3k | at the end | lowest after 3k "
          "| seeds above 50 after 3k |")
    print("|---|---|---|---|---|---|---|---|")
    for column, runs in groups.items():
        end = min(max(s) for s in runs)
        at = lambda t: [s[t] for s in runs]  # noqa: E731
        later = [min(v for t, v in s.items() if t > 3000) for s in runs]
        print(f"| {column} | {len(runs)} | {end} | {statistics.mean(at(3000)):.1f} ± {statistics.pstdev(at(3000)):.1f} "
              f"| {sum(v >= DATA_SCORE for v in at(3000))} | {statistics.mean(at(end)):.1f} ± "
              f"{statistics.pstdev(at(end)):.1f} | {min(later):.1f} | {sum(v > 50 for v in later)} |")


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args and args[0] == "--long":
        long_table(Path(args[1]))
        return 0
    root = Path((args or ["."])[0])
    shown = (2000, 3000, 5000, 8000)
    columns = [f"{t // 1000}k" for t in shown] + ["lowest from 3k", "lme_gap at the end"]
    print("| axis | trial | seeds | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * (len(shown) + 2))
    for sweep, column, n, mean, lowest, gap in rows(root):
        cells = [f"{mean[t]:.1f}" if t in mean else "—" for t in shown]
        print(f"| {sweep} | {column} | {n} | " + " | ".join(cells) + f" | {lowest:.1f} | {gap:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
