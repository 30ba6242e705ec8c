"""The data that crosses module boundaries: the env spec and the batched step record.

Shape legend (used in every file of the package):
    E  parallel environments        N  agents
    O  per-agent observation size   S  global state size
    A  action-mask width: number of discrete actions, or action dimension when continuous
    T  rollout length (steps per env per iteration)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiscreteActions:
    """N agents each pick one of `n` actions; some may be unavailable (see StepRecord.action_mask)."""

    n: int

    @property
    def mask_width(self) -> int:
        return self.n


@dataclass(frozen=True)
class ContinuousActions:
    """N agents each emit a `dim`-vector; the env receives it clipped to [low, high] per dimension."""

    dim: int
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def mask_width(self) -> int:
        return self.dim


ActionSpace = DiscreteActions | ContinuousActions


@dataclass(frozen=True)
class EnvSpec:
    """What a model needs to know about a task. Same for every env of a vector."""

    name: str  # full task name, e.g. "smax:3m"
    n_agents: int  # N
    obs_dim: int  # O; agents with smaller observations are zero-padded up to O
    state_dim: int  # S
    action_space: ActionSpace
    max_episode_steps: int  # the time limit after which an episode is truncated
    has_win: bool  # battle tasks report a win flag per finished episode

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, DiscreteActions)


@dataclass
class StepRecord:
    """One batched step of E environments, all tensors on the adapter's device (CPU).

    Environments reset themselves: when `terminated | truncated` is set for env e, `obs[e]`, `state[e]`,
    `action_mask[e]` and `alive[e]` already belong to the first step of the next episode, and the last
    observation of the finished episode is in `final_obs[e]` / `final_state[e]` / `final_alive[e]` /
    `final_action_mask[e]` (needed to bootstrap the value on truncation). For envs that did not finish,
    the final_* rows are copies of the current ones.

    `discarded[e]` marks an episode cut short because env e's simulator failed and was restarted
    (seqmarl/envs/guard.py): it comes with `truncated` (so GAE neither crosses it nor treats it as a
    terminal state, and bootstraps from `final_obs`, the observation the failed actions were taken at),
    zero reward, and it is no finished episode: consumers leave it out of episode statistics.
    """

    obs: torch.Tensor  # (E, N, O) float32
    state: torch.Tensor  # (E, S) float32
    action_mask: torch.Tensor  # (E, N, A) bool; all True for continuous actions
    alive: torch.Tensor  # (E, N) bool; dead agents' tokens are masked out of the losses
    reward: torch.Tensor  # (E,) float32 team reward for the step just taken (zeros after reset)
    terminated: torch.Tensor  # (E,) bool; the episode ended in a terminal state (no bootstrap)
    truncated: torch.Tensor  # (E,) bool; the episode was cut by the time limit (bootstrap the value)
    final_obs: torch.Tensor  # (E, N, O)
    final_state: torch.Tensor  # (E, S)
    final_alive: torch.Tensor  # (E, N) bool
    final_action_mask: torch.Tensor  # (E, N, A) bool; what was available there (off-policy bootstraps)
    episode_return: torch.Tensor  # (E,) float32; sum of rewards of the finished episode (valid where done)
    episode_length: torch.Tensor  # (E,) int64; steps of the finished episode (valid where done)
    won: torch.Tensor  # (E,) bool; the finished episode was won (battle tasks; False elsewhere)
    discarded: torch.Tensor  # (E,) bool; the episode was cut by a simulator restart (also truncated)

    @property
    def done(self) -> torch.Tensor:  # (E,) bool
        return self.terminated | self.truncated

    @property
    def finished(self) -> torch.Tensor:  # (E,) bool; a real episode ended here (one to count)
        return self.done & ~self.discarded

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor (checkpoints store the record the next rollout starts from)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def step_record_layout(spec: EnvSpec, num_envs: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype every StepRecord field must have for `num_envs` copies of `spec`."""
    E, N, O, S, A = num_envs, spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.mask_width
    return {
        "obs": ((E, N, O), torch.float32),
        "state": ((E, S), torch.float32),
        "action_mask": ((E, N, A), torch.bool),
        "alive": ((E, N), torch.bool),
        "reward": ((E,), torch.float32),
        "terminated": ((E,), torch.bool),
        "truncated": ((E,), torch.bool),
        "final_obs": ((E, N, O), torch.float32),
        "final_state": ((E, S), torch.float32),
        "final_alive": ((E, N), torch.bool),
        "final_action_mask": ((E, N, A), torch.bool),
        "episode_return": ((E,), torch.float32),
        "episode_length": ((E,), torch.int64),
        "won": ((E,), torch.bool),
        "discarded": ((E,), torch.bool),
    }


@dataclass
class ActOutput:
    """What a policy returns while acting. Shapes for B rows (envs) of N agents."""

    actions: torch.Tensor  # (B, N) int64 or (B, N, A) float32
    log_prob: torch.Tensor  # (B, N) (zeros for value-based algorithms)
    value: torch.Tensor  # (B, N) per-agent values, normalised scale (zeros for value-based algorithms)
    hidden: torch.Tensor | None = None  # recurrent state after this step, (B, ...), or None


@dataclass
class EvalOutput:
    """A teacher-forced pass over stored actions (the PPO update)."""

    log_prob: torch.Tensor  # (B, N)
    entropy: torch.Tensor  # (B, N)
    value: torch.Tensor  # (B, N)
