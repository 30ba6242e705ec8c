"""MAT's act() (32 envs, discrete, the fused C++ decode loop) with this checkout's csrc/decode.cpp
against a build of an earlier one, alternating call by call in one process; the actions are compared.

    git show COMMIT:src/seqmarl/nn/csrc/decode.cpp > /tmp/old_decode.cpp
    PYTHONPATH=src python bench/baselines/pass_overheads/act_ab.py THREADS /tmp/old_decode.cpp [N ...]
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "src")
from torch.utils.cpp_extension import load

from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.runinfo import keep_freed_memory
from seqmarl.types import DiscreteActions, EnvSpec

ROUNDS, WARMUP, ENVS = 60, 5, 32
keep_freed_memory()
old = load("decode_before_ext", [sys.argv[2]], extra_cflags=["-O3", *cpp_decode.openmp_flags()])
new = cpp_decode.extension("auto")
torch.set_num_threads(int(sys.argv[1]))
for N in [int(n) for n in sys.argv[3:]] or [3, 27, 64]:
    torch.manual_seed(0)
    spec = EnvSpec("bench", N, 100, 100, DiscreteActions(10), 100, False)
    model = MultiAgentTransformer(MATConfig(), spec)
    obs, mask = torch.randn(ENVS, N, 100), torch.ones(ENVS, N, 10, dtype=torch.bool)
    times, actions = {"old": [], "new": []}, {}
    with torch.no_grad():
        for round_ in range(WARMUP + ROUNDS):
            for name, module in (("old", old), ("new", new)):
                cpp_decode._module = module
                start = time.perf_counter()
                out = model.act(obs, mask, deterministic=True)
                if round_ >= WARMUP:
                    times[name].append((time.perf_counter() - start) * 1e3)
                actions[name] = out.actions
    cpp_decode._module = new
    a, b = (statistics.median(v) for v in times.values())
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"], strict=True))
    same = torch.equal(actions["old"], actions["new"])
    print(
        f"threads {sys.argv[1]} N={N} envs={ENVS}: act ms {a:.2f} (old) / {b:.2f} (new), "
        f"speed-up {a / b:.3f}, median per-round ratio {ratio:.3f}; same greedy actions: {same}"
    )
