"""``misa-fast report``: the paper's results table and learning curves from finished run directories.

    misa-fast report runs/                      # every run directory below runs/
    misa-fast report runs/a runs/b --out results --reference paper corl

A run directory is what ``misa-fast train`` writes (``config.json``, ``progress.csv`` and, once the
run ends, ``summary.json``); a PATH is such a directory or any directory holding some below it.
Runs are grouped by dataset (rows, by domain) and algorithm (columns); each cell is the mean ± std
over the runs (seeds) of one score, with n. Two tables: the score at each run's *last* evaluation
and at its *best* one (CORL reports both). The std is the population std (``numpy.std``, as CORL
computes it). A domain's total sums its datasets' means, as the MISA paper's Table 2 does; its ±
is the root of the summed variances, which reproduces the paper's (742.9 ± 4.6 for gym-locomotion).

Datasets whose runs have no normalized score (no reference returns) are reported apart, in raw
return, and never enter a total. Runs without a ``summary.json`` (still running, killed or failed)
and runs without an evaluation are listed under "Not in the tables", never dropped silently. A
sweep's trials (``misa-fast sweep``: a ``trial.json`` in the run directory) that failed for good are
listed there as failed, with their error, even when they failed before writing a config.json.

Outputs (in ``--out``): ``report.md`` (also printed), ``report-last.csv``, ``report-best.csv`` and
``curves-<dataset>.png``: one line per algorithm, the mean over seeds with a min-max band (the
runs of the tables: unfinished runs are left out of the curves too).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from misa_fast.errors import UserError
from misa_fast.options import add_options, option
from misa_fast.sweep.files import TRIAL_FILE

# Paper-style grouping of the registry's per-environment domains, in the paper's order.
DOMAIN_GROUPS = {
    "hopper": "gym-locomotion", "halfcheetah": "gym-locomotion", "walker2d": "gym-locomotion",
    "ant": "gym-locomotion", "antmaze": "antmaze", "pen": "adroit", "hammer": "adroit", "door": "adroit",
    "relocate": "adroit", "kitchen": "kitchen",
}
GROUP_ORDER = ("gym-locomotion", "antmaze", "adroit", "kitchen", "other")
OTHER = "other"  # a catch-all, so it gets no total

PAPER_TABLE = Path(__file__).resolve().parents[1] / "assets" / "misa-paper-table2.tsv"
# Our algorithm name -> the paper's Table 2 column.
PAPER_COLUMNS = {"misa": "MISA", "td3bc": "TD3+BC", "cql": "CQL", "bc": "BC", "10bc": "10%BC", "awac": "AWAC",
                 "onestep": "OneStep RL", "iql": "IQL"}
# The paper's total rows -> our domain group.
PAPER_TOTALS = {"gym-locomotion-v2 (total)": "gym-locomotion", "kitchen-v0 (total)": "kitchen",
                "adroit-v0 (human+cloned)": "adroit", "antmaze-v0 (total)": "antmaze"}
CORL_TABLE = Path(__file__).resolve().parents[1] / "assets" / "corl-last-scores.tsv"
# Our algorithm name -> CORL's column.
CORL_COLUMNS = {"bc": "BC", "10bc": "10% BC", "td3bc": "TD3+BC", "awac": "AWAC", "cql": "CQL", "iql": "IQL",
                "rebrac": "ReBRAC", "sac-n": "SAC-N", "edac": "EDAC"}

NORMALIZED, RETURN = "normalized score", "return"


# ------------------------------------------------------------------------------------------ reading
@dataclass
class RunRecord:
    path: Path
    algo: str
    seed: Optional[int]
    dataset: str
    finished: bool  # a summary.json: the run reached its last step
    steps: list = field(default_factory=list)  # evaluation steps
    returns: list = field(default_factory=list)
    normalized: list = field(default_factory=list)  # None where the dataset has no reference returns
    error: Optional[str] = None  # a sweep trial's error when it failed (trial.json)

    @property
    def has_normalized(self) -> bool:
        return bool(self.steps) and all(v is not None for v in self.normalized)

    def scores(self, kind: str) -> list:
        return list(self.normalized if kind == NORMALIZED else self.returns)


def _float_or_none(text) -> Optional[float]:
    if text in (None, "", "None"):
        return None
    value = float(text)
    return value if math.isfinite(value) else None




def trial_error(trial: dict) -> Optional[str]:
    """The error of a sweep trial that failed (for good, as the driver recorded it, or in its last
    attempt), else None."""
    if trial.get("failed"):
        return str(trial["failed"])
    attempts = trial.get("attempts") or []
    if attempts and attempts[-1].get("status") == "error":
        return str(attempts[-1].get("error"))
    return None


def trial_column(trial: Optional[dict], algo: str) -> str:
    """A sweep trial's column: its algorithm plus its --grid values (``misa-hmc_space=pre_tanh``),
    the name of its run directory's parent, so grid points of one algorithm stay apart."""
    label = str((trial or {}).get("label") or "")
    if (trial or {}).get("grid") and label.count("/") >= 2:
        return label.rsplit("/", 2)[-2]
    return algo


def read_run(path) -> RunRecord:
    """One run directory: its identity from config.json, its evaluations from progress.csv (and a
    sweep trial's error from trial.json)."""
    path = Path(path)
    config_path = path / "config.json"
    trial = None
    if (path / TRIAL_FILE).exists():
        try:
            trial = json.loads((path / TRIAL_FILE).read_text())
        except ValueError:
            trial = None
    if trial is not None and not config_path.exists():  # a trial that failed before train wrote config.json
        return RunRecord(path=path, algo=trial_column(trial, str(trial.get("algo", "?"))), seed=trial.get("seed"),
                         dataset=str(trial.get("dataset", "?")), finished=False, error=trial_error(trial))
    run, data = _read_config(config_path)
    record = RunRecord(path=path, algo=trial_column(trial, str(run.get("algo", "?"))), seed=run.get("seed"),
                       dataset=str(data.get("name") or run.get("dataset") or "?"),
                       finished=(path / "summary.json").exists())
    progress = path / "progress.csv"
    if progress.exists():
        with open(progress, newline="") as f:
            for row in csv.DictReader(f):
                ret = _float_or_none(row.get("eval_return"))
                if ret is None:
                    continue  # a training-metrics row
                step = _float_or_none(row.get("step"))
                if step is None:
                    raise UserError(f"{progress}: a row without a step number ({row.get('step')!r}); not the "
                                    "progress.csv of a misa-fast run")
                record.steps.append(int(step))
                record.returns.append(ret)
                record.normalized.append(_float_or_none(row.get("eval_normalized")))
    if trial is not None and not record.finished:
        record.error = trial_error(trial)
    return record


def _read_config(config_path: Path) -> tuple:
    """(run section, data section) of a run's config.json, refused in one line when it is not one."""
    def refuse(why: str) -> UserError:
        return UserError(f"{config_path}: not the config.json of a misa-fast train run ({why})")

    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise refuse(f"not JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        raise refuse("no 'run' section")
    run, data = config["run"], config.get("data") or {}
    if not isinstance(data, dict):
        raise refuse("its 'data' section is not a mapping")
    for key in ("algo", "dataset"):
        if run.get(key) is not None and not isinstance(run[key], str):
            raise refuse(f"run.{key} is not a string")
    if run.get("seed") is not None and (isinstance(run["seed"], bool) or not isinstance(run["seed"], int)):
        raise refuse("run.seed is not a whole number")
    return run, data


def find_run_dirs(paths) -> list:
    """Run directories (holding a config.json) among ``paths`` and below them, sorted, without repeats."""
    found = set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: expected a run directory or a directory holding run directories")
        found.update(c.parent.resolve() for c in p.rglob("config.json"))
        found.update(c.parent.resolve() for c in p.rglob(TRIAL_FILE))
        if (p / "config.json").exists():
            found.add(p.resolve())
    return sorted(found)


def domain_group(dataset: str) -> str:
    from misa_fast.data.registry import domain_of

    try:
        return DOMAIN_GROUPS.get(domain_of(dataset).name, OTHER)
    except KeyError:
        return OTHER


# ------------------------------------------------------------------------------------------- tables
@dataclass
class Cell:
    mean: float
    std: float  # population std (numpy.std, ddof=0)
    n: int

    def text(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f} (n={self.n})"


def summarize(values) -> Cell:
    values = np.asarray(values, dtype=float)
    return Cell(float(values.mean()), float(values.std()), len(values))


def domain_total(cells) -> Cell:
    """The paper's total: sum of the means; ± the root of the summed variances (seeds independent
    across datasets); n is the number of datasets summed."""
    return Cell(sum(c.mean for c in cells), math.sqrt(sum(c.std ** 2 for c in cells)), len(cells))


@dataclass
class Report:
    runs: list  # every RunRecord found
    tabled: list  # finished runs with at least one evaluation
    algos: list
    datasets: dict  # dataset -> NORMALIZED or RETURN (what its cells hold)

    @classmethod
    def from_runs(cls, runs: list) -> "Report":
        tabled = [r for r in runs if r.finished and r.steps]
        datasets = {}
        for r in tabled:
            # One run without a normalized score makes the whole dataset raw return, so cells compare alike.
            ok = datasets.get(r.dataset, NORMALIZED) == NORMALIZED and r.has_normalized
            datasets[r.dataset] = NORMALIZED if ok else RETURN
        algos = sorted({r.algo for r in tabled}, key=_algo_order)
        return cls(runs, tabled, algos, dict(sorted(datasets.items(), key=lambda kv: _dataset_order(kv[0]))))

    def cell(self, dataset: str, algo: str, which: str) -> Optional[Cell]:
        """``which``: "last" (each run's final evaluation) or "best" (each run's highest one)."""
        kind = self.datasets[dataset]
        per_run = [r.scores(kind) for r in self.tabled if r.dataset == dataset and r.algo == algo]
        if not per_run:
            return None
        return summarize([s[-1] if which == "last" else max(s) for s in per_run])

    def rows(self, which: str, kind: str) -> list:
        """(domain, label, {algo: Cell or None}, is_total) in table order, totals after each domain."""
        out = []
        for group in GROUP_ORDER:
            names = [d for d, k in self.datasets.items() if k == kind and domain_group(d) == group]
            if not names:
                continue
            for name in names:
                out.append((group, name, {a: self.cell(name, a, which) for a in self.algos}, False))
            if kind == NORMALIZED and group != OTHER:
                totals = {}
                for algo in self.algos:
                    cells = [self.cell(name, algo, which) for name in names]
                    totals[algo] = domain_total(cells) if all(cells) else None
                out.append((group, f"{group} total", totals, True))
        return out

    def unlisted(self) -> list:
        """(run, why) for every run not in the tables."""
        out = []
        for r in self.runs:
            if not r.finished and r.error:
                why = f"failed: {r.error}"
            elif not r.finished:
                why = (f"unfinished (no summary.json: running, killed or failed), "
                       f"{len(r.steps)} evaluation(s) so far")
            elif not r.steps:
                why = "finished without an evaluation in progress.csv"
            else:
                continue
            out.append((r, why))
        return out


def _algo_order(name: str):
    from misa_fast.agents.algorithms import ALGORITHMS

    names = list(ALGORITHMS)
    return (names.index(name) if name in names else len(names), name)


def _dataset_order(name: str):
    return (GROUP_ORDER.index(domain_group(name)), name)


# ------------------------------------------------------------------------------------- paper values
def strip_version(name: str) -> str:
    return re.sub(r"-v\d+$", "", name)


def load_paper_table(path=PAPER_TABLE) -> dict:
    """Row label -> {paper column -> cell text}, from the transcribed Table 2."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    header = lines[0].split("\t")[1:]
    table = {}
    for line in lines[1:]:
        label, *values = line.split("\t")
        table[label] = dict(zip(header, values))
    return table


@dataclass(frozen=True)
class ReferenceSource:
    """A published table to print beside ours: its file, our algorithm -> its column, and its total
    rows (our domain group -> its row; none: a total is the sum of its rows, as the paper sums)."""

    name: str  # what marks its columns: "BC (paper)", "BC (CORL)"
    path: Path
    columns: dict
    total_rows: dict
    note: str


REFERENCES = {
    "paper": ReferenceSource("paper", PAPER_TABLE, PAPER_COLUMNS, PAPER_TOTALS,
                             "the MISA paper's Table 2, copied from the paper"),
    "corl": ReferenceSource("CORL", CORL_TABLE, CORL_COLUMNS, {},
                            "CORL's reproduced last-evaluation scores (its README), copied from it; a CORL total "
                            "is the sum of its rows, ± the root of their summed variances"),
}


class Reference:
    """A reference's numbers for our rows. A dataset matches the reference's row of the same name up to
    the version suffix (the paper used antmaze/kitchen/adroit v0); mismatched versions are listed."""

    def __init__(self, report: Report, source: ReferenceSource):
        self.source = source
        self.table = load_paper_table(source.path)
        self.columns = [a for a in report.algos if a in source.columns]
        total_labels = set(source.total_rows)
        by_stem = {strip_version(label): label for label in self.table if label not in total_labels}
        self.rows = {d: by_stem[strip_version(d)] for d in report.datasets if strip_version(d) in by_stem}
        self.version_notes = sorted(f"{d} ↔ {source.name}'s {row}" for d, row in self.rows.items() if d != row)
        self.totals = {}
        for group in GROUP_ORDER:
            ours = {strip_version(d) for d, k in report.datasets.items()
                    if k == NORMALIZED and domain_group(d) == group}
            # A total is comparable only when our domain holds exactly the reference's datasets.
            theirs = {strip_version(row) for row in self.table if row not in total_labels
                      and domain_group(row) == group}
            if ours and ours == theirs:
                self.totals[group] = [row for row in self.table if row not in total_labels
                                      and domain_group(row) == group]

    def header(self, algo: str) -> str:
        return f"{self.source.columns[algo]} ({self.source.name})"

    def value(self, label: str, algo: str, is_total: bool, group: str) -> str:
        column = self.source.columns[algo]
        if not is_total:
            row = self.rows.get(label)
            return "" if row is None else self.table[row].get(column, "").replace("±", " ± ")
        if group not in self.totals:
            return ""
        row = next((r for r, g in self.source.total_rows.items() if g == group), None)
        if row is not None:
            return self.table.get(row, {}).get(column, "").replace("±", " ± ")
        return _summed([self.table[r].get(column, "") for r in self.totals[group]])


def _summed(cells: list) -> str:
    """The total of "mean±std" cells: the summed means ± the root of the summed variances."""
    try:
        parts = [[float(x) for x in cell.split("±")] for cell in cells]
    except ValueError:
        return ""
    if not parts or any(len(p) != 2 for p in parts):
        return ""
    return f"{sum(p[0] for p in parts):.1f} ± {math.sqrt(sum(p[1] ** 2 for p in parts)):.1f}"


# ------------------------------------------------------------------------------------------ writing
def _heading(which: str) -> str:
    return ("Last evaluation (each run's final evaluation)" if which == "last"
            else "Best evaluation (each run's highest evaluation)")


def _reference_columns(references: Sequence[Reference]) -> list:
    return [(ref, algo) for ref in references for algo in ref.columns]


def markdown_table(report: Report, which: str, kind: str, references: Sequence[Reference] = ()) -> str:
    ref_cols = _reference_columns(references) if kind == NORMALIZED else []
    header = ["domain", "dataset", *report.algos, *(ref.header(a) for ref, a in ref_cols)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for group, label, cells, is_total in report.rows(which, kind):
        texts = []
        for algo in report.algos:
            c = cells[algo]
            if c is not None:
                texts.append(f"{c.mean:.1f} ± {c.std:.1f}" if is_total else c.text())
            else:
                texts.append("incomplete" if is_total else "—")
        texts += [ref.value(label, a, is_total, group) or "—" for ref, a in ref_cols]
        if is_total:
            label, texts = f"**{label}**", [f"**{t}**" for t in texts]
        lines.append(f"| {group} | {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def markdown(report: Report, paths, references: Sequence[Reference] = (), curves: dict = None) -> str:
    unlisted = report.unlisted()
    out = ["# misa-fast report", "",
           f"{len(report.runs)} run(s) found under {', '.join(str(p) for p in paths)}: "
           f"{len(report.tabled)} in the tables, {len(unlisted)} not (listed at the end).", "",
           "Cells: mean ± std over runs (seeds) of the normalized score (raw return in the tables that say "
           "so); std is the population std (numpy.std, ddof=0); n is the number of runs. A domain's total "
           "sums its datasets' means (as "
           "the MISA paper's Table 2 does), ± the root of their summed variances; \"incomplete\" when an "
           "algorithm lacks one of the domain's datasets."]
    for ref in references:
        out += ["", f"Columns marked \"({ref.source.name})\" are {ref.source.note}: not runs of this report. "
                    f"A {ref.source.name} total appears only when this report holds exactly that domain's datasets."]
        if ref.version_notes:
            out += [f"Dataset versions differ from {ref.source.name}'s for: " + "; ".join(ref.version_notes) + "."]
    kinds = [k for k in (NORMALIZED, RETURN) if k in report.datasets.values()]
    for which in ("last", "best"):
        for kind in kinds:
            title = _heading(which) + ("" if kind == NORMALIZED else
                                       ": raw return, for datasets without a normalized score (no totals)")
            out += ["", f"## {title}", "", markdown_table(report, which, kind, references)]
    if not report.tabled:
        out += ["", "No finished run with an evaluation: no table."]
    if unlisted:
        out += ["", "## Not in the tables", ""]
        out += [f"- {r.path}: {r.algo} seed {r.seed} on {r.dataset}: {why}" for r, why in unlisted]
    if curves:
        out += ["", "## Learning curves", ""]
        out += [f"- {d}: {p.name}" for d, p in curves.items()]
    return "\n".join(out) + "\n"


def write_csv(report: Report, which: str, path, references: Sequence[Reference] = ()) -> Path:
    """One row per dataset and per domain total (both score kinds, told apart by the ``score`` column)."""
    ref_cols = _reference_columns(references)
    header = ["domain", "dataset", "score"]
    for algo in report.algos:
        header += [f"{algo} mean", f"{algo} std", f"{algo} n"]
    header += [ref.header(a) for ref, a in ref_cols]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for kind in (NORMALIZED, RETURN):
            for group, label, cells, is_total in report.rows(which, kind):
                row = [group, label, kind]
                for algo in report.algos:
                    c = cells[algo]
                    row += ["", "", ""] if c is None else [f"{c.mean:.6g}", f"{c.std:.6g}", c.n]
                row += [ref.value(label, a, is_total, group) if kind == NORMALIZED else "" for ref, a in ref_cols]
                w.writerow(row)
    return Path(path)


def curve_band(runs: list, kind: str):
    """Steps, and the mean, min and max over the runs evaluated at each step."""
    by_step: dict = {}
    for r in runs:
        for step, value in zip(r.steps, r.scores(kind)):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    values = [np.asarray(by_step[s]) for s in steps]
    return (np.asarray(steps), np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
            np.array([v.max() for v in values]))


def plot_curves(report: Report, dataset: str, path=None):
    """Learning curves of one dataset: a line per algorithm (the mean over seeds) over a min-max band.
    Returns the figure (closed after saving when ``path`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = report.datasets[dataset]
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in report.algos:
        runs = [r for r in report.tabled if r.dataset == dataset and r.algo == algo]
        if not runs:
            continue
        steps, mean, lo, hi = curve_band(runs, kind)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{algo} (n={len(runs)})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(kind)
    ax.set_title(f"{dataset}: mean over seeds, band min-max")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _file_label(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-") or "dataset"


def make_report(paths, out, reference: Union[str, Sequence[str], None] = None) -> tuple:
    """Writes report.md, report-last.csv, report-best.csv and curves-<dataset>.png into ``out``;
    returns (markdown text, report). ``reference``: "paper", "corl" or several of them."""
    runs = [read_run(p) for p in find_run_dirs(paths)]
    report = Report.from_runs(runs)
    names = [reference] if isinstance(reference, str) else list(reference or ())
    paper = [Reference(report, REFERENCES[name]) for name in dict.fromkeys(names)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for dataset in report.datasets:
        curves[dataset] = out / f"curves-{_file_label(dataset)}.png"
        plot_curves(report, dataset, curves[dataset])
    text = markdown(report, paths, paper, curves)
    (out / "report.md").write_text(text)
    for which in ("last", "best"):
        write_csv(report, which, out / f"report-{which}.csv", paper)
    return text, report


# ---------------------------------------------------------------------------------------------- CLI
@dataclass
class ReportConfig:
    """The options of ``misa-fast report``."""

    paths: tuple = option(positional=True, nargs="+", metavar="PATH",
                          help="a run directory of misa-fast train, or a directory holding run directories "
                               "(searched recursively for config.json)")
    out: Optional[str] = option(None, help="where report.md, report-last.csv, report-best.csv and "
                                           "curves-<dataset>.png go (default: the first PATH)")
    reference: tuple = option((), nargs="+", choices=tuple(REFERENCES), metavar="NAME",
                              help="published numbers beside ours: paper (the MISA paper's Table 2, columns marked "
                                   "(paper)), corl (CORL's reproduced scores, columns marked (CORL)), or both")


def configure_parser(p: argparse.ArgumentParser) -> None:
    # The module text (examples, what a cell and a total are, the outputs) is the help's epilog.
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    add_options(p, ReportConfig)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.paths[0])
    try:
        text, report = make_report(args.paths, out, args.reference)
    except (FileNotFoundError, ValueError) as err:
        print(f"misa-fast report: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"misa-fast report: wrote {out / 'report.md'}, report-last.csv, report-best.csv and "
          f"{len(report.datasets)} curves-*.png in {out}", file=sys.stderr)
    if not report.runs:
        print(f"misa-fast report: no run directory (config.json) under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    return 0
