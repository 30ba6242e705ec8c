"""MAT's update with the attention's q/k/v (self-attention) or k/v (cross-attention) projected by one
matmul on the concatenated weights, split and made contiguous for the C++ attention, against the
current three separate Linears; the two alternate call by call in one process (median ms).

    PYTHONPATH=src python bench/baselines/fused_adam/qkv_one_matmul.py N THREADS REPEATS
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import common  # noqa: E402
from update import ACTIONS, OBS_DIM, synthetic_batch  # noqa: E402

from seqmarl import runinfo  # noqa: E402
from seqmarl.algos.mat import MATAlgorithm  # noqa: E402
from seqmarl.config import PPOConfig  # noqa: E402
from seqmarl.nn import cpp_decode  # noqa: E402
from seqmarl.nn.layers import Attention, _FewTokenAttention  # noqa: E402
from seqmarl.nn.mat import MATConfig  # noqa: E402
from seqmarl.types import DiscreteActions, EnvSpec  # noqa: E402

THREE_LINEARS = Attention.forward


def one_matmul(
    self: Attention, query_source: torch.Tensor, kv_source: torch.Tensor, causal: bool
) -> torch.Tensor:
    B, L, E = query_source.shape
    per_head = (B, L, self.n_head, E // self.n_head)
    if query_source is kv_source:
        parts = (self.query, self.key, self.value)
        weight, bias = torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts])
        q, k, v = F.linear(query_source, weight, bias).split(E, dim=-1)
    else:
        q = self.query(query_source)
        weight, bias = (
            torch.cat([self.key.weight, self.value.weight]),
            torch.cat([self.key.bias, self.value.bias]),
        )
        k, v = F.linear(kv_source, weight, bias).split(E, dim=-1)
    q, k, v = (t.contiguous().view(per_head) for t in (q, k, v))
    module = cpp_decode.training_attention(self.kernel, q)
    if module is not None:
        return self.proj(_FewTokenAttention.apply(q, k, v, causal, module).view(B, L, E))
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return self.proj(y.transpose(1, 2).reshape(B, L, E))


def main() -> None:
    runinfo.keep_freed_memory()
    N, threads, repeats = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    spec = EnvSpec("bench", N, OBS_DIM, OBS_DIM, DiscreteActions(ACTIONS), 100, False)
    torch.manual_seed(0)
    algorithm = MATAlgorithm(spec, MATConfig(), PPOConfig(epochs=1, num_minibatches=1), device)
    batch = synthetic_batch(3200, N, device)
    generator = torch.Generator().manual_seed(0)

    def update(forward):
        def run() -> None:
            Attention.forward = forward
            algorithm.update(batch, 5e-4, generator)

        return run

    try:
        t = common.time_alternating_ms(
            {"three": update(THREE_LINEARS), "one": update(one_matmul)}, device, repeats, 2
        )
    finally:
        Attention.forward = THREE_LINEARS
    print(f"N={N}, {threads} threads: three Linears {t['three']:.1f} ms, one matmul {t['one']:.1f} ms")


if __name__ == "__main__":
    main()
