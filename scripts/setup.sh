#!/usr/bin/env bash
# Creates .venv (if missing) and installs dynconv with every extra, pinned by constraints.txt.
# Idempotent: a second run only checks that everything is installed.
# --no-compile: pip would byte-compile every installed module (torch, jax, ... : about 40 s of a fresh
# setup, docs/training.md); Python compiles the modules a run imports the first time it imports them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e '.[torch,train,export,dev]'
