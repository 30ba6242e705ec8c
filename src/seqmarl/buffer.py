"""Preallocated rollout storage and GAE with terminated/truncated kept apart.

Shape legend: T rollout length, E envs, N agents, O obs, A action-mask width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqmarl.normalize import RunningMeanStd
from seqmarl.types import EnvSpec


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    episode_continues: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalised advantage estimation over (T, ...) tensors.

    next_values[t] is the value of the state reached by step t *in the same episode*: V(obs[t+1]) when
    the episode goes on, V(final_obs[t]) when it was truncated by the time limit (bootstrap), and 0 when
    it terminated. episode_continues[t] is 0 wherever step t ended the episode, so the advantage trace
    never crosses into the next episode.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        running = delta + gamma * gae_lambda * episode_continues[t] * running
        advantages[t] = running
    return advantages


def joint_value(agent_values: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The team's value: mean of the alive agents' values (REFERENCE.md 1). (..., N) -> (...)."""
    weights = alive.to(agent_values.dtype)
    return (agent_values * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


@dataclass
class RolloutBatch:
    """A finished rollout flattened to B = T * E samples, ready for minibatching."""

    obs: torch.Tensor  # (B, N, O)
    state: torch.Tensor  # (B, S)
    action_mask: torch.Tensor  # (B, N, A)
    alive: torch.Tensor  # (B, N)
    actions: torch.Tensor  # (B, N) or (B, N, A)
    log_prob: torch.Tensor  # (B, N)
    values: torch.Tensor  # (B, N) per-agent values at collection (normalised scale)
    advantages: torch.Tensor  # (B,) joint advantages, or (B, N) per-agent ones
    returns: torch.Tensor  # value targets (raw scale), same shape as advantages

    def __len__(self) -> int:
        return self.obs.shape[0]

    def index(self, idx: torch.Tensor) -> RolloutBatch:
        """The samples `idx` (a 1-D index tensor). `index_select` gathers the same values as `x[idx]`,
        ~3x faster on CPU at the update's shapes (advanced indexing goes through a generic kernel)."""
        return RolloutBatch(*(getattr(self, f).index_select(0, idx) for f in self.__dataclass_fields__))

    def agents_in_order(self, order: torch.Tensor) -> RolloutBatch:
        """The same samples with the agent axis rearranged so that position k holds agent order[k]."""
        per_agent = {"obs", "action_mask", "alive", "actions", "log_prob", "values"}
        if self.advantages.dim() == 2:
            per_agent |= {"advantages", "returns"}
        return RolloutBatch(
            *(
                getattr(self, f)[:, order] if f in per_agent else getattr(self, f)
                for f in self.__dataclass_fields__
            )
        )


class RolloutBuffer:
    def __init__(self, spec: EnvSpec, T: int, E: int, device: torch.device):
        N, O, S, A = spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.mask_width
        self.T, self.E = T, E
        z = dict(device=device)
        self.obs = torch.zeros(T, E, N, O, **z)
        self.state = torch.zeros(T, E, S, **z)
        self.action_mask = torch.zeros(T, E, N, A, dtype=torch.bool, **z)
        self.alive = torch.zeros(T, E, N, dtype=torch.bool, **z)
        action_shape = (T, E, N) if spec.discrete else (T, E, N, A)
        self.actions = torch.zeros(action_shape, dtype=torch.long if spec.discrete else torch.float32, **z)
        self.log_prob = torch.zeros(T, E, N, **z)
        self.values = torch.zeros(T, E, N, **z)  # normalised per-agent values
        self.rewards = torch.zeros(T, E, **z)
        self.terminated = torch.zeros(T, E, dtype=torch.bool, **z)
        self.truncated = torch.zeros(T, E, dtype=torch.bool, **z)
        # Per-agent values of the final observation of episodes truncated at step t (zeros elsewhere).
        self.final_values = torch.zeros(T, E, N, **z)
        self.final_alive = torch.zeros(T, E, N, dtype=torch.bool, **z)
        # The last observation/state/action mask of episodes truncated at step t (for off-policy
        # bootstrapping: QMIX's target needs the greedy action among those available there).
        self.final_obs = torch.zeros(T, E, N, O, **z)
        self.final_state = torch.zeros(T, E, S, **z)
        self.final_action_mask = torch.zeros(T, E, N, A, dtype=torch.bool, **z)

    def finish(
        self,
        last_values: torch.Tensor,
        last_alive: torch.Tensor,
        normalizer: RunningMeanStd,
        gamma: float,
        gae_lambda: float,
        per_agent: bool = False,
    ) -> RolloutBatch:
        """Advantages and returns, given the values of the observation after the last step.

        Joint (default, MAT): one advantage per env-step from the mean of the alive agents' values.
        per_agent: every agent gets its own GAE trace from its own value and the team reward (the
        "local advantage" of MAT-Dec, and MAPPO/IPPO's per-agent critics).
        """
        values = normalizer.denormalize(self.values)  # (T, E, N)
        last = normalizer.denormalize(last_values)  # (E, N)
        bootstrap = normalizer.denormalize(self.final_values)  # (T, E, N)
        rewards, truncated, terminated = self.rewards, self.truncated, self.terminated
        if per_agent:
            rewards = rewards[..., None].expand_as(values)
            truncated, terminated = truncated[..., None], terminated[..., None]
        else:
            values = joint_value(values, self.alive)  # (T, E)
            last = joint_value(last, last_alive)  # (E,)
            bootstrap = joint_value(bootstrap, self.final_alive)  # (T, E)
        following = torch.cat([values[1:], last[None]])
        next_values = torch.where(truncated, bootstrap, following)
        next_values = next_values.masked_fill(terminated, 0.0)
        continues = (~(terminated | truncated)).to(values.dtype).expand_as(values)
        advantages = compute_gae(rewards, values, next_values, continues, gamma, gae_lambda)
        returns = advantages + values

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(self.T * self.E, *x.shape[2:])

        return RolloutBatch(
            obs=flat(self.obs),
            state=flat(self.state),
            action_mask=flat(self.action_mask),
            alive=flat(self.alive),
            actions=flat(self.actions),
            log_prob=flat(self.log_prob),
            values=flat(self.values),
            advantages=flat(advantages),
            returns=flat(returns),
        )
