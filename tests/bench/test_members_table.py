"""The README table of bench/bench_members.py: member-steps/s per M and the gain over one run."""
import importlib.util
import json
from pathlib import Path

TABLE = Path(__file__).resolve().parents[2] / "bench" / "members_table.py"


def table(path: str) -> str:
    spec = importlib.util.spec_from_file_location("members_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table(path)


def test_table_rows_and_ratios(tmp_path):
    cases = [("pendulum-64", "eager", 1, 40.0), ("pendulum-64", "eager", 4, 80.0), ("pendulum", "compiled", 4, 9.0)]
    path = tmp_path / "members.json"
    path.write_text(json.dumps({"benchmarks": [
        {"extra_info": {"workload": w, "backend": b, "members": m, "member_steps_per_s": v}}
        for w, b, m, v in cases] + [{"extra_info": {}}]}))
    lines = table(str(path)).splitlines()
    assert lines[0] == "| workload | backend | 1 run | M=4 (x 1 run) |"
    assert "| pendulum-64 | eager | 40.0 | 80.0 (2.00x) |" in lines
    assert "| pendulum | compiled | - | 9.0 |" in lines
