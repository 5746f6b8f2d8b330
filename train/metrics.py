"""Per-epoch metrics: ``metrics.csv`` in the workdir and TensorBoard event files (tensorboardX)."""
from __future__ import annotations

import csv
import os
from typing import Dict, Optional

COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
           "learning_rate", "temperature", "seconds")


class MetricsWriter:
    """Appends one row per epoch. On resume from ``resume_step``, rows written after that step
    (by the interrupted run, past its last checkpoint) are dropped so each epoch appears once."""

    def __init__(self, workdir: str, resume_step: Optional[int], tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.csv")
        self._tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def epoch(self, row: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row[k] for k in COLUMNS})
        self.scalars(int(row["step"]), {k: row[k] for k in COLUMNS if k not in ("epoch", "step")}, "epoch")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
