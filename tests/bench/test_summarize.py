"""bench/summarize.py: table and chart from pytest-benchmark JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "bench" / "summarize.py"


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(path, entries):
    path.write_text(json.dumps({"machine_info": {"node": "box"}, "benchmarks": [
        {"name": name, "group": group, "stats": {"median": median}, "extra_info": {"device": "cpu"}}
        for name, group, median in entries]}))


def test_table_speedups_are_relative_to_the_eager_baseline(tmp_path, capsys):
    report = load_report()
    results = tmp_path / "r.json"
    write_results(results, [("step[eager]", "g", 0.010), ("step[graph]", "g", 0.002), ("step[compiled]", "g", 0.005)])
    assert report.main([str(results), "--png", str(tmp_path / "chart.png")]) == 0
    out = capsys.readouterr().out
    assert "baseline: step[eager]" in out
    assert "| step[graph] | cpu | 2.000 | 500.0 | 33.3 min | 5.00x |" in out
    assert "| step[compiled] | cpu | 5.000 | 200.0 | 1.4 h | 2.00x |" in out
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_disabled_benchmark_json_is_a_clear_error(tmp_path):
    report = load_report()
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"benchmarks": [{"name": "x", "group": "g", "stats": None}]}))
    with pytest.raises(SystemExit):
        report.main([str(results)])
