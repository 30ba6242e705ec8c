#!/usr/bin/env bash
# End-to-end A/B of commit c25b481 (C++ loops with OpenMP, C++ GELU/LayerNorm in the update, index_select
# gather; ec09213 adds the 32-token attention limit) against 84bec72 (before them): MAT on ENV (default
# smax:3m) with its preset, bench/train.py, separate processes alternating before / after, R rounds, at
# THREADS torch threads.
#   BEFORE=/path/to/checkout_at_84bec72 AFTER=/path/to/checkout_at_c25b481 PYTHON=.venv/bin/python \
#     THREADS=2 ROUNDS=3 [ENV=smax:27m_vs_30m] bash bench/baselines/openmp_fused_ab/run.sh
# Each checkout builds its own C++ module (TORCH_EXTENSIONS_DIR=<checkout>_ext); JSON goes next to this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
env_name=${ENV:-smax:3m}
tag=$([ "$env_name" = smax:3m ] && echo "" || echo "${env_name//:/_}_")  # smax:3m keeps the first files' names
PYTHON=${PYTHON:-python}; [[ "$PYTHON" = /* || "$PYTHON" != */* ]] || PYTHON="$PWD/$PYTHON"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
    (cd "$dir" && PYTHONPATH="$dir/src" TORCH_EXTENSIONS_DIR="${dir}_ext" "$PYTHON" bench/train.py --envs "${ENV:-smax:3m}" \
      --threads "${THREADS:-2}" --json "$here/train_${tag}${side}_${THREADS:-2}t_r${round}.json" | grep -E "^\| (smax|mamujoco)")
  done
done
