"""``python -m train [--key=value ...]``: train, evaluate, checkpoint and export (docs/training.md)."""
from __future__ import annotations

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
    from train.checkpoint import CheckpointError
    from train.loop import TrainingDiverged, train_and_evaluate
    from train.worker_watchdog import WorkerDied

    try:
        train_and_evaluate(config)
    except UsageError as error:  # found once the run started: the data, the workdir, a --resume refused
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError, WorkerDied) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
