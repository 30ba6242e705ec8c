#!/usr/bin/env bash
# End-to-end A/B of commit c25b481 (C++ loops with OpenMP, C++ GELU/LayerNorm in the update, index_select
# gather) against 84bec72 (before it): MAT on smax:3m with its preset, bench/train.py, separate processes
# alternating before / after, R rounds, at THREADS torch threads.
#   BEFORE=/path/to/checkout_at_84bec72 AFTER=/path/to/checkout_at_c25b481 PYTHON=.venv/bin/python \
#     THREADS=2 ROUNDS=3 bash bench/baselines/openmp_fused_ab/run.sh
# Each checkout builds its own C++ module (TORCH_EXTENSIONS_DIR=<checkout>_ext); JSON goes next to this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}; [[ "$PYTHON" = /* || "$PYTHON" != */* ]] || PYTHON="$PWD/$PYTHON"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
    (cd "$dir" && PYTHONPATH="$dir/src" TORCH_EXTENSIONS_DIR="${dir}_ext" "$PYTHON" bench/train.py --envs smax:3m \
      --threads "${THREADS:-2}" --json "$here/train_${side}_${THREADS:-2}t_r${round}.json" | grep "^| smax")
  done
done
