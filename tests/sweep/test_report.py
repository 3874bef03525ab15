"""misa-fast report on hand-written run directories with hand-computed means, stds and totals."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from misa_fast.sweep import report as rp

PROGRESS_HEADER = ["step", "critic_loss", "eval_return", "eval_return_std", "eval_normalized"]


def make_run(root: Path, name: str, algo: str, seed: int, dataset: str, normalized, returns=None,
             finished: bool = True) -> Path:
    """A run directory as misa-fast train leaves it: evaluations every 10 steps, a training-only row between."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"run": {"algo": algo, "seed": seed, "dataset": dataset}, "agent": {}, "data": {"name": dataset}}))
    returns = returns if returns is not None else [10 * v for v in normalized]
    with open(run / "progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PROGRESS_HEADER)
        for i, ret in enumerate(returns):
            w.writerow([10 * i + 5, 1.0, "", "", ""])
            norm = normalized[i] if normalized else ""
            w.writerow([10 * (i + 1), 1.0, ret, 0.0, norm])
    if finished:
        last = {"step": 10 * len(returns), "mean_return": returns[-1] if returns else None,
                "mean_normalized": normalized[-1] if normalized else None} if returns else None
        (run / "summary.json").write_text(json.dumps({"steps": 10 * len(returns), "last_eval": last}))
    return run


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    # hopper misa: last 50, 60 -> 55 ± 5; best 70, 60 -> 65 ± 5
    make_run(root, "hopper/misa/seed0", "misa", 0, "hopper-medium-v2", [10, 70, 50])
    make_run(root, "hopper/misa/seed1", "misa", 1, "hopper-medium-v2", [20, 40, 60])
    # walker misa: last 80, 40 -> 60 ± 20; best 80, 90 -> 85 ± 5
    make_run(root, "walker/misa/seed0", "misa", 0, "walker2d-medium-v2", [30, 80])
    make_run(root, "walker/misa/seed1", "misa", 1, "walker2d-medium-v2", [90, 40])
    # td3bc has hopper only: its gym-locomotion total is incomplete
    make_run(root, "hopper/td3bc/seed0", "td3bc", 0, "hopper-medium-v2", [5, 15])
    # a dataset without reference returns: raw return, apart, no total
    make_run(root, "custom/misa/seed0", "misa", 0, "mycustom-task", None, returns=[-100.0, -50.0])
    make_run(root, "custom/misa/seed1", "misa", 1, "mycustom-task", None, returns=[-30.0, -70.0])
    # not in the tables, but listed
    make_run(root, "hopper/misa/seed2", "misa", 2, "hopper-medium-v2", [99], finished=False)
    make_run(root, "walker/td3bc/seed0", "td3bc", 0, "walker2d-medium-v2", [], returns=[])
    return root


def load(root):
    return rp.Report.from_runs([rp.read_run(p) for p in rp.find_run_dirs([root])])


def test_cells_last_and_best_population_std(sweep):
    report = load(sweep)
    assert report.algos == ["misa", "td3bc"]
    assert report.datasets == {"hopper-medium-v2": rp.NORMALIZED, "walker2d-medium-v2": rp.NORMALIZED,
                               "mycustom-task": rp.RETURN}
    cell = report.cell("hopper-medium-v2", "misa", "last")
    assert (cell.mean, cell.std, cell.n) == (55.0, 5.0, 2)  # population std: sample std would be 7.07
    cell = report.cell("hopper-medium-v2", "misa", "best")
    assert (cell.mean, cell.std, cell.n) == (65.0, 5.0, 2)
    cell = report.cell("walker2d-medium-v2", "misa", "last")
    assert (cell.mean, cell.std, cell.n) == (60.0, 20.0, 2)
    cell = report.cell("walker2d-medium-v2", "misa", "best")
    assert (cell.mean, cell.std, cell.n) == (85.0, 5.0, 2)
    cell = report.cell("hopper-medium-v2", "td3bc", "last")
    assert (cell.mean, cell.std, cell.n) == (15.0, 0.0, 1)
    assert report.cell("walker2d-medium-v2", "td3bc", "last") is None  # its only run has no evaluation
    cell = report.cell("mycustom-task", "misa", "last")  # raw return: -50, -70
    assert (cell.mean, cell.std, cell.n) == (-60.0, 10.0, 2)


def test_domain_totals(sweep):
    report = load(sweep)
    rows = {label: (group, cells, total) for group, label, cells, total in report.rows("last", rp.NORMALIZED)}
    assert list(rows) == ["hopper-medium-v2", "walker2d-medium-v2", "gym-locomotion total"]
    group, cells, is_total = rows["gym-locomotion total"]
    assert group == "gym-locomotion" and is_total
    assert cells["misa"].mean == 115.0 and cells["misa"].std == pytest.approx(math.sqrt(25 + 400))
    assert cells["td3bc"] is None  # no walker2d result
    best = {label: cells for _, label, cells, _ in report.rows("best", rp.NORMALIZED)}
    assert best["gym-locomotion total"]["misa"].mean == 150.0
    assert best["gym-locomotion total"]["misa"].std == pytest.approx(math.sqrt(50))
    # the raw-return table has no total
    assert [label for _, label, _, _ in report.rows("last", rp.RETURN)] == ["mycustom-task"]


def test_paper_total_rule_reproduces_table2():
    # The ± of the paper's totals is the root of the summed variances: 742.9 ± 4.6 for gym-locomotion.
    table = rp.load_paper_table()
    cells = []
    for label, row in table.items():
        if label.endswith("-v2") and "±" in row["MISA"]:
            mean, std = map(float, row["MISA"].split("±"))
            cells.append(rp.Cell(mean, std, 1))
    total = rp.domain_total(cells)
    assert len(cells) == 9
    assert round(total.mean, 1) == 742.9 and round(total.std, 1) == 4.6


def test_markdown_csv_and_unfinished_listing(sweep, tmp_path):
    out = tmp_path / "out"
    text, report = rp.make_report([sweep], out)
    assert text == (out / "report.md").read_text()
    assert "## Last evaluation" in text and "## Best evaluation" in text
    assert text.index("## Last evaluation") < text.index("## Best evaluation")
    assert "| gym-locomotion | hopper-medium-v2 | 55.0 ± 5.0 (n=2) | 15.0 ± 0.0 (n=1) |" in text
    assert "| gym-locomotion | hopper-medium-v2 | 65.0 ± 5.0 (n=2) | 15.0 ± 0.0 (n=1) |" in text
    assert "**gym-locomotion total** | **115.0 ± 20.6** | **incomplete** |" in text
    assert "raw return" in text and "| other | mycustom-task | -60.0 ± 10.0 (n=2) | — |" in text
    assert "## Not in the tables" in text
    assert "seed2" in text and "unfinished (no summary.json" in text
    assert "walker/td3bc/seed0" in text and "without an evaluation" in text

    with open(out / "report-last.csv", newline="") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert rows["hopper-medium-v2"]["misa mean"] == "55" and rows["hopper-medium-v2"]["misa std"] == "5"
    assert rows["hopper-medium-v2"]["misa n"] == "2" and rows["hopper-medium-v2"]["score"] == rp.NORMALIZED
    assert rows["gym-locomotion total"]["misa mean"] == "115" and rows["gym-locomotion total"]["td3bc mean"] == ""
    assert rows["mycustom-task"]["score"] == rp.RETURN and rows["mycustom-task"]["misa mean"] == "-60"
    with open(out / "report-best.csv", newline="") as f:
        best = {r["dataset"]: r for r in csv.DictReader(f)}
    assert best["walker2d-medium-v2"]["misa mean"] == "85" and best["gym-locomotion total"]["misa mean"] == "150"


def test_curves_one_line_per_algorithm(sweep, tmp_path):
    report = load(sweep)
    fig = rp.plot_curves(report, "hopper-medium-v2")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["misa (n=2)", "td3bc (n=1)"]
    steps, mean = ax.get_lines()[0].get_data()
    assert list(steps) == [10, 20, 30] and list(mean) == [15.0, 55.0, 55.0]
    assert len(ax.collections) == 2  # one min-max band per line
    rp.make_report([sweep], tmp_path / "out")
    for name in ("hopper-medium-v2", "walker2d-medium-v2", "mycustom-task"):
        png = tmp_path / "out" / f"curves-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_paper(sweep, tmp_path):
    text, _ = rp.make_report([sweep], tmp_path / "out", reference="paper")
    assert "| MISA (paper) | TD3+BC (paper) |" in text
    assert "| gym-locomotion | hopper-medium-v2 | 55.0 ± 5.0 (n=2) | 15.0 ± 0.0 (n=1) | 67.1 ± 2.7 | 59.3 |" in text
    assert "MISA paper's Table 2" in text
    # our gym-locomotion holds 2 of the paper's 9 datasets: its total is not shown beside ours
    assert "**gym-locomotion total** | **115.0 ± 20.6** | **incomplete** | **—** | **—** |" in text
    with open(tmp_path / "out" / "report-last.csv", newline="") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert rows["hopper-medium-v2"]["MISA (paper)"] == "67.1 ± 2.7"


def test_reference_paper_total_and_versions(tmp_path):
    table = rp.load_paper_table()
    antmaze = [label for label in table if label.startswith("antmaze-") and "total" not in label]
    for i, label in enumerate(antmaze):  # the paper's v0 datasets, run here as v2
        make_run(tmp_path / "runs", f"r{i}", "misa", 0, label.replace("-v0", "-v2"), [1.0])
    report = load(tmp_path / "runs")
    paper = rp.Reference(report, rp.REFERENCES["paper"])
    assert list(paper.totals) == ["antmaze"]
    assert paper.value("antmaze total", "misa", True, "antmaze") == "348.1 ± 16.7"
    assert "antmaze-umaze-v2 ↔ paper's antmaze-umaze-v0" in paper.version_notes


def test_reference_corl_sums_its_rows_into_a_total(tmp_path):
    table = rp.load_paper_table(rp.CORL_TABLE)
    locomotion = [label for label in table if rp.domain_group(label) == "gym-locomotion"]
    assert len(locomotion) == 9
    for i, label in enumerate(locomotion):
        make_run(tmp_path / "runs", f"r{i}", "edac", 0, label, [1.0])
        make_run(tmp_path / "runs", f"s{i}", "misa", 0, label, [1.0])
    report = load(tmp_path / "runs")
    text, _ = rp.make_report([tmp_path / "runs"], tmp_path / "out", reference=["paper", "corl"])
    # the figures: CORL's locomotion totals are 9x its README's averages (EDAC 92.92)
    corl = rp.Reference(report, rp.REFERENCES["corl"])
    total = corl.value("gym-locomotion total", "edac", True, "gym-locomotion")
    mean, std = (float(x) for x in total.split("±"))
    assert mean == pytest.approx(836.3, abs=0.05)
    rows = [table[label]["EDAC"].split("±") for label in locomotion]
    assert std == pytest.approx(sum(float(r[1]) ** 2 for r in rows) ** 0.5, abs=0.05)
    assert corl.value("hopper-medium-v2", "edac", False, "gym-locomotion") == "101.70 ± 0.28"
    assert "| EDAC (CORL) |" in text and "| MISA (paper) |" in text and "**742.9 ± 4.6**" in text
    assert "**836.3 ± " in text


def test_paper_table_matches_the_paper_text():
    source = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "misa-paper.md"
    if not source.exists():
        pytest.skip(f"{source} is not in this checkout")
    lines = source.read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("Dataset\tBC")))
    end = lines.index("antmaze-v0 (total)\t100.2\t134.2\t112.2\t107.7\t125.3\t163.8\t303.6\t<b>378</b>\t348.1±16.7")
    expected = [ln.replace("<b>", "").replace("</b>", "") for ln in lines[start:end + 1]]
    ours = [ln for ln in rp.PAPER_TABLE.read_text().splitlines() if not ln.startswith("#")]
    assert ours == expected


def test_cli_end_to_end(sweep, tmp_path):
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-m", "misa_fast.cli", "report", str(sweep), "--reference", "paper"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| gym-locomotion | hopper-medium-v2 | 55.0 ± 5.0 (n=2) |" in done.stdout
    assert "67.1 ± 2.7" in done.stdout
    for name in ("report.md", "report-last.csv", "report-best.csv", "curves-hopper-medium-v2.png"):
        assert (sweep / name).exists(), name  # --out defaults to the first PATH
    # and a second report over the same directory does not mistake its outputs for runs
    again = subprocess.run([sys.executable, "-m", "misa_fast.cli", "report", str(sweep), "--out",
                            str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "9 run(s) found" in again.stdout


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rp.find_run_dirs([tmp_path / "nowhere"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=str(bad / "config.json")):
        rp.read_run(bad)


def test_sweep_grid_points_are_separate_columns(tmp_path):
    """Two grid points of one algorithm (misa-fast sweep --grid hmc_space=post_tanh,pre_tanh): one
    column each, named like their run directories; a plain run keeps its algorithm's name."""
    root = tmp_path / "sweep"
    for space, scores in (("post_tanh", [[10, 20], [30, 40]]), ("pre_tanh", [[50, 60], [70, 80]])):
        for seed, normalized in enumerate(scores):
            label = f"mujoco/hopper/medium-v0/misa-hmc_space={space}/seed{seed}"
            run = make_run(root, f"runs/{label}", "misa", seed, "hopper-medium-v2", normalized)
            (run / "trial.json").write_text(json.dumps(
                {"label": label, "algo": "misa", "seed": seed, "grid": {"hmc_space": space}, "attempts": []}))
    make_run(root, "plain/misa/seed0", "misa", 0, "hopper-medium-v2", [5])
    report = load(root)
    assert report.algos == ["misa", "misa-hmc_space=post_tanh", "misa-hmc_space=pre_tanh"]
    assert report.cell("hopper-medium-v2", "misa-hmc_space=post_tanh", "last").mean == 30.0
    assert report.cell("hopper-medium-v2", "misa-hmc_space=pre_tanh", "last").mean == 70.0
