"""A register-blocked variant of the update's C++ attention (decode_blocked.cpp.txt: csrc/decode.cpp
with `blocked_forward` / `blocked_backward` for head sizes that are multiples of 8), against the
tree's own loops: forward + backward at B = 3200 samples, H = 1, D = 64, alternating calls in one
process, and the largest difference of their outputs. Tried and not kept (docs/performance.md).

    PYTHONPATH=src python bench/baselines/blocked_attention/run.py THREADS
"""

import pathlib
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

from seqmarl.nn import cpp_decode
from seqmarl.runinfo import keep_freed_memory

keep_freed_memory()
torch.set_num_threads(int(sys.argv[1]))
build = pathlib.Path(tempfile.mkdtemp())
(build / "decode_blocked.cpp").write_text(
    (pathlib.Path(__file__).parent / "decode_blocked.cpp.txt").read_text()
)
flags = ["-O3", *cpp_decode.openmp_flags()]
blocked = load("seqmarl_decode_blocked", [str(build / "decode_blocked.cpp")], extra_cflags=flags)
current = cpp_decode.extension("cpp")
for L in (3, 8, 12, 16, 20, 27, 32):
    for causal in (False, True):
        g = torch.Generator().manual_seed(L)
        q, k, v, do = (torch.randn(3200, L, 1, 64, generator=g) for _ in range(4))

        def run(module, q=q, k=k, v=v, do=do, causal=causal):
            out, probs = module.attention_forward(q, k, v, causal)
            return (out, probs, *module.attention_backward(do, q, k, v, probs, causal))

        diff = max((x - y).abs().max().item() for x, y in zip(run(current), run(blocked)))
        times = {"current": [], "blocked": []}
        for r in range(13):
            for name, module in (("current", current), ("blocked", blocked)):
                start = time.perf_counter()
                run(module)
                if r >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
        a, b = statistics.median(times["current"]), statistics.median(times["blocked"])
        line = f"L={L:2d} causal={causal!s:5} current {a:7.2f} ms  blocked {b:7.2f} ms  {a / b:.2f}x"
        print(f"{line}  max|diff| {diff:.1e}")
