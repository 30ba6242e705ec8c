"""act() of the fused decode loop with the shared `mm` tiles against a build of an earlier decode.cpp with
its own 4x16 `linear_tile16` (pass the file: `git show 8a3222e:src/seqmarl/nn/csrc/decode.cpp > OLD.cpp`),
alternating in one process; outputs are the same bits.

    PYTHONPATH=src python bench/baselines/training_pass/decode_mm_ab.py THREADS OLD.cpp
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "src")
from torch.utils.cpp_extension import load

from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import DiscreteActions, EnvSpec

old = load("decode_before_ext", [sys.argv[2]], extra_cflags=["-O3", "-fopenmp"])
new = cpp_decode.extension("auto")

torch.set_num_threads(int(sys.argv[1]))
for N in (3, 27, 64):
    model = MultiAgentTransformer(MATConfig(), EnvSpec("t", N, 100, 100, DiscreteActions(10), 10, False))
    obs = torch.randn(32, N, 100)
    mask = torch.ones(32, N, 10, dtype=torch.bool)
    t = {"8a3222e (linear_tile16)": [], "mm": []}
    with torch.no_grad():
        for _ in range(15):
            for name, m in (("8a3222e (linear_tile16)", old), ("mm", new)):
                cpp_decode._module = m
                s = time.perf_counter()
                for _ in range(20):
                    model.act(obs, mask)
                t[name].append((time.perf_counter() - s) / 20 * 1e3)
    cpp_decode._module = new
    a, b = (statistics.median(v) for v in t.values())
    print(
        f"threads {sys.argv[1]} N={N} envs=32: act ms {a:.3f} (8a3222e) / {b:.3f} (this), ratio {a / b:.2f}"
    )
