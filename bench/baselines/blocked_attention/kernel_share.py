"""Share of MAT's update (3200 samples x N agents) spent in the C++ training kernels (attention, GELU,
LayerNorm), timed around each call inside the update, in one process:

    PYTHONPATH=src python bench/baselines/blocked_attention/kernel_share.py THREADS N
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import update as bench_update  # noqa: E402

from seqmarl.algos.mat import MATAlgorithm  # noqa: E402
from seqmarl.config import PPOConfig  # noqa: E402
from seqmarl.nn import cpp_decode  # noqa: E402
from seqmarl.nn.mat import MATConfig  # noqa: E402
from seqmarl.runinfo import keep_freed_memory  # noqa: E402
from seqmarl.types import DiscreteActions, EnvSpec  # noqa: E402

KERNELS = ("attention_forward", "attention_backward", "gelu_forward", "gelu_backward")
KERNELS += ("add_layer_norm_forward", "layer_norm_backward")

keep_freed_memory()  # as the trainer does
torch.set_num_threads(int(sys.argv[1]))
N = int(sys.argv[2])
spec = EnvSpec(
    "bench", N, bench_update.OBS_DIM, bench_update.OBS_DIM, DiscreteActions(bench_update.ACTIONS), 100, False
)
torch.manual_seed(0)
algorithm = MATAlgorithm(spec, MATConfig(), PPOConfig(epochs=1, num_minibatches=1), torch.device("cpu"))
batch = bench_update.synthetic_batch(3200, N, torch.device("cpu"))
generator = torch.Generator().manual_seed(0)
module = cpp_decode.training_kernels("auto", torch.empty(1))
seconds: dict[str, float] = dict.fromkeys(KERNELS, 0.0)


def timed(call, name):
    def wrapper(*args):
        start = time.perf_counter()
        result = call(*args)
        seconds[name] += time.perf_counter() - start
        return result

    return wrapper


for name in KERNELS:
    setattr(module, name, timed(getattr(module, name), name))
for _ in range(2):
    algorithm.update(batch, 5e-4, generator)
seconds.update(dict.fromkeys(KERNELS, 0.0))
repeats = 5
start = time.perf_counter()
for _ in range(repeats):
    algorithm.update(batch, 5e-4, generator)
update_ms = (time.perf_counter() - start) / repeats * 1e3
ms = {name: value / repeats * 1e3 for name, value in seconds.items()}
attention = ms["attention_forward"] + ms["attention_backward"]
print(
    f"N={N} threads={sys.argv[1]} update {update_ms:.1f} ms; "
    + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
)
print(
    f"attention {attention / update_ms:.0%} of the update, all C++ kernels {sum(ms.values()) / update_ms:.0%}"
)
