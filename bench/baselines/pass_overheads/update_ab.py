"""The PPO update (bench/update.py's: 3200 samples x N agents, discrete, one minibatch) with this
checkout's csrc/decode.cpp and Python against a build of an earlier csrc/decode.cpp, alternating call by
call in one process (the machine's speed drifts by ~20% within minutes). Prints the median of each and
the median of the per-round ratios, and the largest weight difference after all rounds.

    git show COMMIT:src/seqmarl/nn/csrc/decode.cpp > /tmp/old_decode.cpp
    PYTHONPATH=src python bench/baselines/pass_overheads/update_ab.py THREADS /tmp/old_decode.cpp [N ...]

Only the C++ module is swapped: Python changes (nn/, algos/) are in both arms.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "bench")
from torch.utils.cpp_extension import load
from update import ACTIONS, OBS_DIM, synthetic_batch

from seqmarl.algos.mat import MATAlgorithm
from seqmarl.config import PPOConfig
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig
from seqmarl.runinfo import keep_freed_memory
from seqmarl.types import DiscreteActions, EnvSpec

ROUNDS, WARMUP = 24, 3
keep_freed_memory()
old = load("decode_before_ext", [sys.argv[2]], extra_cflags=["-O3", *cpp_decode.openmp_flags()])
new = cpp_decode.extension("auto")
torch.set_num_threads(int(sys.argv[1]))
for N in [int(n) for n in sys.argv[3:]] or [3, 27]:
    spec = EnvSpec("bench", N, OBS_DIM, OBS_DIM, DiscreteActions(ACTIONS), 100, False)
    batch = synthetic_batch(3200, N, torch.device("cpu"))
    algos, gens = {}, {}
    for name in ("old", "new"):
        torch.manual_seed(0)
        algos[name] = MATAlgorithm(
            spec, MATConfig(), PPOConfig(epochs=1, num_minibatches=1), torch.device("cpu")
        )
        gens[name] = torch.Generator().manual_seed(0)
    times = {"old": [], "new": []}
    for round_ in range(WARMUP + ROUNDS):
        for name, module in (("old", old), ("new", new)):
            cpp_decode._module = module
            start = time.perf_counter()
            algos[name].update(batch, 5e-4, gens[name])
            if round_ >= WARMUP:
                times[name].append((time.perf_counter() - start) * 1e3)
    cpp_decode._module = new
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(algos["old"].model.parameters(), algos["new"].model.parameters(), strict=True)
    )
    a, b = (statistics.median(v) for v in times.values())
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"], strict=True))
    print(
        f"threads {sys.argv[1]} N={N}: update ms {a:.1f} (old) / {b:.1f} (new), speed-up {a / b:.3f}, "
        f"median per-round ratio {ratio:.3f}; "
        f"largest weight difference after {WARMUP + ROUNDS} updates {drift:.1e}"
    )
