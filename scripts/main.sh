#!/usr/bin/env bash
# Sets everything up and runs the main job: train a dynamic ResNet on the embedded digits data set.
# The per-sample conv strategies follow the fixed rules of dynconv_jax.ops.choose_strategy rather than
# autotune's timings (DYNCONV_AUTOTUNE=0 unless set): every strategy is exact but sums in its own order,
# and on the digits another order gives another final test accuracy (docs/training.md, "Main command"),
# so timings taken on a busy machine would make the result depend on the load; the fixed rules also skip
# the measuring, which a fresh clone would otherwise pay for in CPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DYNCONV_AUTOTUNE="${DYNCONV_AUTOTUNE:-0}"
exec .venv/bin/python -m train "$@"
