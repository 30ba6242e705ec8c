"""The update's GELU and residual + LayerNorm kernels alone: the C++ loops (csrc/decode.cpp) against
torch's, on (3200, 3, 64) float32 inputs (N = 3's update), forward outputs kept alive as in a forward
pass, 8 rotating inputs; the fastest and the median of 5 rounds of 40 calls, in ms.

    python bench/baselines/openmp_fused_ab/kernels.py [THREADS]
"""

import sys
import time

import torch
import torch.nn.functional as F

from seqmarl import runinfo
from seqmarl.nn import cpp_decode

runinfo.keep_freed_memory()
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
m = cpp_decode.extension("cpp")
g = torch.Generator().manual_seed(0)
xs, rs, dys = ([torch.randn(3200, 3, 64, generator=g) for _ in range(8)] for _ in range(3))
w, b = torch.ones(64) + 0.1 * torch.randn(64, generator=g), 0.1 * torch.randn(64, generator=g)
saved = [m.add_layer_norm_forward(x, r, w, b, True) for x, r in zip(xs, rs)]
stats = [torch.ops.aten.native_layer_norm(x + r, [64], w, b, 1e-5) for x, r in zip(xs, rs)]
pairs = {
    "residual add + LayerNorm, forward": (
        lambda i: m.add_layer_norm_forward(xs[i], rs[i], w, b, True),
        lambda i: torch.ops.aten.native_layer_norm(xs[i] + rs[i], [64], w, b, 1e-5),
    ),
    "LayerNorm backward": (
        lambda i: m.layer_norm_backward(dys[i], saved[i][1], saved[i][2], w),
        lambda i: torch.ops.aten.native_layer_norm_backward(
            dys[i], xs[i] + rs[i], [64], stats[i][1], stats[i][2], w, b, [True, True, True]
        ),
    ),
    "GELU forward": (lambda i: m.gelu_forward(xs[i]), lambda i: F.gelu(xs[i])),
    "GELU backward": (
        lambda i: m.gelu_backward(dys[i], xs[i]),
        lambda i: torch.ops.aten.gelu_backward(dys[i], xs[i]),
    ),
}
print(f"threads {torch.get_num_threads()}, commit {runinfo.source_commit()}")
print("| kernel | C++ ms, fastest / median | torch ms, fastest / median |\n|---|---|---|")
for name, fns in pairs.items():
    times = [[], []]
    for _ in range(5):
        for side, f in enumerate(fns):
            kept = []
            start = time.perf_counter()
            for call in range(40):
                kept.append(f(call % 8))
            times[side].append((time.perf_counter() - start) / 40 * 1e3)
            del kept
    cells = [f"{min(t):.3f} / {sorted(t)[2]:.3f}" for t in times]
    print(f"| {name} | {cells[0]} | {cells[1]} |")
