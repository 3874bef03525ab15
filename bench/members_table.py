"""The README's table of ``bench/bench_members.py``: member-steps/s of M seeds trained as one group,
and the gain over one run (M separate runs one after another give the one run's member-steps/s).

    python -m bench.members_table bench/results/members-<device>-<date>.json
"""
import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    rows = defaultdict(dict)  # (workload, backend) -> {M: member-steps/s}
    for case in json.load(open(path))["benchmarks"]:
        info = case.get("extra_info") or {}
        if "member_steps_per_s" not in info:
            continue
        rows[(info["workload"], info["backend"])][info["members"]] = info["member_steps_per_s"]
    counts = sorted({m for row in rows.values() for m in row if m > 1})
    head = ["workload", "backend", "1 run"] + [f"M={m} (x 1 run)" for m in counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (workload, backend), row in rows.items():
        single = row.get(1)
        cells = [workload, backend, f"{single:.1f}" if single else "-"]
        for m in counts:
            value = row.get(m)
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value:.1f} ({value / single:.2f}x)" if single else f"{value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench/results/members-cpu-2core-2026-12-03.json"))
