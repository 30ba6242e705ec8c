"""Transformer pieces shared by the networks: attention, MLP, init.

Shape legend: B batch (envs or samples), N agents (tokens), E embedding, H heads, D = E / H head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_linear(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias: the initialisation of the reference MAT (REFERENCE.md 2)."""
    nn.init.orthogonal_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


RELU_GAIN = math.sqrt(2.0)  # gain for a layer followed by a (GE/Re)LU, as in the reference
SMALL_GAIN = 0.01  # gain for every other layer in the reference


class Attention(nn.Module):
    """Multi-head attention whose queries and keys/values may come from different token streams.

    `forward` attends over whole sequences; the decoder's cached step (nn/mat.py) reuses `heads` and the
    projection weights.
    """

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.query = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)
        self.key = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)
        self.value = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)
        self.proj = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        return x.view(B, L, self.n_head, E // self.n_head).transpose(1, 2)  # (B, H, L, D)

    def forward(self, query_source: torch.Tensor, kv_source: torch.Tensor, causal: bool) -> torch.Tensor:
        """query_source (B, L, E), kv_source (B, L, E) -> (B, L, E)."""
        B, L, E = query_source.shape
        q = self.heads(self.query(query_source))  # (B, H, L, D)
        k, v = self.heads(self.key(kv_source)), self.heads(self.value(kv_source))  # 2 x (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, D)
        return self.proj(y.transpose(1, 2).reshape(B, L, E))  # (B, L, E)


class MLP(nn.Module):
    """Token-wise feed-forward layer; hidden width = n_embd as in the reference."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = init_linear(nn.Linear(n_embd, n_embd), RELU_GAIN)
        self.proj = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))
