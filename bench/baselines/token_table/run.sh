#!/usr/bin/env bash
# The token table and the categorical loops (docs/performance.md, "The token table and the categorical
# loops"): the update against the previous build, alternating in one process, at 2 and 1 threads; then
# bench/update.py at N = 3, 10, 27, 64 twice, and MAT on smax:3m end to end three times.
set -euo pipefail
export PYTHONPATH=src
out=bench/baselines/token_table
py=${PYTHON:-.venv/bin/python}
git show 8c0888e:src/seqmarl/nn/csrc/decode.cpp > /tmp/decode_8c0888e.cpp
{
  $py $out/update_ab.py 2 /tmp/decode_8c0888e.cpp 3 27
  $py $out/update_ab.py 1 /tmp/decode_8c0888e.cpp 3 27
} 2>&1 | grep -v Warning | tee $out/update_ab.txt
for round in 1 2; do
  $py bench/update.py --agents 3 10 27 64 --threads 2 --repeats 9 --json $out/update_2t_$round.json
done
for round in 1 2 3; do
  $py bench/train.py --envs smax:3m --threads 2 --iterations 4 --json $out/train_3m_$round.json
done
