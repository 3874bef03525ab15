"""Learning curves from a run's progress.csv."""
from __future__ import annotations

import csv
import math
from pathlib import Path

# Training metrics worth a glance next to the score, in order of preference.
LOSS_PANELS = (("critic_loss", "actor_loss"), ("q_mean", "lme_gap"), ("alpha", "hmc_accept_rate"))


def _column(rows, key):
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan")]
    return [p for p in points if math.isfinite(p[1])]


def plot_progress(csv_path, png_path, title: str = "") -> Path | None:
    """Score (normalized when available, else raw return) and a few training metrics against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path = Path(csv_path), Path(png_path)
    if not csv_path.exists():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    panels = [keys for keys in LOSS_PANELS if any(_column(rows, k) for k in keys)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.5 * (1 + len(panels)), 3.6), squeeze=False)
    ax = axes[0, 0]
    score_key = "eval_normalized" if _column(rows, "eval_normalized") else "eval_return"
    points = _column(rows, score_key)
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o")
        std = dict(_column(rows, "eval_return_std")) if score_key == "eval_return" else {}
        if std:
            lo = [v - std.get(s, 0.0) for s, v in points]
            hi = [v + std.get(s, 0.0) for s, v in points]
            ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.set_title("normalized score" if score_key == "eval_normalized" else "evaluation return")
    ax.set_xlabel("step")
    for ax, keys in zip(axes[0, 1:], panels):
        for key in keys:
            pts = _column(rows, key)
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_xlabel("step")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
