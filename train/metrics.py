"""Per-epoch metrics: ``metrics.csv`` in the workdir and TensorBoard event files (tensorboardX); the
share of the training steps' time the loop waits for data (:class:`DataWaitClock`)."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from typing import Dict, List, Optional

COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "learning_rate",
    "temperature",
    "seconds",
)


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
            rows = _rows_until(self.path, resume_step)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if tensorboard:
            from tensorboardX import SummaryWriter  # here: only --tensorboard runs need it

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


def _rows_until(path: str, step: int) -> List[Dict[str, str]]:
    """The rows of ``path`` (``metrics.csv``) up to ``step``; a row that is not one the writer wrote (a column
    missing or extra, a step that is not a number: a line edited or cut by a crash) is left out and named."""
    rows, dropped = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                try:
                    valid = set(row) == set(COLUMNS) and None not in row.values() and int(row["step"]) >= 0
                except ValueError:
                    valid = False
                if not valid:
                    dropped.append(str(reader.line_num))
                elif int(row["step"]) <= step:
                    rows.append(row)
        except csv.Error:  # not CSV from here on (e.g. a line of binary garbage)
            dropped.append(f"{reader.line_num}-end")
    if dropped:
        print(
            f"WARNING: {path}: left out {len(dropped)} line(s) that are not metrics rows (line(s) "
            f"{', '.join(dropped)})",
            file=sys.stderr,
            flush=True,
        )
    return rows


class DataWaitClock:
    """How much of the training steps' wall time the loop waits for its next batch.

    The loop calls :meth:`waiting` before it asks the pipeline for a batch, :meth:`ready` once the
    batch is on the devices and :meth:`dispatched` after the step call returns. The first step is
    kept apart: its wait (``first_batch_seconds``) includes starting the data workers, and its call
    compiles. From then on, evaluation and checkpointing run inside :meth:`paused` and are not step
    time. Steps are dispatched asynchronously, so the host may wait for data while the devices still
    run earlier steps: ``data_wait_fraction`` (:meth:`summary`) counts a wait only if the devices had
    finished every step dispatched before it by the time the batch arrived (then they waited for data,
    at most that long); ``host_data_wait_fraction`` counts every wait."""

    def __init__(self):
        self.first_batch_seconds: Optional[float] = None
        self.wait_seconds = self.starved_seconds = self.paused_seconds = 0.0
        self._asked = self._steady_start = None
        self._epoch = (0.0, 0.0, None)  # (starved, paused) seconds at the epoch's start, and its start time

    def waiting(self) -> None:
        self._asked = time.perf_counter()

    def ready(self, devices_busy: bool) -> None:
        """The batch is on the devices; ``devices_busy``: the previous step had not finished yet."""
        wait = time.perf_counter() - self._asked
        if self.first_batch_seconds is None:
            self.first_batch_seconds = wait
            return
        self.wait_seconds += wait
        if not devices_busy:
            self.starved_seconds += wait

    def dispatched(self) -> None:
        if self._steady_start is None:
            self._steady_start = time.perf_counter()
            self._epoch = (0.0, 0.0, self._steady_start)

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._steady_start is not None:
                self.paused_seconds += time.perf_counter() - start

    def steady_seconds(self) -> float:
        """Wall seconds since the first step returned, evaluation and checkpointing left out."""
        if self._steady_start is None:
            return 0.0
        return time.perf_counter() - self._steady_start - self.paused_seconds

    def summary(self) -> Dict[str, Optional[float]]:
        """``data_wait_fraction`` (seconds the devices waited for data, at most, / :meth:`steady_seconds`),
        ``host_data_wait_fraction`` (every wait of the host / the same), ``first_batch_seconds`` and
        ``steady_seconds``, all taken at one instant."""
        steady = self.steady_seconds()
        return {
            "data_wait_fraction": self.starved_seconds / max(steady, 1e-9),
            "host_data_wait_fraction": self.wait_seconds / max(steady, 1e-9),
            "first_batch_seconds": self.first_batch_seconds,
            "steady_seconds": steady,
        }

    def epoch_fraction(self) -> float:
        """``data_wait_fraction`` since the last call (the first call: since the first step)."""
        starved, paused, start = self._epoch
        now = time.perf_counter()
        if start is None:
            return 0.0
        self._epoch = (self.starved_seconds, self.paused_seconds, now)
        return (self.starved_seconds - starved) / max(now - start - (self.paused_seconds - paused), 1e-9)
