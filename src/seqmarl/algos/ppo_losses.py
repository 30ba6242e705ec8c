"""The PPO maths, written once: pure functions over tensors of any matching shape.

`mask` marks the tokens that count (alive agents); every mean is over those tokens only, so dead agents
(which can only take the no-op action in SMAX) neither dilute nor drive the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def normalize_advantages(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit std over the masked entries (the reference excludes dead agents the same way)."""
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) / (var.sqrt() + eps)


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective per token, returned as a loss to minimise, with diagnostics.

    `weight` multiplies each token's clipped objective: HAPPO's correction factor (the product of the
    already-updated agents' probability ratios, see `happo_correction`); None means 1.
    """
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    objective = torch.minimum(unclipped, clipped)
    if weight is not None:
        objective = weight * objective
    loss = -masked_mean(objective, mask)
    with torch.no_grad():
        # Schulman's low-variance KL estimator (cleanrl's approx_kl), and how often the clip bit.
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return loss, {"approx_kl": approx_kl, "clip_fraction": clip_fraction}


def happo_correction(
    factor: torch.Tensor, new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """HAPPO (Kuba et al. 2022): after agent i's update, the factor of every sample is multiplied by
    agent i's new/old probability ratio, so the next agent's advantage is corrected for the policy
    changes already made. Dead agents (forced no-op) change nothing. All (B,); no gradient flows."""
    ratio = (new_log_prob - old_log_prob).exp()
    return (factor * torch.where(alive, ratio, torch.ones_like(ratio))).detach()


def clipped_value_loss(
    value: torch.Tensor,
    old_value: torch.Tensor,
    target: torch.Tensor,
    clip: float,
    huber_delta: float | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Pessimistic (max) of the unclipped and clipped errors, as in PPO/MAPPO.

    With `huber_delta` the error is a true Huber loss (quadratic within delta, linear outside, on both
    sides; the reference's condition gives zero gradient for errors below -delta). None gives MSE.
    """
    value_clipped = old_value + (value - old_value).clamp(-clip, clip)
    if huber_delta is None:
        unclipped = 0.5 * (value - target) ** 2
        clipped = 0.5 * (value_clipped - target) ** 2
    else:
        unclipped = F.huber_loss(value, target, reduction="none", delta=huber_delta)
        clipped = F.huber_loss(value_clipped, target, reduction="none", delta=huber_delta)
    return masked_mean(torch.maximum(unclipped, clipped), mask)
