"""The PPO update (bench/update.py's: 3200 samples x N agents, discrete, one minibatch) with this
checkout's csrc/decode.cpp against a build of an earlier one (with torch's ops for the masked categorical
when that build has no loops for it), alternating call by call in one process
(the machine's speed drifts by ~20% within minutes); the update's outputs are compared too.

    git show COMMIT:src/seqmarl/nn/csrc/decode.cpp > /tmp/old_decode.cpp
    PYTHONPATH=src python bench/baselines/token_table/update_ab.py THREADS /tmp/old_decode.cpp [N ...]
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
        ppo = PPOConfig(epochs=1, num_minibatches=1)
        algos[name] = MATAlgorithm(spec, MATConfig(), ppo, torch.device("cpu"))
        gens[name] = torch.Generator().manual_seed(0)
    times = {"old": [], "new": []}
    for round_ in range(14):
        for name, module in (("old", old), ("new", new)):
            # A build without categorical loops (before 89a2792) takes torch's ops, as it did (the whole
            # pass does not read this switch).
            cpp_decode._module = module
            cpp_decode.use_training_fused = hasattr(module, "categorical_forward")
            start = time.perf_counter()
            algos[name].update(batch, 5e-4, gens[name])
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    cpp_decode._module, cpp_decode.use_training_fused = new, True
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(algos["old"].model.parameters(), algos["new"].model.parameters(), strict=True)
    )
    a, b = (statistics.median(v) for v in times.values())
    print(
        f"threads {sys.argv[1]} N={N}: update ms {a:.1f} (old) / {b:.1f} (new), speed-up {a / b:.2f}; "
        f"largest weight difference after 14 updates {drift:.1e}"
    )
