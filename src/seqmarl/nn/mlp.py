"""Feed-forward actors and critics for the baselines (MAPPO, IPPO, HAPPO) and MAT-Dec's decentralised
actor, in the style of the tuned MAPPO recipe (Yu et al. 2022): LayerNorm on the input features, ReLU
layers each followed by LayerNorm, orthogonal init, a small-gain policy output layer.

Continuous policies use the same state-independent std as MAT (sigmoid(param) * std_scale), so the
comparison with MAT is not confounded by the exploration noise.

Shape legend: B batch, N agents, I input features, H hidden width, A actions (count or dimensions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seqmarl.nn import distributions as dist
from seqmarl.nn.layers import RELU_GAIN, SMALL_GAIN, init_linear
from seqmarl.types import EnvSpec


@dataclass(frozen=True)
class MLPConfig:
    """Sizes of the feed-forward actor/critic networks."""

    hidden: int = 64  # H (MAPPO on SMAC: 64; HAPPO on MA-MuJoCo: 128)
    layers: int = 2  # hidden layers in each trunk
    agent_id: bool = True  # append a one-hot agent id to shared actors' and critics' inputs (MAPPO)
    # MAT-Dec's shared actor: append a one-hot agent id to its input too. Off by default, as the reference
    # MAT-Dec (its actor sees only the agent's own observation, and the weights stay N-free).
    mat_dec_agent_id: bool = False
    # MAPPO's centralised critic: read the agent's own observation beside the global state (Yu et al. 2022's
    # "agent-specific global state", AS). Off by default: the preset's critic reads the global state + id.
    critic_own_obs: bool = False
    std_init: float = 1.0  # continuous: initial pre-sigmoid std parameter (as MAT)
    std_scale: float = 0.5  # continuous: std = sigmoid(param) * std_scale (as MAT)


def trunk(in_dim: int, config: MLPConfig) -> nn.Sequential:
    """LayerNorm(I) -> [Linear -> ReLU -> LayerNorm] x layers: (..., I) -> (..., H)."""
    modules: list[nn.Module] = [nn.LayerNorm(in_dim)]
    width = in_dim
    for _ in range(config.layers):
        modules += [
            init_linear(nn.Linear(width, config.hidden), RELU_GAIN),
            nn.ReLU(),
            nn.LayerNorm(config.hidden),
        ]
        width = config.hidden
    return nn.Sequential(*modules)


def with_agent_id(x: torch.Tensor) -> torch.Tensor:
    """Append a one-hot agent id to each agent's features: (B, N, I) -> (B, N, I + N)."""
    B, N, _ = x.shape
    ids = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, N, N)
    return torch.cat([x, ids], dim=-1)


class Actor(nn.Module):
    """A policy on per-agent inputs: (B, L, I) features -> actions, log-probs and entropies.

    Used shared across agents (MAPPO, IPPO, MAT-Dec: L = N) or one per agent (HAPPO: L = 1)."""

    def __init__(self, in_dim: int, spec: EnvSpec, config: MLPConfig):
        super().__init__()
        self.discrete = spec.discrete
        self.config = config
        A = spec.action_space.mask_width
        self.trunk = trunk(in_dim, config)
        self.out = init_linear(nn.Linear(config.hidden, A), SMALL_GAIN)
        if not self.discrete:
            self.std_param = nn.Parameter(torch.full((A,), config.std_init))

    def _std(self) -> torch.Tensor:
        return torch.sigmoid(self.std_param) * self.config.std_scale  # (A,)

    def _head(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.out(self.trunk(x))  # (B, L, A)
        return dist.masked_logits(out, mask) if self.discrete else out

    def sample(
        self, x: torch.Tensor, mask: torch.Tensor, deterministic: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> actions (B, L) or (B, L, A), log-probs (B, L)."""
        out = self._head(x, mask)
        if self.discrete:
            actions = dist.categorical_sample(out, deterministic)
            log_prob, _ = dist.categorical_log_prob_entropy(out, actions)
        else:
            std = self._std()
            actions = dist.gaussian_sample(out, std, deterministic)
            log_prob, _ = dist.gaussian_log_prob_entropy(out, std, actions)
        return actions, log_prob

    def log_prob_entropy(
        self, x: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> log-probs (B, L), entropies (B, L) of the given actions."""
        out = self._head(x, mask)
        if self.discrete:
            return dist.categorical_log_prob_entropy(out, actions)
        return dist.gaussian_log_prob_entropy(out, self._std(), actions)


class Critic(nn.Module):
    """A value function on per-agent (or global) inputs: (B, L, I) -> (B, L)."""

    def __init__(self, in_dim: int, config: MLPConfig):
        super().__init__()
        self.trunk = trunk(in_dim, config)
        self.out = init_linear(nn.Linear(config.hidden, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x)).squeeze(-1)
