"""Action distributions as pure functions (torch.distributions' validation costs time per agent step).

Shape legend: B batch, L tokens (agents), A actions (discrete) or action dimensions (continuous).
"""

from __future__ import annotations

import math

import torch

from seqmarl.nn import cpp_decode

MASKED_LOGIT = -1e10  # finite, so entropy terms of masked actions are 0 * finite = 0, never NaN


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unavailable actions get a logit so low their probability is exactly 0 in float32."""
    return logits.masked_fill(~mask, MASKED_LOGIT)  # (B, L, A)


def gumbel_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None):
    u = torch.rand(shape, generator=generator, device=device)
    neg_log_u = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)  # in (0, 46]
    return -torch.log(neg_log_u)


def sampling_noise(
    shape: tuple[int, ...], discrete: bool, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Every random number a sample of `shape` (B, N, A) needs: Gumbel noise for categorical
    (Gumbel-max), standard normal noise for Gaussian actions. Drawn in one call so that any decoding
    order consumes the same draws."""
    if discrete:
        return gumbel_noise(shape, device, generator)
    return torch.randn(shape, generator=generator, device=device)


def categorical_sample(logits: torch.Tensor, deterministic: bool, generator: torch.Generator | None = None):
    """Gumbel-max sampling: argmax(logits + Gumbel noise); masked logits can never win."""
    if deterministic:
        return logits.argmax(dim=-1)  # (B, L)
    return (logits + gumbel_noise(logits.shape, logits.device, generator)).argmax(dim=-1)  # (B, L)


def categorical_log_prob_entropy(
    logits: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, L, A)
    log_prob = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, L)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, L)
    return log_prob, entropy


class _MaskedCategorical(torch.autograd.Function):
    """masked_categorical_log_prob_entropy in one C++ pass over the rows each way (csrc/decode.cpp
    `categorical_forward` / `categorical_backward`: the same formulas); p and log p are kept."""

    @staticmethod
    def forward(ctx, logits, mask, actions, module):
        log_prob, entropy, probs, log_probs = module.categorical_forward(logits, mask, actions)
        ctx.save_for_backward(mask, actions, entropy)
        ctx.module, ctx.kept = module, (probs, log_probs)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        mask, actions, entropy = ctx.saved_tensors
        probs, log_probs = ctx.kept
        grad = ctx.module.categorical_backward(
            grad_log_prob, grad_entropy, mask, actions, probs, log_probs, entropy
        )
        return grad, None, None, None


def masked_categorical_log_prob_entropy(
    logits: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor, kernel: str = "python"
) -> tuple[torch.Tensor, torch.Tensor]:
    """categorical_log_prob_entropy(masked_logits(logits, mask), actions): logits (B, L, A), mask (B, L, A)
    bool, actions (B, L) -> log-probs, entropies (B, L). Where `cpp_decode.training_kernels(kernel, logits)`
    allows (CPU float32, model.decode auto/cpp), by the C++ loops: the same maths in one pass each way
    instead of ~16 ops (~2 ms of a ~45 ms PPO update of MAT at N = 3, docs/performance.md)."""
    module = cpp_decode.training_kernels(kernel, logits)
    if module is None:
        return categorical_log_prob_entropy(masked_logits(logits, mask), actions)
    return _MaskedCategorical.apply(logits, mask, actions, module)


def gaussian_sample(
    mean: torch.Tensor, std: torch.Tensor, deterministic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    if deterministic:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise  # (B, L, A)


def gaussian_log_prob_entropy(
    mean: torch.Tensor, std: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal Gaussian, summed over action dimensions (one ratio per agent token)."""
    log_std = torch.log(std).expand_as(mean)
    log_prob = -((actions - mean) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)
    entropy = 0.5 + 0.5 * math.log(2 * math.pi) + log_std
    return log_prob.sum(-1), entropy.sum(-1)  # (B, L), (B, L)
