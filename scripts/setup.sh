#!/usr/bin/env bash
# Creates .venv (if missing) and installs dynconv with every extra (docs: the suite builds the API site),
# pinned by constraints.txt.
# Idempotent: a second run only checks that everything is installed.
# The venv gets the pip pinned in constraints.txt: pip 23's link evaluation made resolving the pins from
# the package index about 10 s slower (docs/training.md, "Main command"). It is installed by the
# interpreter's own pip (--python) into a venv made without pip, which skips ensurepip's byte-compiled
# copy of the bundled pip; an interpreter whose pip cannot do that gets an ordinary venv, then the pin.
# --no-compile: pip would byte-compile every installed module (torch, jax, ... : about 40 s of a fresh
# setup); Python compiles the modules a run imports the first time it imports them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_OPTIONS=(-q --disable-pip-version-check --no-compile -c constraints.txt)
if [ ! -x .venv/bin/python ]; then
  if ! { "$PY" -m venv --without-pip .venv \
         && "$PY" -m pip --python .venv/bin/python install "${PIP_OPTIONS[@]}" pip 2>/dev/null; }; then
    rm -rf .venv
    "$PY" -m venv .venv
    .venv/bin/python -m pip install "${PIP_OPTIONS[@]}" pip
  fi
fi
.venv/bin/python -m pip install "${PIP_OPTIONS[@]}" -e '.[torch,train,export,dev,docs]'
