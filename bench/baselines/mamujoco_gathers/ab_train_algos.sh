#!/bin/bash
# base (bd6626a + this bench/train.py) / new, alternating, MAPPO and HAPPO on two MaMuJoCo tasks, 1 thread
set -e
for algo in mappo happo; do
for i in 1 2; do
  for side in base main; do
    cd /work/$side
    PYTHONPATH=/work/$side/src TORCH_EXTENSIONS_DIR=/work/main_ext /work/main/.venv/bin/python bench/train.py --algo $algo --envs mamujoco:HalfCheetah-6x1 mamujoco:Ant-4x2 --threads 1 --iterations 3 --json /work/exp/s17/train_${algo}_${side}_$i.json 2>&1 | grep "^| mamujoco" | sed "s/^/$side $i /"
  done
done
done
