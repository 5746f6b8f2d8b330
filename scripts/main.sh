#!/usr/bin/env bash
# Sets everything up and runs the main job: train a dynamic ResNet on the embedded digits data set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m train "$@"
