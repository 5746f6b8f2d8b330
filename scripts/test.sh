#!/usr/bin/env bash
# Sets everything up, checks lint and format (seconds), then runs the whole test suite (this is what CI runs).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast loop (CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n 2 --dist load --maxschedchunk 2 "$@"
