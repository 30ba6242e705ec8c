#!/usr/bin/env bash
# The CPU targets of issue 4 measured again on 4b6399e (docs/performance.md, "The CPU targets again"):
# the update at N = 3 and 27 and MAT on smax:3m end to end, three runs each, 2 threads, alternating
# update and train runs so that the machine's drift reaches both alike.
#   bash bench/baselines/recheck/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=src
out=bench/baselines/recheck
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400 > $out/lscpu.txt
for i in 1 2 3; do
  python bench/update.py --agents 3 27 --threads 2 --repeats 9 --json $out/update_2t_$i.json
  python bench/train.py --envs smax:3m --threads 2 --json $out/train_3m_$i.json
done
# OMP_WAIT_POLICY=PASSIVE (libgomp's threads sleep instead of spinning between parallel regions) against
# the default, alternating (run before the loop above, by hand, with these commands):
#   for i in 1 2; do for w in default PASSIVE; do
#     [ $w = PASSIVE ] && export OMP_WAIT_POLICY=PASSIVE || unset OMP_WAIT_POLICY
#     python bench/train.py --envs smax:3m --threads 2 --iterations 3 --json $out/omp_wait_${w}_$i.json
#   done; done
