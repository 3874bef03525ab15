"""The README's table of ``bench/bench_members.py``: member-steps/s of M seeds trained as one group
beside the same M seeds updated one after another, per workload and backend.

    python -m bench.members_table bench/results/members-<device>-<date>.json
"""
import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    rows = defaultdict(dict)  # (workload, backend) -> {(M, how): member-steps/s}
    for case in json.load(open(path))["benchmarks"]:
        info = case.get("extra_info") or {}
        if "member_steps_per_s" not in info:
            continue
        rows[(info["workload"], info["backend"])][(info["members"], info["how"])] = info["member_steps_per_s"]
    counts = sorted({m for row in rows.values() for m, _ in row})
    head = ["workload", "backend", "1 run"] + [f"M={m}: group / separate (x)" for m in counts if m > 1]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (workload, backend), row in rows.items():
        single = row.get((1, "group"))
        cells = [workload, backend, f"{single:.1f}" if single else "-"]
        for m in counts:
            if m == 1:
                continue
            group, separate = row.get((m, "group")), row.get((m, "separate"))
            if group is None or separate is None:
                cells.append("-")
                continue
            cells.append(f"{group:.1f} / {separate:.1f} ({group / separate:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench/results/members-cpu-2core-2026-12-03.json"))
