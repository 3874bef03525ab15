"""Turn pytest-benchmark JSON files into a table and a bar chart.

    python -m bench.report bench/results/step-cpu-2core-2026-11-21.json [more.json ...] [--png out.png]

For each benchmark group: median time, operations (steps) per second, the time 1M of them would
take, and the speed-up over the group's baseline — the entry named like ``eager``/``reference``
when there is one, else the slowest entry. The PNG shows ops/s per entry, one panel per group.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

BASELINE = re.compile(r"reference-eager|eager|reference|naive")


def load_rows(paths) -> Dict[str, List[dict]]:
    """group -> rows (name, median_s, device, source file), in file order."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for path in paths:
        data = json.loads(Path(path).read_text())
        machine = data.get("machine_info", {}).get("node", "")
        for bench in data.get("benchmarks", []):
            stats = bench.get("stats") or {}
            if not stats.get("median"):
                continue
            extra = bench.get("extra_info", {})
            groups[bench.get("group") or bench["name"]].append({
                "name": bench["name"], "median_s": float(stats["median"]),
                "device": extra.get("device", machine), "file": Path(path).name,
            })
    return groups


def baseline_of(rows: List[dict]) -> dict:
    named = [r for r in rows if BASELINE.search(r["name"])]
    return max(named or rows, key=lambda r: r["median_s"])


def format_table(groups: Dict[str, List[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        base = baseline_of(rows)
        lines.append(f"\n## {group}  (baseline: {base['name']})\n")
        lines.append("| benchmark | device | median ms | per s | 1M takes | speed-up |")
        lines.append("|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["median_s"]):
            per_million_h = r["median_s"] * 1e6 / 3600
            took = f"{per_million_h:.1f} h" if per_million_h >= 1 else f"{per_million_h * 60:.1f} min"
            lines.append(f"| {r['name']} | {r['device']} | {r['median_s'] * 1e3:.3f} | {1 / r['median_s']:.1f} | "
                         f"{took} | {base['median_s'] / r['median_s']:.2f}x |")
    return "\n".join(lines)


def plot(groups: Dict[str, List[dict]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    heights = [max(2.0, 0.32 * len(rows) + 1.0) for rows in groups.values()]
    fig, axes = plt.subplots(n, 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (group, rows) in zip(axes[:, 0], groups.items()):
        rows = sorted(rows, key=lambda r: r["median_s"], reverse=True)
        base = baseline_of(rows)
        names = [re.sub(r"^test_", "", r["name"]) for r in rows]
        per_s = [1 / r["median_s"] for r in rows]
        bars = ax.barh(names, per_s, color=["#999999" if r is base else "#3b75af" for r in rows])
        for bar, r in zip(bars, rows):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {base['median_s'] / r['median_s']:.2f}x", va="center", fontsize=8)
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("per second (higher is better); label: speed-up over the grey baseline")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--png", help="bar chart path (default: next to the first file, .png)")
    args = parser.parse_args(argv)
    groups = load_rows(args.files)
    if not groups:
        parser.error("no benchmark with timing statistics in the given files (run without --benchmark-disable)")
    print(format_table(groups))
    png = Path(args.png) if args.png else Path(args.files[0]).with_suffix(".png")
    print(f"\nchart: {plot(groups, png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
