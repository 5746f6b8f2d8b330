"""``python -m train [--key=value ...]``: train, evaluate, checkpoint and export (docs/training.md)."""

from __future__ import annotations

import logging
import os
import sys

from train.config import UsageError, parse_args, usage


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        config = parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Here: --help and usage errors answer without loading JAX.
    from train.checkpoint import CheckpointError
    from train.loop import TrainingDiverged, train_and_evaluate
    from train.preemption import EXIT_CODE, Preempted
    from train.workdir import WorkdirError
    from train.worker_watchdog import WorkerDied

    logging.getLogger("absl").addFilter(_orbax_failure_reports)
    try:
        train_and_evaluate(config)
    except UsageError as error:  # found once the run started: the data, the workdir, a --resume refused
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError, WorkerDied, WorkdirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Preempted as stop:
        print(stop, file=sys.stderr)
        return EXIT_CODE
    return 0


def _orbax_failure_reports(record: logging.LogRecord) -> bool:
    """Keep Orbax's error reports (with tracebacks, from its background threads) off the terminal: the run
    raises each failure itself, as one line naming the step, the cause and the last good checkpoint
    (:class:`~train.checkpoint.CheckpointWriteError`). A full disk used to print ~300 lines before it."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


if __name__ == "__main__":
    sys.exit(main())
