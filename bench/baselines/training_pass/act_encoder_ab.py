"""act() of MAT with its encoder and value head as the training pass's encoder loops (C++) against the
per-layer encoder, alternating in one process (same weights, same observations, same decode loop).

    PYTHONPATH=src python bench/baselines/training_pass/act_encoder_ab.py THREADS N ENVS
"""

import statistics
import sys
import time

import torch

from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import DiscreteActions, EnvSpec

threads, N, B = (int(x) for x in sys.argv[1:4])
torch.set_num_threads(threads)
mask = torch.ones(B, N, 9, dtype=torch.bool)
model = MultiAgentTransformer(MATConfig(), EnvSpec("bench", N, 100, 100, DiscreteActions(9), 10, False))
obs = torch.randn(B, N, 100)
times: dict[bool, list[float]] = {True: [], False: []}
with torch.no_grad():
    for _ in range(50):
        model.act(obs, mask)
    for _ in range(15):
        for encoder_pass in (True, False):
            cpp_decode.use_training_pass = encoder_pass
            start = time.perf_counter()
            for _ in range(50):
                model.act(obs, mask)
            times[encoder_pass].append((time.perf_counter() - start) / 50 * 1e3)
ours, theirs = statistics.median(times[True]), statistics.median(times[False])
print(
    f"threads {threads} N={N} envs={B}: act ms, C++ encoder {ours:.3f}, per layer {theirs:.3f}, "
    f"gain {theirs / ours:.2f}"
)
