"""Turn pytest-benchmark JSON files into a table and a bar chart.

    python -m bench.summarize bench/results/step-cpu-2core-2026-11-21.json [more.json ...] [--png out.png]

For each benchmark group: median time, operations (steps) per second, the time 1M of them would
take, and the speed-up over a baseline. Benchmarks parametrised by ``backend`` (bench_step.py) are
compared with the ``eager`` run of the same other parameters; any other entry with the group's
baseline — the entry named like ``eager``/``reference`` when there is one, else the slowest entry.
The PNG shows ops/s per entry, one panel per group, labelled with the same speed-ups.
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
                "params": dict(bench.get("params") or {}),
            })
    return groups


def baseline_of(rows: List[dict]) -> dict:
    named = [r for r in rows if BASELINE.search(r["name"])]
    return max(named or rows, key=lambda r: r["median_s"])


def _without_backend(row: dict):
    return row["file"], tuple(sorted((k, repr(v)) for k, v in row["params"].items() if k != "backend"))


def baselines(rows: List[dict]) -> List[dict]:
    """The baseline of each row: the eager row with the same other parameters (same file) for rows
    with a ``backend`` parameter, the group's baseline otherwise."""
    group_base = baseline_of(rows)
    eager = {_without_backend(r): r for r in rows if r["params"].get("backend") == "eager"}
    return [eager.get(_without_backend(r), group_base) if "backend" in r["params"] else group_base for r in rows]


def _baseline_title(rows: List[dict]) -> str:
    if any("backend" in r["params"] for r in rows):
        return "speed-up over eager with the same parameters"
    return f"baseline: {baseline_of(rows)['name']}"


def format_table(groups: Dict[str, List[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        lines.append(f"\n## {group}  ({_baseline_title(rows)})\n")
        lines.append("| benchmark | device | median ms | per s | 1M takes | speed-up |")
        lines.append("|---|---|---|---|---|---|")
        for r, base in sorted(zip(rows, baselines(rows)), key=lambda rb: rb[0]["median_s"]):
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
        pairs = sorted(zip(rows, baselines(rows)), key=lambda rb: rb[0]["median_s"], reverse=True)
        names = [re.sub(r"^test_", "", r["name"]) for r, _ in pairs]
        per_s = [1 / r["median_s"] for r, _ in pairs]
        bars = ax.barh(names, per_s, color=["#999999" if r is base else "#3b75af" for r, base in pairs])
        for bar, (r, base) in zip(bars, pairs):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {base['median_s'] / r['median_s']:.2f}x", va="center", fontsize=8)
        ax.set_title(f"{group} ({_baseline_title(rows)})", fontsize=10)
        ax.set_xlabel("per second (higher is better); label: speed-up over the grey baseline(s)")
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
