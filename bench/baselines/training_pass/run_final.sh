#!/usr/bin/env bash
# After the whole-batch change (one minibatch: no gather): the update at N = 3 and 27 twice, and smax:3m
# end to end with and without the C++ pass. docs/performance.md, "MAT's update as one C++ pass".
set -euo pipefail
export PYTHONPATH=src
out=bench/baselines/training_pass
py=${PYTHON:-.venv/bin/python}
$py $out/mm_tiles.py | tee $out/mm_tiles.md
for round in 1 2; do
  $py bench/update.py --agents 3 27 --threads 2 --repeats 9 --compare-pass --json $out/final_update_2t_$round.json
done
$py bench/train.py --envs smax:3m --threads 2 --iterations 3 --json $out/final_train_pass.json
$py bench/train.py --envs smax:3m --threads 2 --iterations 3 --per-layer --json $out/final_train_per_layer.json
$py bench/train.py --envs smax:3m --threads 2 --iterations 3 --json $out/final_train_pass_2.json
