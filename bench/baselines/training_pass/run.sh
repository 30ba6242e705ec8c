#!/usr/bin/env bash
# The measurements of docs/performance.md, "MAT's update as one C++ pass": the update with the pass and
# layer by layer (alternating call by call, 2 and 1 threads), then end to end with and without it
# (separate processes, alternating, two rounds). Run from the repository root on an idle machine.
set -euo pipefail
export PYTHONPATH=src
out=bench/baselines/training_pass
py=${PYTHON:-.venv/bin/python}
$py bench/update.py --threads 2 --repeats 7 --compare-pass --json $out/update_2t.json
$py bench/update.py --threads 1 --repeats 5 --compare-pass --json $out/update_1t.json
for round in a b; do
  $py bench/train.py --envs smax:3m mamujoco:HalfCheetah-6x1 --threads 2 --iterations 3 --json $out/train_pass_$round.json
  $py bench/train.py --envs smax:3m mamujoco:HalfCheetah-6x1 --threads 2 --iterations 3 --per-layer --json $out/train_per_layer_$round.json
done
$py bench/train.py --envs smax:27m_vs_30m --threads 2 --iterations 3 --json $out/train_27m_pass.json
$py bench/train.py --envs smax:27m_vs_30m --threads 2 --iterations 3 --per-layer --json $out/train_27m_per_layer.json
