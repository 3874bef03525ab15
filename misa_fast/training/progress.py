"""What a run writes as it goes: ``progress.csv`` rows (and TensorBoard events when installed)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from misa_fast.errors import UserError


class ProgressLog:
    """progress.csv with a fixed header (chosen at the first row) plus optional TensorBoard."""

    EVAL_COLUMNS = ("eval_return", "eval_return_std", "eval_normalized")

    def __init__(self, out: Path, resume_step: Optional[int], tensorboard: bool, extra_columns: tuple = ()):
        self.path = out / "progress.csv"
        self.fixed_columns = (*extra_columns, *self.EVAL_COLUMNS)  # columns rows may lack
        self.header: Optional[list] = None
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_step)
            except ImportError:
                pass

    def _truncate_after(self, step: int) -> None:
        """Rows written after the checkpoint we resume from are replayed, so drop them."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
            f.seek(0)
            self.header = next(csv.reader(f), None)
        if not self.header or "step" not in self.header:  # emptied or never written past its header: start anew
            self.header = None
            self.path.unlink()
            return
        try:
            kept = [r for r in rows if int(float(r["step"])) <= step]
        except (TypeError, ValueError):
            raise UserError(f"{self.path}: a row without a step number; not a progress.csv of misa-fast (move it "
                            "away to resume without it)") from None
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.header)
            w.writeheader()
            w.writerows(kept)
        tmp.replace(self.path)

    def write(self, step: int, values: dict) -> None:
        if self.header is None:
            # The SNIS diagnostics take the place of the HMC columns they replace (unbiased_estimator=snis).
            metric_keys = sorted((k for k in values if k not in ("step", *self.fixed_columns)),
                                 key=lambda k: "hmc_" + k if k.startswith("snis_") else k)
            self.header = ["step", *metric_keys, *self.fixed_columns]
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.header)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.header, extrasaction="ignore").writerow({"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and np.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def metrics_to_floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}
