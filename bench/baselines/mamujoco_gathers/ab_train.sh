#!/bin/bash
# base / new / base / new, MAT end to end on two MaMuJoCo tasks, 1 thread, benchmark workers paused
set -e
for i in 1 2; do
  for side in base main; do
    cd /work/$side
    PYTHONPATH=/work/$side/src TORCH_EXTENSIONS_DIR=/work/main_ext /work/main/.venv/bin/python bench/train.py --envs mamujoco:HalfCheetah-6x1 mamujoco:Ant-4x2 --threads 1 --iterations 3 --json /work/exp/s17/train_${side}_$i.json 2>&1 | grep -v "WARNING\|^$" | grep "^| mamujoco"
  done
done
