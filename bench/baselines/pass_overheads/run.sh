#!/usr/bin/env bash
# The update's overheads (docs/performance.md, "Flat Adam, even chunks, leftover-row tiles, and the
# interleaved rate"): bench/update.py with --compare-adam (FlatAdam against torch's Adam tensor by tensor)
# and bench/train.py on smax:3m, alternating, three times each, 2 threads; then A/Bs of csrc/decode.cpp
# against 8004a6f's (even chunks, the matmul's leftover rows, blocked weight gradients): the update and
# act(), 2 and 1 threads.
#   bash bench/baselines/pass_overheads/run.sh   (with the project's .venv active, or python on PATH able to import torch)
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=src
out=bench/baselines/pass_overheads
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400 > $out/lscpu.txt
git show 8004a6f:src/seqmarl/nn/csrc/decode.cpp > /tmp/decode_8004a6f.cpp
for i in 1 2 3; do
  python bench/update.py --agents 3 27 --threads 2 --repeats 9 --compare-adam --json $out/update_2t_$i.json
  python bench/train.py --envs smax:3m --threads 2 --json $out/train_3m_$i.json
done
# The A/Bs last: they rewrite tracked text files, which would mark the JSON above "-dirty".
{
  python $out/update_ab.py 2 /tmp/decode_8004a6f.cpp 3 27
  python $out/update_ab.py 1 /tmp/decode_8004a6f.cpp 3 27
} 2>&1 | grep -v "^$" | tee $out/update_ab.txt
{
  python $out/act_ab.py 2 /tmp/decode_8004a6f.cpp 3 27 64
  python $out/act_ab.py 1 /tmp/decode_8004a6f.cpp 3 27 64
} 2>&1 | grep -v "^$" | tee $out/act_ab.txt
