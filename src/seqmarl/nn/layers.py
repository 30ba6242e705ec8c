"""Transformer pieces shared by the networks: attention, MLP, init.

Shape legend: B batch (envs or samples), N agents (tokens), E embedding, H heads, D = E / H head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmarl.nn import cpp_decode


def init_linear(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias: the initialisation of the reference MAT (REFERENCE.md 2)."""
    nn.init.orthogonal_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


RELU_GAIN = math.sqrt(2.0)  # gain for a layer followed by a (GE/Re)LU, as in the reference
SMALL_GAIN = 0.01  # gain for every other layer in the reference


class _FewTokenAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt D) v with the C++ loops of csrc/decode.cpp, forward and backward, on
    (B, L, H, D) tensors (no transposes); the softmax weights are kept for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, module):
        out, probs = module.attention_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, probs)
        ctx.causal, ctx.module = causal, module
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved_tensors
        return (*ctx.module.attention_backward(grad, q, k, v, probs, ctx.causal), None, None)


class _Gelu(torch.autograd.Function):
    """Exact (erf) GELU with the C++ loops of csrc/decode.cpp; the input is kept for the backward."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.save_for_backward(x)
        ctx.module = module
        return module.gelu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.module.gelu_backward(grad, x), None


class _AddLayerNorm(torch.autograd.Function):
    """LayerNorm(x + residual) (or of x alone) over the last dimension in one pass, with the C++ loops of
    csrc/decode.cpp; the normalised rows and 1/std are kept for the backward."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, module, keep: bool):
        y, xhat, rstd = module.add_layer_norm_forward(x, residual, weight, bias, keep)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.module, ctx.has_residual = module, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        ds, dw, db = ctx.module.layer_norm_backward(grad, xhat, rstd, weight)
        return ds, (ds if ctx.has_residual else None), dw, db, None, None


def gelu(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """F.gelu, by the C++ loops where `cpp_decode.training_kernels(kernel, x)` allows (same maths)."""
    module = cpp_decode.training_kernels(kernel, x)
    return F.gelu(x) if module is None else _Gelu.apply(x, module)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, ln: nn.LayerNorm, kernel: str
) -> torch.Tensor:
    """ln(x + residual) (ln(x) when residual is None), by the C++ loops where `kernel` allows."""
    module = cpp_decode.training_kernels(kernel, x)
    if module is None or ln.weight is None or ln.eps != cpp_decode.LAYER_NORM_EPS:
        return ln(x if residual is None else x + residual)
    # Inside `forward` grad mode is off, so whether a backward can come is decided here.
    inputs = (x, residual, ln.weight)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _AddLayerNorm.apply(x, residual, ln.weight, ln.bias, module, keep)


class Attention(nn.Module):
    """Multi-head attention whose queries and keys/values may come from different token streams.

    `forward` attends over whole sequences; the decoder's cached step (nn/mat.py) reuses `heads` and the
    projection weights. `kernel` is a `MATConfig.decode` mode: with "auto"/"cpp", CPU float32 sequences
    of few tokens are attended by the C++ loops (cpp_decode.training_attention; same maths, summed in
    another order), everything else by torch's scaled_dot_product_attention.
    """

    def __init__(self, n_embd: int, n_head: int, kernel: str = "python"):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.kernel = kernel
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
        q, k, v = self.query(query_source), self.key(kv_source), self.value(kv_source)  # 3 x (B, L, E)
        per_head = (B, L, self.n_head, E // self.n_head)
        module = cpp_decode.training_attention(self.kernel, q.view(per_head))
        if module is not None:
            y = _FewTokenAttention.apply(q.view(per_head), k.view(per_head), v.view(per_head), causal, module)
            return self.proj(y.view(B, L, E))  # y: (B, L, H, D)
        y = F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v), is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, L, E))  # y: (B, H, L, D)


class MLP(nn.Module):
    """Token-wise feed-forward layer; hidden width = n_embd as in the reference."""

    def __init__(self, n_embd: int, kernel: str = "python"):
        super().__init__()
        self.kernel = kernel
        self.fc = init_linear(nn.Linear(n_embd, n_embd), RELU_GAIN)
        self.proj = init_linear(nn.Linear(n_embd, n_embd), SMALL_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu(self.fc(x), self.kernel))
