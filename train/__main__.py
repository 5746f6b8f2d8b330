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
    # Here: --help and usage errors answer without loading JAX.
    from train.checkpoint import CheckpointError
    from train.loop import TrainingDiverged, train_and_evaluate

    try:
        train_and_evaluate(config)
    except (TrainingDiverged, CheckpointError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
